"""LensModel.predict takes what users hand it (lens.images) and refuses bad queries with a typed error."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image
from lens.errors import InvalidInput


def test_predict_applies_exif_orientation(tiny_lens) -> None:
    upright = random_image(24, 40)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 is displayed by a clockwise turn
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    phone = Image.open(io.BytesIO(buffer.getvalue()))
    assert phone.size == (24, 40)
    a, b = tiny_lens.predict(phone, "the ring"), tiny_lens.predict(upright, "the ring")
    assert a.mask.shape == (24, 40)  # the displayed frame, not the stored one
    np.testing.assert_array_equal(a.mask, b.mask)


def test_predict_accepts_arrays_tensors_and_bytes(tiny_lens) -> None:
    upright = random_image(24, 40)
    pixels = np.asarray(upright)
    reference = tiny_lens.predict(upright, "the ring").mask
    buffer = io.BytesIO()
    upright.save(buffer, format="PNG")
    for source in (
        pixels.astype(np.float32) / 255,
        np.moveaxis(pixels, -1, 0).copy(),
        torch.from_numpy(np.moveaxis(pixels, -1, 0).copy()),
        buffer.getvalue(),
    ):
        np.testing.assert_array_equal(tiny_lens.predict(source, "the ring").mask, reference)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("   ", "whitespace"), ("show <image> here", "<image>"), (b"\xff\xfe", "UTF-8")],
)
def test_predict_refuses_bad_queries(tiny_lens, text, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        tiny_lens.predict(random_image(24, 40), text)
    with pytest.raises(InvalidInput, match=message):
        tiny_lens.predict(random_image(24, 40), ["the ring", text])


def test_predict_refuses_a_query_past_the_context(tiny_lens) -> None:
    with pytest.raises(InvalidInput, match="tokens long"):
        tiny_lens.predict(random_image(24, 40), "ring " * 5000)
