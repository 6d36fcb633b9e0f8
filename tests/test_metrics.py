"""gIoU / cIoU against hand-computed cases and an independent re-derivation of the reference's histogram."""

import json

import numpy as np
import pytest
import torch

from lens.data.types import IGNORE_INDEX
from lens.metrics import IOU_EPS, IoUAccumulator, giou_ciou, intersection_union, query_iou

H, W = 6, 8


def _box(y0: int, y1: int, x0: int, x1: int, value: int = 1) -> np.ndarray:
    """(H, W) uint8 with ``value`` on rows y0:y1, columns x0:x1."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def test_perfect_prediction() -> None:
    target = _box(1, 4, 2, 6)  # 12 pixels
    assert intersection_union(target == 1, target) == (12, 12)
    assert query_iou(12, 12) == pytest.approx(12 / (12 + IOU_EPS), abs=0)
    assert giou_ciou([target == 1], [target]) == pytest.approx((1.0, 1.0), abs=1e-6)


def test_disjoint_prediction() -> None:
    target = _box(0, 2, 0, 2)  # 4 pixels
    pred = _box(4, 6, 5, 8) == 1  # 6 pixels
    assert intersection_union(pred, target) == (0, 10)
    assert giou_ciou([pred], [target]) == (0.0, 0.0)


def test_partial_overlap_numbers() -> None:
    target = _box(0, 2, 0, 4)  # rows 0-1, 8 pixels
    pred = _box(1, 3, 0, 4) == 1  # rows 1-2, 8 pixels, row 1 shared
    assert intersection_union(pred, target) == (4, 12)
    giou, ciou = giou_ciou([pred], [target])
    assert giou == pytest.approx(4 / (12 + 1e-5), rel=1e-12)
    assert ciou == pytest.approx(4 / 12, rel=1e-9)


def test_empty_target_empty_prediction_scores_one() -> None:
    target = np.zeros((H, W), np.uint8)
    assert intersection_union(np.zeros((H, W), bool), target) == (0, 0)
    giou, ciou = giou_ciou([np.zeros((H, W), bool)], [target])
    assert giou == 1.0
    assert ciou == 0.0  # ΣI / (ΣU + 1e-10) with ΣU == 0, as the reference


def test_empty_target_nonempty_prediction_scores_zero() -> None:
    pred = _box(0, 1, 0, 3) == 1
    assert intersection_union(pred, np.zeros((H, W), np.uint8)) == (0, 3)
    assert giou_ciou([pred], [np.zeros((H, W), np.uint8)]) == (0.0, 0.0)


def test_ignore_pixels_leave_both_intersection_and_union() -> None:
    target = _box(0, 2, 0, 4)  # 8 target pixels in rows 0-1
    target[1, :] = IGNORE_INDEX  # row 1 ignored: 4 target pixels left, row 1 of pred does not count
    pred = _box(1, 3, 0, 4) == 1  # rows 1-2
    # I: nothing (row 1 ignored); U: row 0 (target) + row 2 (pred) = 8
    assert intersection_union(pred, target) == (0, 8)
    pred[0, 0] = True
    assert intersection_union(pred, target) == (1, 8)


def test_prediction_only_on_ignore_counts_as_empty() -> None:
    target = _box(2, 4, 2, 4, value=IGNORE_INDEX)
    assert intersection_union(target == IGNORE_INDEX, target) == (0, 0)
    assert giou_ciou([target == IGNORE_INDEX], [target])[0] == 1.0


def test_ciou_differs_from_giou() -> None:
    small_t = _box(0, 1, 0, 2)  # 2 pixels
    small_p = _box(0, 1, 0, 1) == 1  # 1 pixel inside: I=1, U=2
    big_t = _box(0, 2, 0, 5)  # 10 pixels
    big_p = _box(0, 2, 0, 5) == 1
    big_p[0, 0] = False  # I=9, U=10
    giou, ciou = giou_ciou([small_p, big_p], [small_t, big_t])
    assert giou == pytest.approx((1 / (2 + 1e-5) + 9 / (10 + 1e-5)) / 2, rel=1e-12)  # ≈ 0.70
    assert ciou == pytest.approx(10 / 12, rel=1e-9)  # ≈ 0.83


def _reference_counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Independent re-derivation of the reference's 2-class histogram (ignore label out of histc's range)."""
    out = torch.from_numpy(pred.astype(np.float32)).flatten()
    tgt = torch.from_numpy(target.astype(np.float32)).flatten()
    out[tgt == IGNORE_INDEX] = IGNORE_INDEX
    hist = lambda x: torch.histc(x, bins=2, min=0, max=1)  # noqa: E731
    area_i, area_o, area_t = hist(out[out == tgt]), hist(out), hist(tgt)
    return int(area_i[1]), int(area_o[1] + area_t[1] - area_i[1])


def test_matches_reference_histogram_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        pred = rng.random((H, W)) < rng.random()
        target = rng.choice(np.array([0, 1, IGNORE_INDEX], np.uint8), size=(H, W), p=[0.5, 0.3, 0.2])
        assert intersection_union(pred, target) == _reference_counts(pred, target)


@pytest.mark.parametrize(
    ("pred", "target", "error", "match"),
    [
        (np.zeros((H, W), bool), np.zeros((H, W + 1), np.uint8), ValueError, "shapes"),
        (np.zeros((H, W), np.float32), np.zeros((H, W), np.uint8), TypeError, "bool"),
        (np.zeros((H, W), bool), np.zeros((H, W), np.float32), TypeError, "integer"),
        (np.zeros((H, W), bool), np.full((H, W), 2, np.uint8), ValueError, r"found \[2\]"),
    ],
)
def test_bad_inputs_raise(pred: np.ndarray, target: np.ndarray, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        intersection_union(pred, target)


def test_giou_ciou_names_bad_query_and_length_mismatch() -> None:
    good = np.zeros((H, W), np.uint8)
    with pytest.raises(ValueError, match="query 1"):
        giou_ciou([good == 1, np.zeros((2, 2), bool)], [good, good])
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        giou_ciou([good == 1], [good, good])


def test_accumulator_resumes_from_json_state() -> None:
    rng = np.random.default_rng(1)
    pairs = [(rng.random((H, W)) < 0.5, (rng.random((H, W)) < 0.4).astype(np.uint8)) for _ in range(6)]
    full = IoUAccumulator()
    for i, (p, t) in enumerate(pairs):
        full.update(p, t, key=f"q{i}")

    first = IoUAccumulator()
    for i, (p, t) in enumerate(pairs[:3]):
        first.update(p, t, key=f"q{i}")
    resumed = IoUAccumulator()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert "q2" in resumed and "q3" not in resumed
    for i, (p, t) in enumerate(pairs):
        if f"q{i}" not in resumed:
            resumed.update(p, t, key=f"q{i}")

    assert resumed.compute() == full.compute()
    assert full.compute()["count"] == 6
    assert resumed.per_sample == full.per_sample
    giou, ciou = giou_ciou([p for p, _ in pairs], [t for _, t in pairs])
    assert full.compute()["giou"] == pytest.approx(giou, rel=1e-12)
    assert full.compute()["ciou"] == pytest.approx(ciou, rel=1e-12)


def test_accumulator_empty_duplicate_and_bad_state() -> None:
    acc = IoUAccumulator()
    assert acc.compute() == {"giou": 0.0, "ciou": 0.0, "count": 0}
    target = _box(0, 1, 0, 2)
    assert acc.update(target == 1, target, key="a") == pytest.approx(2 / (2 + IOU_EPS), abs=0)
    acc.update(target == 1, target)  # anonymous keys may repeat
    acc.update(target == 1, target)
    with pytest.raises(ValueError, match="already counted"):
        acc.update(target == 1, target, key="a")
    assert len(acc) == 3
    with pytest.raises(ValueError, match="not an IoUAccumulator state"):
        acc.load_state_dict({"per_sample": []})
    with pytest.raises(ValueError, match="appears twice"):
        acc.load_state_dict({"version": 1, "per_sample": [acc.per_sample[0], acc.per_sample[0]]})
