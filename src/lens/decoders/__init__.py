"""Mask decoders, by name. A new decoder = one module + one line in ``DECODERS``."""

from __future__ import annotations

import torch

from lens.config import DecoderConfig
from lens.decoders.base import ImageEmbeddings, MaskDecoderBridge
from lens.decoders.sam import SamDecoder

DECODERS: dict[str, type[MaskDecoderBridge]] = {"sam": SamDecoder}


def load_decoder(config: DecoderConfig, device: str | torch.device = "cpu") -> MaskDecoderBridge:
    """Load the mask decoder named by ``config.name`` from ``config.model_id`` (hub id or local directory)."""
    if config.name not in DECODERS:
        raise ValueError(f"unknown decoder {config.name!r}; available: {sorted(DECODERS)}")
    return DECODERS[config.name].from_pretrained(
        config.model_id,
        revision=config.revision,
        device=device,
        train_mask_decoder=config.train_mask_decoder,
    )


__all__ = ["DECODERS", "ImageEmbeddings", "MaskDecoderBridge", "SamDecoder", "load_decoder"]
