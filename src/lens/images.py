"""User input in, checked: every entry point (library, CLI, web, HTTP, dataset readers) turns what it was
handed into an upright 8-bit RGB ``PIL.Image`` with ``load_image`` and checks queries with ``validate_query``.

Why one place: a phone photo's EXIF orientation, a 16-bit PNG, a float or channels-first array each give a
silently wrong mask when converted naively (``Image.open(p).convert("RGB")`` ignores the orientation and
clips 16-bit values to white). Anything that cannot be converted unambiguously is refused with an
``InvalidInput`` naming the image and what is wrong with it.

Decisions (documented in SECURITY.md and docs/reliability.md):
  - Images larger than ``max_pixels`` (default ``DEFAULT_MAX_PIXELS``) are refused before decoding, so a
    decompression bomb costs nothing; ``max_pixels=None`` lifts the limit (up to PIL's own, 2 x 89 MP).
  - Images more elongated than ``MAX_ASPECT``:1 are refused: their short side would round to nothing in
    the decoder's input.
  - Images with a side shorter than ``MIN_SIDE`` are refused (not padded): the MLLM's processor cannot tell
    a 3-pixel-high image from a channels-first one, and padding would invent content.
  - Alpha is dropped (as ``convert("RGB")`` and the reference's ``cv2.imread`` do).
  - Queries longer than the backbone's context are refused, not truncated: a truncated question asks for
    a different object.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lens.errors import ImageNotFound, InvalidInput

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000; a 48 MP phone photo fits twice
MIN_SIDE = 8  # pixels; shorter sides are refused (see the module docstring)
MAX_ASPECT = 100  # longest / shortest side; beyond it the short side vanishes in SAM's 1024-px input
IMAGE_PLACEHOLDERS = ("<image>",)  # strings the MLLM's processor expands into image tokens
TEMPLATE_MARGIN = 64  # tokens kept free for the chat template around a query
CHANNELS = (1, 3, 4)  # gray, RGB, RGBA

ImageSource = Any  # PIL image | str | Path | bytes | file object | numpy array | torch tensor


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An upright 8-bit RGB image from a PIL image, path, bytes, file object, numpy array or torch tensor.

    Arrays: (H, W), (H, W, C) or (C, H, W) with C in 1/3/4 (HWC preferred for numpy, CHW for torch when
    both fit); uint8 as is, uint16 scaled by 255/65535, bool as 0/255, floats in [0, 1] scaled by 255 and
    floats in [0, 255] used as is; a leading batch axis of size 1 is dropped.

    Raises ``ImageNotFound`` for a missing path and ``InvalidInput`` for everything else it refuses.
    """
    if isinstance(source, Image.Image):
        return _finish(source, "image", max_pixels)
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ImageNotFound(f"no image at {path}")
        with path.open("rb") as handle:
            return _open(handle, str(path), max_pixels)
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise InvalidInput("image bytes are empty")
        return _open(io.BytesIO(bytes(source)), "image bytes", max_pixels)
    if hasattr(source, "read"):
        return _open(source, getattr(source, "name", "image file object"), max_pixels)
    if type(source).__module__.startswith("torch"):
        return _finish(
            _from_array(source.detach().cpu().numpy(), "tensor", channels_first=True), "tensor", max_pixels
        )
    if isinstance(source, np.ndarray):
        return _finish(_from_array(source, "array", channels_first=False), "array", max_pixels)
    raise InvalidInput(
        f"cannot read an image from a {type(source).__name__}; pass a PIL image, a path, bytes, "
        "a numpy array or a torch tensor"
    )


def _open(handle: Any, name: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(handle)
    except Image.DecompressionBombError:  # over twice PIL's own limit: refused before ours is consulted
        raise InvalidInput(
            f"{name}: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels exceeds the pixel limit (PIL's)"
        ) from None
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidInput(f"{name}: not a readable image ({err})") from None
    _check_size(image.size, name, max_pixels)  # before decoding a single pixel
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise InvalidInput(f"{name}: not a readable image ({err})") from None
    return _finish(image, name, max_pixels)


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidInput(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the pixel limit of "
            f"{max_pixels:,} (max_pixels)"
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidInput(
            f"{name}: {width}x{height} is too small; both sides must be at least {MIN_SIDE} px"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InvalidInput(f"{name}: {width}x{height} is more elongated than {MAX_ASPECT}:1; crop it first")


def _finish(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    """Orientation applied, high bit depths scaled, 8-bit RGB out."""
    _check_size(image.size, name, max_pixels)
    image = ImageOps.exif_transpose(image)  # a copy with orientation 1 (or the image itself if none)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit data (PIL opens 16-bit PNG / TIFF as "I;16" or "I"): 65535 -> 255, not clipped to white
        values = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(_scale_float(np.asarray(image, dtype=np.float64), name), "L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _scale_float(values: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise InvalidInput(f"{name}: float image holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        values = values * 255.0
    elif low < 0 or high > 255:
        raise InvalidInput(f"{name}: float values span [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _from_array(array: np.ndarray, name: str, channels_first: bool) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) -> PIL; see ``load_image`` for the accepted dtypes and ranges."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        hwc, chw = array.shape[-1] in CHANNELS, array.shape[0] in CHANNELS
        if chw and (channels_first or not hwc):
            array = np.moveaxis(array, 0, -1)
        elif not hwc:
            raise InvalidInput(
                f"{name} of shape {array.shape}: expected (H, W, C) or (C, H, W) with C in {CHANNELS}"
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise InvalidInput(f"{name} of shape {array.shape}: expected (H, W), (H, W, C) or (C, H, W)")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        pixels = np.round(array.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        pixels = _scale_float(array.astype(np.float64), name)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InvalidInput(f"{name} of {array.dtype} spans [{low}, {high}]; expected [0, 255]")
        pixels = array.astype(np.uint8)
    else:
        raise InvalidInput(f"{name} of dtype {array.dtype} is not an image")
    return Image.fromarray(np.ascontiguousarray(pixels))


def validate_query(text: Any, *, placeholders: Sequence[str] = IMAGE_PLACEHOLDERS) -> str:
    """The query, stripped; refuses non-strings, non-UTF-8 bytes, empty text and image placeholders.

    A placeholder such as ``<image>`` would be expanded by the MLLM's processor into a second block of
    image tokens, so the prompt no longer has one image where the head expects it.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidInput(
                f"query is not valid UTF-8 (byte 0x{text[err.start]:02x} at position {err.start})"
            ) from None
    if not isinstance(text, str):
        raise InvalidInput(f"query must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: how Python hands over non-UTF-8 bytes of argv
        raise InvalidInput(
            f"query is not valid UTF-8 (undecodable character at position {err.start})"
        ) from None
    stripped = text.strip()
    if not stripped:
        raise InvalidInput("query is empty" if not text else "query is only whitespace")
    for placeholder in placeholders:
        if placeholder in stripped:
            raise InvalidInput(
                f"query contains {placeholder!r}, which the MLLM reserves for the image; remove it"
            )
    return stripped


def check_query_tokens(text: str, tokenizer: Any, max_tokens: int | None) -> str:
    """Refuse a query over ``max_tokens`` tokens; warn when every token is the tokenizer's unknown token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None and len(ids) > max_tokens:
        raise InvalidInput(
            f"query is {len(ids)} tokens long; the backbone's context leaves room for {max_tokens}"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids and all(i == unk for i in ids):
        logger.warning("every token of the query %r is unknown to the MLLM's tokenizer", text[:80])
    return text


def validate_queries(texts: Sequence[Any], backbone: Any = None) -> list[str]:
    """``validate_query`` on each text, plus the token checks when ``backbone`` has a tokenizer and context."""
    checked = [validate_query(t) for t in texts]
    processor = getattr(backbone, "processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return checked
    config = getattr(getattr(backbone, "model", None), "config", None)
    text_config = getattr(config, "text_config", config)
    context = getattr(text_config, "max_position_embeddings", None)
    grid = getattr(backbone, "grid_size", None)
    max_tokens = None
    if context is not None:
        image_tokens = int(np.prod(grid)) if grid is not None else 0
        max_tokens = max(1, int(context) - image_tokens - TEMPLATE_MARGIN)
    return [check_query_tokens(t, tokenizer, max_tokens) for t in checked]
