"""Building is separate from loading: ``build_lens`` makes a model from a config (frozen parts pretrained,
trainable parts fresh), ``load_lens_weights`` fills the trainable parts from a safetensors file.

A LENS checkpoint is a directory with ``lens_config.yaml`` and ``model.safetensors`` holding only the
trainable tensors (head, descriptor, [CLS] position, SAM mask decoder): the frozen MLLM and SAM encoder are
referenced by id, never copied.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lens.assets import resolve_model_id
from lens.backbone import load_backbone
from lens.config import LensConfig
from lens.decoder import load_sam
from lens.model import LensModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "lens_config.yaml"
WEIGHTS_NAME = "model.safetensors"


def build_lens(config: LensConfig, device: str | torch.device = "cpu") -> LensModel:
    """Load the frozen MLLM and SAM named in ``config`` and attach freshly initialised LENS parts."""
    bridge = load_sam(
        resolve_model_id(config.decoder.model_id),
        revision=config.decoder.revision,
        device=device,
        train_mask_decoder=config.decoder.train_mask_decoder,
    )
    backbone_config = dataclasses.replace(
        config.backbone, model_id=resolve_model_id(config.backbone.model_id)
    )
    backbone = load_backbone(backbone_config, device=device, sam_size=bridge.image_size)
    return LensModel(config, backbone, bridge).to(device)


def save_lens_weights(model: LensModel, directory: str | Path) -> Path:
    """Write config + trainable weights atomically: a crash mid-save never corrupts an existing checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    for name, write in ((WEIGHTS_NAME, lambda p: save_file(state, p)), (CONFIG_NAME, model.config.to_yaml)):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, directory / name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return directory


def load_lens_weights(model: LensModel, path: str | Path) -> LensModel:
    """Fill the trainable parts of ``model`` from a checkpoint directory or ``.safetensors`` file."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LENS weights at {file}")
    state = load_file(str(file), device=str(model.device))
    expected = model.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{file}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return model


def load_lens(directory: str | Path, device: str | torch.device = "cpu") -> LensModel:
    """A trained LENS from a checkpoint directory (or ``lens:`` asset): its config, frozen models, weights."""
    directory = Path(resolve_model_id(str(directory)))
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not a LENS checkpoint (no {CONFIG_NAME})")
    config = LensConfig.from_yaml(directory / CONFIG_NAME)
    return load_lens_weights(build_lens(config, device), directory)
