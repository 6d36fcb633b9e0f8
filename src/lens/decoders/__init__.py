"""Mask decoders, by name. A new decoder = one module + one line in ``DECODERS``."""

from __future__ import annotations

import torch

from lens.config import DecoderConfig
from lens.decoders.base import ImageEmbeddings, MaskDecoderBridge
from lens.decoders.sam import SamDecoder
from lens.decoders.sam2 import Sam2Decoder
from lens.decoders.sam_hq import SamHQDecoder

DECODERS: dict[str, type[MaskDecoderBridge]] = {
    "sam": SamDecoder,  # facebook/sam-vit-{base,large,huge}
    "sam_hq": SamHQDecoder,  # syscv-community/sam-hq-vit-{base,large,huge}
    "sam2": Sam2Decoder,  # facebook/sam2.1-hiera-{tiny,small,base-plus,large} (image mode)
}


def load_decoder(config: DecoderConfig, device: str | torch.device = "cpu") -> MaskDecoderBridge:
    """Load the mask decoder named by ``config.name`` from ``config.model_id`` (hub id or local directory)."""
    if config.name not in DECODERS:
        raise ValueError(f"unknown decoder {config.name!r}; available: {sorted(DECODERS)}")
    decoder = DECODERS[config.name].from_pretrained(
        config.model_id,
        revision=config.revision,
        device=device,
        train_mask_decoder=config.train_mask_decoder,
    )
    decoder.configure_image_encoder(
        config.attn_implementation,
        None if config.image_encoder_dtype is None else getattr(torch, config.image_encoder_dtype),
        config.compile_image_encoder,
    )
    return decoder


__all__ = [
    "DECODERS",
    "ImageEmbeddings",
    "MaskDecoderBridge",
    "Sam2Decoder",
    "SamDecoder",
    "SamHQDecoder",
    "load_decoder",
]
