"""Adapter for InternVL 3 (``InternVLForConditionalGeneration``, e.g. ``OpenGVLab/InternVL3-8B-hf``).

Dynamic tiling: the processor picks the (columns, rows) arrangement of at most ``max_patches`` tiles whose
aspect ratio is closest to the image's (``get_optimal_tiled_canvas``), resizes the image (stretching, no
padding) to (448 * columns) x (448 * rows) and cuts it into 448-px tiles, row-major, followed by a thumbnail
tile (the whole image at 448 px) when there is more than one tile. Each tile gives 32 x 32 patches, pixel
shuffled (x0.5) into 16 x 16 LLM tokens, row-major, tiles one after another.

The attention grid is the tiles' cells assembled into one (16 * rows) x (16 * columns) grid of the whole image:
cell (r, c) is image token ``tile * 256 + (r % 16) * 16 + c % 16`` with ``tile = (r // 16) * columns + c // 16``;
the thumbnail's tokens are neither grid nor text. A cell covers ``W / gw`` x ``H / gh`` original pixels
(``GridFrame.resize``). 1-D RoPE: prompts on one image share its template + image tokens (``encode_prefix``;
``shared_length`` = P); a batch over several images runs every prompt whole (their image token counts differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor
from transformers import InternVLForConditionalGeneration, InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from lens.backbone.hf import HFBackbone, ImageLayout
from lens.geometry import GridFrame


def tile_arrangement(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(rows, columns) of the processor's tiling of a width x height image."""
    columns, rows = get_optimal_tiled_canvas((height, width), (tile, tile), min_tiles, max_tiles)
    return rows, columns


def tiled_cell_order(rows: int, columns: int, side: int) -> Tensor:
    """(rows * side * columns * side,) long: for each cell of the assembled grid (row-major), the index of its
    token among the tiles' tokens (tile-major, each tile row-major over side x side)."""
    r = torch.arange(rows * side)[:, None]  # (gh, 1)
    c = torch.arange(columns * side)[None, :]  # (1, gw)
    tile = (r // side) * columns + c // side
    return (tile * side * side + (r % side) * side + c % side).flatten()


class InternVLBackbone(HFBackbone):
    """Frozen InternVL 3 run up to decoder layer k, its tiles read as one whole-image grid."""

    model_class: ClassVar[type] = InternVLForConditionalGeneration
    processor_class: ClassVar[type] = InternVLProcessor
    # LLaVA-1.5's k = 14 of 32 (the paper) as a fraction: k = 12 of InternVL3-8B's 28 Qwen2.5 layers.
    DEFAULT_LAYER_FRACTION: ClassVar[float] = 14 / 32
    shares_prefix: ClassVar[bool] = True  # 1-D RoPE, nothing added between layers
    HUB_MODELS: ClassVar[dict[str, int]] = {"OpenGVLab/InternVL3-8B-hf": 28}

    @property
    def tile_side(self) -> int:
        """LLM tokens per tile side: (448 / 14) * 0.5 = 16 for InternVL 3."""
        c = self.model.config
        patch = c.vision_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return int(self._tile_px() // patch * c.downsample_ratio)

    def _tile_px(self) -> int:
        return self.processor.image_processor.size["height"]

    def arrangement(self, width: int, height: int) -> tuple[int, int]:
        ip = self.processor.image_processor
        # InternVLProcessor passes crop_to_patches=True by default, over the image processor's own setting
        defaults = getattr(self.processor, "images_kwargs", None) or {}
        crop = defaults.get("crop_to_patches", ip.crop_to_patches)
        if not crop:
            return 1, 1
        return tile_arrangement(width, height, self._tile_px(), ip.min_patches, ip.max_patches)

    def grid_frame(self, width: int, height: int) -> GridFrame:
        rows, columns = self.arrangement(width, height)
        return GridFrame.resize(width, height, rows * self.tile_side, columns * self.tile_side)

    def _per_prompt(self, features: object, unique: Sequence[Image.Image], index: list[int]) -> object:
        # one row per tile of every image (thumbnails included): cut per image, repeat, concatenate again
        tiles = [
            rows * columns + (rows * columns > 1)
            for rows, columns in (self.arrangement(im.width, im.height) for im in unique)
        ]
        per_image = torch.split(features, tiles)
        return torch.cat([per_image[i] for i in index])

    def image_layout(self, inputs: dict[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        side = self.tile_side
        layouts = []
        for image, tokens in zip(images, self.image_tokens(inputs["input_ids"]), strict=True):
            rows, columns = self.arrangement(image.width, image.height)
            n_tiles = rows * columns + (rows * columns > 1)  # + the thumbnail
            if len(tokens) != n_tiles * side * side:
                raise ValueError(
                    f"a {image.width}x{image.height} image should give {n_tiles} tiles of {side * side} tokens, "
                    f"but the prompt has {len(tokens)} image tokens"
                )
            order = tiled_cell_order(rows, columns, side).to(tokens.device)
            layouts.append(ImageLayout(tokens[order], self.grid_frame(image.width, image.height)))
        return layouts
