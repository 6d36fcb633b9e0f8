"""MixtureSampler: ratios, per-epoch permutations, determinism and exact resume."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest

from lens.data.mixing import DEFAULT_RATIOS, MixtureSampler, resolve_weights

DATASETS = {"sem": range(50), "refer": range(20), "reason": range(7)}


def take(sampler: MixtureSampler, n: int) -> list[tuple[str, int]]:
    return list(islice(sampler, n))


def test_default_ratios_are_lisa_without_vqa() -> None:
    assert DEFAULT_RATIOS == {"sem": 9.0, "refer": 3.0, "reason": 1.0}


def test_empirical_ratios_over_13000_draws() -> None:
    counts = Counter(name for name, _ in take(MixtureSampler(DATASETS, seed=3), 13_000))
    # Binomial std for p = 9/13 over 13,000 draws is ~53 draws; 0.015 * 13,000 = 195 is ~4 std.
    assert counts["sem"] / 13_000 == pytest.approx(9 / 13, abs=0.015)
    assert counts["refer"] / 13_000 == pytest.approx(3 / 13, abs=0.015)
    assert counts["reason"] / 13_000 == pytest.approx(1 / 13, abs=0.015)


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    sampler = MixtureSampler({"only": range(10)}, ratios={"only": 1.0}, seed=0)
    first, second = [i for _, i in take(sampler, 10)], [i for _, i in take(sampler, 10)]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second and first != list(range(10))
    assert sampler.epoch("only") == 2


def test_indices_cover_each_dataset_once_per_pass() -> None:
    draws = take(MixtureSampler(DATASETS, seed=1), 3_000)
    for name, size in (("sem", 50), ("refer", 20), ("reason", 7)):
        indices = [i for n, i in draws if n == name]
        full = len(indices) // size * size
        assert full >= size
        for start in range(0, full, size):
            assert sorted(indices[start : start + size]) == list(range(size))


def test_deterministic_from_seed() -> None:
    a = take(MixtureSampler(DATASETS, seed=5), 2_000)
    assert a == take(MixtureSampler(DATASETS, seed=5), 2_000)
    assert a != take(MixtureSampler(DATASETS, seed=6), 2_000)


@pytest.mark.parametrize("resume_at", [0, 1, 49, 4_095, 4_096, 5_000])  # inside/at the edges of choice blocks
def test_resume_continues_exactly(resume_at: int) -> None:
    reference = MixtureSampler(DATASETS, seed=11)
    expected = take(reference, resume_at + 3_000)[resume_at:]

    original = MixtureSampler(DATASETS, seed=11)
    take(original, resume_at)
    state = json.loads(json.dumps(original.state_dict()))  # a checkpoint holds plain JSON-able values
    resumed = MixtureSampler(DATASETS, seed=999)  # the seed comes back from the state
    resumed.load_state_dict(state)
    assert take(resumed, 3_000) == expected
    assert take(original, 3_000) == expected  # saving did not disturb the original


def test_resume_refuses_other_datasets_or_ratios() -> None:
    state = MixtureSampler(DATASETS).state_dict()
    with pytest.raises(ValueError, match="datasets"):
        MixtureSampler({**DATASETS, "reason": range(8)}).load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        MixtureSampler(DATASETS, ratios={"sem": 1, "refer": 1, "reason": 1}).load_state_dict(state)


def test_missing_datasets_drop_their_ratio() -> None:
    sampler = MixtureSampler({"sem": range(5), "reason": range(5)})
    assert sampler.weights == pytest.approx({"sem": 0.9, "reason": 0.1})


def test_group_ratio_is_shared_by_present_members() -> None:
    datasets = {"ade20k": range(4), "mapillary": range(4), "refcoco": range(4), "refcocog": range(4)}
    weights = MixtureSampler(datasets).weights
    assert weights == pytest.approx(
        {"ade20k": 0.375, "mapillary": 0.375, "refcoco": 0.125, "refcocog": 0.125}
    )
    # A dataset's own ratio overrides its group's share.
    own = resolve_weights(
        ["ade20k", "mapillary"], {"sem": 2.0, "ade20k": 6.0}, {"sem": ("ade20k", "mapillary")}
    )
    assert own == pytest.approx({"ade20k": 0.75, "mapillary": 0.25})


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="no ratio for dataset"):
        MixtureSampler({"sem": range(3), "vqa": range(3)})
    with pytest.raises(ValueError, match="positive"):
        MixtureSampler(DATASETS, ratios={"sem": 9, "refer": 0, "reason": 1})
    with pytest.raises(ValueError, match="positive"):
        MixtureSampler(DATASETS, ratios={"sem": 9, "refer": -3, "reason": 1})
    with pytest.raises(ValueError, match="empty"):
        MixtureSampler({"sem": range(0), "refer": range(3)})
    with pytest.raises(ValueError, match="at least one"):
        MixtureSampler({})
