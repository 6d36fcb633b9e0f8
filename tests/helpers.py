"""Helpers the tests import (``from helpers import ...``): tiny LENS models, images and masks. Fixtures are in
conftest.py."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lens.backbone import LlavaBackbone
from lens.config import LensConfig
from lens.decoder import SamBridge
from lens.model import LensModel

TINY_LAYER = 2  # k for the 4-layer tiny Llama


def make_lens(tiny_models, **overrides) -> LensModel:
    llava, llava_processor, sam, sam_processor = tiny_models
    config = LensConfig()
    config.backbone.layer = TINY_LAYER
    config.descriptor.num_heads = 4
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    backbone = LlavaBackbone(
        llava, llava_processor, layer=TINY_LAYER, sam_size=sam.config.prompt_encoder_config.image_size
    )
    bridge = SamBridge(sam, sam_processor, train_mask_decoder=config.decoder.train_mask_decoder)
    torch.manual_seed(0)
    return LensModel(config, backbone, bridge)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[top:bottom, left:right] = 1
    return mask
