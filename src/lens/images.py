"""Minimal stand-in (branch `interfaces`) for branch `reliability`'s lens.images; replaced at merge.

``load_image`` turns what a user handed over into an upright RGB ``PIL.Image`` (EXIF applied, pixel limit
checked before decoding); ``validate_query`` refuses empty queries. Same names and signatures as the real one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lens.errors import InvalidInput

DEFAULT_MAX_PIXELS = 100_000_000


def load_image(source: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An upright RGB image from a PIL image, a path, bytes or a (H, W[, C]) uint8 array."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, str | Path):
        if not Path(source).is_file():
            raise InvalidInput(f"no image file at {source}")
        image = _open(Path(source).read_bytes(), str(source))
    elif isinstance(source, bytes | bytearray):
        image = _open(bytes(source), "image bytes")
    elif isinstance(source, np.ndarray) and source.dtype == np.uint8 and source.ndim in (2, 3):
        image = Image.fromarray(source)
    else:
        raise InvalidInput(f"cannot read an image from a {type(source).__name__}")
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise InvalidInput(
            f"image of {image.width}x{image.height} exceeds the pixel limit of {max_pixels:,} pixels"
        )
    return ImageOps.exif_transpose(image).convert("RGB")


def _open(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidInput(f"{name} is not an image PIL can read: {error}") from None
    return image


def validate_query(text: str) -> str:
    """The query stripped; empty or whitespace-only queries are refused."""
    if not isinstance(text, str):
        raise InvalidInput(f"a query must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInput("empty query")
    return text.strip()
