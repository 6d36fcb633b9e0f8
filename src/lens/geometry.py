"""The one place that knows how original-image pixels map to the MLLM's attention grid and the decoder's input.

Like segment-anything's ``utils/transforms.py``, every other module goes through these frames instead of redoing
resize / pad arithmetic, so the frames cannot drift apart. Two frames per image, each an axis-aligned affine map
per axis, supplied by the stage that owns it:

* :class:`GridFrame` (from the **backbone adapter**): how the MLLM's attention grid of this image lies over the
  original pixels. LLaVA-1.5 pads to a centred square and resizes (``GridFrame.pad_to_square``); a
  dynamic-resolution or tiled family resizes (``GridFrame.resize``), possibly with cells that are not square.
* :class:`DecoderFrame` (from the **mask decoder**): how the original image sits in the decoder's square input.
  SAM resizes the longest side and pads bottom-right (``DecoderFrame.longest_side``); SAM 2 stretches to the
  square (``DecoderFrame.stretch``).

:class:`ImageGeometry` is the pair; it is what features, outputs, the cache and visualisation carry.

Coordinate conventions:

* Points are continuous ``(x, y)`` in the last dimension, with ``(0, 0)`` at the top-left corner of the top-left
  pixel: pixel ``(row i, col j)`` covers ``[j, j + 1) x [i, i + 1)`` and its centre is ``(j + 0.5, i + 0.5)``.
* Grid points are in cell units where integer ``(x, y) = (column, row)`` is the CENTRE of that cell (what keypoint
  NMS returns): original pixel ``x = origin_x + (g + 0.5) * cell_w``.
* Decoder points are continuous pixels of the decoder's square input, mapped from the original by
  ``x * resized_w / W``, ``y * resized_h / H`` (SAM's own ``apply_coords`` ratio).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lens.data.types import IGNORE_INDEX


def longest_side_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(new_h, new_w) after resizing the longest side to ``long_side``, rounded as SAM's ``get_preprocess_shape``."""
    for name, value in (("height", height), ("width", width), ("long_side", long_side)):
        _check_positive_int(name, value)
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class GridFrame:
    """An image's attention grid over its original pixels: cell (row r, col c) covers
    ``[origin_x + c * cell_w, origin_x + (c + 1) * cell_w) x [origin_y + r * cell_h, ...)``.

    ``origin`` is negative where the MLLM padded the image (LLaVA-1.5: ``-pad_left``, ``-pad_top``); cells that
    do not overlap the image at all are padding (``valid_cells`` is False there).
    """

    width: int  # original image, pixels
    height: int
    grid_h: int  # cells of this image's attention grid
    grid_w: int
    cell_w: float  # original pixels per cell along x
    cell_h: float
    origin_x: float = 0.0  # original-pixel coordinate of the grid's top-left corner
    origin_y: float = 0.0

    def __post_init__(self) -> None:
        for name in ("width", "height", "grid_h", "grid_w"):
            _check_positive_int(name, getattr(self, name))
        for name in ("cell_w", "cell_h", "origin_x", "origin_y"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.cell_w <= 0 or self.cell_h <= 0:
            raise ValueError(f"cell sizes must be > 0, got {(self.cell_w, self.cell_h)}")

    @classmethod
    def pad_to_square(cls, width: int, height: int, grid_h: int, grid_w: int | None = None) -> GridFrame:
        """LLaVA-1.5 (``LlavaImageProcessor(do_pad=True)``): pad to a centred square of side max(W, H) with
        ``pad_left = (s - W) // 2``, ``pad_top = (s - H) // 2``, resize uniformly, split into the grid."""
        grid_w = grid_h if grid_w is None else grid_w
        for name, value in (("width", width), ("height", height), ("grid_h", grid_h), ("grid_w", grid_w)):
            _check_positive_int(name, value)
        side = max(width, height)
        return cls(
            width,
            height,
            grid_h,
            grid_w,
            side / grid_w,
            side / grid_h,
            -((side - width) // 2),
            -((side - height) // 2),
        )

    @classmethod
    def resize(cls, width: int, height: int, grid_h: int, grid_w: int) -> GridFrame:
        """The whole image resized onto the grid, no padding (dynamic-resolution families, tiled views)."""
        for name, value in (("width", width), ("height", height), ("grid_h", grid_h), ("grid_w", grid_w)):
            _check_positive_int(name, value)
        return cls(width, height, grid_h, grid_w, width / grid_w, height / grid_h)

    # ----- point maps ----------------------------------------------------------------------------------------
    def _affine(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale, offset) taking grid cells to original pixels: origin + (g + 0.5) * cell."""
        return (self.cell_w, self.cell_h), (
            self.origin_x + 0.5 * self.cell_w,
            self.origin_y + 0.5 * self.cell_h,
        )

    def grid_to_image(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in grid cells (integer = cell centre) -> (..., 2) x, y in original pixels."""
        return _affine(points, *self._affine())

    def image_to_grid(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in original pixels -> (..., 2) x, y in grid cells."""
        return _affine(points, *self._affine(), inverse=True)

    def image_extent(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x_min, x_max), (y_min, y_max)): the image's edges in grid-cell coordinates, where a keypoint may lie."""
        (sx, sy), (ox, oy) = self._affine()
        return ((0 - ox) / sx, (self.width - ox) / sx), ((0 - oy) / sy, (self.height - oy) / sy)

    # ----- dense maps ----------------------------------------------------------------------------------------
    def mask_to_grid(self, mask: Tensor) -> Tensor:
        """Fraction of each grid cell covered by ``mask``: the target for the attention loss.

        Each cell's value is the exact area average over the cell, including pixels only partly inside it;
        the part of a cell outside the image (MLLM padding) counts as background. Adaptive pooling would use
        integer, overlapping bins whenever the cell size is not an integer, which is why it is not used.

        Arguments:
            mask: (H, W) bool, or numbers in [0, 1]; ``IGNORE_INDEX`` (255) pixels count as 0 here.

        Returns:
            (grid_h, grid_w) float in [0, 1], floating mask dtype kept, float32 otherwise.
        """
        if mask.shape != (self.height, self.width):
            raise ValueError(f"mask must be (H, W) = {(self.height, self.width)}, got {tuple(mask.shape)}")
        dtype = mask.dtype if mask.is_floating_point() else torch.float32
        values = mask.to(dtype)
        values = torch.where(values == IGNORE_INDEX, torch.zeros_like(values), values)
        if values.numel() and (values.min() < 0 or values.max() > 1):
            raise ValueError("mask values must be in [0, 1] (or IGNORE_INDEX)")
        rows = _cell_overlap(self.grid_h, self.cell_h, self.origin_y, self.height, mask.device).to(dtype)
        cols = _cell_overlap(self.grid_w, self.cell_w, self.origin_x, self.width, mask.device).to(dtype)
        return rows @ values @ cols.T  # (grid_h, H) @ (H, W) @ (W, grid_w)

    def valid_cells(self, device: torch.device | str | None = None) -> Tensor:
        """(grid_h, grid_w) bool: cells that overlap the image at all; cells of pure MLLM padding are False."""
        rows = _cell_overlap(self.grid_h, self.cell_h, self.origin_y, self.height, device).sum(1) > 0
        cols = _cell_overlap(self.grid_w, self.cell_w, self.origin_x, self.width, device).sum(1) > 0
        return rows[:, None] & cols[None, :]


@dataclass(frozen=True)
class DecoderFrame:
    """How the original image sits in the mask decoder's square input of side ``input_size``.

    ``mode`` says how low-resolution logits return to the original size: ``"longest_side"`` (SAM) upsamples to
    the square input, drops the bottom-right padding, then resizes to (H, W), as ``SamImageProcessor.
    post_process_masks``; ``"stretch"`` (SAM 2) resizes straight to (H, W), as ``Sam2ImageProcessor``.
    """

    width: int  # original image, pixels
    height: int
    input_size: int  # side of the decoder's square input
    resized_h: int  # the image inside it, before any padding
    resized_w: int
    mode: str = "longest_side"  # "longest_side" | "stretch"

    def __post_init__(self) -> None:
        for name in ("width", "height", "input_size", "resized_h", "resized_w"):
            _check_positive_int(name, getattr(self, name))
        if self.mode not in ("longest_side", "stretch"):
            raise ValueError(f"mode must be 'longest_side' or 'stretch', got {self.mode!r}")
        if self.resized_h > self.input_size or self.resized_w > self.input_size:
            raise ValueError(
                f"resized image {(self.resized_h, self.resized_w)} exceeds input {self.input_size}"
            )

    @classmethod
    def longest_side(cls, width: int, height: int, input_size: int) -> DecoderFrame:
        """SAM (``SamImageProcessor``): resize the longest side to ``input_size``, pad bottom-right."""
        new_h, new_w = longest_side_shape(height, width, input_size)
        return cls(width, height, input_size, new_h, new_w, "longest_side")

    @classmethod
    def stretch(cls, width: int, height: int, input_size: int) -> DecoderFrame:
        """SAM 2 (``Sam2ImageProcessor``): resize to ``input_size`` x ``input_size``, aspect ratio not kept."""
        return cls(width, height, input_size, input_size, input_size, "stretch")

    @classmethod
    def identity(cls, width: int, height: int) -> DecoderFrame:
        """The original pixels themselves (no decoder): what a backbone reports when no decoder frame is given."""
        return cls.longest_side(width, height, max(width, height))

    def _affine(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return (self.resized_w / self.width, self.resized_h / self.height), (0.0, 0.0)

    def image_to_decoder(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in original pixels -> (..., 2) x, y in decoder input pixels (SAM's ``apply_coords``)."""
        return _affine(points, *self._affine())

    def decoder_to_image(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in decoder input pixels -> (..., 2) x, y in original pixels."""
        return _affine(points, *self._affine(), inverse=True)

    def postprocess_masks(self, low_res: Tensor) -> Tensor:
        """Decoder low-resolution logits (..., h, w) -> logits (..., H, W) at the original size, differentiably
        (no binarising), by the decoder's own post-processing steps (see ``mode``)."""
        if low_res.dim() < 2 or not low_res.is_floating_point():
            raise ValueError(
                f"low_res must be a float tensor (..., h, w), got {low_res.dtype} {tuple(low_res.shape)}"
            )
        lead = low_res.shape[:-2]
        x = low_res.reshape(-1, 1, *low_res.shape[-2:])  # (N, 1, h, w)
        if self.mode == "longest_side":
            x = F.interpolate(x, (self.input_size, self.input_size), mode="bilinear", align_corners=False)
            x = x[..., : self.resized_h, : self.resized_w]
        x = F.interpolate(x, (self.height, self.width), mode="bilinear", align_corners=False)
        return x.reshape(*lead, self.height, self.width)


@dataclass(frozen=True)
class ImageGeometry:
    """One image's two frames: the MLLM attention grid and the mask decoder's input."""

    grid: GridFrame
    decoder: DecoderFrame

    def __post_init__(self) -> None:
        if (self.grid.width, self.grid.height) != (self.decoder.width, self.decoder.height):
            raise ValueError(
                f"grid frame is for a {self.grid.width}x{self.grid.height} image, "
                f"decoder frame for {self.decoder.width}x{self.decoder.height}"
            )

    @property
    def width(self) -> int:
        return self.grid.width

    @property
    def height(self) -> int:
        return self.grid.height

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.grid.grid_h, self.grid.grid_w

    def grid_to_image(self, points: Tensor) -> Tensor:
        return self.grid.grid_to_image(points)

    def image_to_grid(self, points: Tensor) -> Tensor:
        return self.grid.image_to_grid(points)

    def image_to_decoder(self, points: Tensor) -> Tensor:
        return self.decoder.image_to_decoder(points)

    def decoder_to_image(self, points: Tensor) -> Tensor:
        return self.decoder.decoder_to_image(points)

    def grid_to_decoder(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in grid cells -> (..., 2) x, y in decoder input pixels, e.g. keypoints as prompts."""
        return self.decoder.image_to_decoder(self.grid.grid_to_image(points))

    def mask_to_grid(self, mask: Tensor) -> Tensor:
        return self.grid.mask_to_grid(mask)

    def valid_cells(self, device: torch.device | str | None = None) -> Tensor:
        return self.grid.valid_cells(device)

    def postprocess_masks(self, low_res: Tensor) -> Tensor:
        return self.decoder.postprocess_masks(low_res)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the feature cache stores geometries in its metadata)."""
        return {"grid": asdict(self.grid), "decoder": asdict(self.decoder)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageGeometry:
        return cls(GridFrame(**data["grid"]), DecoderFrame(**data["decoder"]))


def grid_cell_index(grid_sizes: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """(B, grid_h, grid_w) long: for each cell of the padded grid, its index n in the image's own row-major
    (gh_i, gw_i) grid, or -1 outside that grid. ``grid_sizes``: (B, 2) long (gh_i, gw_i)."""
    rows = torch.arange(grid_h, device=grid_sizes.device)[None, :, None]  # (1, gh, 1)
    cols = torch.arange(grid_w, device=grid_sizes.device)[None, None, :]  # (1, 1, gw)
    gh, gw = grid_sizes[:, 0, None, None], grid_sizes[:, 1, None, None]  # (B, 1, 1)
    inside = (rows < gh) & (cols < gw)
    return torch.where(inside, rows * gw + cols, torch.full_like(rows * gw + cols, -1))


def to_padded_grid(values: Tensor, grid_sizes: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """Per-image row-major cell values (B, N, ...) -> (B, grid_h, grid_w, ...), zero outside each image's grid."""
    index = grid_cell_index(grid_sizes, grid_h, grid_w).flatten(1)  # (B, gh * gw)
    gathered = values[torch.arange(values.shape[0], device=values.device)[:, None], index.clamp(min=0)]
    inside = (index >= 0).view(*index.shape, *([1] * (values.dim() - 2)))
    gathered = torch.where(inside, gathered, torch.zeros_like(gathered))
    return gathered.view(values.shape[0], grid_h, grid_w, *values.shape[2:])


def valid_cell_mask(geometries: list[ImageGeometry], grid_h: int, grid_w: int, device=None) -> Tensor:
    """(B, grid_h, grid_w) bool: True on cells inside each image's own grid that overlap the image."""
    out = torch.zeros(len(geometries), grid_h, grid_w, dtype=torch.bool, device=device)
    for i, g in enumerate(geometries):
        out[i, : g.grid.grid_h, : g.grid.grid_w] = g.valid_cells(device)
    return out


def pad_grids(maps: list[Tensor], grid_h: int, grid_w: int) -> Tensor:
    """Per-image (gh_i, gw_i) maps -> (B, grid_h, grid_w), zero outside each image's grid."""
    out = maps[0].new_zeros(len(maps), grid_h, grid_w)
    for i, m in enumerate(maps):
        out[i, : m.shape[0], : m.shape[1]] = m
    return out


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _affine(
    points: Tensor, scale: tuple[float, float], offset: tuple[float, float], inverse: bool = False
) -> Tensor:
    """(..., 2) -> (..., 2): ``p * scale + offset``, or its inverse. Integer points are promoted to float32."""
    if points.dim() == 0 or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2) as (x, y), got {tuple(points.shape)}")
    if not points.is_floating_point():
        points = points.float()
    scale_t = torch.tensor(scale, dtype=points.dtype, device=points.device)
    offset_t = torch.tensor(offset, dtype=points.dtype, device=points.device)
    return (points - offset_t) / scale_t if inverse else points * scale_t + offset_t


def _cell_overlap(
    num_cells: int, cell: float, origin: float, length: int, device: torch.device | str | None
) -> Tensor:
    """(num_cells, length) float64: share of each cell, along one axis, covered by each original pixel.

    Cell k spans ``origin + [k, k + 1) * cell``; original pixel p spans ``[p, p + 1)``. Computed in float64 so
    the cell edges are exact before any cast.
    """
    edges = origin + torch.arange(num_cells + 1, dtype=torch.float64, device=device) * cell  # (K + 1,)
    start = torch.arange(length, dtype=torch.float64, device=device)  # (L,)
    overlap = torch.minimum(edges[1:, None], start + 1) - torch.maximum(edges[:-1, None], start)  # (K, L)
    return overlap.clamp(min=0) / cell
