"""From ``DataConfig`` to training batches: readers → rows (image + instruction + mask) → mixture batches.

Every data source is viewed as a sequence of *items*; an item is one image with one or more queries about it
(a semantic-segmentation image gives up to ``num_classes_per_sample`` class phrases, a synthetic scene up to as
many of its queries, a ReasonSeg / REFER sample exactly one). ``QueryDataset.rows(index, epoch)`` turns an item
into *rows*, plain dicts that the model (``LensModel.prepare``), the feature cache and the evaluation consume.

Training draws come from ``MixtureSampler``: a draw is ``DrawKey(name, index, epoch)`` and everything random
about it (which classes, which sentence, which question template) is a pure function of the seed and the key,
so DataLoader workers agree with each other and a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from lens.config import DataConfig
from lens.data.mixing import MixtureSampler
from lens.data.reason_seg import ReasonSegDataset
from lens.data.refer import ReferDataset
from lens.data.semantic import (
    ADE20KReader,
    CocoStuffReader,
    MapillaryReader,
    PacoLvisReader,
    PascalPartReader,
    SemanticReader,
)
from lens.data.synthetic import SegQuery, SyntheticWorld
from lens.data.templates import format_question
from lens.data.types import Sample

logger = logging.getLogger(__name__)

# image (PIL), instruction, mask (H, W) uint8, query, name, source, is_sentence, kind, held_out, index, part
Row = dict[str, Any]
SYNTHETIC = "synthetic"
REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
TRAIN_SPLIT = "train"
SEMANTIC_TRAIN_SPLIT = "training"  # ADE20K / Mapillary folder name of the training split
ADE20K_CLASS_FILES = ("objectInfo150.txt", "ade20k_classes.json")  # the dataset's own, or LISA's


class DrawKey(NamedTuple):
    name: str  # dataset name in the mixture
    index: int  # item index within that dataset
    epoch: int  # pass over that dataset the draw belongs to (drives per-epoch redraws)


class ItemSource(Protocol):
    """What training and evaluation need from a dataset: rows of item ``index`` for pass ``epoch``."""

    def __len__(self) -> int: ...

    def rows(self, index: int, epoch: int = 0) -> list[Row]: ...


class SyntheticScenes(Sequence[list[SegQuery]]):
    """Training view of a synthetic split: item i is scene i, with up to ``queries_per_scene`` of its queries
    drawn afresh each epoch from (seed, epoch, i)."""

    def __init__(
        self, world: SyntheticWorld, split: str = TRAIN_SPLIT, queries_per_scene: int = 3, seed: int = 0
    ):
        self.scenes, self.queries_per_scene, self.seed = world.split(split), queries_per_scene, seed

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> list[SegQuery]:  # type: ignore[override]  # no slices
        return self.sample(index, 0)

    def sample(self, index: int, epoch: int = 0) -> list[SegQuery]:
        queries = self.scenes[index].segmentation_queries()
        if len(queries) > self.queries_per_scene:
            rng = np.random.default_rng((self.seed, epoch, index))
            queries = [queries[i] for i in rng.choice(len(queries), self.queries_per_scene, replace=False)]
        return queries


class SyntheticQueries(Sequence[SegQuery]):
    """Evaluation view of a synthetic split: every query of its first ``num_scenes`` scenes, one per item."""

    def __init__(self, world: SyntheticWorld, split: str, num_scenes: int | None = None):
        self.scenes = world.split(split)
        self.held_out_pairs = world.held_out_pairs  # rows flag targets of these pairs (see QueryDataset.rows)
        n = len(self.scenes) if num_scenes is None else min(num_scenes, len(self.scenes))
        self._items = [(s, k) for s in range(n) for k in range(len(self.scenes[s].segmentation_queries()))]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> SegQuery:  # type: ignore[override]  # no slices
        scene, k = self._items[index]
        return self.scenes[scene].segmentation_queries()[k]


def _draw(reader: Any, index: int, epoch: int) -> list[Sample | SegQuery]:
    """Item ``index`` of any reader for pass ``epoch``, as a list."""
    if hasattr(reader, "sample"):  # semantic readers, synthetic scenes: pure in (index, epoch)
        drawn = reader.sample(index, epoch)
    else:
        if hasattr(reader, "set_epoch"):  # REFER train mode redraws its sentence per epoch
            reader.set_epoch(epoch)
        drawn = reader[index]
    return drawn if isinstance(drawn, list) else [drawn]


def draw_seed(*parts: int | str) -> int:
    """A 64-bit seed from integers and strings, stable across processes and Python versions."""
    words = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


class QueryDataset(Dataset):
    """Rows of one reader. ``train=True`` draws question templates from (seed, epoch, index); otherwise the
    first template is used (the reference evaluation prompt)."""

    def __init__(self, reader: Sequence[Any], name: str, train: bool = False, seed: int = 0):
        self.reader, self.name, self.train, self.seed = reader, name, train, seed

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> list[Row]:
        return self.rows(index)

    def rows(self, index: int, epoch: int = 0) -> list[Row]:
        held_out = getattr(self.reader, "held_out_pairs", frozenset())
        out = []
        for part, drawn in enumerate(_draw(self.reader, index, epoch)):
            sample, kind = (drawn.sample, drawn.kind) if isinstance(drawn, SegQuery) else (drawn, "")
            target = drawn.target if isinstance(drawn, SegQuery) else None
            rng = random.Random(draw_seed(self.seed, epoch, self.name, index, part)) if self.train else None
            out.append(
                {
                    "image": Image.fromarray(sample.image),
                    "instruction": format_question(sample.query, sample.is_sentence, rng),
                    "mask": sample.mask,  # (H, W) uint8
                    "query": sample.query,
                    "name": sample.name,
                    "source": sample.source,
                    "is_sentence": sample.is_sentence,
                    "kind": kind,
                    # the target's colour x shape pair never was a training target (synthetic val / test)
                    "held_out": target is not None and (target.colour, target.shape) in held_out,
                    "index": index,
                    "part": part,
                }
            )
        return out


class MixtureDataset(Dataset):
    """Rows of a ``DrawKey`` from named item sources (``QueryDataset`` or the feature cache)."""

    def __init__(self, sources: Mapping[str, ItemSource]):
        self.sources = dict(sources)

    def __getitem__(self, key: DrawKey) -> list[Row]:
        return self.sources[key.name].rows(key.index, key.epoch)


def collate_rows(items: list[list[Row]]) -> list[Row]:
    """Keep rows as a flat list: images differ in size and items hold different numbers of queries."""
    return [row for item in items for row in item]


class MixtureBatchSampler:
    """Batches of ``DrawKey`` for one process, cut from one global draw sequence that every process replays.

    Each global batch holds ``batch_size * num_processes`` draws; process r takes its r-th slice. DataLoader
    workers prefetch, so the sampler runs ahead of training: ``state_dict()`` returns the sampler state after
    the last batch the training loop *consumed* (``mark_consumed``), which is what exact resume needs.
    """

    def __init__(
        self, sampler: MixtureSampler, batch_size: int, num_processes: int = 1, process_index: int = 0
    ):
        if batch_size < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"bad batch_size {batch_size} / process {process_index} of {num_processes}")
        self.sampler, self.batch_size = sampler, batch_size
        self.num_processes, self.process_index = num_processes, process_index
        self.consumed = 0
        self._states: dict[int, dict[str, Any]] = {0: sampler.state_dict()}  # batches produced -> state

    def __iter__(self) -> Iterator[list[DrawKey]]:
        self.sampler.load_state_dict(self._states[self.consumed])
        self._states = {self.consumed: self._states[self.consumed]}
        produced = self.consumed
        while True:
            keys = []
            for _ in range(self.batch_size * self.num_processes):
                epochs = {name: self.sampler.epoch(name) for name in self.sampler.names}  # before the draw
                name, index = next(self.sampler)
                keys.append(DrawKey(name, index, epochs[name]))
            produced += 1
            self._states[produced] = self.sampler.state_dict()
            start = self.process_index * self.batch_size
            yield keys[start : start + self.batch_size]

    def mark_consumed(self) -> None:
        self.consumed += 1
        for old in [b for b in self._states if b < self.consumed]:
            del self._states[old]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "sampler": self._states[self.consumed]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.consumed = int(state["consumed"])
        self._states = {self.consumed: self.sampler.state_dict()}


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


def train_ratios(data: DataConfig) -> dict[str, float]:
    """Mixture ratios: the synthetic world alone, or ``data.mixture`` over the real datasets."""
    return {SYNTHETIC: 1.0} if data.synthetic_seed is not None else dict(data.mixture)


def build_train_datasets(
    data: DataConfig, seed: int = 0, world: SyntheticWorld | None = None
) -> dict[str, QueryDataset]:
    """Every training dataset whose root is set, by mixture name."""
    n = data.num_classes_per_sample
    if data.synthetic_seed is not None:
        world = world or SyntheticWorld(seed=data.synthetic_seed)
        return {SYNTHETIC: QueryDataset(SyntheticScenes(world, TRAIN_SPLIT, n, seed), SYNTHETIC, True, seed)}
    readers: dict[str, Sequence[Any]] = {}
    for source, root in data.semantic_roots.items():
        readers[source] = _semantic_reader(source, Path(root), n, seed)
    if data.refer_root:
        for dataset in REFER_DATASETS:
            image_root = _refer_image_root(data, dataset)
            if (Path(data.refer_root) / dataset).is_dir() and image_root:
                readers[dataset] = ReferDataset(
                    data.refer_root, image_root, dataset, TRAIN_SPLIT, mode="train", seed=seed
                )
    if data.reason_seg_root:
        readers["reason_seg"] = ReasonSegDataset(data.reason_seg_root, TRAIN_SPLIT, seed=seed)
    if not readers:
        raise ValueError("DataConfig names no training data: set synthetic_seed or at least one dataset root")
    return {name: QueryDataset(reader, name, True, seed) for name, reader in readers.items()}


def build_eval_dataset(
    data: DataConfig, dataset: str, split: str, world: SyntheticWorld | None = None
) -> QueryDataset:
    """One evaluation split ("reason_seg"/"val", "refcoco"/"testA", "synthetic"/"test", ...), reference prompts."""
    reader: Sequence[Any]
    if dataset == SYNTHETIC:
        if data.synthetic_seed is None and world is None:
            raise ValueError("the synthetic world needs data.synthetic_seed")
        world = world or SyntheticWorld(seed=data.synthetic_seed)
        reader = SyntheticQueries(world, split, data.synthetic_eval_scenes)
    elif dataset == "reason_seg":
        if not data.reason_seg_root:
            raise ValueError("data.reason_seg_root is not set")
        reader = ReasonSegDataset(data.reason_seg_root, split)
    elif dataset in REFER_DATASETS:
        image_root = _refer_image_root(data, dataset)
        if not data.refer_root or not image_root:
            raise ValueError(f"{dataset} needs data.refer_root and its image root")
        reader = ReferDataset(data.refer_root, image_root, dataset, split, mode="eval")
    else:
        raise ValueError(f"unknown evaluation dataset {dataset!r}")
    return QueryDataset(reader, dataset, train=False)
