"""Shared fixtures: tiny randomly initialised LLaVA + SAM built from configs (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens.backbone import LlavaBackbone
from lens.config import LensConfig
from lens.decoders import SamDecoder
from lens.model import LensModel
from lens.tiny import build_tiny_models

TINY_LAYER = 2  # k for the 4-layer tiny Llama


@pytest.fixture
def tiny_models():
    """(llava, llava_processor, sam, sam_processor), fresh per test so no test sees another's changes."""
    return build_tiny_models(seed=0)


def make_lens(tiny_models, **overrides) -> LensModel:
    llava, llava_processor, sam, sam_processor = tiny_models
    config = LensConfig()
    config.backbone.layer = TINY_LAYER
    config.descriptor.num_heads = 4
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    backbone = LlavaBackbone(llava, llava_processor, layer=TINY_LAYER)
    decoder = SamDecoder(sam, sam_processor, train_mask_decoder=config.decoder.train_mask_decoder)
    torch.manual_seed(0)
    return LensModel(config, backbone, decoder)


@pytest.fixture
def tiny_lens(tiny_models) -> LensModel:
    return make_lens(tiny_models)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[top:bottom, left:right] = 1
    return mask
