"""Pretraining of the synthetic world's small MLLM: a LLaVA-architecture model taught captions and VQA only.

The model never sees a mask: like LLaVA-1.5 it only learns to answer questions about images, which is what LENS
assumes of the frozen MLLM it plugs into. It is saved with ``save_pretrained`` and loads with
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``, exactly like LLaVA-1.5-7B.

Training has two stages: the vision tower alone learns what captions name (``lens.world.vision``), then the whole
model learns to answer with the LM loss on answer tokens (batches, shared-prefix loss and scoring are in
``lens.world.vqa``). ``init_from`` continues an existing checkpoint instead. ``skills`` adds the instruction
skills of ``lens.world.skills`` (boxes as text, intent routing, follow-ups) to the questions.

    python -m lens.world.mllm --out runs/mllm-base --skip-kind identify           # run 1 of the shipped model
    python -m lens.world.mllm --out runs/mllm-run2 --init-from runs/mllm-base --steps 1500 ...
    # runs 2-5, each continuing the last on every kind: the whole commands are in docs/pretraining.md
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from tqdm.auto import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from lens.assets import METRICS_FILE, asset_root, checkpoint_dir, checkpoint_metrics
from lens.data.synthetic import (
    Scene,
    SyntheticWorld,
    world_vocabulary,
)
from lens.data.synthetic.language import VQA_TEMPLATES
from lens.tiny import TinyLlavaSpec, build_llava, word_tokenizer
from lens.world.skills import SKILLS, check_skills, evaluate_skills, router_budget, skill_vocabulary
from lens.world.snapshots import remove_snapshot, save_snapshot
from lens.world.vision import init_vision_positions, pretrain_vision
from lens.world.vqa import (
    CAPTION_KIND,
    Batch,
    PromptParts,
    accuracy_by_kind,
    batch_loss,
    evaluate_vqa,
    make_batch,
    step_loader,
)

logger = logging.getLogger(__name__)

# The shipped model's architecture; other components are built against these sizes (a 12 x 12 image grid).
SHIPPED_SPEC = TinyLlavaSpec(
    image_size=96,
    patch_size=8,
    vision_hidden=128,
    vision_layers=4,
    vision_heads=4,
    text_hidden=192,
    text_layers=6,
    text_heads=6,
    text_kv_heads=6,
    text_intermediate=512,
    max_positions=256,
)
DEFAULT_OUT = asset_root() / "synthetic" / "mllm"  # what "lens:synthetic/mllm" resolves to


@dataclass
class MllmTrainConfig:
    """Every setting of a pretraining run; the defaults with ``skip_kinds=("identify",)`` made run 1 of the shipped one."""

    # Stage 1: the vision tower alone learns which objects a caption names (see ``pretrain_vision``).
    vision_steps: int = 1200
    vision_batch: int = 128
    vision_lr: float = 3e-3
    # Stage 2: the whole model learns to answer, with the LM loss on answer tokens.
    steps: int = 2400
    scenes_per_step: int = 64  # images per batch
    questions_per_scene: int = 16  # short-answer questions sampled per image, plus its caption
    # Question kinds never trained on (run 1 of the shipped model skipped "identify").
    skip_kinds: tuple[str, ...] = ()
    # How much likelier a question of a kind is to be drawn than one of an unlisted kind (weight 1); captions are
    # not drawn (every image has one). Empty: all questions equally likely, as in runs 1-5 of the shipped model.
    kind_weights: dict[str, float] = field(default_factory=dict)
    lr: float = 2e-3
    vision_lr_scale: float = 0.5  # vision tower and projector learn slower: they arrive pretrained
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    fan_in_init: bool = True  # std 1/sqrt(fan_in) instead of 0.02: shorter plateau before the image is used
    sincos_init: bool = True  # vision position embeddings start as 2-D sine-cosine codes
    seed: int = 0  # model initialisation and data order
    world_seed: int = 0
    num_threads: int = 1
    num_workers: int = 0  # processes rendering scenes and building batches (0: in the training process)
    bf16_autocast: bool = True  # bf16 matmuls, fp32 weights: ~2x faster on CPUs with AVX512-BF16
    # For training only; None: eager on CPU (faster under autocast), sdpa on GPU.
    attn_implementation: str | None = None
    init_from: str | None = None  # continue from this checkpoint (skips stage 1 and the initialisation)
    eval_scenes: int = 200  # first scenes of the test split used for the final VQA evaluation
    eval_batch_size: int = 64
    log_every: int = 25
    # Steps between snapshots of the weights to ``<out>/snapshot`` (0: none). A run stopped early (a CPU session
    # ending) leaves a checkpoint that ``init_from`` continues.
    save_every: int = 0
    # End the run after this many steps of a ``steps``-long schedule (None: all of it), saving and evaluating as
    # a finished run does: how a run cut short by a session's end is reproduced from one command.
    stop_after: int | None = None
    # The world's phrasing of questions and queries ("canonical": today's text; "varied": seen compositional pools).
    phrasing: str = "canonical"
    # Instruction skills trained besides VQA (``lens.world.skills.SKILLS``); a skill's name is its kind in
    # ``kind_weights``. Empty: VQA and captions only, exactly as every run before skills existed.
    skills: tuple[str, ...] = ()
    skill_eval_scenes: int = 100  # first test scenes the skills are scored on
    router_eval_scenes: int = 20  # ... of which routed by the agent's Router too (label likelihoods)
    spec: TinyLlavaSpec = field(default_factory=lambda: dataclasses.replace(SHIPPED_SPEC))

    def __post_init__(self) -> None:
        check_skills(self.skills)
        known = set(VQA_TEMPLATES) | set(self.skills)
        unknown = sorted((set(self.skip_kinds) - set(VQA_TEMPLATES)) | (set(self.kind_weights) - known))
        if unknown:
            raise ValueError(f"unknown question kinds {unknown}; the world asks {sorted(known)}")
        bad = {
            kind: w for kind, w in self.kind_weights.items() if kind == CAPTION_KIND or not 0 < w < math.inf
        }
        if bad:
            raise ValueError(f"kind weights must be positive, finite and not for captions, got {bad}")
        if self.init_from is not None:
            checkpoint_dir(self.init_from)
        self.world()  # an unknown phrasing is a ValueError naming the world's phrasings
        if self.stop_after is not None and not 0 < self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in 1..steps ({self.steps}), got {self.stop_after}")

    @property
    def extended(self) -> bool:
        """Whether the run reads text beyond the shipped vocabulary (skills or a non-canonical phrasing)."""
        return bool(self.skills) or self.phrasing != "canonical"

    def world(self) -> SyntheticWorld:
        """The world of the run (canonical phrasing: today's world)."""
        return SyntheticWorld(seed=self.world_seed, phrasing=self.phrasing)

    def vocabulary(self) -> list[str]:
        """Words of a fresh model's tokenizer: the shipped list, or the extended one when the run needs it."""
        return skill_vocabulary() if self.extended else world_vocabulary()

    @property
    def last_step(self) -> int:
        """Number of steps the run takes (its schedule may be longer: ``stop_after``)."""
        return self.stop_after or self.steps


class _QuestionBatches(torch.utils.data.Dataset):
    """Stage-2 batch of each step: the step's scenes of ``order`` with questions drawn by its own generator."""

    def __init__(
        self,
        train: Sequence[Scene],
        order: np.ndarray,
        processor: LlavaProcessor,
        parts: PromptParts,
        cfg: MllmTrainConfig,
        budget: int = 0,
    ) -> None:
        self.train, self.order, self.processor, self.parts, self.cfg = train, order, processor, parts, cfg
        self.budget = budget  # the router's text budget on this model, for intent turns

    def __len__(self) -> int:
        return self.cfg.last_step

    def __getitem__(self, step: int) -> Batch:
        rng = np.random.default_rng([self.cfg.seed, 2, step])
        chosen = self.order[step * self.cfg.scenes_per_step : (step + 1) * self.cfg.scenes_per_step]
        scenes = [self.train[int(i)] for i in chosen]
        cfg = self.cfg
        return make_batch(
            scenes,
            self.processor,
            self.parts,
            cfg.questions_per_scene,
            rng,
            cfg.skip_kinds,
            cfg.kind_weights,
            cfg.skills,
            self.budget,
        )


def _fan_in_init(model: LlavaForConditionalGeneration, num_layers: int, seed: int) -> None:
    """Re-draw every linear weight but the LM head with std 1/sqrt(fan_in), residual outputs (attention and MLP
    output projections, vision tower included) further divided by sqrt(2 * num_layers) as in GPT-2.

    HF's std 0.02 makes attention nearly uniform over the 144 image tokens at first, prolonging the plateau.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                std = module.in_features**-0.5
                if name.endswith(("o_proj", "down_proj", "out_proj", "fc2")):
                    std /= math.sqrt(2 * num_layers)
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)


def build_model(cfg: MllmTrainConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained model of a run: ``build_llava`` over the world's vocabulary, then our initialisation."""
    model, processor = build_llava(cfg.vocabulary(), cfg.spec, seed=cfg.seed)
    if cfg.fan_in_init:
        _fan_in_init(model, cfg.spec.text_layers, cfg.seed)
    if cfg.sincos_init:
        init_vision_positions(model)
    return model, processor


def grow_vocabulary(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, words: Sequence[str], seed: int = 0
) -> list[str]:
    """Append the ``words`` the tokenizer lacks after its last id and resize the embeddings; returns them.

    Old ids keep their rows, so the model computes exactly what it did on text of the old vocabulary; new input
    and output rows start at the mean of the old ones (HF's ``mean_resizing``; its covariance sampling is used
    only when the old rows' covariance is positive definite, which it is not for fewer rows than dimensions).
    """
    vocab = processor.tokenizer.get_vocab()
    new = [w for w in dict.fromkeys(words) if w not in vocab]
    if not new:
        return []
    old = sorted(vocab, key=vocab.__getitem__)  # in id order: word_tokenizer gives ids in list order
    tokenizer = word_tokenizer([*old, *new])
    if [tokenizer.convert_tokens_to_ids(w) for w in old] != list(range(len(old))):
        raise RuntimeError(
            "growing the vocabulary would move old ids; is the tokenizer not word_tokenizer's?"
        )
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    processor.tokenizer = tokenizer
    return new


def _lr_factor(step: int, cfg: MllmTrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, cfg: MllmTrainConfig) -> torch.optim.Optimizer:
    """AdamW; 1-D parameters (norms, biases) are not decayed, as in nanoGPT; the image side at a lower rate."""
    groups = []
    for image_side in (True, False):
        params = [
            p for n, p in model.named_parameters() if ("vision_tower" in n or "projector" in n) == image_side
        ]
        lr = cfg.lr * (cfg.vision_lr_scale if image_side else 1.0)
        groups.append(
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": lr}
        )
        groups.append({"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _scene_order(size: int, steps: int, per_step: int, rng: np.random.Generator) -> np.ndarray:
    """Scene indices for the whole run: fresh permutations of the split, one after another."""
    epochs = math.ceil(steps * per_step / size)
    return np.concatenate([rng.permutation(size) for _ in range(epochs)])[: steps * per_step]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _snapshot(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    out_dir: Path,
    step: int,
    cfg: MllmTrainConfig,
    curve: list[dict],
    history: dict | None,
) -> Path:
    """Snapshot the weights at ``step`` with the run so far; ``history``, the metrics of the run this one
    continued, comes along, so a run continued from the snapshot keeps the whole history."""
    progress = {"step": step, "config": dataclasses.asdict(cfg), "learning_curve": curve}
    if history is not None:
        progress["init_from_metrics"] = history
    return save_snapshot(model, processor, out_dir, progress)


def pretrain(
    cfg: MllmTrainConfig, out_dir: Path | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, list[dict]]:
    """Train a freshly initialised model; returns it (in eval mode, on CPU), its processor and the learning curve.

    Each curve point holds the mean loss and the teacher-forced accuracy per question kind over the last
    ``log_every`` steps. Scenes are seen once, so accuracy before each update is held-out accuracy. With
    ``cfg.save_every`` and an ``out_dir``, the weights are also saved every that many steps (``_snapshot``).
    """
    torch.set_num_threads(cfg.num_threads)
    device = _device()
    rng = np.random.default_rng(cfg.seed)
    if cfg.init_from is None:
        model, processor = build_model(cfg)
    else:
        source = checkpoint_dir(cfg.init_from)
        model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(source)
        if cfg.extended:
            added = grow_vocabulary(model, processor, cfg.vocabulary(), cfg.seed)
            logger.info("vocabulary grown by %d words to %d", len(added), len(processor.tokenizer))
    model.set_attn_implementation(cfg.attn_implementation or ("eager" if device.type == "cpu" else "sdpa"))
    model.to(device).train()
    if cfg.vision_steps and cfg.init_from is None:
        pretrain_vision(model, processor, cfg)
    parts = PromptParts.of(processor)
    optimizer = _optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    train = cfg.world().split("train")
    order = _scene_order(len(train), cfg.steps, cfg.scenes_per_step, rng)
    logger.info("training %.2fM parameters for %d steps on %s", _millions(model), cfg.last_step, device)

    window, curve = [], []
    # The continued run's metrics, read once for every snapshot.
    history = checkpoint_metrics(cfg.init_from) if cfg.init_from is not None else None
    dataset = _QuestionBatches(train, order, processor, parts, cfg, router_budget(model))
    batches = step_loader(dataset, cfg.num_workers)
    for step, batch in enumerate(tqdm(batches, desc="mllm", disable=None)):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            loss, results = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        window.append((loss.item(), results))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.last_step:
            point = {
                "step": step + 1,
                "loss": float(np.mean([w[0] for w in window])),
                "accuracy": accuracy_by_kind([r for w in window for r in w[1]]),
            }
            curve.append(point)
            logger.info("step %d loss %.4f accuracy %s", point["step"], point["loss"], point["accuracy"])
            window = []
        # The last step needs no snapshot: the finished model is saved in its place.
        due = cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.last_step
        if out_dir is not None and due:
            _snapshot(model, processor, out_dir, step + 1, cfg, curve, history)
    model.set_attn_implementation("sdpa")  # what from_pretrained picks too
    return model.eval().to("cpu"), processor, curve


def train_mllm(cfg: MllmTrainConfig, out_dir: str | Path, command: str = "") -> dict[str, Any]:
    """Pretrain, save to ``out_dir``, reload from disk and evaluate VQA on the test split.

    Returns the metrics also written to ``out_dir/metrics.json``.
    """
    out_dir = Path(out_dir)
    start = time.perf_counter()
    model, processor, curve = pretrain(cfg, out_dir)
    train_seconds = time.perf_counter() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_snapshot(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    # Evaluate what was written, loaded the way every user of the checkpoint loads it.
    device = _device()
    model = LlavaForConditionalGeneration.from_pretrained(out_dir).to(device)
    processor = AutoProcessor.from_pretrained(out_dir)
    start = time.perf_counter()
    test = cfg.world().split("test")[: cfg.eval_scenes]
    # "overall" covers the kinds the model was trained on; kinds it skipped are scored apart, not mixed in.
    trained_kinds = [kind for kind in VQA_TEMPLATES if kind not in cfg.skip_kinds]
    vqa = evaluate_vqa(model, processor, test, batch_size=cfg.eval_batch_size, kinds=trained_kinds)
    metrics = {
        "vqa_test": vqa,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({cfg.num_threads} threads)",
        "command": command,
        "config": dataclasses.asdict(cfg),
        "learning_curve": curve,
    }
    if cfg.skills:
        start = time.perf_counter()
        skill_test = cfg.world().split("test")[: cfg.skill_eval_scenes]
        metrics["skills_test"] = evaluate_skills(
            model, processor, skill_test, cfg.eval_batch_size, cfg.router_eval_scenes, cfg.seed
        )
        metrics["skills_eval_seconds"] = round(time.perf_counter() - start, 1)
    if cfg.skip_kinds:
        metrics["vqa_test_skipped_kinds"] = evaluate_vqa(
            model, processor, test, batch_size=cfg.eval_batch_size, kinds=cfg.skip_kinds
        )
    if cfg.init_from is not None:  # keep the history: the run this one continued
        metrics["init_from_metrics"] = checkpoint_metrics(cfg.init_from)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("VQA accuracy on %d test questions: %.4f", vqa["num_questions"], vqa["overall"])
    return metrics


def _millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def parse_kind_weights(items: Sequence[str]) -> dict[str, float]:
    """``["identify=3"]`` -> ``{"identify": 3.0}``; a malformed item is a ValueError naming it."""
    weights = {}
    for item in items:
        kind, _, value = item.partition("=")
        try:
            if not kind.strip():
                raise ValueError
            weights[kind.strip()] = float(value)  # no "=" leaves value "", which float refuses too
        except ValueError:
            raise ValueError(f"--kind-weight takes KIND=WEIGHT, e.g. identify=3; got {item!r}") from None
    return weights


app = typer.Typer(add_completion=False)


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="directory for the checkpoint and metrics.json")] = DEFAULT_OUT,
    steps: Annotated[int, typer.Option(help="whole-model optimizer steps")] = MllmTrainConfig.steps,
    scenes_per_step: Annotated[
        int, typer.Option(help="images per whole-model step")
    ] = MllmTrainConfig.scenes_per_step,
    lr: Annotated[float, typer.Option(help="whole-model peak learning rate")] = MllmTrainConfig.lr,
    questions_per_scene: Annotated[
        int, typer.Option(help="questions (and skill items) drawn per image, besides its caption")
    ] = MllmTrainConfig.questions_per_scene,
    vision_steps: Annotated[
        int, typer.Option(help="vision-tower steps (stage 1)")
    ] = MllmTrainConfig.vision_steps,
    vision_batch: Annotated[int, typer.Option(help="images per vision step")] = MllmTrainConfig.vision_batch,
    seed: Annotated[int, typer.Option(help="initialisation and data order")] = MllmTrainConfig.seed,
    num_threads: Annotated[int, typer.Option(help="CPU threads for torch")] = MllmTrainConfig.num_threads,
    num_workers: Annotated[int, typer.Option(help="batch-building processes")] = MllmTrainConfig.num_workers,
    eval_scenes: Annotated[
        int, typer.Option(help="test scenes to evaluate on")
    ] = MllmTrainConfig.eval_scenes,
    init_from: Annotated[
        str | None, typer.Option(help="continue training this checkpoint (no stage 1, no re-initialisation)")
    ] = None,
    skip_kind: Annotated[
        list[str] | None, typer.Option(help="a question kind not to train on (repeatable)")
    ] = None,
    kind_weight: Annotated[
        list[str] | None,
        typer.Option(help="KIND=W: draw questions of KIND W times as often as others (repeatable)"),
    ] = None,
    warmup_steps: Annotated[int, typer.Option(help="linear warmup steps")] = MllmTrainConfig.warmup_steps,
    save_every: Annotated[
        int, typer.Option(help="steps between weight snapshots to OUT/snapshot (0: none)")
    ] = MllmTrainConfig.save_every,
    stop_after: Annotated[
        int | None, typer.Option(help="end after this many steps of the --steps schedule (saved, evaluated)")
    ] = None,
    phrasing: Annotated[
        str, typer.Option(help="the world's phrasing: canonical (today's text) or varied")
    ] = MllmTrainConfig.phrasing,
    skill: Annotated[
        list[str] | None,
        typer.Option(help=f"an instruction skill to train too, one of {list(SKILLS)} (repeatable)"),
    ] = None,
    skill_eval_scenes: Annotated[
        int, typer.Option(help="test scenes the skills are scored on")
    ] = MllmTrainConfig.skill_eval_scenes,
) -> None:
    """Pretrain the synthetic world's small MLLM on captions and VQA and save it as a LLaVA checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = MllmTrainConfig(
            kind_weights=parse_kind_weights(kind_weight or ()),
            steps=steps,
            scenes_per_step=scenes_per_step,
            lr=lr,
            questions_per_scene=questions_per_scene,
            vision_steps=vision_steps,
            vision_batch=vision_batch,
            seed=seed,
            num_threads=num_threads,
            num_workers=num_workers,
            eval_scenes=eval_scenes,
            init_from=init_from,
            skip_kinds=tuple(skip_kind or ()),
            warmup_steps=warmup_steps,
            save_every=save_every,
            stop_after=stop_after,
            phrasing=phrasing,
            skills=tuple(skill or ()),
            skill_eval_scenes=skill_eval_scenes,
        )
    except (
        ValueError,
        FileNotFoundError,
        TypeError,
    ) as error:  # a bad --skip-kind, --kind-weight, --init-from...
        raise typer.BadParameter(str(error)) from None
    command = shlex.join(["python", "-m", "lens.world.mllm", *sys.argv[1:]])
    train_mllm(cfg, out, command=command)


if __name__ == "__main__":
    app()
