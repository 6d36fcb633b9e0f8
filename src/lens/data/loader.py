"""From ``DataConfig`` to training batches: readers → rows (image + instruction + mask) → mixture batches.

Every data source is viewed as a sequence of *items*; an item is one image with one or more queries about it
(a semantic-segmentation image gives up to ``num_classes_per_sample`` class phrases, a synthetic scene up to as
many of its queries, a ReasonSeg / REFER sample exactly one). ``QueryDataset.rows(index, epoch)`` turns an item
into *rows* (``ImageRow``) that the model (``LensModel.prepare``), the feature cache and the evaluation consume.

Training draws come from ``MixtureSampler``: a draw is ``DrawKey(name, index, epoch)`` and everything random
about it (which classes, which sentence, which question template) is a pure function of the seed and the key,
so DataLoader workers agree with each other and a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from lens.config import DataConfig
from lens.data.mixing import MixtureSampler
from lens.data.registry import configured_datasets, get_dataset
from lens.data.templates import format_question
from lens.data.types import Sample

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One query about one image, as training, the cache and evaluation see it (without the image itself)."""

    instruction: str  # the full prompt: the query in a question template
    mask: np.ndarray  # (H, W) uint8: 1 target, 0 background, IGNORE_INDEX ignored
    query: str
    name: str
    source: str
    is_sentence: bool
    kind: str
    held_out: bool
    index: int  # the item of its dataset
    part: int  # which of the item's queries


@dataclass
class ImageRow(Row):
    """A row read from a dataset: the model runs the MLLM and SAM's encoder on ``image``."""

    image: Image.Image


class DrawKey(NamedTuple):
    name: str  # dataset name in the mixture
    index: int  # item index within that dataset
    epoch: int  # pass over that dataset the draw belongs to (drives per-epoch redraws)


class ItemSource(Protocol):
    """What training and evaluation need from a dataset: rows of item ``index`` for pass ``epoch``."""

    def __len__(self) -> int: ...

    def rows(self, index: int, epoch: int = 0) -> list[Row]: ...


def _draw(reader: Any, index: int, epoch: int) -> list[Sample]:
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

    def __getitem__(self, index: int) -> list[ImageRow]:
        return self.rows(index)

    def rows(self, index: int, epoch: int = 0) -> list[ImageRow]:
        out: list[ImageRow] = []
        for part, sample in enumerate(_draw(self.reader, index, epoch)):
            rng = random.Random(draw_seed(self.seed, epoch, self.name, index, part)) if self.train else None
            out.append(
                ImageRow(
                    instruction=format_question(sample.query, sample.is_sentence, rng),
                    mask=sample.mask,
                    query=sample.query,
                    name=sample.name,
                    source=sample.source,
                    is_sentence=sample.is_sentence,
                    kind=sample.kind,
                    held_out=sample.held_out,
                    index=index,
                    part=part,
                    image=Image.fromarray(sample.image),
                )
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


def train_ratios(data: DataConfig) -> dict[str, float]:
    """Mixture ratios: ``data.mixture`` (per dataset or group), and 1 for a plug-in dataset it does not name.

    Ratios of absent datasets are dropped (``MixtureSampler``), so a plug-in configured alone trains alone.
    """
    return {**{name: 1.0 for name in data.datasets}, **data.mixture}


def build_train_datasets(data: DataConfig, seed: int = 0) -> dict[str, QueryDataset]:
    """Every configured dataset that has a training split, by mixture name."""
    specs = [s for s in configured_datasets(data) if s.train_reader is not None]
    if not specs:
        raise ValueError(
            "DataConfig names no training data: set data.datasets (e.g. synthetic) or at least one dataset root"
        )
    return {s.name: QueryDataset(s.train_reader(data, seed), s.name, True, seed) for s in specs}


def build_eval_dataset(data: DataConfig, dataset: str, split: str) -> QueryDataset:
    """One evaluation split ("reason_seg"/"val", "refcoco"/"testA", "synthetic"/"test", ...), reference prompts."""
    spec = get_dataset(dataset)
    if spec.eval_reader is None:
        raise ValueError(f"dataset {dataset!r} has no evaluation splits")
    return QueryDataset(spec.eval_reader(data, split), dataset, train=False)
