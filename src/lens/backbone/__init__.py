"""Frozen MLLM adapters, by name. A new family = one module + one line in ``BACKBONES``."""

from __future__ import annotations

import torch

from lens.backbone.base import (
    Backbone,
    BackboneFeatures,
    DecoderFrameFn,
    LayerSpec,
    RopeSpec,
    first_of_each,
    image_geometries,
    run_until,
    shared_prefix_length,
    unique_images,
)
from lens.backbone.internvl import InternVLBackbone
from lens.backbone.llava import LlavaBackbone
from lens.backbone.llava_next import LlavaNextBackbone, LlavaOnevisionBackbone
from lens.backbone.qwen_vl import Qwen2_5_VLBackbone, Qwen3VLBackbone
from lens.config import BackboneConfig

BACKBONES: dict[str, type[Backbone]] = {
    "llava": LlavaBackbone,
    "llava_next": LlavaNextBackbone,
    "llava_onevision": LlavaOnevisionBackbone,
    "qwen2_5_vl": Qwen2_5_VLBackbone,
    "qwen3_vl": Qwen3VLBackbone,
    "internvl": InternVLBackbone,
}


def load_backbone(config: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    """Load the frozen MLLM named by ``config`` (hub id or local directory)."""
    if config.name not in BACKBONES:
        raise ValueError(f"unknown backbone {config.name!r}; available: {sorted(BACKBONES)}")
    return BACKBONES[config.name].from_pretrained(
        config.model_id,
        layer=config.layer,
        revision=config.revision,
        dtype=getattr(torch, config.dtype),
        device=device,
        **({"quantization": config.quantization} if config.quantization else {}),
    )


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneFeatures",
    "DecoderFrameFn",
    "LayerSpec",
    "RopeSpec",
    "LlavaBackbone",
    "first_of_each",
    "image_geometries",
    "load_backbone",
    "run_until",
    "shared_prefix_length",
    "unique_images",
]
