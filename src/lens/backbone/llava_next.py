"""Adapters for LLaVA-NeXT (``LlavaNextForConditionalGeneration``, e.g. ``llava-hf/llava-v1.6-mistral-7b-hf``)
and LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, e.g. ``llava-hf/llava-onevision-qwen2-7b-ov-hf``).

Any resolution: the processor picks the best canvas among ``image_grid_pinpoints`` (``select_best_resolution``),
resizes the image into it keeping the aspect ratio (``get_patch_output_size``), pads it centred
(``paste = (canvas - resized) // 2``) and cuts it into vision-tower tiles; a base view (the whole image
resized to one tile) goes first. The model lays the tiles' cells out as one canvas grid, removes the padded
rows or columns (``unpad_image``), and — OneVision only — bilinearly shrinks grids larger than
``anyres_max_N`` tiles' worth of cells; then it writes, after the base view's tokens, each grid row followed
by one newline token.

The attention grid here is that whole-image grid, newlines removed: cell (r, c) is image token
``base + r * (gw + 1) + c``. Base-view and newline tokens are neither grid nor text. The frame maps a cell
back through the unpadding, the centred padding and the resize, per axis (``cell_w``, ``cell_h``, and an
origin that is the unpadded grid's top-left corner in original pixels; it may sit a fraction of a cell
outside the image where the model's unpadding rounds).

Both use 1-D RoPE: prompts on one image share its template + image tokens (``encode_prefix``; ``shared_length``
= P); a batch over several images runs every prompt whole (their image token counts differ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from PIL import Image
from torch import Tensor
from transformers import (
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.image_processing_utils import select_best_resolution

from lens.backbone.hf import HFBackbone, ImageLayout
from lens.geometry import GridFrame


def anyres_frame(
    width: int,
    height: int,
    pinpoints: Sequence[Sequence[int]],
    tile: int,
    patch: int,
    max_tiles: int | None = None,
) -> GridFrame:
    """The whole-image grid of an any-resolution image and how it sits on the original pixels.

    Arguments:
        width, height: original image size.
        pinpoints: the model's ``image_grid_pinpoints``, (height, width) canvases.
        tile: side of one vision-tower tile in pixels (``vision_config.image_size``).
        patch: the vision tower's patch size: cells per tile side = tile // patch.
        max_tiles: OneVision's ``anyres_max_N`` budget (None: LLaVA-NeXT, no shrinking).
    """
    canvas_h, canvas_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    # the processor's resize into the canvas (get_patch_output_size) and its centred padding
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        new_w, new_h = canvas_w, min(math.ceil(height * scale_w), canvas_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), canvas_w), canvas_h
    paste_x, paste_y = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
    # the model's unpad_image on the canvas grid: tile // patch cells per tile side. When patch does not
    # divide the tile (SigLIP: 384 / 14 -> 27, the tile's last 6 px unseen) a cell is tile / side canvas px
    # on average, the best per-axis affine fit (off by < half a cell at a tile's far edge, reset per tile)
    side = tile // patch
    pitch = tile / side  # canvas pixels per cell
    grid_h, grid_w = canvas_h // tile * side, canvas_w // tile * side
    row0 = col0 = 0
    if width / height > grid_w / grid_h:
        kept = int(round(height * (grid_w / width), 7))
        row0 = (grid_h - kept) // 2
        grid_h -= 2 * row0
    else:
        kept = int(round(width * (grid_h / height), 7))
        col0 = (grid_w - kept) // 2
        grid_w -= 2 * col0
    # canvas pixel -> original pixel: (x - paste) * W / new_w
    sx, sy = width / new_w, height / new_h
    cell_w, cell_h = pitch * sx, pitch * sy
    origin_x, origin_y = (col0 * pitch - paste_x) * sx, (row0 * pitch - paste_y) * sy
    if max_tiles is not None:
        ratio = math.sqrt(grid_h * grid_w / (max_tiles * side**2))
        if ratio > 1.1:  # bilinear (align_corners=False) onto fewer cells over the same extent
            small_h, small_w = int(grid_h // ratio), int(grid_w // ratio)
            cell_h, cell_w = cell_h * grid_h / small_h, cell_w * grid_w / small_w
            grid_h, grid_w = small_h, small_w
    return GridFrame(width, height, grid_h, grid_w, cell_w, cell_h, origin_x, origin_y)


class LlavaNextBackbone(HFBackbone):
    """Frozen LLaVA-NeXT run up to decoder layer k, its tiles read as one whole-image grid."""

    model_class: ClassVar[type] = LlavaNextForConditionalGeneration
    processor_class: ClassVar[type] = LlavaNextProcessor
    # LLaVA-1.5's k = 14 of 32 (the paper): LLaVA-NeXT keeps LLaVA-1.5's recipe on a 32-layer LM.
    DEFAULT_LAYER_FRACTION: ClassVar[float] = 14 / 32
    shares_prefix: ClassVar[bool] = True  # 1-D RoPE, nothing added between layers
    HUB_MODELS: ClassVar[dict[str, int]] = {"llava-hf/llava-v1.6-mistral-7b-hf": 32}

    def max_tiles(self) -> int | None:
        return None

    def grid_frame(self, width: int, height: int) -> GridFrame:
        vision = self.model.config.vision_config
        return anyres_frame(
            width,
            height,
            self.model.config.image_grid_pinpoints,
            vision.image_size,
            vision.patch_size,
            self.max_tiles(),
        )

    def image_layout(self, inputs: dict[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        vision = self.model.config.vision_config
        base = (vision.image_size // vision.patch_size) ** 2  # the base view's tokens come first
        layouts = []
        for image, tokens in zip(images, self.image_tokens(inputs["input_ids"]), strict=True):
            frame = self.grid_frame(image.width, image.height)
            gh, gw = frame.grid_h, frame.grid_w
            if len(tokens) != base + gh * (gw + 1):
                raise ValueError(
                    f"a {image.width}x{image.height} image should give {base} base-view tokens and {gh} rows "
                    f"of {gw} cells + a newline, but the prompt has {len(tokens)} image tokens"
                )
            rows = tokens[base:].view(gh, gw + 1)[:, :gw]  # (gh, gw): drop each row's newline token
            layouts.append(ImageLayout(rows.flatten(), frame))
        return layouts


class LlavaOnevisionBackbone(LlavaNextBackbone):
    """Frozen LLaVA-OneVision run up to decoder layer k (anyres_max_N grids shrunk as the model does)."""

    model_class: ClassVar[type] = LlavaOnevisionForConditionalGeneration
    processor_class: ClassVar[type] = LlavaOnevisionProcessor
    # LLaVA-1.5's k = 14 of 32 as a fraction: k = 12 of OneVision-7B's 28 Qwen2 layers.
    DEFAULT_LAYER_FRACTION: ClassVar[float] = 14 / 32
    HUB_MODELS: ClassVar[dict[str, int]] = {"llava-hf/llava-onevision-qwen2-7b-ov-hf": 28}

    def max_tiles(self) -> int | None:
        return int(self.model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
