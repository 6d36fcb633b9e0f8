"""Keypoint extraction (NMS + sub-pixel refinement) and neighbourhood sampling, paper §3.2 and S1.1-S1.2.

All coordinates are ``(x, y)`` in heatmap *cell* units: ``x`` is the column, ``y`` the row, and integer values sit on
cell centres. Everything is batched without a Python loop over the batch, so it runs unchanged on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# H + eps*I counts as ill-conditioned when |det| <= rtol * ||H + eps*I||_F^2. For a symmetric 2x2 matrix with
# eigenvalues l1, l2 the ratio |l1 l2| / (l1^2 + l2^2) is about 1 / condition number, so this switches to the
# paper's diagonal fallback above a condition number of ~1e4, well clear of float32 rounding in the determinant.
ILL_CONDITIONED_RTOL = 1e-4
MAX_OFFSET = 1.0  # S1.2: the Newton step is clipped component-wise to [-1, 1] cells

# S1 eq. 3: (dx, dy) cell offsets of the samples v0..v8 (centre, 4-neighbours, 4 diagonals), in the paper's order.
_STENCIL = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (-1, 1), (1, -1))


def _check_heatmaps(heatmaps: Tensor) -> None:
    if heatmaps.ndim != 3:
        raise ValueError(f"heatmaps must be 3-D (B, H, W), got shape {tuple(heatmaps.shape)}")
    if not heatmaps.is_floating_point():
        raise ValueError(f"heatmaps must be floating point, got dtype {heatmaps.dtype}")
    if heatmaps.shape[1] == 0 or heatmaps.shape[2] == 0:
        raise ValueError(f"heatmaps must have H, W >= 1, got shape {tuple(heatmaps.shape)}")


def _check_points(points: Tensor, batch: int) -> None:
    if points.ndim != 3 or points.shape[2] != 2 or points.shape[0] != batch:
        raise ValueError(f"points must be (B={batch}, N, 2), got shape {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"points must be floating point, got dtype {points.dtype}")


def _bilinear(maps: Tensor, xy: Tensor) -> Tensor:
    """Bilinearly sample ``maps`` (B, C, H, W) at cell coordinates ``xy`` (B, N, K, 2) -> (B, C, N, K).

    ``align_corners=True`` makes normalized -1/+1 the centres of the outer cells (S1 eq. 1), and ``"border"``
    padding replicates the outer cells for samples that fall off the grid.
    """
    height, width = maps.shape[-2:]
    # A singleton axis has no spacing; any normalized value maps to its only cell under align_corners=True.
    scale = xy.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    grid = xy.to(maps.dtype) * scale.to(maps.dtype) - 1.0
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=True)


@torch.no_grad()
def nms(heatmaps: Tensor, radius: float = 4.0, max_points: int = 16) -> tuple[Tensor, Tensor]:
    """Greedy radius NMS of S1.1: take the global max, zero everything within ``radius`` cells, repeat.

    Ties go to the lowest row-major index (``torch.argmax``). Selection stops after ``max_points`` points or
    once no value is > 0, so non-positive values are never keypoints. NaNs count as 0. The input is not modified.

    Arguments:
        heatmaps: (B, H, W) float responses.
        radius: suppression radius in cells; a cell is suppressed when its squared distance <= radius**2.
        max_points: N, the number of output slots.

    Returns:
        points: (B, N, 2) float (x, y) integer cell coordinates; invalid slots are (0, 0).
        valid: (B, N) bool; valid slots come first.
    """
    _check_heatmaps(heatmaps)
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    batch, height, width = heatmaps.shape
    work = heatmaps.detach().reshape(batch, height * width)  # (B, HW)
    work = torch.where(torch.isnan(work), torch.zeros_like(work), work)  # fresh tensor: safe to edit in place
    flat = torch.arange(height * width, device=heatmaps.device)
    rows, cols = flat // width, flat % width  # (HW,)
    # Squared integer distances are exact, so compare them with the largest integer <= radius**2.
    threshold = math.floor(radius * radius)

    picks, keeps = [], []
    for _ in range(max_points):
        index = work.argmax(dim=1)  # (B,) first maximum on ties, documented for argmax on every device
        value = work.gather(1, index[:, None])[:, 0]  # (B,)
        keep = value > 0  # (B,) once False it stays False: nothing is zeroed for that element afterwards
        dist2 = (rows[None] - (index // width)[:, None]) ** 2 + (cols[None] - (index % width)[:, None]) ** 2
        work.masked_fill_((dist2 <= threshold) & keep[:, None], 0.0)
        picks.append(index)
        keeps.append(keep)

    index = torch.stack(picks, dim=1)  # (B, N)
    valid = torch.stack(keeps, dim=1)  # (B, N)
    points = torch.stack([index % width, index // width], dim=-1).to(heatmaps.dtype)  # (B, N, 2) x, y
    return points * valid[..., None], valid


def refine_subpixel(heatmaps: Tensor, points: Tensor, eps: float = 1e-6) -> Tensor:
    """Move integer keypoints toward the true peak with one regularized Newton step (S1.2).

    The 3x3 neighbourhood is sampled with ``padding_mode="border"``: at the grid edge the missing neighbour
    repeats the edge value (a one-sided difference), whereas zero padding would invent a cliff down to 0 next to
    every border keypoint and pull it toward the inside. Where ``H + eps*I`` is ill-conditioned (see
    ``ILL_CONDITIONED_RTOL``) the diagonal fallback of S1.2 is used; non-finite steps become 0, and steps are
    clipped to [-1, 1]. Along a singleton axis (H or W == 1) there is nothing to refine and the step is 0.

    Arguments:
        heatmaps: (B, H, W) float responses.
        points: (B, N, 2) (x, y) integer-valued cell coordinates, e.g. from :func:`nms`.
        eps: Tikhonov term added to the Hessian diagonal.

    Returns:
        (B, N, 2) refined (x, y) in cells, in ``heatmaps.dtype``. Border peaks may move up to half a cell
        past the outer cell centres (i.e. onto the image edge); saddles are not rejected, only clipped.
    """
    _check_heatmaps(heatmaps)
    _check_points(points, heatmaps.shape[0])
    points = points.to(heatmaps.dtype)
    if points.shape[1] == 0:
        return points.clone()
    _, height, width = heatmaps.shape
    stencil = points.new_tensor(_STENCIL)  # (9, 2)
    v = _bilinear(heatmaps[:, None], points[:, :, None] + stencil)[:, 0]  # (B, N, 9)
    v = v.unbind(dim=-1)

    # S1 eq. 4-6: central differences at the centre sample.
    d_x, d_y = 0.5 * (v[1] - v[2]), 0.5 * (v[3] - v[4])
    d_xx, d_yy = v[1] - 2 * v[0] + v[2], v[3] - 2 * v[0] + v[4]
    d_xy = 0.25 * (v[5] + v[6] - v[7] - v[8])

    # delta = -(H + eps*I)^-1 g with the 2x2 inverse written out.
    h_xx, h_yy = d_xx + eps, d_yy + eps
    det = h_xx * h_yy - d_xy * d_xy
    ill = det.abs() <= ILL_CONDITIONED_RTOL * (h_xx**2 + h_yy**2 + 2 * d_xy**2)
    safe_det = torch.where(ill, torch.ones_like(det), det)
    newton_x = -(h_yy * d_x - d_xy * d_y) / safe_det
    newton_y = -(h_xx * d_y - d_xy * d_x) / safe_det
    # Diagonal fallback (S1.2); a zero curvature leaves no information, so no step.
    diag_x = torch.where(h_xx == 0, torch.zeros_like(d_x), -d_x / h_xx)
    diag_y = torch.where(h_yy == 0, torch.zeros_like(d_y), -d_y / h_yy)
    delta = torch.stack([torch.where(ill, diag_x, newton_x), torch.where(ill, diag_y, newton_y)], dim=-1)

    delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
    # A singleton axis already yields D = 0 there; zero the step explicitly so that stays true whatever the values.
    axis_defined = torch.tensor([width > 1, height > 1], device=delta.device)  # (2,) x, y
    delta = torch.where(axis_defined, delta, torch.zeros_like(delta))
    return points + delta.clamp(-MAX_OFFSET, MAX_OFFSET)


def sample_neighbourhood(features: Tensor, points: Tensor, size: int = 3) -> Tensor:
    """Bilinearly sample a ``size x size`` cell neighbourhood of features around each point (§3.2, d_N(i)).

    Arguments:
        features: (B, C, H, W) feature map on the same cell grid as the points.
        points: (B, N, 2) (x, y) cell coordinates, sub-pixel allowed.
        size: odd neighbourhood side; offsets run from -(size // 2) to size // 2 cells.

    Returns:
        (B, N, size * size, C) samples in row-major order (dy outer, dx inner); differentiable w.r.t. features.
        Samples off the grid take the nearest border value.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be 4-D (B, C, H, W), got shape {tuple(features.shape)}")
    _check_points(points, features.shape[0])
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size}")
    half = size // 2
    steps = torch.arange(-half, half + 1, device=points.device, dtype=points.dtype)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    offsets = torch.stack([dx, dy], dim=-1).reshape(size * size, 2)  # (S*S, 2) x, y, dy outer
    samples = _bilinear(features, points[:, :, None] + offsets)  # (B, C, N, S*S)
    return samples.permute(0, 2, 3, 1)


def extract_keypoints(
    heatmaps: Tensor, radius: float = 4.0, max_points: int = 16, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """``Sub-pixel(NMS(heatmaps))`` of eq. 3.

    Returns:
        points: (B, N, 2) refined (x, y) in cells; invalid slots stay (0, 0).
        valid: (B, N) bool, valid slots first.
    """
    points, valid = nms(heatmaps, radius=radius, max_points=max_points)
    refined = refine_subpixel(heatmaps, points, eps=eps)
    return torch.where(valid[..., None], refined, torch.zeros_like(refined)), valid
