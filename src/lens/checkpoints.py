"""Training checkpoints: what a resumable step holds, how it is written safely, and how a run finds it.

``output_dir/checkpoints/step_XXXXXXX/`` is Accelerate's state (trainable weights, optimizer, scheduler, RNG
states, sampler position) plus ``lens/``, a loadable LENS checkpoint; ``checkpoints/latest`` names the newest.
A checkpoint is written to a temporary folder and renamed, so a crash never leaves a half-written one behind
``latest``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from lens.data.loader import MixtureBatchSampler
from lens.model import LensModel
from lens.weights import load_lens_weights, save_lens_weights

logger = logging.getLogger(__name__)

CHECKPOINTS, LATEST = "checkpoints", "latest"
LENS_SUBDIR = "lens"
STEP_NAME = "step_{:07d}"


class TrainProgress:
    """Checkpointed with Accelerate (``register_for_checkpointing``): the step and the sampler position."""

    def __init__(self, batches: MixtureBatchSampler):
        self.step, self.batches = 0, batches

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.batches.load_state_dict(state["batches"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(output_dir) / CHECKPOINTS / LATEST
    return pointer.parent / pointer.read_text().strip() if pointer.is_file() else None


def keep_trainable(models: list, weights: list[dict[str, torch.Tensor]], _directory: str) -> None:
    """Accelerate save hook: checkpoint the trainable tensors only (the frozen MLLM is referenced by id)."""
    for model, state in zip(models, weights, strict=True):
        trainable = set(getattr(model, "module", model).trainable_names())
        for name in [n for n in state if n.removeprefix("module.") not in trainable]:
            del state[name]


def save_checkpoint(
    accelerator: Accelerator, model: LensModel, step: int, output_dir: Path, keep: int
) -> None:
    """Write ``step``'s checkpoint, point ``latest`` at it, and delete all but the ``keep`` newest."""
    root = output_dir / CHECKPOINTS
    final, tmp = root / STEP_NAME.format(step), root / f".tmp_{STEP_NAME.format(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if deepspeed else {}))
    if accelerator.is_main_process:
        save_lens_weights(model, tmp / LENS_SUBDIR)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / f".{LATEST}").write_text(final.name)
        (root / f".{LATEST}").replace(root / LATEST)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, model: LensModel, checkpoint: Path) -> None:
    """Restore every piece of a checkpoint's state, so the resumed run takes the steps the first one would have."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    # the frozen MLLM / SAM encoder are not in the checkpoint (keep_trainable), hence not strict
    accelerator.load_state(
        str(checkpoint), **({"load_module_strict": False} if deepspeed else {"strict": False})
    )
    load_lens_weights(model, checkpoint / LENS_SUBDIR)  # checks every trainable tensor is there
