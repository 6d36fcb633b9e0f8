"""Semantic- and part-segmentation readers: LISA's "sem_seg" training group, one class phrase per target.

Every reader maps an image index to a ``list[Sample]``: up to ``num_classes_per_sample`` classes present in
that image (LISA samples 3), one Sample per class, all sharing the same image array. Which classes are drawn
depends only on ``(seed, epoch, index)``, so a resumed run sees exactly the samples it would have seen; call
``set_epoch`` once per pass (as with torch's ``DistributedSampler``) or use ``sample(index, epoch)``. With
``num_classes_per_sample=None`` every class present is returned, in a fixed order (evaluation, inspection).
An image without any usable class gives ``[]``.

Masks: 1 = the class, 0 = any other labelled pixel, ``IGNORE_INDEX`` = pixels whose label is unknown or was
dropped (ADE20K's "other", COCO-Stuff's 255 and its "-" classes, Mapillary's non-evaluated "unlabeled").
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lens.data.types import IGNORE_INDEX, Sample

logger = logging.getLogger(__name__)

SEMANTIC_SOURCES = ("ade20k", "cocostuff", "paco_lvis", "pascal_part", "mapillary")
_LABEL_VALUES = 256  # label maps are 8-bit PNGs
_PART_SEPARATOR = ":"  # PACO / PASCAL-Part category names are "object:part"
_LVIS_QUALIFIER = "_("  # LVIS disambiguates with a suffix: "bow_(weapon)" -> "bow"
_COCOSTUFF_DROPPED = "-"  # LISA leaves out COCO-Stuff classes like "wall-other": not natural phrases

A = TypeVar("A")  # a reader's per-image annotation (a class-id map, COCO annotations by phrase)


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, whatever the file's own mode (ADE20K has grayscale JPEGs)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class SemanticReader(Sequence[list[Sample]], Generic[A]):
    """What all readers share: index checks, the deterministic class draw, and Sample assembly."""

    source: ClassVar[str]

    def __init__(self, num_classes_per_sample: int | None = 3, seed: int = 0) -> None:
        if num_classes_per_sample is not None and num_classes_per_sample < 1:
            raise ValueError(f"num_classes_per_sample must be >= 1 or None, got {num_classes_per_sample}")
        self.num_classes_per_sample = num_classes_per_sample
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _image_path(self, index: int) -> Path: ...

    @abstractmethod
    def _annotation(self, index: int) -> A: ...

    @abstractmethod
    def _phrases(self, annotation: A) -> list[str]:
        """Class phrases present in the image, in an order fixed by the annotation alone."""

    @abstractmethod
    def _mask(self, annotation: A, phrase: str) -> np.ndarray:
        """(H, W) uint8 mask of ``phrase``: 1 / 0 / IGNORE_INDEX."""

    def __getitem__(self, index: int) -> list[Sample]:  # type: ignore[override]  # no slices
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int = 0) -> list[Sample]:
        """The Samples of image ``index`` for pass ``epoch``: a pure function of (seed, epoch, index)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.source}: index {index} out of range for {len(self)} images")
        index %= len(self)
        annotation = self._annotation(index)
        phrases = self._phrases(annotation)
        if self.num_classes_per_sample is not None and len(phrases) > self.num_classes_per_sample:
            rng = np.random.default_rng((self.seed, epoch, index))
            chosen = rng.choice(len(phrases), size=self.num_classes_per_sample, replace=False)
            phrases = [phrases[i] for i in chosen]
        if not phrases:
            logger.debug("%s: image %d has no usable class", self.source, index)
            return []
        path = self._image_path(index)
        image = read_rgb(path)
        return [
            Sample(image, phrase, self._mask(annotation, phrase), False, self.source, f"{path.stem}:{phrase}")
            for phrase in phrases
        ]


class LabelMapReader(SemanticReader[np.ndarray]):
    """Datasets whose annotation is one PNG of class values per image (ADE20K, COCO-Stuff, Mapillary).

    ``names_by_value`` maps a raw label value to its phrase; values it leaves out are ignored. Values sharing
    a phrase are merged into one class.
    """

    def __init__(
        self,
        image_paths: Sequence[Path],
        label_paths: Sequence[Path],
        names_by_value: Mapping[int, str],
        num_classes_per_sample: int | None = 3,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes_per_sample, seed)
        if len(image_paths) != len(label_paths):
            raise ValueError(f"{self.source}: {len(image_paths)} images but {len(label_paths)} label maps")
        missing = [str(p) for p in [*image_paths, *label_paths] if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.source}: {len(missing)} missing file(s), e.g. {missing[0]}")
        self.image_paths = list(image_paths)
        self.label_paths = list(label_paths)
        self.phrases = list(dict.fromkeys(names_by_value[v] for v in sorted(names_by_value)))
        if len(self.phrases) >= IGNORE_INDEX:
            raise ValueError(f"{self.source}: {len(self.phrases)} classes do not fit beside IGNORE_INDEX")
        class_of_phrase = {phrase: i for i, phrase in enumerate(self.phrases)}
        self._class_of_value = np.full(_LABEL_VALUES, IGNORE_INDEX, dtype=np.uint8)  # (256,) raw -> class
        for value, phrase in names_by_value.items():
            self._class_of_value[value] = class_of_phrase[phrase]
        logger.info("%s: %d images, %d classes", self.source, len(self), len(self.phrases))

    def __len__(self) -> int:
        return len(self.image_paths)

    def _image_path(self, index: int) -> Path:
        return self.image_paths[index]

    def _annotation(self, index: int) -> np.ndarray:
        with Image.open(self.label_paths[index]) as label_image:
            label = np.asarray(label_image)  # palette PNGs read as their indices
        if label.ndim != 2 or label.dtype != np.uint8:
            raise ValueError(f"{self.label_paths[index]}: expected an 8-bit single-channel label map")
        return self._class_of_value[label]  # (H, W) class ids, IGNORE_INDEX where unknown

    def _phrases(self, annotation: np.ndarray) -> list[str]:
        return [self.phrases[c] for c in np.unique(annotation) if c != IGNORE_INDEX]

    def _mask(self, annotation: np.ndarray, phrase: str) -> np.ndarray:
        target = (annotation == self.phrases.index(phrase)).astype(np.uint8)
        return np.where(annotation == IGNORE_INDEX, IGNORE_INDEX, target).astype(np.uint8)


def _paired_files(
    image_dir: Path, label_dir: Path, image_suffix: str = ".jpg"
) -> tuple[list[Path], list[Path]]:
    """Label maps in ``label_dir`` and their same-stem images, sorted by name."""
    labels = sorted(label_dir.glob("*.png"))
    if not labels:
        raise FileNotFoundError(f"no label maps (*.png) in {label_dir}")
    return [image_dir / f"{p.stem}{image_suffix}" for p in labels], labels


def read_ade20k_class_names(path: str | Path) -> list[str]:
    """The 150 ADE20K class names, in label order (value 1 first).

    Reads the dataset's ``objectInfo150.txt`` (tab-separated; each name is a synonym list whose first entry
    is kept, which gives LISA's list except "television" for its "television receiver") or a JSON list of
    names such as LISA's ``ade20k_classes.json``.
    """
    path = Path(path)
    if path.suffix == ".json":
        return [str(name) for name in json.loads(path.read_text())]
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    rows.sort(key=lambda cols: int(cols[0]))
    return [cols[-1].split(",")[0].strip().lower() for cols in rows]


class ADE20KReader(LabelMapReader):
    """ADEChallengeData2016: ``images/<split>/*.jpg``, ``annotations/<split>/*.png``; value 0 ("other") ignored."""

    source = "ade20k"

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        class_names_file: str | Path | None = None,
        num_classes_per_sample: int | None = 3,
        seed: int = 0,
    ) -> None:
        root = Path(root)
        names = read_ade20k_class_names(class_names_file or root / "objectInfo150.txt")
        images, labels = _paired_files(root / "images" / split, root / "annotations" / split)
        names_by_value = {i + 1: name for i, name in enumerate(names)}  # value v is class v - 1
        super().__init__(images, labels, names_by_value, num_classes_per_sample, seed)


def read_cocostuff_class_names(path: str | Path) -> dict[int, str]:
    """``{category id: name}`` from cocostuff's ``id: name`` list (``0: unlabeled`` is dropped)."""
    names = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            category_id, name = line.split(":", 1)
            names[int(category_id)] = name.strip()
    names.pop(0, None)
    return names


class CocoStuffReader(LabelMapReader):
    """COCO-Stuff stuffthingmaps: ``<label_dir>/*.png`` (value = category id - 1, 255 unlabeled) + COCO images.

    Classes whose name contains "-" ("wall-other", "desk-stuff") are ignored, as in LISA.
    """

    source = "cocostuff"

    def __init__(
        self,
        label_dir: str | Path,
        image_dir: str | Path,
        class_names_file: str | Path,
        num_classes_per_sample: int | None = 3,
        seed: int = 0,
    ) -> None:
        images, labels = _paired_files(Path(image_dir), Path(label_dir))
        names_by_value = {
            category_id - 1: name
            for category_id, name in read_cocostuff_class_names(class_names_file).items()
            if _COCOSTUFF_DROPPED not in name
        }
        super().__init__(images, labels, names_by_value, num_classes_per_sample, seed)


class MapillaryReader(LabelMapReader):
    """Mapillary Vistas v2.0: ``<split>/v2.0/labels/*.png``, ``<split>/images/*.jpg``, ``config_v2.0.json``.

    Phrases are the lower-cased "readable" names (as in LISA); labels with ``evaluate: false`` (the
    "unlabeled" void class) are ignored instead of being asked for.
    """

    source = "mapillary"

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        num_classes_per_sample: int | None = 3,
        seed: int = 0,
    ) -> None:
        root = Path(root)
        labels_config = json.loads((root / "config_v2.0.json").read_text())["labels"]
        names_by_value = {
            value: label["readable"].strip().lower()
            for value, label in enumerate(labels_config)
            if label.get("evaluate", True)
        }
        images, labels = _paired_files(root / split / "images", root / split / "v2.0" / "labels")
        super().__init__(images, labels, names_by_value, num_classes_per_sample, seed)


def part_phrase(category_name: str) -> str:
    """PACO / PASCAL-Part category name to a query: "dog:head" -> "the head of the dog".

    LVIS qualifiers are dropped and underscores become spaces ("car_(automobile):wheel" -> "the wheel of
    the car"); an object-only name stays as is ("trash_can" -> "trash can").
    """

    def clean(word: str) -> str:
        return word.split(_LVIS_QUALIFIER)[0].replace("_", " ").strip().lower()

    words = [clean(w) for w in category_name.strip().split(_PART_SEPARATOR)]
    if len(words) == 1:
        return words[0]
    if len(words) != 2:
        raise ValueError(f"expected 'object' or 'object:part', got {category_name!r}")
    obj, part = words
    return f"the {part} of the {obj}"


class CocoPartReader(SemanticReader[dict[str, list[dict[str, Any]]]]):
    """Part datasets in COCO format (VLPart's PACO-LVIS and PASCAL-Part JSONs), read with pycocotools.

    All annotations of one category in an image form one target (the class phrase names all of them),
    where LISA took single instances. Images without annotations are left out.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        num_classes_per_sample: int | None = 3,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes_per_sample, seed)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(annotation_file))
        self.image_dir = Path(image_dir)
        self.phrase_of_category = {
            c["id"]: part_phrase(c["name"]) for c in self.coco.loadCats(self.coco.getCatIds())
        }
        self.image_ids = sorted(i for i in self.coco.getImgIds() if self.coco.getAnnIds(imgIds=i))
        logger.info("%s: %d images, %d categories", self.source, len(self), len(self.phrase_of_category))

    def __len__(self) -> int:
        return len(self.image_ids)

    def _image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def _annotation(self, index: int) -> dict[str, list[dict[str, Any]]]:
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.image_ids[index]))
        by_phrase: dict[str, list[dict[str, Any]]] = {}
        for ann in sorted(annotations, key=lambda a: (a["category_id"], a["id"])):
            by_phrase.setdefault(self.phrase_of_category[ann["category_id"]], []).append(ann)
        return by_phrase

    def _phrases(self, annotation: dict[str, list[dict[str, Any]]]) -> list[str]:
        return list(annotation)

    def _mask(self, annotation: dict[str, list[dict[str, Any]]], phrase: str) -> np.ndarray:
        masks = mask_utils.decode([self.coco.annToRLE(ann) for ann in annotation[phrase]])  # (H, W, N) 0/1
        return masks.max(axis=2).astype(np.uint8)


class PacoLvisReader(CocoPartReader):
    """PACO-LVIS (``paco_lvis_v1_train.json``); ``image_dir`` is the COCO root holding ``train2017/``."""

    source = "paco_lvis"


class PascalPartReader(CocoPartReader):
    """PASCAL-Part (VLPart's ``train.json``); ``image_dir`` is ``VOCdevkit/VOC2010/JPEGImages``."""

    source = "pascal_part"
