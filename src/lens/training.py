"""Training with Hugging Face Accelerate: one loop for CPU, one GPU, DDP and DeepSpeed ZeRO-2 (paper §4.1).

Optimisation follows LISA as the paper says: AdamW (betas 0.9 / 0.95), linear warm-up then linear decay by
steps, gradient accumulation, clipping at 1.0, bf16 autocast on GPU. Only the trainable parts (head,
descriptor, [CLS] position, SAM mask decoder) reach the optimizer and the checkpoints.

``output_dir`` holds ``checkpoints/`` (``lens.checkpoints``: resumable, written safely), ``train_log.jsonl``
(losses and lr per step, validation metrics), ``val/step_XXXXXXX/`` (evaluation files) and, at the end,
``model/`` (``lens.weights.load_lens``). Resuming restores every piece of state, so the resumed run takes
exactly the steps the uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from lens.assets import resolve_model_id
from lens.batches import lens_inputs
from lens.cache import (
    MANIFEST_NAME,
    CachedDataset,
    CacheKey,
    build_cache,
    finalize_cache,
)
from lens.checkpoints import (
    CHECKPOINTS,
    STEP_NAME,
    TrainProgress,
    keep_trainable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lens.config import LensConfig, TrainConfig
from lens.data.loader import (
    ItemSource,
    MixtureBatchSampler,
    MixtureDataset,
    Row,
    build_eval_dataset,
    build_train_datasets,
    collate_rows,
    train_ratios,
)
from lens.data.mixing import MixtureSampler
from lens.data.registry import REASON_SEG, get_dataset
from lens.evaluation import EvalSplit, evaluate
from lens.model import LensModel
from lens.rundir import check_output_dir, clear, save_run_config
from lens.weights import build_lens, build_lens_for_cache, load_lens_weights, save_lens_weights

logger = logging.getLogger(__name__)

FINAL = "model"
LOG_NAME = "train_log.jsonl"
TENSORBOARD = "tensorboard"
RUN_OUTPUT = (CHECKPOINTS, FINAL, LOG_NAME, "val", TENSORBOARD)  # a directory holding any of these is a run
LOSS_NAMES = ("loss", "dice_loss", "bce_loss", "attention_loss")  # a baseline names its own (``loss_names``)


@dataclass
class TrainData:
    train: dict[str, ItemSource]  # mixture name -> items (raw rows or cached features)
    ratios: dict[str, float]
    val: EvalSplit | None = None


def val_dataset_name(config: LensConfig, cache_root: str | Path | None = None) -> str | None:
    """The dataset validated on during training: the first plug-in of ``data.datasets`` that has evaluation
    splits, else ReasonSeg (as LISA), if configured (or cached under ``cache_root``)."""
    data = config.data
    candidates = [n for n in data.datasets if get_dataset(n).eval_reader is not None] + [REASON_SEG]
    for name in candidates:
        if cache_root is not None:
            found = (Path(cache_root) / name / data.val_split / MANIFEST_NAME).is_file()
        else:
            found = get_dataset(name).configured(data)
        if found:
            return name
    return None


def build_train_data(config: LensConfig, cache_root: str | Path | None = None) -> TrainData:
    """Training datasets from ``config.data``, or from ``cache_root/{dataset}/{train,<val_split>}`` caches."""
    data, seed, split = config.data, config.train.seed, config.data.val_split
    val_name = val_dataset_name(config, cache_root)
    if cache_root is None:
        val = None if val_name is None else build_eval_dataset(data, val_name, split)
        train: dict[str, ItemSource] = dict(build_train_datasets(data, seed))
        ratios = train_ratios(data)
    else:
        root, key = Path(cache_root), CacheKey.from_config
        names = sorted(d.name for d in root.iterdir() if (d / "train" / MANIFEST_NAME).is_file())
        if not names:
            raise FileNotFoundError(f"no training caches under {root} (expected {root}/<dataset>/train/)")
        train = {n: CachedDataset(root / n / "train", key(config, n, "train", True, seed)) for n in names}
        ratios = train_ratios(data)
        val = (
            None
            if val_name is None
            else CachedDataset(root / val_name / split, key(config, val_name, split, False))
        )
    return TrainData(train, ratios, None if val is None else EvalSplit(val_name, split, val))


def cache_datasets(
    config: LensConfig,
    cache_root: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    shard_size: int = 256,
    batch_size: int = 8,
) -> list[Path]:
    """Build feature caches under ``cache_root/{dataset}/{split}``.

    ``splits`` holds "train" (every training dataset, rows as drawn at epoch 0), bare split names of the
    validation dataset ("val") and evaluation labels ("reason_seg/test", "refcoco/testA"; reference prompts).
    Resumable; under ``accelerate launch`` the shards are spread over the processes.
    """
    accelerator = Accelerator()
    model = build_lens(config, accelerator.device)
    data, seed = config.data, config.train.seed
    jobs: list[tuple[str, str, ItemSource, bool]] = []
    if "train" in splits:
        jobs += [(name, "train", ds, True) for name, ds in build_train_datasets(data, seed).items()]
    for entry in (s for s in splits if s != "train"):
        name, split = entry.split("/", 1) if "/" in entry else (val_dataset_name(config), entry)
        if name is None:
            raise ValueError(f"no validation dataset configured for split {entry!r}")
        jobs.append((name, split, build_eval_dataset(data, name, split), False))
    out = []
    for name, split, dataset, is_train in jobs:
        key = CacheKey.from_config(config, name, split, train=is_train, seed=seed)
        directory = Path(cache_root) / name / split
        rank, world = accelerator.process_index, accelerator.num_processes
        build_cache(model, dataset, directory, key, shard_size, batch_size, rank, world)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and world > 1:
            finalize_cache(directory)
        out.append(directory)
    return out


@dataclass
class _Run:
    """What one training run holds between its steps."""

    config: LensConfig
    output_dir: Path
    accelerator: Accelerator
    model: Any  # LensModel, wrapped by Accelerate (DDP / DeepSpeed) for forward and backward
    unwrapped: LensModel
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
    batches: MixtureBatchSampler
    progress: TrainProgress
    val: EvalSplit | None

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_NAME


def train(
    config: LensConfig,
    output_dir: str | Path,
    resume: bool = False,
    *,
    model: LensModel | None = None,
    data: TrainData | None = None,
    cache_root: str | Path | None = None,
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Train LENS as ``config`` says; returns this run's log records (also in ``train_log.jsonl``).

    The paper's §3.4: the trainable parts (head, descriptor, SAM's mask decoder) learn end to end from
    L = λ_dice·Dice + λ_bce·BCE + L_attn while the MLLM stays frozen. Steps: build, resume, loop (with
    validation and checkpoints), save.

    Arguments:
        resume: continue from ``output_dir``'s latest checkpoint (refused without it when one exists).
        model: a ready model (tests, custom backbones); default ``build_lens`` / ``build_lens_for_cache``.
        data: ready datasets; default ``build_train_data(config, cache_root)``.
        cache_root: read features from ``lens cache`` output instead of running the MLLM.
        stop_at_step: end this run early (e.g. a time-limited job); ``resume`` continues it.
        overwrite: remove an earlier run's output in ``output_dir`` first (refused without this or ``resume``).
    """
    if stop_at_step is not None and stop_at_step < 1:
        raise ValueError(f"stop_at_step must be >= 1, got {stop_at_step}")
    output_dir = Path(output_dir)
    start = None if overwrite else latest_checkpoint(output_dir)
    if start is not None and not resume:
        raise FileExistsError(f"{output_dir} already has checkpoints: --resume, or train into a new folder")
    stale = check_output_dir(output_dir, config, resume, overwrite, start is not None, RUN_OUTPUT)
    run = _build(config, output_dir, model, data, cache_root, warm_start=start is None)
    if run.accelerator.is_main_process:
        clear(output_dir, stale)
        save_run_config(output_dir, config)
    run.accelerator.wait_for_everyone()
    _resume(run, start)
    records = _loop(run, min(config.train.max_steps, stop_at_step or config.train.max_steps))
    _save_final(run)
    return records


def _accelerator(tc: TrainConfig, output_dir: Path) -> Accelerator:
    return Accelerator(
        mixed_precision=tc.mixed_precision if torch.cuda.is_available() else "no",
        gradient_accumulation_steps=tc.grad_accum_steps,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_config=ProjectConfiguration(str(output_dir), logging_dir=str(output_dir / TENSORBOARD)),
        # frozen parts get no gradient hooks; their buffers are fixed by the config, so never re-broadcast
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)],
    )


def _build(
    config: LensConfig,
    output_dir: Path,
    model: LensModel | None,
    data: TrainData | None,
    cache_root: str | Path | None,
    warm_start: bool,
) -> _Run:
    """Model, data, optimizer (AdamW over the trainable parameters only), schedule and loader."""
    tc = config.train
    accelerator = _accelerator(tc, output_dir)
    set_seed(tc.seed)
    if model is None:
        model = (build_lens_for_cache if cache_root else build_lens)(config, accelerator.device)
    if tc.init_from is not None and warm_start:  # a resumed run's checkpoint holds newer weights
        load_lens_weights(model, resolve_model_id(tc.init_from))
        logger.info("trainable weights start from %s", tc.init_from)
    data = data or build_train_data(config, cache_root)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    logger.info("trainable parameters: %d (%d frozen tensors)", sum(p.numel() for p in params), frozen)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = get_scheduler(tc.lr_schedule, optimizer, tc.warmup_steps, tc.max_steps)
    batches = MixtureBatchSampler(
        MixtureSampler(data.train, data.ratios, seed=tc.seed),
        tc.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
    )
    loader = DataLoader(
        MixtureDataset(data.train),
        batch_sampler=batches,
        collate_fn=collate_rows,
        num_workers=config.data.num_workers,
        generator=torch.Generator().manual_seed(tc.seed),  # the global RNG stays untouched by the loader
    )
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=tc.batch_size, gradient_clipping=tc.max_grad_norm)
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = TrainProgress(batches)
    # progress is saved as JSON by save_checkpoint, never registered with Accelerate (it would pickle it)
    accelerator.register_save_state_pre_hook(keep_trainable)
    unwrapped: LensModel = accelerator.unwrap_model(wrapped)
    return _Run(
        config, output_dir, accelerator, wrapped, unwrapped, params, optimizer, scheduler, loader, batches,
        progress, data.val,
    )  # fmt: skip


def _resume(run: _Run, start: Path | None) -> None:
    """Restore the latest checkpoint (weights, optimizer, schedule, RNG, sampler) and cut the log to it."""
    if start is not None:
        load_checkpoint(run.accelerator, run.unwrapped, start, run.progress)
        logger.info("resumed from %s at step %d", start, run.progress.step)
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        path = run.log_path
        kept = list(map(json.loads, path.read_text().splitlines())) if start and path.is_file() else []
        _write_log(path, [r for r in kept if r["step"] <= run.progress.step], mode="w")
    run.accelerator.init_trackers("lens")


def _loop(run: _Run, stop: int) -> list[dict[str, Any]]:
    """Optimizer steps until ``stop``: forward, L, backward, clip, step; log, validate and checkpoint."""
    tc, accelerator, progress = run.config.train, run.accelerator, run.progress
    names = tuple(getattr(run.unwrapped, "loss_names", LOSS_NAMES))  # "loss" first, then its terms
    records: list[dict[str, Any]] = []
    sums = torch.zeros(len(names), dtype=torch.float64)
    micro = 0
    bar = tqdm(
        total=tc.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train"
    )
    run.model.train()
    last_rows: list[Row] = []
    for rows in run.loader if progress.step < stop else []:
        run.batches.mark_consumed()
        with accelerator.accumulate(run.model):
            # An item may hold no query (an image without a usable class): rerun the previous rows with zero
            # weight, so every process still takes part in the gradient all-reduce.
            weight, last_rows = (1.0, rows) if rows else (0.0, last_rows)
            if not last_rows:
                raise ValueError("the first training batch holds no query")
            out = run.model(lens_inputs(run.unwrapped, last_rows))
            accelerator.backward(out.loss * weight)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(run.params, tc.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        if rows:
            sums += torch.tensor(
                [out.loss.item(), *(out.losses[n].item() for n in names[1:])], dtype=torch.float64
            )
            micro += 1
        if not accelerator.sync_gradients:
            continue
        lr = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        progress.step += 1
        means = accelerator.reduce((sums / max(micro, 1)).to(accelerator.device), "mean").tolist()
        record = {"step": progress.step, **dict(zip(names, means, strict=True)), "lr": lr}
        sums.zero_()
        micro = 0
        if run.val is not None and (
            progress.step == tc.max_steps or (tc.eval_every and progress.step % tc.eval_every == 0)
        ):
            record.update(_validate(run.unwrapped, run.val, run.output_dir, progress.step, tc, accelerator))
        records.append(record)
        if accelerator.is_main_process:
            _write_log(run.log_path, [record])
        if progress.step % tc.log_every == 0 or "val_giou" in record:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=progress.step)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if progress.step % tc.save_every == 0 or progress.step == stop:
            save_checkpoint(
                accelerator, run.unwrapped, progress.step, run.output_dir, tc.keep_checkpoints, progress
            )
        if progress.step >= stop:
            break
    bar.close()
    return records


def _validate(
    model: LensModel,
    split: EvalSplit,
    output_dir: Path,
    step: int,
    tc: TrainConfig,
    accelerator: Accelerator,
) -> dict[str, float]:
    """gIoU / cIoU on the first ``train.eval_limit`` validation items; files in ``val/step_XXXXXXX``."""
    out_dir = output_dir / "val" / STEP_NAME.format(step)
    results = evaluate(
        model, [split], out_dir, tc.eval_batch_size, accelerator, tc.eval_limit, replace_stale=True
    )
    overall = results["splits"][split.label]["overall"]
    return {"val_giou": overall["giou"], "val_ciou": overall["ciou"]}


def _save_final(run: _Run) -> None:
    """Once the last step is done: the loadable checkpoint ``output_dir/model`` (``lens.weights.load_lens``)."""
    if run.progress.step >= run.config.train.max_steps and run.accelerator.is_main_process:
        save_lens_weights(run.unwrapped, run.output_dir / FINAL)
    run.accelerator.end_training()


def _write_log(path: Path, records: list[dict[str, Any]], mode: str = "a") -> None:
    with path.open(mode) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
