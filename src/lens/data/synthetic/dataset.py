"""The synthetic world as a dataset of the registry (``lens.data.registry``), like ReasonSeg or RefCOCO.

Configured by ``data.datasets.synthetic``: ``seed`` (the world's), ``eval_scenes`` (how many scenes of a val /
test split are scored, every query of each; default 100, null: the whole split) and any other
``SyntheticWorld`` field (e.g. ``train_size`` for a small world in tests, ``phrasing``). Training items are
scenes with up to ``data.num_classes_per_sample`` of their queries, redrawn per epoch; evaluation items are
single queries. Besides ``val`` and ``test``, ``val_heldout_phrasing`` and ``test_heldout_phrasing`` score the
same queries (scenes, kinds, targets, masks, names) worded only with the held-out phrasing pools.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from lens.config import DataConfig
from lens.data.registry import TRAIN_SPLIT, DatasetSpec, dataset_options, register_dataset
from lens.data.synthetic.phrasing import HELD_OUT
from lens.data.synthetic.queries import SegQuery
from lens.data.synthetic.world import SPLITS, SyntheticWorld
from lens.data.types import Sample

SYNTHETIC = "synthetic"
EVAL_SCENES = 100  # default scenes of a val / test split scored (about 1,250 queries)
HELD_OUT_PHRASING = "_heldout_phrasing"  # "test_heldout_phrasing": the test split in held-out phrasings
_OWN_OPTIONS = ("eval_scenes",)  # the rest are SyntheticWorld fields


def _as_sample(query: SegQuery, held_out: frozenset[tuple[str, str]] = frozenset()) -> Sample:
    target = query.target
    flagged = target is not None and (target.colour, target.shape) in held_out
    return dataclasses.replace(query.sample, kind=query.kind, held_out=flagged)


class SyntheticScenes(Sequence[list[Sample]]):
    """Training view of a synthetic split: item i is scene i, with up to ``queries_per_scene`` of its queries
    drawn afresh each epoch from (seed, epoch, i)."""

    def __init__(
        self, world: SyntheticWorld, split: str = TRAIN_SPLIT, queries_per_scene: int = 3, seed: int = 0
    ):
        self.scenes, self.queries_per_scene, self.seed = world.split(split), queries_per_scene, seed

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> list[Sample]:  # type: ignore[override]  # no slices
        return self.sample(index, 0)

    def sample(self, index: int, epoch: int = 0) -> list[Sample]:
        queries = self.scenes[index].segmentation_queries()
        if len(queries) > self.queries_per_scene:
            rng = np.random.default_rng((self.seed, epoch, index))
            queries = [queries[i] for i in rng.choice(len(queries), self.queries_per_scene, replace=False)]
        return [_as_sample(q) for q in queries]


class SyntheticQueries(Sequence[Sample]):
    """Evaluation view of a synthetic split: every query of its first ``num_scenes`` scenes, one per item.

    A query whose target's colour x shape pair was held out of training is flagged ``held_out``. ``phrasing``
    (default: the world's) words every query; any phrasing gives the same items in the same order.
    """

    def __init__(
        self, world: SyntheticWorld, split: str, num_scenes: int | None = None, phrasing: str | None = None
    ):
        self.scenes, self.held_out_pairs, self.phrasing = world.split(split), world.held_out_pairs, phrasing
        n = len(self.scenes) if num_scenes is None else min(num_scenes, len(self.scenes))
        self._items = [(s, k) for s in range(n) for k in range(len(self.scenes[s].segmentation_queries()))]

    def __len__(self) -> int:
        return len(self._items)

    def query(self, index: int) -> SegQuery:
        scene, k = self._items[index]
        return self.scenes[scene].segmentation_queries(self.phrasing)[k]

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]  # no slices
        return _as_sample(self.query(index), self.held_out_pairs)


def world_from_config(data: DataConfig) -> SyntheticWorld:
    """The world ``data.datasets.synthetic`` describes."""
    options = {k: v for k, v in dataset_options(data, SYNTHETIC).items() if k not in _OWN_OPTIONS}
    known = {f.name for f in dataclasses.fields(SyntheticWorld)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"data.datasets.synthetic: unknown key(s) {unknown}; known: {[*_OWN_OPTIONS, *known]}"
        )
    if "held_out_pairs" in options:  # YAML gives lists
        options["held_out_pairs"] = frozenset(tuple(pair) for pair in options["held_out_pairs"])
    return SyntheticWorld(**options)


def eval_queries(data: DataConfig, split: str) -> SyntheticQueries:
    """The evaluation items of ``split``: "val", "test", or either with the ``HELD_OUT_PHRASING`` suffix."""
    base = split.removesuffix(HELD_OUT_PHRASING)
    if base not in SPLITS or base == TRAIN_SPLIT:
        raise ValueError(f"unknown synthetic evaluation split {split!r}; expected one of {EVAL_SPLITS}")
    phrasing = HELD_OUT if split.endswith(HELD_OUT_PHRASING) else None
    return SyntheticQueries(world_from_config(data), base, _eval_scenes(data), phrasing)


def _eval_scenes(data: DataConfig) -> int | None:
    return dataset_options(data, SYNTHETIC).get("eval_scenes", EVAL_SCENES)


def _cache_options(data: DataConfig, split: str, train: bool) -> dict[str, Any]:
    options = {k: v for k, v in dataset_options(data, SYNTHETIC).items() if k not in _OWN_OPTIONS}
    if train:
        return options
    if split.endswith(HELD_OUT_PHRASING):
        options = {**options, "phrasing": HELD_OUT}
    return {**options, "eval_scenes": _eval_scenes(data)}


_BASE_EVAL_SPLITS = tuple(s for s in SPLITS if s != TRAIN_SPLIT)
EVAL_SPLITS: tuple[str, ...] = (*_BASE_EVAL_SPLITS, *(s + HELD_OUT_PHRASING for s in _BASE_EVAL_SPLITS))

SPEC = register_dataset(
    DatasetSpec(
        SYNTHETIC,
        lambda data: SYNTHETIC in data.datasets,
        train_reader=lambda data, seed: SyntheticScenes(
            world_from_config(data), TRAIN_SPLIT, data.num_classes_per_sample, seed
        ),
        eval_reader=eval_queries,
        eval_splits=EVAL_SPLITS,
        cache_options=_cache_options,
    )
)
