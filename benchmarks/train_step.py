"""Time of one LENS training step on the shipped synthetic world, split into where it goes.

A step of ``lens train configs/synthetic.yaml`` (8 scenes, 3 queries each) is: the frozen MLLM to layer k and
SAM's image encoder in inference mode (``inputs``), the head, descriptor and mask decoder (``forward``), then
``backward`` and the AdamW update (``optimizer``). The batches are the training run's first ones, drawn
offline from the synthetic world; the models are the shipped checkpoints.

    python benchmarks/train_step.py                      # CPU, the threads torch picks
    python benchmarks/train_step.py --threads 2 --steps 12
    python benchmarks/train_step.py --device cuda
    python benchmarks/train_step.py --threads 2 --cached   # the same steps read from a feature cache
    python benchmarks/train_step.py --threads 2 --bf16     # forward under bf16 autocast (fp32 weights)
    python benchmarks/train_step.py --threads 2 --set baseline.system=lisa   # a comparison system's step

With ``--cached`` the same batches are first written to a feature cache (``lens.cache.build_cache``, untimed),
the MLLM and SAM's image encoder are dropped as ``lens train --cache-root`` drops them, and ``inputs`` is the
padding of the cached rows into a batch (``stack_cached``); reading the rows, done by the data-loader
workers in ``lens train``, is not timed, just as drawing the rows is not timed without ``--cached``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from lens.batches import lens_inputs
from lens.cache import CachedDataset, CacheKey, build_cache
from lens.config import LensConfig
from lens.data.loader import ItemSource, Row
from lens.training import build_train_data
from lens.weights import build_lens, strip_frozen_encoders

logger = logging.getLogger("train_step")
PHASES = ("inputs", "forward", "backward", "optimizer")


def _clock(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


class _FirstItems:
    """The first ``n`` items of a dataset (an ``ItemSource``): what the timed steps draw."""

    def __init__(self, source: ItemSource, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def rows(self, index: int, epoch: int = 0) -> list[Row]:
        return self.source.rows(index, epoch)


def time_steps(
    config: LensConfig,
    device: torch.device,
    steps: int,
    warmup: int,
    cached: bool = False,
    bf16: bool = False,
) -> dict[str, list[float]]:
    """Seconds per phase for each of ``steps`` training steps, after ``warmup`` untimed ones; ``bf16`` runs
    the inputs and the forward under bf16 autocast, as ``train.mixed_precision: bf16`` does."""
    torch.manual_seed(config.train.seed)
    model = build_lens(config, device).train()
    data = build_train_data(config).train
    per_step = config.train.batch_size
    name = next(iter(data))  # the config's first training dataset (the synthetic world's scenes)
    source = _FirstItems(data[name], (warmup + steps) * per_step)
    if cached:
        key = CacheKey.from_config(config, name, "train", train=True, seed=config.train.seed)
        with tempfile.TemporaryDirectory() as directory:
            build_cache(model, source, directory, key, shard_size=len(source), batch_size=3 * per_step)
            source = CachedDataset(directory, key)
            items = [source.rows(i) for i in range(len(source))]  # read now: the files go away
        strip_frozen_encoders(model)
    else:
        items = [source.rows(i) for i in range(len(source))]
    batches = [
        [row for item in items[s * per_step : (s + 1) * per_step] for row in item]
        for s in range(warmup + steps)
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr)
    now = _clock(device)
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for index, rows in enumerate(batches):
        t0 = now()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            inputs = lens_inputs(model, rows)
            t1 = now()
            out = model(inputs)
            t2 = now()
        out.loss.backward()
        t3 = now()
        optimizer.step()
        optimizer.zero_grad()
        t4 = now()
        if index >= warmup:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[phase].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cached", action="store_true", help="time steps on a feature cache of the batches")
    parser.add_argument("--bf16", action="store_true", help="inputs and forward under bf16 autocast")
    parser.add_argument(
        "--set", action="append", default=[], help="section.key=value, e.g. baseline.system=lisa (repeatable)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = LensConfig.from_yaml(args.config).override(args.set)
    times = time_steps(config, torch.device(args.device), args.steps, args.warmup, args.cached, args.bf16)
    total = [sum(parts) for parts in zip(*times.values(), strict=True)]
    logger.info(
        "%s%s, %d threads, %d scenes x 3 queries a step%s, median of %d steps:",
        args.device,
        " bf16 autocast" if args.bf16 else "",
        torch.get_num_threads(),
        config.train.batch_size,
        ", from a feature cache" if args.cached else "",
        args.steps,
    )
    for phase, seconds in times.items():
        logger.info("  %-10s %7.3f s", phase, statistics.median(seconds))
    logger.info("  %-10s %7.3f s", "step", statistics.median(total))


if __name__ == "__main__":
    main()
