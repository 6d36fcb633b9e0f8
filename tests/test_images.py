"""lens.images: what every entry point does to user input. References are the EXIF spec's eight orientations
written as numpy flips / rotations, hand-computed 16-bit values, and the array layouts themselves."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lens.errors import ImageNotFound, InvalidInput
from lens.images import (
    MIN_SIDE,
    check_query_tokens,
    load_image,
    validate_queries,
    validate_query,
)

RNG = np.random.default_rng(0)
UPRIGHT = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # (H, W, 3), as the photo is displayed

# EXIF orientation -> the stored pixels whose display (per the EXIF 2.3 spec) is UPRIGHT
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # mirrored horizontally
    3: lambda u: u[::-1, ::-1],  # rotated 180
    4: lambda u: u[::-1],  # mirrored vertically
    5: lambda u: u.transpose(1, 0, 2),  # transposed (self-inverse)
    6: lambda u: np.rot90(u, 1),  # displayed by a 90 degree clockwise turn
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),  # transverse (self-inverse)
    8: lambda u: np.rot90(u, -1),  # displayed by a 90 degree counter-clockwise turn
}


def _png_with_orientation(orientation: int) -> bytes:
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](UPRIGHT)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_exif_orientations_come_out_upright(orientation: int, tmp_path: Path) -> None:
    data = _png_with_orientation(orientation)
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    for source in (data, path, str(path), Image.open(io.BytesIO(data))):
        np.testing.assert_array_equal(np.asarray(load_image(source)), UPRIGHT)


def test_16_bit_images_are_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535] * 4] * 8, dtype=np.uint16)  # 8 x 16
    expected = np.array([[0, 1, 128, 255] * 4] * 8, dtype=np.uint8)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # a 16-bit grayscale PNG
    assert Image.open(path).mode in ("I;16", "I")
    for source in (path, Image.fromarray(values), Image.fromarray(values.astype(np.int32)), values):
        out = np.asarray(load_image(source))
        assert out.shape == (8, 16, 3)
        np.testing.assert_array_equal(out[..., 0], expected)
    floats = Image.fromarray(values.astype(np.float32) / 65535, "F")
    np.testing.assert_array_equal(np.asarray(load_image(floats))[..., 1], expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda u: u,
        lambda u: u.astype(np.float32) / 255,  # float HWC in [0, 1]
        lambda u: u.astype(np.float64),  # float HWC in [0, 255]
        lambda u: np.moveaxis(u, -1, 0).copy(),  # uint8 CHW
        lambda u: np.moveaxis(u, -1, 0).astype(np.float32) / 255,  # float CHW
        lambda u: u[None],  # a batch of one
        lambda u: u.astype(np.int64),
        lambda u: torch.from_numpy(np.moveaxis(u, -1, 0).copy()).float() / 255,  # torch CHW float
        lambda u: torch.from_numpy(u.copy()),  # torch HWC uint8
    ],
)
def test_array_layouts_and_dtypes(make) -> None:
    out = np.asarray(load_image(make(UPRIGHT)))
    np.testing.assert_allclose(out.astype(int), UPRIGHT.astype(int), atol=1)


def test_gray_rgba_and_bool_arrays() -> None:
    gray = UPRIGHT[..., 0]
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([UPRIGHT, np.full((12, 20, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), UPRIGHT)  # alpha dropped
    on = np.asarray(load_image(np.eye(10, dtype=bool)))
    assert on[0, 0].tolist() == [255] * 3 and on[0, 1].tolist() == [0] * 3


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (np.zeros((12, 20, 5), np.uint8), "expected \\(H, W, C\\)"),
        (np.zeros((2, 12, 20, 3), np.uint8), "expected \\(H, W\\)"),
        (np.full((12, 20, 3), 300.0), "expected \\[0, 1\\] or \\[0, 255\\]"),
        (np.full((12, 20, 3), -1.0), "expected \\[0, 1\\] or \\[0, 255\\]"),
        (np.full((12, 20, 3), np.nan), "NaN"),
        (np.full((12, 20), 256, np.int32), "expected \\[0, 255\\]"),
        (np.zeros((12, 20), np.complex64), "not an image"),
        (b"", "empty"),
        (b"not an image at all", "not a readable image"),
        (12, "cannot read an image from a int"),
    ],
)
def test_refused_inputs_name_the_problem(source, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_image(source)


def test_missing_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match="no image at"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        load_image(str(tmp_path / "nope.jpg"))
    buffer = io.BytesIO()
    Image.fromarray(UPRIGHT).resize((200, 100)).save(buffer, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InvalidInput, match="cut.png: not a readable image"):
        load_image(truncated)


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    # a 12,000 x 12,000 PNG of zeros compresses to ~150 KB; refused from its header alone
    path = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(path)
    message = "bomb.png: 12000x12000 = 144,000,000 pixels exceeds the pixel limit of 100,000,000"
    with pytest.raises(InvalidInput, match=message):
        load_image(path)
    huge = tmp_path / "huge.png"  # past PIL's own limit (2 x 89 MP), which PIL checks first
    Image.new("1", (20_000, 20_000)).save(huge)
    with pytest.raises(InvalidInput, match="huge.png: more than .* pixels exceeds the pixel limit"):
        load_image(huge)
    with pytest.raises(InvalidInput, match="pixel limit of 100 "):
        load_image(np.zeros((12, 20), np.uint8), max_pixels=100)
    assert load_image(np.zeros((12, 20), np.uint8), max_pixels=240).size == (20, 12)


def test_too_small_image_is_named_with_its_size(tmp_path: Path) -> None:
    path = tmp_path / "sliver.png"
    Image.new("RGB", (3, 2000)).save(path)
    with pytest.raises(InvalidInput, match=f"sliver.png: 3x2000 is too small.*{MIN_SIDE} px"):
        load_image(path)
    assert load_image(np.zeros((MIN_SIDE, 800, 3), np.uint8)).size == (800, MIN_SIDE)
    with pytest.raises(InvalidInput, match="16x2000 is more elongated than 100:1"):
        load_image(np.zeros((2000, 16, 3), np.uint8))


def test_validate_query() -> None:
    assert validate_query("  Please segment the ring.\n") == "Please segment the ring."
    assert validate_query("the café".encode()) == "the café"
    for bad, message in [
        ("", "query is empty"),
        (" \t\n", "only whitespace"),
        (b"caf\xe9", "not valid UTF-8 \\(byte 0xe9 at position 3\\)"),
        ("what is <image> showing?", "'<image>'"),
        (None, "must be a string, got NoneType"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            validate_query(bad)


class _WordTokenizer:
    unk_token_id = 0
    vocab = {"red": 1, "ring": 2}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.vocab.get(w, 0) for w in text.split()]}


def test_query_tokens_context_and_unknown(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = _WordTokenizer()
    assert check_query_tokens("red ring", tokenizer, 2) == "red ring"
    with pytest.raises(InvalidInput, match="3 tokens long; the backbone's context leaves room for 2"):
        check_query_tokens("red red ring", tokenizer, 2)
    with caplog.at_level(logging.WARNING):
        check_query_tokens("zorblax quux", tokenizer, None)
    assert "unknown" in caplog.text


def test_validate_queries_on_the_shipped_backbone_tokenizer(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from lens.assets import resolve_model_id

    mllm = resolve_model_id("lens:synthetic/mllm")
    backbone = SimpleNamespace(
        processor=SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(mllm)),
        model=SimpleNamespace(config=AutoConfig.from_pretrained(mllm)),
        grid_size=(8, 8),
    )
    context = backbone.model.config.text_config.max_position_embeddings
    assert validate_queries(["the red ring"], backbone) == ["the red ring"]
    with pytest.raises(InvalidInput, match="tokens long"):
        validate_queries(["red " * context], backbone)
    with caplog.at_level(logging.WARNING):
        validate_queries(["zorblax quux"], backbone)
    assert "unknown" in caplog.text
