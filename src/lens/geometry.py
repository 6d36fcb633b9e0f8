"""The one place that knows how original-image pixels map to the MLLM's grid and to SAM's input.

Like segment-anything's ``utils/transforms.py``, every other module goes through :class:`ImageGeometry`
instead of redoing resize / pad arithmetic, so the three frames cannot drift apart.

Frames (the pre-processing they mirror is Hugging Face's, exactly):

* **Original image**, ``width`` x ``height`` pixels.
* **MLLM view** (LLaVA-1.5, ``LlavaImageProcessor`` with ``do_pad=True``): the image is padded to a square of
  side ``s = max(W, H)``, centred with ``pad_left = (s - W) // 2`` and ``pad_top = (s - H) // 2``, then resized to
  ``mllm_size`` x ``mllm_size``; the vision tower splits it into ``grid_h`` x ``grid_w`` cells. Nothing is cropped,
  and the resize is uniform, so a cell always covers ``s / grid`` original pixels whatever ``mllm_size`` is.
* **SAM view** (``SamImageProcessor``): the image is resized so its longest side is ``sam_size``
  (:func:`sam_preprocess_shape`), then padded bottom-right to ``sam_size`` x ``sam_size``.

Coordinate conventions:

* Points are continuous ``(x, y)`` in the last dimension, with ``(0, 0)`` at the top-left corner of the top-left
  pixel: pixel ``(row i, col j)`` covers ``[j, j + 1) x [i, i + 1)`` and its centre is ``(j + 0.5, i + 0.5)``.
* Grid points are in cell units where integer ``(x, y) = (column, row)`` is the CENTRE of that cell (what keypoint
  NMS returns); the continuous position in the padded square is ``(x + 0.5) * cell_size``.
* SAM points are continuous pixels of SAM's ``sam_size`` input frame, mapped from the original by
  ``x * new_w / W``, ``y * new_h / H`` (SAM's own ``apply_coords`` ratio).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from lens.data.types import IGNORE_INDEX


def sam_preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(new_h, new_w) after resizing the longest side to ``long_side``, rounded as SAM's ``get_preprocess_shape``."""
    for name, value in (("height", height), ("width", width), ("long_side", long_side)):
        _check_positive_int(name, value)
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class ImageGeometry:
    """Exact maps between the original image, the MLLM attention grid and SAM's input frame.

    Every point map is an axis-aligned affine map ``p * scale + offset`` on the last dimension (x, y), so any
    number of leading dimensions is fine and round trips are exact to float precision.
    """

    width: int  # original image
    height: int
    grid_h: int = 24
    grid_w: int = 24
    mllm_size: int = 336
    sam_size: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_positive_int(f.name, getattr(self, f.name))

    # ----- derived sizes -------------------------------------------------------------------------------------
    @property
    def square_side(self) -> int:
        """Side of the square the MLLM processor pads the original image to."""
        return max(self.width, self.height)

    @property
    def pad_left(self) -> int:
        return (self.square_side - self.width) // 2

    @property
    def pad_top(self) -> int:
        return (self.square_side - self.height) // 2

    @property
    def cell_size(self) -> tuple[float, float]:
        """(width, height) of one grid cell, in original-image pixels."""
        return self.square_side / self.grid_w, self.square_side / self.grid_h

    @property
    def sam_resized_hw(self) -> tuple[int, int]:
        """(new_h, new_w): the image inside SAM's input frame, before its bottom-right padding."""
        return sam_preprocess_shape(self.height, self.width, self.sam_size)

    # ----- point maps ----------------------------------------------------------------------------------------
    def _grid_affine(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale, offset) taking grid cells to original pixels: (g + 0.5) * cell - pad."""
        cell_w, cell_h = self.cell_size
        return (cell_w, cell_h), (0.5 * cell_w - self.pad_left, 0.5 * cell_h - self.pad_top)

    def _sam_affine(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale, offset) taking original pixels to SAM input pixels."""
        new_h, new_w = self.sam_resized_hw
        return (new_w / self.width, new_h / self.height), (0.0, 0.0)

    def grid_to_image(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in grid cells (integer = cell centre) -> (..., 2) x, y in original pixels."""
        return _affine(points, *self._grid_affine())

    def image_to_grid(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in original pixels -> (..., 2) x, y in grid cells."""
        return _affine(points, *self._grid_affine(), inverse=True)

    def image_to_sam(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in original pixels -> (..., 2) x, y in SAM input pixels (SAM's ``apply_coords``)."""
        return _affine(points, *self._sam_affine())

    def sam_to_image(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in SAM input pixels -> (..., 2) x, y in original pixels."""
        return _affine(points, *self._sam_affine(), inverse=True)

    def grid_to_sam(self, points: Tensor) -> Tensor:
        """(..., 2) x, y in grid cells -> (..., 2) x, y in SAM input pixels, e.g. keypoints as SAM prompts."""
        return self.image_to_sam(self.grid_to_image(points))

    # ----- dense maps ----------------------------------------------------------------------------------------
    def mask_to_grid(self, mask: Tensor) -> Tensor:
        """Fraction of each grid cell covered by ``mask``: the target for the attention loss.

        The mask is placed in the padded square exactly like the image (padding counts as background) and
        each cell's value is the exact area average over the cell, including pixels only partly inside it.
        When ``square_side`` is a multiple of the grid this equals ``F.adaptive_avg_pool2d`` of the padded
        mask; otherwise adaptive pooling would use integer, overlapping bins, which is why it is not used.

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
        rows = _cell_overlap(self.grid_h, self.square_side, self.pad_top, self.height, dtype, mask.device)
        cols = _cell_overlap(self.grid_w, self.square_side, self.pad_left, self.width, dtype, mask.device)
        return rows @ values @ cols.T  # (grid_h, H) @ (H, W) @ (W, grid_w)

    def postprocess_masks(self, low_res: Tensor) -> Tensor:
        """SAM low-resolution logits -> logits at the original size, differentiably (no binarising).

        Same steps as ``SamImageProcessor.post_process_masks``: bilinear up to SAM's square input, drop its
        bottom-right padding, bilinear to (H, W).

        Arguments:
            low_res: (..., h, w) float logits from SAM's mask decoder (256 x 256 for SAM).

        Returns:
            (..., H, W) logits in the original image frame.
        """
        if low_res.dim() < 2 or not low_res.is_floating_point():
            raise ValueError(
                f"low_res must be a float tensor (..., h, w), got {low_res.dtype} {tuple(low_res.shape)}"
            )
        new_h, new_w = self.sam_resized_hw
        lead = low_res.shape[:-2]
        x = low_res.reshape(-1, 1, *low_res.shape[-2:])  # (N, 1, h, w)
        x = F.interpolate(x, (self.sam_size, self.sam_size), mode="bilinear", align_corners=False)
        x = x[..., :new_h, :new_w]
        x = F.interpolate(x, (self.height, self.width), mode="bilinear", align_corners=False)
        return x.reshape(*lead, self.height, self.width)


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
    num_cells: int, side: int, pad: int, length: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(num_cells, length): share of each cell, along one axis, covered by each original pixel.

    Cell k spans ``[k, k + 1) * side / num_cells`` of the padded square; original pixel p spans
    ``[p + pad, p + pad + 1)``. Computed in float64 so the cell edges are exact before the cast.
    """
    edges = torch.arange(num_cells + 1, dtype=torch.float64, device=device) * (side / num_cells)  # (K + 1,)
    start = torch.arange(length, dtype=torch.float64, device=device) + pad  # (L,)
    overlap = torch.minimum(edges[1:, None], start + 1) - torch.maximum(edges[:-1, None], start)  # (K, L)
    return (overlap.clamp(min=0) / (side / num_cells)).to(dtype)
