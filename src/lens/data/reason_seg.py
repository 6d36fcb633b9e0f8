"""ReasonSeg reader: ``{root}/{split}/<name>.jpg`` beside a LabelMe-style ``<name>.json``.

Each JSON holds ``"text"`` (list of queries, all about the same object), ``"is_sentence"`` (long query vs
short phrase) and ``"shapes"`` (polygons ``{"label", "points": [[x, y], ...], ...}``). Masks follow LISA's
``utils/data_processing.py::get_mask_from_json``; the evaluation protocol follows LISA's
``utils/dataset.py::ValDataset`` (one query per image, the first one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import cv2
import numpy as np

from lens.data.types import IGNORE_INDEX, Sample
from lens.images import load_image

logger = logging.getLogger(__name__)

SOURCE = "reason_seg"
IMAGE_SUFFIX = ".jpg"  # LISA globs only *.jpg
TARGET_VALUE = 1
FLAG_LABEL = "flag"  # LISA skips shapes labelled exactly this (any case): deprecated annotations
IGNORE_LABEL = "ignore"  # shapes whose label contains this (any case) are excluded from evaluation
TRAIN_SPLIT = "train"
REQUIRED_KEYS = ("text", "is_sentence", "shapes")
Subset = Literal["short", "long"]


def _polygon(points: Sequence[Sequence[float]]) -> np.ndarray:
    """(1, n, 2) int32 vertices truncated toward zero, as LISA's ``np.array([points], dtype=np.int32)``."""
    xy = np.asarray(points, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
        raise ValueError(f"points must be a non-empty list of [x, y], got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError("points must be finite numbers")
    return np.array([xy], dtype=np.int32)


def _draw(canvas: np.ndarray, polygon: np.ndarray, value: int) -> None:
    """LISA's two calls, in its order: a closed 1-pixel outline, then the filled interior (in place)."""
    cv2.polylines(canvas, polygon, True, value, 1)
    cv2.fillPoly(canvas, polygon, value)


def rasterize_shapes(shapes: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of LabelMe polygons: 1 target, ``IGNORE_INDEX`` for "ignore" labels, 0 elsewhere.

    Exactly LISA's ``get_mask_from_json`` (tested pixel for pixel against it): "flag" shapes are skipped;
    each polygon's area is its pixel count drawn alone; polygons are drawn in ``np.argsort(areas)[::-1]``
    order (largest first, so smaller ones, often ignore holes or targets inside ignore regions, overwrite
    them), each as ``cv2.polylines`` then ``cv2.fillPoly`` on int32-truncated vertices. ``shape_type`` is
    not read: every shape is a polygon, as in LISA.
    """
    polygons: list[tuple[np.ndarray, int]] = []  # (vertices, value)
    for i, shape in enumerate(shapes):
        if "label" not in shape or "points" not in shape:
            raise ValueError(f"shape {i} needs 'label' and 'points', has {sorted(shape)}")
        label = str(shape["label"]).lower()
        if label == FLAG_LABEL:
            continue
        try:
            vertices = _polygon(shape["points"])
        except ValueError as err:
            raise ValueError(f"shape {i} ({shape['label']!r}): {err}") from err
        polygons.append((vertices, IGNORE_INDEX if IGNORE_LABEL in label else TARGET_VALUE))

    areas = []
    for vertices, _ in polygons:
        alone = np.zeros((height, width), dtype=np.uint8)
        _draw(alone, vertices, TARGET_VALUE)
        areas.append(alone.sum())
    mask = np.zeros((height, width), dtype=np.uint8)
    for j in np.argsort(areas)[::-1] if polygons else []:  # LISA's order, ties included
        _draw(mask, *polygons[j])
    return mask  # (H, W)


@dataclass
class ReasonSegAnnotation:
    texts: list[str]
    is_sentence: bool
    shapes: list[dict[str, Any]]


def read_annotation(path: str | Path) -> ReasonSegAnnotation:
    """Parse and check one ReasonSeg JSON; errors name the file."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")  # some ReasonSeg files are cp1252; LISA falls back the same way
    try:
        anno = json.loads(text)
        missing = [k for k in REQUIRED_KEYS if k not in anno]
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        texts, is_sentence, shapes = anno["text"], anno["is_sentence"], anno["shapes"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"'text' must be a non-empty list of strings, got {texts!r}")
        if not isinstance(is_sentence, bool):
            raise ValueError(f"'is_sentence' must be a bool, got {is_sentence!r}")
        if not isinstance(shapes, list):
            raise ValueError(f"'shapes' must be a list, got {type(shapes).__name__}")
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: {err}") from err
    return ReasonSegAnnotation([t.strip() for t in texts], is_sentence, shapes)


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, EXIF orientation applied (as LabelMe shows the image and cv2.imread loads it)."""
    return np.array(load_image(path, max_pixels=None), dtype=np.uint8)


class ReasonSegDataset(Sequence[Sample]):
    """ReasonSeg samples, images loaded lazily.

    Arguments:
      root: the ReasonSeg folder holding one folder per split.
      split: "train", "val", "test" (any folder name under ``root``).
      one_query_per_image: None = True except for the train split. When True, non-train splits use each
        image's first query (the reference protocol); the train split draws one query per image at random,
        fixed by ``seed``. When False every (image, query) pair is a sample.
      subset: None for all, "short" (``is_sentence`` false) or "long" (true): the paper's query-length split.
      seed: only used to draw train queries in one-query mode.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        one_query_per_image: bool | None = None,
        subset: Subset | None = None,
        seed: int = 0,
    ) -> None:
        if subset not in (None, "short", "long"):
            raise ValueError(f"subset must be None, 'short' or 'long', got {subset!r}")
        self.split_dir = Path(root) / split
        if not self.split_dir.is_dir():
            available = (
                sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
            )
            raise FileNotFoundError(
                f"ReasonSeg split folder {self.split_dir} not found; available: {available}"
            )
        if one_query_per_image is None:
            one_query_per_image = split != TRAIN_SPLIT
        self.one_query_per_image = one_query_per_image

        images = sorted(self.split_dir.glob(f"*{IMAGE_SUFFIX}"))
        if not images:
            raise FileNotFoundError(f"no {IMAGE_SUFFIX} images in {self.split_dir}")
        rng = np.random.default_rng(seed)
        self._annotations: list[ReasonSegAnnotation] = []
        self._images: list[Path] = []
        self._items: list[tuple[int, int]] = []  # (image index, query index)
        for image_path in images:
            json_path = image_path.with_suffix(".json")
            if not json_path.is_file():
                raise FileNotFoundError(f"{image_path} has no annotation {json_path.name}")
            anno = read_annotation(json_path)
            drawn = int(rng.integers(len(anno.texts)))  # drawn before filtering: same pick for any subset
            if subset is not None and anno.is_sentence != (subset == "long"):
                continue
            if not one_query_per_image:
                queries = range(len(anno.texts))
            elif split == TRAIN_SPLIT:
                queries = [drawn]
            else:
                queries = [0]  # LISA ValDataset: sampled_sents = [sampled_sents[0]]
            self._items += [(len(self._images), q) for q in queries]
            self._images.append(image_path)
            self._annotations.append(anno)
        logger.info("ReasonSeg %s: %d images, %d samples", split, len(self._images), len(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image_index, query_index = self._items[index]  # raises IndexError past the end
        path, anno = self._images[image_index], self._annotations[image_index]
        image = load_rgb(path)
        try:
            mask = rasterize_shapes(anno.shapes, *image.shape[:2])
        except ValueError as err:
            raise ValueError(f"{path.with_suffix('.json')}: {err}") from err
        name = path.stem if self.one_query_per_image else f"{path.stem}_{query_index}"
        return Sample(
            image=image,
            query=anno.texts[query_index],
            mask=mask,
            is_sentence=anno.is_sentence,
            source=SOURCE,
            name=name,
        )
