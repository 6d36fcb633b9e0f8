"""gIoU and cIoU exactly as the reference (LISA) evaluation computes them.

The reference protocol (LISA ``train_ds.py::validate`` with ``utils.py::intersectionAndUnionGPU``):

* per query, the foreground intersection I and union U are counted after removing the target's ignore
  pixels (``IGNORE_INDEX``) from both the prediction and the target;
* the query's IoU is ``I / (U + 1e-5)``, and 1.0 when ``U == 0`` (nothing predicted where nothing is);
* gIoU is the mean IoU over queries; cIoU is ``ΣI / (ΣU + 1e-10)`` over the whole split, so a split whose
  every query has ``U == 0`` scores gIoU 1.0 but cIoU 0.0, as in the reference.

One deviation, below float32 resolution: the reference divides the summed IoU by ``count + 1e-5`` (an
artifact of its distributed averaging); we take the plain mean. Counts are exact Python ints, where the
reference accumulates float32 histograms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lens.data.types import IGNORE_INDEX

IOU_EPS = 1e-5  # reference: acc_iou = intersection / (union + 1e-5)
CIOU_EPS = 1e-10  # reference: ciou = Σintersection / (Σunion + 1e-10)
FOREGROUND = 1  # target value of the referred object
_STATE_VERSION = 1

Key = str | int  # a query's identifier; plain types so the state survives a JSON round trip


def intersection_union(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Foreground intersection and union of one query, ignore pixels removed from both.

    Arguments:
      pred: (H, W) bool, the thresholded prediction (threshold logits first; floats are refused).
      target: (H, W) integer, 1 target / 0 background / ``IGNORE_INDEX`` ignored.

    Returns:
      (I, U) as ints.
    """
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must be equal (H, W) shapes")
    if pred.dtype != np.bool_:
        raise TypeError(f"pred must be a bool mask (threshold the logits first), got dtype {pred.dtype}")
    if not np.issubdtype(target.dtype, np.integer):
        raise TypeError(f"target must be an integer mask, got dtype {target.dtype}")
    is_fg = target == FOREGROUND
    valid = target != IGNORE_INDEX
    if not np.all(is_fg | ~valid | (target == 0)):
        bad = sorted(set(np.unique(target).tolist()) - {0, FOREGROUND, IGNORE_INDEX})
        raise ValueError(f"target may only hold 0, {FOREGROUND} and {IGNORE_INDEX}, found {bad}")
    pred = pred & valid  # the reference overwrites pred with the ignore label where the target ignores
    intersection = int(np.count_nonzero(pred & is_fg))
    union = int(np.count_nonzero(pred | is_fg))
    return intersection, union


def query_iou(intersection: int, union: int) -> float:
    """One query's IoU; an empty union (empty prediction on an empty target) counts as a hit."""
    if union == 0:
        return 1.0
    return intersection / (union + IOU_EPS)


class IoUAccumulator:
    """Streams (pred, target) pairs and keeps per-query counts, so an evaluation can stop and resume.

    ``per_sample`` holds one plain dict per query (``key``, ``intersection``, ``union``, ``iou``);
    ``state_dict()`` is JSON-serialisable when the keys are.
    """

    def __init__(self) -> None:
        self.per_sample: list[dict[str, Any]] = []
        self._keys: set[Key] = set()

    def __len__(self) -> int:
        return len(self.per_sample)

    def __contains__(self, key: Key) -> bool:
        """Whether a query with this key was already counted (to skip it when resuming)."""
        return key in self._keys

    def update(self, pred: np.ndarray, target: np.ndarray, key: Key | None = None) -> float:
        """Count one query and return its IoU. A key may be counted once; ``None`` keys are anonymous."""
        if key is not None and key in self._keys:
            raise ValueError(f"query {key!r} was already counted")
        intersection, union = intersection_union(pred, target)
        iou = query_iou(intersection, union)
        self._append({"key": key, "intersection": intersection, "union": union, "iou": iou})
        return iou

    def compute(self) -> dict[str, float | int]:
        """gIoU, cIoU and the query count; both metrics are 0.0 before any query (as the reference)."""
        count = len(self.per_sample)
        if count == 0:
            return {"giou": 0.0, "ciou": 0.0, "count": 0}
        total_i = sum(s["intersection"] for s in self.per_sample)
        total_u = sum(s["union"] for s in self.per_sample)
        giou = math.fsum(s["iou"] for s in self.per_sample) / count
        return {"giou": giou, "ciou": total_i / (total_u + CIOU_EPS), "count": count}

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "per_sample": [dict(s) for s in self.per_sample]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the current state with one from ``state_dict()`` (e.g. read back from JSON)."""
        if state.get("version") != _STATE_VERSION or not isinstance(state.get("per_sample"), list):
            raise ValueError(f"not an IoUAccumulator state (version {_STATE_VERSION}): keys {sorted(state)}")
        self.per_sample, self._keys = [], set()
        for entry in state["per_sample"]:
            missing = {"key", "intersection", "union", "iou"} - set(entry)
            if missing:
                raise ValueError(f"per-sample entry {entry!r} lacks {sorted(missing)}")
            if entry["key"] is not None and entry["key"] in self._keys:
                raise ValueError(f"query {entry['key']!r} appears twice in the state")
            self._append(dict(entry))

    def _append(self, entry: dict[str, Any]) -> None:
        self.per_sample.append(entry)
        if entry["key"] is not None:
            self._keys.add(entry["key"])


def giou_ciou(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> tuple[float, float]:
    """(gIoU, cIoU) of a whole split; ``preds[i]`` (bool) is scored against ``targets[i]`` (uint8)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
    acc = IoUAccumulator()
    for i, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        try:
            acc.update(pred, target)
        except (ValueError, TypeError) as err:
            raise type(err)(f"query {i}: {err}") from err
    result = acc.compute()
    return float(result["giou"]), float(result["ciou"])
