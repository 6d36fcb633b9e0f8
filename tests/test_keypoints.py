"""Tests for lens.keypoints against brute-force references and analytic peaks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lens.keypoints import (
    ILL_CONDITIONED_RTOL,
    extract_keypoints,
    nms,
    refine_subpixel,
    sample_neighbourhood,
)


def reference_nms(heatmap: np.ndarray, radius: float, max_points: int) -> list[tuple[int, int]]:
    """S1.1 for one (H, W) map, written as plainly as possible: a list of (x, y)."""
    work = np.where(np.isnan(heatmap), 0.0, heatmap).astype(np.float64)
    height, width = work.shape
    points = []
    while len(points) < max_points:
        best, best_yx = 0.0, None
        for y in range(height):
            for x in range(width):
                if work[y, x] > best:  # strict: the first (row-major) maximum wins ties
                    best, best_yx = work[y, x], (y, x)
        if best_yx is None:
            break
        cy, cx = best_yx
        points.append((cx, cy))
        for y in range(height):
            for x in range(width):
                if (x - cx) ** 2 + (y - cy) ** 2 <= radius * radius:
                    work[y, x] = 0.0
    return points


def assert_matches_reference(heatmaps: torch.Tensor, radius: float, max_points: int) -> None:
    original = heatmaps.clone()
    points, valid = nms(heatmaps, radius=radius, max_points=max_points)
    assert torch.equal(heatmaps, original), "input was mutated"
    assert points.shape == (heatmaps.shape[0], max_points, 2) and valid.shape == points.shape[:2]
    for b in range(heatmaps.shape[0]):
        expected = reference_nms(heatmaps[b].numpy(), radius, max_points)
        count = len(expected)
        assert valid[b].tolist() == [True] * count + [False] * (max_points - count)
        assert points[b, :count].tolist() == [[float(x), float(y)] for x, y in expected]
        assert not points[b, count:].any(), "invalid slots must hold (0, 0)"


@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_reference_on_random_maps(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    heatmaps = torch.randn(3, 12, 17, generator=gen)  # about half the values are <= 0
    assert_matches_reference(heatmaps, radius=[4.0, 1.5, 0.0, 2.9][seed], max_points=[16, 5, 40, 8][seed])


@settings(max_examples=150, deadline=None)
@given(
    heatmaps=st.integers(1, 3).flatmap(
        lambda b: hnp.arrays(
            np.float32,
            st.tuples(st.just(b), st.integers(1, 9), st.integers(1, 9)),
            # Few distinct values -> many ties; zeros and negatives must never be selected.
            elements=st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0]) | st.floats(-5, 5, width=32),
        )
    ),
    radius=st.sampled_from([0.0, 1.0, math.sqrt(2), 2.0, 4.0]) | st.floats(0, 8),
    max_points=st.integers(1, 20),
)
def test_nms_matches_reference_hypothesis(heatmaps: np.ndarray, radius: float, max_points: int) -> None:
    heatmaps = torch.from_numpy(heatmaps)
    assert_matches_reference(heatmaps, radius, max_points)
    points, valid = nms(heatmaps, radius=radius, max_points=max_points)
    for b in range(heatmaps.shape[0]):
        kept = points[b, valid[b]]
        if len(kept) > 1:  # radius rule
            dist = torch.cdist(kept.double(), kept.double())
            assert (dist[~torch.eye(len(kept), dtype=torch.bool)] > radius).all()
        for x, y in kept.long().tolist():
            assert heatmaps[b, y, x] > 0


def test_nms_ties_take_lowest_row_major_index() -> None:
    heatmaps = torch.zeros(1, 4, 4)
    heatmaps[0, 2, 0] = heatmaps[0, 1, 3] = heatmaps[0, 3, 3] = 1.0
    points, valid = nms(heatmaps, radius=1.0, max_points=3)
    assert points[0].tolist() == [[3.0, 1.0], [0.0, 2.0], [3.0, 3.0]] and valid.all()


def test_nms_stop_rules() -> None:
    # All-zero and all-negative maps give nothing; one peak with a radius covering the map gives one point.
    heatmaps = torch.stack([torch.zeros(5, 5), -torch.ones(5, 5), torch.rand(5, 5) + 0.1])
    points, valid = nms(heatmaps, radius=10.0, max_points=4)
    assert valid.tolist() == [[False] * 4, [False] * 4, [True, False, False, False]]
    assert not points[:2].any() and not points[2, 1:].any()
    # Radius 0 suppresses only the chosen cell: all 25 positive cells, in decreasing order, capped at max_points.
    values = torch.randperm(25).float().add(1).reshape(1, 5, 5)
    points, valid = nms(values, radius=0.0, max_points=30)
    assert valid.sum() == 25
    picked = values[0, points[0, :25, 1].long(), points[0, :25, 0].long()]
    assert torch.equal(picked, torch.arange(25, 0, -1).float())


def test_nms_nan_is_never_selected() -> None:
    heatmaps = torch.tensor([[[float("nan"), 0.5, 0.0]]])
    points, valid = nms(heatmaps, radius=0.0, max_points=2)
    assert points[0].tolist() == [[1.0, 0.0], [0.0, 0.0]] and valid.tolist() == [[True, False]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: nms(torch.zeros(4, 4)), "heatmaps must be 3-D"),
        (lambda: nms(torch.zeros(1, 4, 4, dtype=torch.long)), "floating point"),
        (lambda: nms(torch.zeros(1, 0, 4)), "H, W >= 1"),
        (lambda: nms(torch.zeros(1, 4, 4), radius=-1.0), "radius"),
        (lambda: nms(torch.zeros(1, 4, 4), max_points=0), "max_points"),
        (lambda: refine_subpixel(torch.zeros(2, 4, 4), torch.zeros(1, 3, 2)), "points must be"),
        (lambda: sample_neighbourhood(torch.zeros(1, 4, 4), torch.zeros(1, 3, 2)), "features must be 4-D"),
        (lambda: sample_neighbourhood(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2), size=2), "size"),
        (lambda: sample_neighbourhood(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2), size=-1), "size"),
    ],
)
def test_invalid_inputs_raise(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def grid_max_points(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, 1, 2) float (x, y) of each map's argmax."""
    index = heatmaps.flatten(1).argmax(dim=1)
    width = heatmaps.shape[2]
    return torch.stack([index % width, index // width], dim=-1)[:, None].to(heatmaps.dtype)


def coordinate_grid(height: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij"
    )
    return xs, ys


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_subpixel_recovers_quadratic_peak(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    xs, ys = coordinate_grid(11, 13, dtype)
    maps, peaks = [], []
    for _ in range(8):
        a, b = (0.2 + torch.rand(2, generator=gen)).tolist()
        c = (torch.rand(1, generator=gen).item() * 2 - 1) * math.sqrt(a * b)  # c^2 < 4ab: concave peak
        x0, y0 = 6 + torch.rand(1, generator=gen).item() - 0.5, 5 + torch.rand(1, generator=gen).item() - 0.5
        maps.append(-a * (xs - x0) ** 2 - b * (ys - y0) ** 2 - c * (xs - x0) * (ys - y0))
        peaks.append([x0, y0])
    heatmaps, peaks = torch.stack(maps), torch.tensor(peaks, dtype=dtype)[:, None]
    start = grid_max_points(heatmaps)
    assert ((start - peaks).abs() < 1).all()  # precondition: the peak lies within the clip range
    refined = refine_subpixel(heatmaps, start)
    assert refined.dtype == dtype
    torch.testing.assert_close(refined, peaks, atol=1e-3, rtol=0)


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_subpixel_recovers_gaussian_peak(sigma: float) -> None:
    gen = torch.Generator().manual_seed(int(sigma * 10))
    xs, ys = coordinate_grid(16, 20, torch.float32)
    peaks = torch.rand(6, 1, 2, generator=gen) - 0.5 + torch.tensor([9.0, 7.0])
    heatmaps = torch.stack(
        [torch.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma**2)) for x0, y0 in peaks[:, 0].tolist()]
    )
    start = grid_max_points(heatmaps)
    refined = refine_subpixel(heatmaps, start)
    assert (refined - peaks).norm(dim=-1).max() < 0.1
    assert (refined - peaks).norm(dim=-1).mean() < (start - peaks).norm(dim=-1).mean()


def test_subpixel_flat_neighbourhood_gives_zero_step() -> None:
    heatmaps = torch.stack([torch.full((5, 6), 0.7), torch.zeros(5, 6)])
    points = torch.tensor([[[2.0, 2.0], [0.0, 4.0]], [[5.0, 0.0], [3.0, 1.0]]])
    assert torch.equal(refine_subpixel(heatmaps, points), points)


def test_subpixel_saddle_noise_and_borders_are_clipped_and_finite() -> None:
    gen = torch.Generator().manual_seed(3)
    xs, ys = coordinate_grid(9, 9, torch.float32)
    saddle = (xs - 4.3) ** 2 - (ys - 3.6) ** 2
    noise = torch.rand(9, 9, generator=gen)
    overflow = torch.zeros(9, 9)
    overflow[0, 8] = 1e30  # the Hessian determinant overflows float32: the step must fall back to 0
    heatmaps = torch.stack([saddle, noise, overflow])
    corners = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0], [4.0, 4.0]])
    points = torch.cat([corners, torch.randint(0, 9, (20, 2), generator=gen).float()]).expand(3, -1, -1)
    delta = refine_subpixel(heatmaps, points) - points
    assert torch.isfinite(delta).all() and (delta.abs() <= 1).all()
    assert (delta[0].abs() == 1).any(), "a saddle should drive some steps into the clip"
    assert torch.equal(delta[2, 1], torch.zeros(2))


@pytest.mark.parametrize(
    ("x0", "y0"),
    [(0.2, 4.6), (-0.3, 5.1), (12.3, 3.4), (11.8, 9.8), (6.4, 0.3), (5.7, -0.2), (0.3, 0.2), (11.6, 10.3)],
)
def test_subpixel_recovers_quadratic_peaks_on_border_cells(x0: float, y0: float) -> None:
    """Peaks on the outer cells (edges and corners): one-sided differences are exact for a quadratic, so the step
    lands on the analytic peak. Replicating the edge value instead moves every border peak by -0.5 cells
    (x0 = 0.2 came out at -0.43), whatever the data."""
    xs, ys = coordinate_grid(11, 13, torch.float64)
    a, b, c = 0.7, 0.5, 0.2  # c^2 < 4ab: a concave peak
    heatmaps = (-a * (xs - x0) ** 2 - b * (ys - y0) ** 2 - c * (xs - x0) * (ys - y0))[None]
    start = grid_max_points(heatmaps)
    assert start[0, 0, 0] in (0, 12) or start[0, 0, 1] in (0, 10)  # precondition: a border cell
    refined = refine_subpixel(heatmaps, start)
    torch.testing.assert_close(
        refined[0, 0], torch.tensor([x0, y0], dtype=torch.float64), atol=1e-5, rtol=0
    )  # eps = 1e-6 shifts it ~1e-7


def test_subpixel_uses_only_the_given_cells() -> None:
    """A padded map (a batch mixing grid sizes): cells outside the image's own 7 x 9 grid hold garbage, and the
    peak on that grid's border is still found exactly."""
    xs, ys = coordinate_grid(11, 13, torch.float64)
    heatmaps = (-0.6 * (xs - 8.3) ** 2 - 0.4 * (ys - 3.2) ** 2)[None].clone()
    cells = torch.zeros(1, 11, 13, dtype=torch.bool)
    cells[:, :7, :9] = True
    heatmaps[~cells] = (
        50.0 * torch.rand(int((~cells).sum()), generator=torch.Generator().manual_seed(0)).double()
    )
    refined = refine_subpixel(heatmaps, torch.tensor([[[8.0, 3.0]]], dtype=torch.float64), cells=cells)
    torch.testing.assert_close(
        refined[0, 0], torch.tensor([8.3, 3.2], dtype=torch.float64), atol=1e-5, rtol=0
    )  # eps = 1e-6 shifts it ~1e-7


def test_subpixel_border_without_a_concave_fit_takes_no_step() -> None:
    # A lone spike in the corner: the one-sided fits along both axes are convex (0 - 2 * 0 + 0 < 1 fails), so there
    # is no peak to move to and the keypoint stays on its cell.
    heatmaps = torch.zeros(1, 9, 9, dtype=torch.float64)
    heatmaps[0, 0, 8] = 1.0
    point = torch.tensor([[[8.0, 0.0]]], dtype=torch.float64)
    assert torch.equal(refine_subpixel(heatmaps, point), point)


def test_nms_never_picks_excluded_cells() -> None:
    """Cells outside ``cells`` (the MLLM's padding, a smaller image's part of a padded batch) are never keypoints,
    however high their response."""
    gen = torch.Generator().manual_seed(1)
    heatmaps = torch.rand(4, 8, 10, generator=gen)
    cells = torch.rand(4, 8, 10, generator=gen) > 0.6
    heatmaps[~cells] += 10.0
    points, valid = nms(heatmaps, radius=1.0, max_points=30, cells=cells)
    cols, rows = points[..., 0].long(), points[..., 1].long()
    picked = cells[torch.arange(4)[:, None], rows, cols]
    assert valid.any() and picked[valid].all()
    assert (valid.sum(1) <= cells.flatten(1).sum(1)).all()


def test_sampling_under_bf16_uses_float32_locations() -> None:
    """bf16 features are sampled at float32 locations: the same as sampling their float32 copy, then rounding.
    A bf16 sampling grid moves locations by up to ~0.1 cells on a 24-cell map."""
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, 8, 24, 24, generator=gen).to(torch.bfloat16)
    points = torch.rand(2, 16, 2, generator=gen) * 23
    got = sample_neighbourhood(features, points, size=3)
    assert got.dtype == torch.bfloat16
    expected = sample_neighbourhood(features.float(), points, size=3).to(torch.bfloat16)
    assert torch.equal(got, expected)


def test_sample_neighbourhood_clamps_to_each_images_own_grid() -> None:
    """On a padded map, a neighbourhood reaching past an image's own grid takes that grid's border values, never
    the padding: equal to sampling the image's own map alone."""
    gen = torch.Generator().manual_seed(3)
    own = torch.randn(1, 4, 5, 6, generator=gen, dtype=torch.float64)
    padded = torch.full((1, 4, 9, 9), 1e6, dtype=torch.float64)
    padded[..., :5, :6] = own
    points = torch.tensor([[[5.0, 4.0], [0.0, 0.0], [5.4, 2.2]]], dtype=torch.float64)
    got = sample_neighbourhood(padded, points, size=3, grid_sizes=torch.tensor([[5, 6]]))
    torch.testing.assert_close(got, sample_neighbourhood(own, points, size=3), rtol=0, atol=0)


def test_subpixel_ill_conditioned_uses_diagonal_fallback() -> None:
    # f = -(x + y - 9.6)^2 has a rank-1 Hessian [[-2, -2], [-2, -2]]: exactly the paper's ill-conditioned case.
    xs, ys = coordinate_grid(10, 10, torch.float64)
    heatmaps = (-((xs + ys - 9.6) ** 2))[None]
    eps = 1e-6
    det = (-2 + eps) ** 2 - 4
    assert abs(det) <= ILL_CONDITIONED_RTOL * (2 * (-2 + eps) ** 2 + 2 * 4)
    refined = refine_subpixel(heatmaps, torch.tensor([[[5.0, 4.0]]], dtype=torch.float64), eps=eps)
    d = 1.2  # D_x = D_y = -2 * (5 + 4 - 9.6)
    expected = torch.tensor([5.0, 4.0], dtype=torch.float64) - d / (-2 + eps)
    torch.testing.assert_close(refined[0, 0], expected)


def test_subpixel_singleton_axes() -> None:
    row = torch.exp(-((torch.arange(9.0) - 4.3) ** 2) / 8)
    along_x = refine_subpixel(row[None, None], torch.tensor([[[4.0, 0.0]]]))
    along_y = refine_subpixel(row[None, :, None], torch.tensor([[[0.0, 4.0]]]))
    single = refine_subpixel(torch.ones(1, 1, 1), torch.zeros(1, 2, 2))
    assert along_x[0, 0, 1] == 0 and abs(along_x[0, 0, 0] - 4.3) < 0.05
    assert along_y[0, 0, 0] == 0 and abs(along_y[0, 0, 1] - 4.3) < 0.05
    assert torch.equal(single, torch.zeros(1, 2, 2))


def test_extract_keypoints_finds_two_peaks_and_zeroes_invalid_slots() -> None:
    xs, ys = coordinate_grid(24, 24, torch.float32)
    peaks = [(5.3, 6.8, 1.0), (17.6, 15.2, 0.8)]
    heatmap = sum(h * torch.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * 2.0**2)) for x0, y0, h in peaks)
    heatmaps = torch.stack([heatmap - 0.3, torch.zeros(24, 24)])  # negatives away from the peaks
    points, valid = extract_keypoints(heatmaps, radius=4.0, max_points=16, eps=1e-6)
    assert valid[0].sum() == 2 and not valid[1].any()
    torch.testing.assert_close(points[0, :2], torch.tensor([p[:2] for p in peaks]), atol=0.1, rtol=0)
    assert not points[0, 2:].any() and not points[1].any()


def reference_bilinear(feature: np.ndarray, x: float, y: float) -> np.ndarray:
    """Border-clamped bilinear interpolation of a (C, H, W) map at (x, y) cells."""
    _, height, width = feature.shape
    x, y = min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    wx, wy = x - x0, y - y0
    top = (1 - wx) * feature[:, y0, x0] + wx * feature[:, y0, x1]
    bottom = (1 - wx) * feature[:, y1, x0] + wx * feature[:, y1, x1]
    return (1 - wy) * top + wy * bottom


@pytest.mark.parametrize("size", [1, 3, 5])
def test_sample_neighbourhood_matches_hand_bilinear(size: int) -> None:
    gen = torch.Generator().manual_seed(size)
    features = torch.randn(2, 4, 7, 9, generator=gen, dtype=torch.float64)
    points = torch.tensor(
        [
            [[0.0, 0.0], [3.0, 2.0], [8.0, 6.0], [4.25, 3.5]],
            [[1.7, 5.9], [8.6, 0.2], [-0.4, 2.0], [6.0, 3.3]],
        ],
        dtype=torch.float64,
    )
    out = sample_neighbourhood(features, points, size=size)
    assert out.shape == (2, 4, size * size, 4)
    half = size // 2
    for b in range(2):
        for n in range(4):
            x, y = points[b, n].tolist()
            expected = [
                reference_bilinear(features[b].numpy(), x + dx, y + dy)
                for dy in range(-half, half + 1)
                for dx in range(-half, half + 1)
            ]
            np.testing.assert_allclose(out[b, n].numpy(), np.stack(expected), atol=1e-12)
    # At integer points inside the grid the samples are plain lookups.
    assert torch.equal(out[0, 1, (size * size) // 2], features[0, :, 2, 3])


def test_sample_neighbourhood_gradients_flow_to_features() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    points = torch.tensor([[[2.3, 1.6], [0.0, 4.0]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: sample_neighbourhood(f, points, size=3), (features,))
    sample_neighbourhood(features, points, size=1)[0, 0, 0, 0].backward()
    # The single sample at (2.3, 1.6) spreads its gradient over the four surrounding cells of channel 0.
    grad = features.grad[0, 0]
    torch.testing.assert_close(
        grad[1:3, 2:4], torch.tensor([[0.7 * 0.4, 0.3 * 0.4], [0.7 * 0.6, 0.3 * 0.6]]).double()
    )
    assert grad.sum().item() == pytest.approx(1.0) and not features.grad[0, 1].any()
