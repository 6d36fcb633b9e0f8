"""The dataset registry: the core reaches every dataset by name, through one interface, without knowing it.

A dataset is a ``DatasetSpec``: whether a ``DataConfig`` configures it, its training reader, its evaluation reader
per split, the splits ``lens eval`` scores by default, and what else keys its feature cache. A reader is a
sequence of items, each a ``Sample`` or a list of them (one image, several queries). ReasonSeg, the REFER family
and LISA's semantic datasets are registered here; a plug-in (such as the project's synthetic world) is a module
listed in ``PLUGINS`` imported when ``data.datasets`` names it, or anything that calls ``register_dataset``.
Options of a plug-in live in ``data.datasets[name]`` (a plain mapping the plug-in reads).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.config import DataConfig
from lens.data.reason_seg import ReasonSegDataset
from lens.data.refer import ReferDataset
from lens.data.semantic import (
    SEMANTIC_SOURCES,
    ADE20KReader,
    CocoStuffReader,
    MapillaryReader,
    PacoLvisReader,
    PascalPartReader,
    SemanticReader,
)

TRAIN_SPLIT = "train"
SEMANTIC_TRAIN_SPLIT = "training"  # ADE20K / Mapillary folder name of the training split
ADE20K_CLASS_FILES = ("objectInfo150.txt", "ade20k_classes.json")  # the dataset's own, or LISA's
REASON_SEG = "reason_seg"
REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
REFER_EVAL_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"),
                     "refcocog": ("val", "test"), "refclef": ()}  # fmt: skip  # the paper's Table 3 columns
# dataset name -> module that registers it when imported (plug-ins the core never imports by itself)
PLUGINS: dict[str, str] = {"synthetic": "lens.data.synthetic.dataset"}

Reader = Sequence[Any]  # items: a Sample, or a list of Samples about one image


def _no_options(data: DataConfig, split: str, train: bool) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class DatasetSpec:
    """How training, evaluation and the cache reach one dataset."""

    name: str
    configured: Callable[[DataConfig], bool]  # are its files / options set in this DataConfig?
    train_reader: Callable[[DataConfig, int], Reader] | None = None  # (data, seed) -> items; None: eval only
    eval_reader: Callable[[DataConfig, str], Reader] | None = None  # (data, split) -> items; None: train only
    eval_splits: tuple[str, ...] = ()  # scored when no split is named (the paper's tables)
    # (data, split, train) -> JSON-able settings that change the items, hence part of the feature-cache key
    cache_options: Callable[[DataConfig, str, bool], dict[str, Any]] = _no_options


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Make ``spec`` reachable by name (a later registration under the same name replaces it)."""
    _REGISTRY[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered as ``name``, importing its plug-in module first if it has one."""
    if name not in _REGISTRY and name in PLUGINS:
        importlib.import_module(PLUGINS[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted({*_REGISTRY, *PLUGINS})}")
    return _REGISTRY[name]


def registered_names() -> list[str]:
    """Names ``get_dataset`` accepts: registered specs and plug-ins not imported yet."""
    return [*_REGISTRY, *(name for name in PLUGINS if name not in _REGISTRY)]


def configured_datasets(data: DataConfig) -> list[DatasetSpec]:
    """Every dataset ``data`` configures: the ``data.datasets`` plug-ins in their order, then the built-ins."""
    plugins = [get_dataset(name) for name in data.datasets]
    return plugins + [s for s in _REGISTRY.values() if s.name not in data.datasets and s.configured(data)]


def dataset_options(data: DataConfig, name: str) -> dict[str, Any]:
    """``data.datasets[name]``: a plug-in's options (an error naming the section when it is missing)."""
    if name not in data.datasets:
        raise ValueError(f"dataset {name!r} needs a data.datasets.{name} section")
    options = data.datasets[name]
    if not isinstance(options, dict):
        raise ValueError(f"data.datasets.{name} must be a mapping of options, got {options!r}")
    return options


def _semantic_reader(source: str, root: Path, num_classes: int, seed: int) -> SemanticReader:
    """Readers for LISA's ``dataset/`` layout (``root`` = ``dataset/<name>``, COCO images in ``dataset/coco``).

    See docs/training.md for the files each root must hold.
    """
    coco = root.parent / "coco" if source == "cocostuff" else root.parents[1] / "coco"  # dataset/vlpart/paco
    if source == "ade20k":
        names = [root / f for f in ADE20K_CLASS_FILES if (root / f).is_file()]
        return ADE20KReader(root, SEMANTIC_TRAIN_SPLIT, names[0] if names else None, num_classes, seed)
    if source == "mapillary":
        return MapillaryReader(root, SEMANTIC_TRAIN_SPLIT, num_classes, seed)
    if source == "cocostuff":
        names = root / "cocostuff_classes.txt"
        return CocoStuffReader(root / "train2017", coco / "train2017", names, num_classes, seed)
    if source == "paco_lvis":  # file names in the JSON start with train2017/
        return PacoLvisReader(root / "annotations" / "paco_lvis_v1_train.json", coco, num_classes, seed)
    if source == "pascal_part":
        images = root / "VOCdevkit" / "VOC2010" / "JPEGImages"
        return PascalPartReader(root / "train.json", images, num_classes, seed)
    raise ValueError(f"unknown semantic source {source!r}")


def _refer_image_root(data: DataConfig, dataset: str) -> str | None:
    return data.saiapr_image_root if dataset == "refclef" else data.coco_image_root


def _reason_seg_root(data: DataConfig) -> str:
    if not data.reason_seg_root:
        raise ValueError("data.reason_seg_root is not set")
    return data.reason_seg_root


def _refer_spec(dataset: str) -> DatasetSpec:
    def configured(data: DataConfig) -> bool:
        return (
            bool(data.refer_root and _refer_image_root(data, dataset))
            and Path(data.refer_root or "", dataset).is_dir()
        )

    def reader(data: DataConfig, split: str, mode: str, seed: int = 0) -> Reader:
        image_root = _refer_image_root(data, dataset)
        if not data.refer_root or not image_root:
            raise ValueError(f"{dataset} needs data.refer_root and its image root")
        return ReferDataset(data.refer_root, image_root, dataset, split, mode=mode, seed=seed)

    return DatasetSpec(
        dataset,
        configured,
        train_reader=lambda data, seed: reader(data, TRAIN_SPLIT, "train", seed),
        eval_reader=lambda data, split: reader(data, split, "eval"),
        eval_splits=REFER_EVAL_SPLITS[dataset],
    )


def _semantic_spec(source: str) -> DatasetSpec:
    def train_reader(data: DataConfig, seed: int) -> Reader:
        return _semantic_reader(source, Path(data.semantic_roots[source]), data.num_classes_per_sample, seed)

    return DatasetSpec(source, lambda data: source in data.semantic_roots, train_reader=train_reader)


for _name in SEMANTIC_SOURCES:  # registration order is the training mixture's order of datasets
    register_dataset(_semantic_spec(_name))
for _name in REFER_DATASETS:
    register_dataset(_refer_spec(_name))
register_dataset(
    DatasetSpec(
        REASON_SEG,
        lambda data: bool(data.reason_seg_root),
        train_reader=lambda data, seed: ReasonSegDataset(_reason_seg_root(data), TRAIN_SPLIT, seed=seed),
        eval_reader=lambda data, split: ReasonSegDataset(_reason_seg_root(data), split),
        eval_splits=("val", "test"),
    )
)
