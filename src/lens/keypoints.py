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
    padding replicates the outer cells for samples that fall off the grid. The sampling grid stays float32
    (at least) whatever the features' dtype: in bf16 a normalised coordinate is off by up to 0.12 cells on a
    24-cell grid, as large as the sub-pixel correction itself. The result is cast back to ``maps.dtype``.
    """
    height, width = maps.shape[-2:]
    work = torch.promote_types(maps.dtype, torch.float32)
    # A singleton axis has no spacing; any normalized value maps to its only cell under align_corners=True.
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], dtype=work, device=xy.device)
    grid = xy.to(work) * scale - 1.0
    out = F.grid_sample(maps.to(work), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(maps.dtype)


@torch.no_grad()
def nms(
    heatmaps: Tensor, radius: float = 4.0, max_points: int = 16, cells: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Greedy radius NMS of S1.1: take the global max, zero everything within ``radius`` cells, repeat.

    Ties go to the lowest row-major index (``torch.argmax``). Selection stops after ``max_points`` points or
    once no value is > 0, so non-positive values are never keypoints. NaNs count as 0. The input is not modified.

    Arguments:
        heatmaps: (B, H, W) float responses.
        radius: suppression radius in cells; a cell is suppressed when its squared distance <= radius**2.
        max_points: N, the number of output slots.
        cells: optional (B, H, W) bool, the cells a keypoint may sit on (the image's own grid, without the
            MLLM's padding: ``valid_cell_mask``); the others are never picked (they count as 0).

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
    if cells is not None:
        if cells.shape != heatmaps.shape:
            raise ValueError(f"cells must be (B, H, W) = {tuple(heatmaps.shape)}, got {tuple(cells.shape)}")
        work = torch.where(cells.reshape(batch, height * width), work, torch.zeros_like(work))
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


def refine_subpixel(
    heatmaps: Tensor, points: Tensor, eps: float = 1e-6, cells: Tensor | None = None
) -> Tensor:
    """Move integer keypoints toward the true peak with one regularized Newton step (S1.2).

    Derivatives are finite differences of the map's own cells. Inside the map they are the paper's central
    differences (S1 eq. 4-6). Where a neighbour is missing (the map's border, a cell outside ``cells``) the
    derivatives along that axis are one-sided three-point differences (exact for a quadratic, like the central
    ones); along an axis with fewer than three usable cells, or whose one-sided fit is not concave, there is no
    step. Replicating the edge value
    instead (``padding_mode="border"``) forces a step of exactly -0.5 cells away from the border whatever the data.
    Where ``H + eps*I`` is ill-conditioned (see ``ILL_CONDITIONED_RTOL``) the diagonal fallback of S1.2 is used;
    non-finite steps become 0, and steps are clipped to [-1, 1].

    Arguments:
        heatmaps: (B, H, W) float responses.
        points: (B, N, 2) (x, y) integer-valued cell coordinates, e.g. from :func:`nms`.
        eps: Tikhonov term added to the Hessian diagonal.
        cells: optional (B, H, W) bool, the cells whose values may be used (the image's own grid).

    Returns:
        (B, N, 2) refined (x, y) in cells, in ``heatmaps.dtype``; saddles are not rejected, only clipped.
    """
    _check_heatmaps(heatmaps)
    _check_points(points, heatmaps.shape[0])
    points = points.to(heatmaps.dtype)
    if points.shape[1] == 0:
        return points.clone()
    batch, height, width = heatmaps.shape
    usable = torch.ones_like(heatmaps, dtype=torch.bool) if cells is None else cells
    flat, usable = heatmaps.reshape(batch, -1), usable.reshape(batch, -1)
    col, row = points[..., 0].round().long(), points[..., 1].round().long()  # (B, N)

    def at(dx: int, dy: int) -> tuple[Tensor, Tensor]:
        """Value and availability (B, N) of the cell (dx, dy) away from each point."""
        c, r = col + dx, row + dy
        inside = (c >= 0) & (c < width) & (r >= 0) & (r < height)
        index = r.clamp(0, height - 1) * width + c.clamp(0, width - 1)
        ok = inside & usable.gather(1, index)
        return torch.where(ok, flat.gather(1, index), torch.zeros_like(flat[:, :1])), ok

    v0 = at(0, 0)[0]
    d_x, d_xx, dir_x, ok_x = _axis_derivatives(v0, at(1, 0), at(-1, 0), at(2, 0), at(-2, 0))
    d_y, d_yy, dir_y, ok_y = _axis_derivatives(v0, at(0, 1), at(0, -1), at(0, 2), at(0, -2))
    # Mixed derivative: the paper's four diagonals where all exist; else the mean of the one-sided 2x2 blocks
    # (a, b) on the side(s) each axis used, a * b * (v(a, b) - v(a, 0) - v(0, b) + v0), also exact for a quadratic.
    diagonals = [at(1, 1), at(-1, -1), at(-1, 1), at(1, -1)]
    central_xy = 0.25 * (diagonals[0][0] + diagonals[1][0] - diagonals[2][0] - diagonals[3][0])
    all_diagonals = diagonals[0][1] & diagonals[1][1] & diagonals[2][1] & diagonals[3][1]
    block_sum, block_count = torch.zeros_like(v0), torch.zeros_like(v0)
    for sa in (-1, 1):
        for sb in (-1, 1):
            (v_ab, ok_ab), (v_a, ok_a), (v_b, ok_b) = at(sa, sb), at(sa, 0), at(0, sb)
            use = ok_ab & ok_a & ok_b & ((dir_x == 0) | (dir_x == sa)) & ((dir_y == 0) | (dir_y == sb))
            block_sum = block_sum + torch.where(
                use, sa * sb * ((v_ab - v_a) - (v_b - v0)), torch.zeros_like(v0)
            )
            block_count = block_count + use.to(v0.dtype)
    one_sided_xy = block_sum / block_count.clamp(min=1)
    central = (dir_x == 0) & (dir_y == 0) & all_diagonals
    d_xy = torch.where(central, central_xy, one_sided_xy)
    d_xy = torch.where(ok_x & ok_y, d_xy, torch.zeros_like(d_xy))

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
    # No usable stencil along an axis (singleton axis, or fewer than three cells): no step along it.
    delta = torch.where(torch.stack([ok_x, ok_y], -1), delta, torch.zeros_like(delta))
    return points + delta.clamp(-MAX_OFFSET, MAX_OFFSET)


def _axis_derivatives(
    v0: Tensor, plus: tuple[Tensor, Tensor], minus: tuple[Tensor, Tensor], plus2: tuple, minus2: tuple
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First and second derivative along one axis at each point (B, N), the direction used (0 central, +1 or
    -1 one-sided) and whether any three-point stencil exists. Central: (v+ - v-) / 2, v+ - 2 v0 + v-.
    One-sided toward s: s (-3 v0 + 4 v_s - v_2s) / 2, v0 - 2 v_s + v_2s, written as differences to v0 so a
    flat map gives exactly 0."""
    (vp, okp), (vm, okm), (vp2, okp2), (vm2, okm2) = plus, minus, plus2, minus2
    central = okp & okm
    forward = ~central & okp & okp2
    backward = ~central & ~forward & okm & okm2
    zero = torch.zeros_like(v0)
    d1 = torch.where(
        central,
        0.5 * (vp - vm),
        torch.where(
            forward,
            0.5 * (4 * (vp - v0) - (vp2 - v0)),
            torch.where(backward, -0.5 * (4 * (vm - v0) - (vm2 - v0)), zero),
        ),
    )
    d2 = torch.where(
        central,
        vp - 2 * v0 + vm,
        torch.where(forward, (vp2 - vp) - (vp - v0), torch.where(backward, (vm2 - vm) - (vm - v0), zero)),
    )
    direction = forward.long() - backward.long()
    # A one-sided fit that is not concave does not locate a peak (Newton would head for its minimum): no step.
    usable = central | ((forward | backward) & (d2 < 0))
    return d1, d2, direction, usable


def sample_neighbourhood(
    features: Tensor, points: Tensor, size: int = 3, grid_sizes: Tensor | None = None
) -> Tensor:
    """Bilinearly sample a ``size x size`` cell neighbourhood of features around each point (§3.2, d_N(i)).

    Arguments:
        features: (B, C, H, W) feature map on the same cell grid as the points.
        points: (B, N, 2) (x, y) cell coordinates, sub-pixel allowed.
        size: odd neighbourhood side; offsets run from -(size // 2) to size // 2 cells.
        grid_sizes: optional (B, 2) (gh_i, gw_i): each image's own grid in the top-left of a padded map.

    Returns:
        (B, N, size * size, C) samples in row-major order (dy outer, dx inner); differentiable w.r.t. features.
        Samples off the image's own grid take the nearest value on it (never a padding cell).
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
    xy = points[:, :, None] + offsets  # (B, N, S*S, 2)
    if grid_sizes is not None:  # border clamping on each image's own grid = padding_mode="border" there
        last = (grid_sizes.flip(-1) - 1).to(xy)[:, None, None, :]  # (B, 1, 1, 2) x, y of the last cell
        xy = torch.minimum(xy.clamp(min=0), last)
    samples = _bilinear(features, xy)  # (B, C, N, S*S)
    return samples.permute(0, 2, 3, 1)


def extract_keypoints(
    heatmaps: Tensor,
    radius: float = 4.0,
    max_points: int = 16,
    eps: float = 1e-6,
    cells: Tensor | None = None,
    subpixel: bool = True,
) -> tuple[Tensor, Tensor]:
    """``Sub-pixel(NMS(heatmaps))`` of eq. 3, on the ``cells`` (B, H, W) bool a keypoint may use (all if None).
    ``subpixel`` False skips the Newton step: ``NMS(heatmaps)``, the ablation without sub-pixel refinement.

    Returns:
        points: (B, N, 2) refined (x, y) in cells; invalid slots stay (0, 0).
        valid: (B, N) bool, valid slots first.
    """
    points, valid = nms(heatmaps, radius=radius, max_points=max_points, cells=cells)
    if not subpixel:
        return points, valid
    refined = refine_subpixel(heatmaps, points, eps=eps, cells=cells)
    return torch.where(valid[..., None], refined, torch.zeros_like(refined)), valid
