"""lens predict / demo figures are drawn at display size, whatever the photo's resolution."""

import time
import tracemalloc

import numpy as np
from PIL import Image

from geometry_compat import make_geometry
from lens.model import Prediction
from lens.visualize import MASK_COLOUR, lens_figure, overlay_mask

CAPTION = 18  # rows above the panels
TITLE = 16  # rows above each panel's image


def _prediction(width: int, height: int) -> Prediction:
    mask = np.zeros((height, width), bool)
    mask[:, : width // 2] = True  # the left half
    attention = np.zeros((12, 12), np.float32)
    attention[6, 3] = 1.0
    return Prediction(
        mask=mask,
        score=0.5,
        keypoints=np.array([[width / 4, height / 2], [3 * width / 4, height / 2]]),
        keypoints_inside=np.array([True, False]),
        attention_map=attention,
        geometry=make_geometry(width, height, 12, 12),
    )


def test_an_8000_pixel_photo_renders_at_display_size_quickly() -> None:
    image = Image.new("RGB", (8000, 8000), (90, 90, 90))
    prediction = _prediction(8000, 8000)
    tracemalloc.start()  # numpy's allocations are traced; 4.3 GB before, at full resolution
    start = time.perf_counter()
    figure = lens_figure(image, prediction, "the left half", height=256)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6, f"{peak / 1e6:.0f} MB"
    assert figure.size == (3 * 256 + 2 * 4, CAPTION + TITLE + 256)
    assert elapsed < 3.0, f"{elapsed:.1f} s"  # 46 s before (0.15 s after) on this CPU
    panel = np.asarray(figure)[CAPTION + TITLE :, 2 * (256 + 4) :]  # the mask panel, (256, 256, 3)
    tinted = np.round(0.5 * 90 + 0.5 * np.array(MASK_COLOUR))
    np.testing.assert_array_equal(panel[:, :127], np.broadcast_to(tinted, (256, 127, 3)))
    np.testing.assert_array_equal(panel[:, 129:], np.full((256, 127, 3), 90))


def test_a_small_image_is_not_resampled() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (100, 200, 3), dtype=np.uint8))
    prediction = _prediction(200, 100)
    figure = np.asarray(lens_figure(image, prediction, "q", height=100))
    panels = figure[CAPTION + TITLE :]
    np.testing.assert_array_equal(panels[:, :200], np.asarray(image))
    np.testing.assert_array_equal(panels[:, 2 * 204 :], np.asarray(overlay_mask(image, prediction.mask)))
