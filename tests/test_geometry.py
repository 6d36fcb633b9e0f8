"""Geometry: hand-computed numbers, round trips, and cross-checks against the Hugging Face processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lens.data.types import IGNORE_INDEX
from lens.geometry import DecoderFrame, GridFrame, ImageGeometry, longest_side_shape

SAM_SIZE = 1024
# (height, width): portrait, landscape, square, odd, extreme aspect ratio
SIZES = [(640, 480), (480, 640), (256, 256), (333, 517), (517, 333), (7, 1000)]
# (height, width) -> SAM (new_h, new_w), computed by hand: int(side * 1024 / long_side + 0.5)
SAM_SHAPES = {
    (480, 640): (768, 1024),  # 480 * 1.6
    (640, 480): (1024, 768),
    (100, 200): (512, 1024),
    (333, 517): (660, 1024),  # 659.56
    (7, 10): (717, 1024),  # 716.8
    (1, 3): (341, 1024),  # 341.33
    (1024, 1024): (1024, 1024),
}


def _geometry(
    width: int, height: int, grid_h: int = 24, grid_w: int | None = None, sam_size: int = SAM_SIZE, **_
) -> ImageGeometry:
    """LLaVA-1.5's grid frame (pad to square) with SAM's decoder frame (longest side + pad)."""
    return ImageGeometry(
        GridFrame.pad_to_square(width, height, grid_h, grid_w),
        DecoderFrame.longest_side(width, height, sam_size),
    )


def _random_points(geometry: ImageGeometry, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """(*shape, 2) x, y uniformly inside the original image."""
    gen = torch.Generator().manual_seed(0)
    unit = torch.rand(*shape, 2, generator=gen, dtype=torch.float64)
    return (unit * torch.tensor([geometry.width, geometry.height], dtype=torch.float64)).to(dtype)


# ----- sizes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hw", "expected"), SAM_SHAPES.items())
def test_longest_side_shape_hand_table(hw: tuple[int, int], expected: tuple[int, int]) -> None:
    assert longest_side_shape(*hw, SAM_SIZE) == expected


@pytest.mark.parametrize("hw", [*SIZES, (100, 200), (1, 3)])
def test_sam_shape_and_points_match_hf_sam_processor(hw: tuple[int, int]) -> None:
    sam_module = pytest.importorskip("transformers.models.sam.image_processing_pil_sam")
    from transformers import SamProcessor

    processor = sam_module.SamImageProcessorPil()
    height, width = hw
    image = Image.fromarray(np.zeros((height, width, 3), np.uint8))
    out = processor(images=image, do_rescale=False, do_normalize=False, do_pad=False)
    assert tuple(out["reshaped_input_sizes"][0]) == longest_side_shape(height, width, SAM_SIZE)

    geometry = _geometry(width=width, height=height, sam_size=SAM_SIZE)
    points = _random_points(geometry, (5,), torch.float64)
    expected = SamProcessor(processor)._normalize_coordinates(SAM_SIZE, points.numpy(), (height, width))
    torch.testing.assert_close(geometry.image_to_decoder(points), torch.from_numpy(expected))


def test_derived_sizes_landscape_by_hand() -> None:
    g = _geometry(width=200, height=100)
    assert (g.grid.origin_x, g.grid.origin_y) == (0, -50)  # pad_top = (200 - 100) // 2
    assert (g.grid.cell_w, g.grid.cell_h) == pytest.approx((200 / 24, 200 / 24))
    assert (g.decoder.resized_h, g.decoder.resized_w) == (512, 1024)


def test_derived_sizes_portrait_odd_pad_by_hand() -> None:
    g = _geometry(width=5, height=8, grid_h=4, grid_w=4)
    assert (g.grid.origin_x, g.grid.origin_y) == (-1, 0)  # (8 - 5) // 2 = 1: the extra column goes right
    assert (g.grid.cell_w, g.grid.cell_h) == (2.0, 2.0)
    torch.testing.assert_close(g.grid_to_image(torch.tensor([0.0, 0.0])), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(g.grid_to_image(torch.tensor([3.0, 3.0])), torch.tensor([6.0, 7.0]))


# ----- point maps by hand ---------------------------------------------------------------------------------------
def test_point_maps_by_hand() -> None:
    g = _geometry(width=200, height=100)
    cell = 200 / 24
    grid = torch.tensor([[0.0, 0.0], [23.0, 23.0], [11.5, 11.5]], dtype=torch.float64)
    image = torch.tensor(
        [[cell / 2, cell / 2 - 50], [23.5 * cell, 23.5 * cell - 50], [100.0, 50.0]], dtype=torch.float64
    )
    torch.testing.assert_close(g.grid_to_image(grid), image)
    torch.testing.assert_close(g.image_to_grid(image), grid)
    # SAM scales 200 x 100 by 5.12 in both axes
    torch.testing.assert_close(g.image_to_decoder(torch.tensor([100.0, 50.0])), torch.tensor([512.0, 256.0]))
    torch.testing.assert_close(
        g.grid_to_decoder(grid[:1]),
        torch.tensor([[cell / 2 * 5.12, (cell / 2 - 50) * 5.12]], dtype=torch.float64),
    )


# ----- round trips ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", SIZES)
def test_round_trip_image_grid_sam_image_float64(hw: tuple[int, int]) -> None:
    g = _geometry(width=hw[1], height=hw[0])
    points = _random_points(g, (2, 3, 7), torch.float64)  # leading batch dims
    back = g.decoder_to_image(g.grid_to_decoder(g.image_to_grid(points)))
    assert back.shape == points.shape and back.dtype == torch.float64
    torch.testing.assert_close(back, points, rtol=0, atol=1e-9)


@pytest.mark.parametrize("hw", SIZES)
def test_round_trips_float32(hw: tuple[int, int]) -> None:
    g = _geometry(width=hw[1], height=hw[0])
    points = _random_points(g, (50,), torch.float32)
    for forward, backward in ((g.image_to_grid, g.grid_to_image), (g.image_to_decoder, g.decoder_to_image)):
        out = backward(forward(points))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, points, rtol=0, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
    grid=st.integers(1, 64),
    x=st.floats(-2, 70),
    y=st.floats(-2, 70),
)
def test_grid_round_trip_any_geometry(width: int, height: int, grid: int, x: float, y: float) -> None:
    g = GridFrame.pad_to_square(width, height, grid, grid + 1)
    cells = torch.tensor([x, y], dtype=torch.float64)
    torch.testing.assert_close(g.image_to_grid(g.grid_to_image(cells)), cells, rtol=0, atol=1e-9)


# ----- MLLM padding against transformers' LLaVA processor ------------------------------------------------------
@pytest.mark.parametrize(("hw", "pixel"), [((7, 4), (5, 2)), ((4, 7), (3, 6)), ((5, 5), (0, 4))])
def test_pad_offsets_match_hf_llava_processor(hw: tuple[int, int], pixel: tuple[int, int]) -> None:
    """No resize, one cell per square pixel: the marked pixel must land in the cell image_to_grid names."""
    llava = pytest.importorskip("transformers.models.llava.image_processing_pil_llava")
    height, width = hw
    image = np.zeros((height, width, 3), np.uint8)
    image[pixel] = 255
    processor = llava.LlavaImageProcessorPil(
        do_pad=True, do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False
    )
    square = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0, 0]  # (s, s)
    side = max(hw)
    g = _geometry(width=width, height=height, grid_h=side, grid_w=side, mllm_size=side)
    col, row = g.image_to_grid(torch.tensor([pixel[1] + 0.5, pixel[0] + 0.5])).tolist()
    assert (row, col) == (round(row), round(col))  # a pixel centre is a cell centre here
    assert list(zip(*np.nonzero(square == 255), strict=True)) == [(round(row), round(col))]


def test_resized_cell_matches_hf_llava_processor() -> None:
    """6 x 3 image -> 6 x 6 square -> 12 x 12 input, 6 x 6 grid: each grid cell is a 2 x 2 block."""
    llava = pytest.importorskip("transformers.models.llava.image_processing_pil_llava")
    image = np.zeros((3, 6, 3), np.uint8)
    image[0, 2] = 255
    processor = llava.LlavaImageProcessorPil(
        do_pad=True,
        do_center_crop=False,
        do_rescale=False,
        do_normalize=False,
        size={"height": 12, "width": 12},
        resample=Image.Resampling.NEAREST,
    )
    pixels = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0, 0]  # (12, 12)
    g = _geometry(width=6, height=3, grid_h=6, grid_w=6, mllm_size=12)
    col, row = (round(v) for v in g.image_to_grid(torch.tensor([2.5, 0.5])).tolist())
    assert (col, row) == (2, 1)
    expected = np.zeros((12, 12), bool)
    expected[2 * row : 2 * row + 2, 2 * col : 2 * col + 2] = True
    np.testing.assert_array_equal(pixels == 255, expected)
    torch.testing.assert_close(g.grid_to_image(torch.tensor([2.0, 1.0])), torch.tensor([2.5, 0.5]))


# ----- mask_to_grid ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [48, 100])  # 100 is not a multiple of 24: cells are 4.1667 px
def test_mask_to_grid_top_left_quarter(side: int) -> None:
    mask = torch.zeros(side, side, dtype=torch.uint8)
    mask[: side // 2, : side // 2] = 1
    grid = _geometry(width=side, height=side).mask_to_grid(mask)
    expected = torch.zeros(24, 24)
    expected[:12, :12] = 1
    torch.testing.assert_close(grid, expected)


def test_mask_to_grid_landscape_padding_is_zero() -> None:
    g = _geometry(width=200, height=100)  # pad_top = 50 = exactly 6 cells of 200 / 24
    grid = g.mask_to_grid(torch.ones(100, 200, dtype=torch.bool))
    expected = torch.zeros(24, 24)
    expected[6:18] = 1
    torch.testing.assert_close(grid, expected)


def test_mask_to_grid_partial_cells_by_hand() -> None:
    """5 x 5 image, 2 x 2 grid of 2.5 px cells: pixel (row 0, col 2) straddles the two top cells."""
    mask = torch.zeros(5, 5)
    mask[0, 2] = 1
    grid = _geometry(width=5, height=5, grid_h=2, grid_w=2).mask_to_grid(mask)
    torch.testing.assert_close(grid, torch.tensor([[0.08, 0.08], [0.0, 0.0]]))  # 0.5 px^2 / 6.25 px^2


@pytest.mark.parametrize("hw", [(48, 96), (47, 96), (96, 72)])
def test_mask_to_grid_matches_adaptive_pool_when_cells_are_whole_pixels(hw: tuple[int, int]) -> None:
    height, width = hw
    g = _geometry(width=width, height=height)
    mask = torch.rand(height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64) > 0.5
    s, pad_left, pad_top = max(hw), -int(g.grid.origin_x), -int(g.grid.origin_y)
    padded = F.pad(mask.double(), (pad_left, s - width - pad_left, pad_top, s - height - pad_top))
    expected = F.adaptive_avg_pool2d(padded[None], (24, 24))[0]
    torch.testing.assert_close(g.mask_to_grid(mask.double()), expected)


def test_mask_to_grid_conserves_area_and_drops_ignore() -> None:
    height, width = 333, 517
    g = _geometry(width=width, height=height)
    mask = torch.randint(0, 2, (height, width), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    mask[:10] = IGNORE_INDEX
    grid = g.mask_to_grid(mask)
    assert grid.dtype == torch.float32 and grid.shape == (24, 24)
    assert grid.min() >= 0 and grid.max() <= 1
    cell_w, cell_h = g.grid.cell_w, g.grid.cell_h
    covered = (mask == 1).sum().item()
    assert grid.double().sum().item() * cell_w * cell_h == pytest.approx(covered, rel=1e-5)


def test_mask_to_grid_rejects_bad_masks() -> None:
    g = _geometry(width=4, height=3)
    with pytest.raises(ValueError, match="mask must be"):
        g.mask_to_grid(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        g.mask_to_grid(torch.full((3, 4), 2.0))


# ----- postprocess_masks ----------------------------------------------------------------------------------------
def test_postprocess_masks_maps_a_box_back() -> None:
    g = _geometry(width=200, height=100)  # SAM frame holds it as 512 x 1024, low-res valid part 128 x 256
    low_res = -torch.ones(2, 3, 256, 256)
    low_res[..., 32:64, 64:128] = (
        1.0  # SAM frame rows [128, 256), cols [256, 512) -> /5.12 -> [25, 50) x [50, 100)
    )
    low_res.requires_grad_(True)
    out = g.postprocess_masks(low_res)
    assert out.shape == (2, 3, 100, 200)
    inside = torch.zeros(100, 200, dtype=torch.bool)
    inside[25:50, 50:100] = True
    margin = torch.zeros_like(inside)  # bilinear blur straddles the box edge by about a pixel
    margin[23:52, 48:102] = True
    margin[27:48, 52:98] = False
    assert (out[..., inside & ~margin] > 0).all()
    assert (out[..., ~inside & ~margin] < 0).all()
    out.sum().backward()
    assert low_res.grad is not None and low_res.grad[..., 32:64, 64:128].abs().sum() > 0


@pytest.mark.parametrize("hw", [(100, 200), (333, 517)])
def test_postprocess_masks_matches_hf_sam_processor(hw: tuple[int, int]) -> None:
    sam_module = pytest.importorskip("transformers.models.sam.image_processing_pil_sam")
    height, width = hw
    g = _geometry(width=width, height=height)
    low_res = torch.randn(1, 2, 256, 256, generator=torch.Generator().manual_seed(3))
    (expected,) = sam_module.SamImageProcessorPil().post_process_masks(
        [low_res], [(height, width)], [(g.decoder.resized_h, g.decoder.resized_w)], binarize=False
    )
    torch.testing.assert_close(g.postprocess_masks(low_res), expected)


# ----- validation and dtypes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs", [{"width": 0, "height": 5}, {"width": 5, "height": -1}, {"width": 2.5, "height": 5}]
)
def test_rejects_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="positive int"):
        GridFrame.pad_to_square(grid_h=24, **kwargs)
    with pytest.raises(ValueError, match="positive int"):
        DecoderFrame.longest_side(input_size=1024, **kwargs)
    with pytest.raises(ValueError, match="positive int"):
        _geometry(width=5, height=5, grid_h=0)
    with pytest.raises(ValueError, match="positive int"):
        longest_side_shape(0, 5, SAM_SIZE)


def test_rejects_bad_points_and_logits() -> None:
    g = _geometry(width=10, height=10)
    for bad in (torch.zeros(4, 3), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
            g.image_to_grid(bad)
    with pytest.raises(ValueError, match="float tensor"):
        g.postprocess_masks(torch.zeros(256, 256, dtype=torch.long))


def test_integer_points_are_promoted() -> None:
    g = _geometry(width=48, height=48)  # cell = 2 px
    out = g.grid_to_image(torch.tensor([[3, 5]]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[7.0, 11.0]]))


# ----- frames of other families and decoders ---------------------------------------------------------------------
def test_valid_cells_mark_the_mllm_padding_by_hand() -> None:
    """1000 x 300 padded to 1000 x 1000 with pad_top 350, 6 x 6 cells of 166.7 px: rows 2 and 3 touch the image."""
    grid = GridFrame.pad_to_square(1000, 300, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[2:4] = True
    assert torch.equal(grid.valid_cells(), expected)
    # Portrait: pad_left = (100 - 33) // 2 = 33 of a 100 px square, 4 cells of 25 px: cols 1 and 2 only.
    assert torch.equal(
        GridFrame.pad_to_square(33, 100, 4).valid_cells()[0], torch.tensor([False, True, True, False])
    )
    assert GridFrame.resize(33, 100, 5, 7).valid_cells().all()


@pytest.mark.parametrize(
    ("width", "height", "gh", "gw"), [(640, 480, 34, 46), (7, 1000, 71, 1), (517, 333, 3, 5)]
)
def test_resize_frame_round_trips_and_conserves_area(width: int, height: int, gh: int, gw: int) -> None:
    """A dynamic-resolution grid (non-square cells, no padding): the image's corners are the grid's corners."""
    g = ImageGeometry(GridFrame.resize(width, height, gh, gw), DecoderFrame.stretch(width, height, 1024))
    corners = torch.tensor([[0.0, 0.0], [width, height]], dtype=torch.float64)
    torch.testing.assert_close(
        g.image_to_grid(corners), torch.tensor([[-0.5, -0.5], [gw - 0.5, gh - 0.5]]).double()
    )
    points = _random_points(g, (20,), torch.float64)
    torch.testing.assert_close(g.decoder_to_image(g.grid_to_decoder(g.image_to_grid(points))), points)
    mask = torch.rand(height, width, generator=torch.Generator().manual_seed(4)) > 0.5
    area = g.mask_to_grid(mask).double().sum().item() * g.grid.cell_w * g.grid.cell_h
    assert area == pytest.approx(mask.sum().item(), rel=1e-5)
    (x0, x1), (y0, y1) = g.grid.image_extent()
    assert (x0, x1, y0, y1) == pytest.approx((-0.5, gw - 0.5, -0.5, gh - 0.5))


def test_stretch_frame_matches_hf_sam2_processor() -> None:
    """SAM 2: 1024 x 1024 stretch; points scale per axis, masks resize straight to the original size."""
    frame = DecoderFrame.stretch(200, 100, 1024)
    torch.testing.assert_close(
        frame.image_to_decoder(torch.tensor([100.0, 50.0])), torch.tensor([512.0, 512.0])
    )
    sam2 = pytest.importorskip("transformers.models.sam2.image_processing_sam2")  # needs torchvision
    low_res = torch.randn(1, 2, 256, 256, generator=torch.Generator().manual_seed(5))
    (expected,) = sam2.Sam2ImageProcessor().post_process_masks([low_res], [(100, 200)], binarize=False)
    torch.testing.assert_close(frame.postprocess_masks(low_res), expected)


def test_geometry_dict_round_trip_and_frame_checks() -> None:
    g = _geometry(width=333, height=517, grid_h=5, grid_w=7)
    assert ImageGeometry.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="grid frame is for a 10x20 image"):
        ImageGeometry(GridFrame.resize(10, 20, 2, 2), DecoderFrame.stretch(20, 10, 1024))


def test_padded_grid_helpers_by_hand() -> None:
    from lens.geometry import grid_cell_index, to_padded_grid

    sizes = torch.tensor([[2, 3], [1, 2]])  # two images: a 2 x 3 and a 1 x 2 grid in a 2 x 3 padded layout
    index = grid_cell_index(sizes, 2, 3)
    assert index.tolist() == [[[0, 1, 2], [3, 4, 5]], [[0, 1, -1], [-1, -1, -1]]]
    values = torch.tensor([[1.0, 2, 3, 4, 5, 6], [7, 8, 99, 99, 99, 99]])  # row 1: cells beyond 2 are padding
    assert to_padded_grid(values, sizes, 2, 3).tolist() == [[[1, 2, 3], [4, 5, 6]], [[7, 8, 0], [0, 0, 0]]]
