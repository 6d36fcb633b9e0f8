"""Systems LENS is compared with (docs/baselines.md), each behind the same entry points as LENS.

``training_free``: the frozen MLLM's own attention peaks clicked into the pretrained SAM (nothing trains; its own
command). The trained systems are named by a config's ``baseline.system`` (``lens.config.BaselineConfig``):
``lens train`` and ``lens eval`` build them through ``lens.weights.build_lens`` and train, checkpoint and score
them exactly as LENS, on the same data, loop, metrics and files.

A system module offers ``build(config, device)``, whose model offers the loop and the evaluation what
``LensModel`` does: ``config``, ``backbone``, ``decoder``, ``device``, ``trainable_names()``,
``trainable_state_dict()``, ``prepare(images, instructions, masks)`` (the frozen work, inference mode),
``forward(inputs) -> LensOutput`` (with ``loss`` and ``losses`` when the inputs carry masks) and ``loss_names``
("loss" first, then the keys of ``losses`` logged per step).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from lens.config import BASELINE_SYSTEMS, LensConfig

SYSTEM_MODULES = {  # baseline.system -> the module whose ``build`` makes it
    "lisa": "lens.baselines.lisa",
    "read": "lens.baselines.read",
    "flmm": "lens.baselines.flmm",
    "self1e": "lens.baselines.self1e",
}
assert tuple(SYSTEM_MODULES) == BASELINE_SYSTEMS


def build_system(config: LensConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The comparison system ``config.baseline.system`` on the frozen MLLM and SAM ``config`` names, freshly
    initialised where it trains (``lens.weights.load_lens_weights`` fills it from a checkpoint)."""
    name = config.baseline.system
    if name not in SYSTEM_MODULES:
        raise ValueError(f"unknown baseline system {name!r}; known: {sorted(SYSTEM_MODULES)}")
    return importlib.import_module(SYSTEM_MODULES[name]).build(config, device)
