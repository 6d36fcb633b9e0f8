# The two commands of the README. Both set up first, so a fresh clone needs nothing else.
# setup installs torch==2.13.0 from pip's configured index (a CUDA wheel installed before is kept).
PYTHON ?= python3

.PHONY: setup demo test lint

setup:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

demo: setup
	lens demo

# ruff covers every Python file and every Python block in the Markdown files of the repository
test: setup lint
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Regenerate the shipped synthetic-world models (docs/pretraining.md has the times and numbers: the first runs
# of the MLLM and SAM were trained on a GPU, their continuations and the head on CPU; each command uses a GPU
# when there is one).
ASSETS := src/lens/assets/synthetic
.PHONY: world
world: setup
	$(PYTHON) -m lens.world.mllm --out runs/mllm-base --num-workers 10 --skip-kind identify
	$(PYTHON) -m lens.world.mllm --out runs/mllm-run2 --init-from runs/mllm-base --steps 1500 --scenes-per-step 32 \
		--num-threads 2 --num-workers 1 --lr 1e-3 --warmup-steps 20 --seed 3 --save-every 100
	$(PYTHON) -m lens.world.mllm --out runs/mllm-run3 --init-from runs/mllm-run2 --steps 1300 --scenes-per-step 32 \
		--num-threads 2 --num-workers 1 --lr 1e-3 --warmup-steps 20 --seed 4 --save-every 100
	$(PYTHON) -m lens.world.mllm --out runs/mllm-run4a --init-from runs/mllm-run3 --steps 1300 --stop-after 700 \
		--scenes-per-step 32 --num-threads 2 --num-workers 1 --lr 1e-3 --warmup-steps 20 --seed 5 --save-every 100
	$(PYTHON) -m lens.world.mllm --out runs/mllm-run4b --init-from runs/mllm-run4a --steps 1000 --scenes-per-step 32 \
		--num-threads 2 --num-workers 1 --lr 1e-3 --warmup-steps 20 --seed 6 --save-every 100
	$(PYTHON) -m lens.world.mllm --out runs/mllm-run5a --init-from runs/mllm-run4b --steps 1300 --stop-after 1000 \
		--scenes-per-step 32 --num-threads 2 --num-workers 1 --lr 1e-3 --warmup-steps 20 --seed 7 --save-every 100
	$(PYTHON) -m lens.world.mllm --out $(ASSETS)/mllm --init-from runs/mllm-run5a --steps 800 --scenes-per-step 32 \
		--num-threads 2 --num-workers 1 --lr 5e-4 --warmup-steps 20 --seed 8 --save-every 100
	$(PYTHON) -m lens.world.sam --out runs/sam-base --render-workers 6
	$(PYTHON) -m lens.world.sam --out $(ASSETS)/sam --init-from runs/sam-base --steps 3000 --lr 1e-3 \
		--warmup-steps 50 --seed 1 --num-threads 2 --render-workers 2
	rm -rf runs/synthetic
	lens train configs/synthetic.yaml --output-dir runs/synthetic
	rm -rf $(ASSETS)/lens && cp -r runs/synthetic/model $(ASSETS)/lens
	lens eval $(ASSETS)/lens --splits synthetic/test --output-dir runs/synthetic-eval
