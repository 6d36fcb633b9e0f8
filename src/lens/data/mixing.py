"""The training mixture: which dataset, and which item of it, each training sample comes from.

LISA draws a dataset group with fixed odds (sem_seg : refer_seg : vqa : reason_seg = 9 : 3 : 3 : 1), then a
source uniformly within the group. LENS trains on segmentation only, so the default drops the VQA part.

Unlike LISA's per-call ``np.random`` draws, every choice here is a pure function of the seed and a counter:
the dataset of draw ``n`` comes from a seeded block of choices, and each dataset is walked through a seeded
permutation per epoch (every item once per pass). ``state_dict()`` is therefore a handful of integers, and a
sampler restored from it continues with exactly the draws the original would have made.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any

import numpy as np

from lens.data.semantic import SEMANTIC_SOURCES

logger = logging.getLogger(__name__)

DEFAULT_RATIOS: dict[str, float] = {"sem": 9.0, "refer": 3.0, "reason": 1.0}
# A ratio named after a group is shared equally by the group's datasets that are present (LISA's uniform
# choice of source within a group).
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {
    "sem": SEMANTIC_SOURCES,
    "refer": ("refclef", "refcoco", "refcoco+", "refcocog"),
    "reason": ("reason_seg",),
}

_CHOICE_BLOCK = 4096  # dataset choices are drawn this many at a time, from a generator keyed by the block
_CHOICE_STREAM, _ORDER_STREAM = 0, 1  # keep the two uses of the seed apart


def resolve_weights(
    names: Sequence[str], ratios: Mapping[str, float], groups: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Per-dataset probabilities from ratios given per dataset or per group; absent entries are dropped.

    A dataset's own ratio takes precedence over its group's share. Raises ``ValueError`` for a non-positive
    ratio or a dataset that no ratio covers.
    """
    for key, ratio in ratios.items():
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"ratio for {key!r} must be a positive number, got {ratio!r}")
    weights = {name: float(ratios[name]) for name in names if name in ratios}
    for key, ratio in ratios.items():
        if key in weights:
            continue
        members = [n for n in groups.get(key, ()) if n in names and n not in ratios]
        if not members:
            logger.info("mixture: no dataset for %r, its ratio is dropped", key)
        for member in members:
            weights[member] = float(ratio) / len(members)
    unknown = [n for n in names if n not in weights]
    if unknown:
        raise ValueError(
            f"no ratio for dataset(s) {unknown}: name them in ratios or in a group of {sorted(groups)}"
        )
    total = sum(weights.values())
    return {name: weights[name] / total for name in names}


class MixtureSampler(Iterator[tuple[str, int]]):
    """Yields ``(dataset_name, index)`` forever, mixing named datasets with the given ratios.

    Arguments:
        datasets: name -> dataset (only its length is used). Every dataset must be non-empty.
        ratios: relative odds per dataset name or group name (see ``DEFAULT_GROUPS``); entries matching no
            dataset are dropped and the rest renormalised.
        seed: the only source of randomness.
        groups: group name -> dataset names, for ratios given per group.
    """

    def __init__(
        self,
        datasets: Mapping[str, Sized],
        ratios: Mapping[str, float] = DEFAULT_RATIOS,
        seed: int = 0,
        groups: Mapping[str, Sequence[str]] = DEFAULT_GROUPS,
    ) -> None:
        if not datasets:
            raise ValueError("MixtureSampler needs at least one dataset")
        self.lengths = {name: len(ds) for name, ds in datasets.items()}
        empty = [name for name, n in self.lengths.items() if n == 0]
        if empty:
            raise ValueError(f"empty dataset(s): {empty}")
        self.names = tuple(datasets)
        self.weights = resolve_weights(self.names, ratios, groups)
        self._probs = np.array([self.weights[n] for n in self.names])  # (K,) sums to 1
        self.seed = seed
        self._step = 0  # number of draws made so far
        self._cursors = {name: [0, 0] for name in self.names}  # name -> [epoch, position in its permutation]
        self._block: tuple[int, np.ndarray] | None = None  # (block index, (_CHOICE_BLOCK,) dataset ids)
        self._orders: dict[str, tuple[int, np.ndarray]] = {}  # name -> (epoch, (N,) permutation)
        logger.info("mixture: %s", {n: round(w, 4) for n, w in self.weights.items()})

    def __iter__(self) -> MixtureSampler:
        return self

    def __next__(self) -> tuple[str, int]:
        name = self.names[self._dataset_id(self._step)]
        self._step += 1
        return name, self._next_index(name)

    def epoch(self, name: str) -> int:
        """How many full passes over dataset ``name`` the draws so far have completed."""
        return self._cursors[name][0]

    def _dataset_id(self, step: int) -> int:
        block, offset = divmod(step, _CHOICE_BLOCK)
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng((self.seed, _CHOICE_STREAM, block))
            self._block = (block, rng.choice(len(self.names), size=_CHOICE_BLOCK, p=self._probs))
        return int(self._block[1][offset])

    def _order(self, name: str, epoch: int) -> np.ndarray:
        """(N,) the visiting order of dataset ``name`` in pass ``epoch``; keyed by name, not position."""
        cached = self._orders.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng((self.seed, _ORDER_STREAM, zlib.crc32(name.encode()), epoch))
            cached = (epoch, rng.permutation(self.lengths[name]))
            self._orders[name] = cached
        return cached[1]

    def _next_index(self, name: str) -> int:
        cursor = self._cursors[name]
        index = int(self._order(name, cursor[0])[cursor[1]])
        cursor[1] += 1
        if cursor[1] == self.lengths[name]:
            cursor[0], cursor[1] = cursor[0] + 1, 0
        return index

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, floats and strings (JSON/YAML-safe): enough to continue the exact same sequence."""
        return {
            "seed": self.seed,
            "step": self._step,
            "cursors": {name: {"epoch": e, "position": p} for name, (e, p) in self._cursors.items()},
            "lengths": dict(self.lengths),
            "weights": dict(self.weights),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; refuses one saved for other datasets, sizes or ratios."""
        if state["lengths"] != self.lengths:
            raise ValueError(f"state is for datasets {state['lengths']}, this sampler has {self.lengths}")
        if state["weights"].keys() != self.weights.keys() or not all(
            math.isclose(state["weights"][n], w) for n, w in self.weights.items()
        ):
            raise ValueError(
                f"state was saved with weights {state['weights']}, this sampler has {self.weights}"
            )
        self.seed = int(state["seed"])
        self._step = int(state["step"])
        self._cursors = {n: [int(c["epoch"]), int(c["position"])] for n, c in state["cursors"].items()}
        self._block, self._orders = None, {}
