"""Paper-protocol evaluation on a tiny synthetic ReasonSeg export: tables, per-sample file, resume, sharding."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from helpers import make_lens
from lens.cache import CacheKey, build_cache
from lens.config import DataConfig, LensConfig
from lens.data.loader import QueryDataset, build_eval_dataset
from lens.data.reason_seg import ReasonSegDataset
from lens.data.synthetic import SyntheticWorld, export_split
from lens.data.synthetic.dataset import SyntheticQueries
from lens.evaluation import (
    IDENTITY_NAME,
    PARTS_DIR,
    PER_SAMPLE_NAME,
    RESULTS_JSON,
    RESULTS_MD,
    EvalSplit,
    eval_splits,
    evaluate,
    prediction_path,
)
from lens.metrics import giou_ciou

SPLITS = ("val", "test")
LIMIT = 5  # items per split in the sharding test


@pytest.fixture(scope="module")
def export_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reason_seg")
    world = SyntheticWorld(seed=0, height=64, width=80)
    for split in SPLITS:
        export_split(world, split, root, num_scenes=1)
    return root


@pytest.fixture
def lens(tiny_models):
    return make_lens(tiny_models, backbone__dtype="float32")


def _splits(root) -> list[EvalSplit]:
    return [EvalSplit("reason_seg", s, QueryDataset(ReasonSegDataset(root, s), "reason_seg")) for s in SPLITS]


def _count_prepared(lens, monkeypatch) -> list[int]:
    calls: list[int] = []
    prepare = lens.prepare
    monkeypatch.setattr(lens, "prepare", lambda im, tx, m=None: calls.append(len(im)) or prepare(im, tx, m))
    return calls


def test_tables_and_per_sample_results_match_the_saved_predictions(lens, export_root, tmp_path):
    splits = _splits(export_root)
    results = evaluate(lens, splits, tmp_path, batch_size=4, save_predictions=True)
    records = [json.loads(line) for line in (tmp_path / PER_SAMPLE_NAME).read_text().splitlines()]
    assert len(records) == sum(len(s.data) for s in splits)
    assert not list((tmp_path / PARTS_DIR).glob("*.jsonl"))  # merged into the per-sample file
    assert json.loads((tmp_path / RESULTS_JSON).read_text()) == results

    # Recompute every number from the saved PNG predictions and the dataset's own masks.
    for split in splits:
        preds, targets, long = [], [], []
        for record in (r for r in records if r["split"] == split.split):
            preds.append(np.asarray(Image.open(prediction_path(tmp_path, record))) > 0)
            targets.append(split.data.reader[record["index"]].mask)
            long.append(record["is_sentence"])
        assert any(p.any() for p in preds) and not all(p.all() for p in preds)  # not a constant model
        for subset, keep in (
            ("overall", [True] * len(long)),
            ("long", long),
            ("short", [not x for x in long]),
        ):
            giou, ciou = giou_ciou(
                [p for p, k in zip(preds, keep, strict=True) if k],
                [t for t, k in zip(targets, keep, strict=True) if k],
            )
            found = results["splits"][f"reason_seg/{split.split}"][subset]
            assert (found["giou"], found["ciou"], found["count"]) == (
                pytest.approx(giou, abs=1e-12),
                pytest.approx(ciou, abs=1e-12),
                sum(keep),
            )

    t2 = results["table2"]
    assert t2["val"]["ciou"] == results["splits"]["reason_seg/val"]["overall"]["ciou"]
    assert t2["test_long"]["giou"] == results["splits"]["reason_seg/test"]["long"]["giou"]
    assert results["table3"] is None
    md = (tmp_path / RESULTS_MD).read_text()
    assert "Table 2" in md and "Table 3" not in md
    row = next(line for line in md.splitlines() if line.startswith("| LENS |"))
    assert row.split(" | ")[1] == f"{100 * t2['val']['giou']:.1f}"
    assert row.split(" | ")[-1].rstrip(" |") == f"{100 * t2['test_overall']['ciou']:.1f}"


def test_synthetic_evaluation_scores_held_out_targets_apart(lens, tmp_path):
    world = SyntheticWorld(
        seed=0, height=64, width=80, held_out_pairs=frozenset({("red", "star"), ("blue", "ring")})
    )
    reader = SyntheticQueries(world, "test", num_scenes=12)
    queries = [reader.query(i) for i in range(len(reader))]
    held = [
        q.target is not None and (q.target.colour, q.target.shape) in world.held_out_pairs for q in queries
    ]
    assert 0 < sum(held) < len(held)
    split = EvalSplit("synthetic", "test", QueryDataset(reader, "synthetic"))
    results = evaluate(lens, [split], tmp_path, batch_size=8, save_predictions=True)
    records = [json.loads(line) for line in (tmp_path / PER_SAMPLE_NAME).read_text().splitlines()]
    assert [r["held_out"] for r in sorted(records, key=lambda r: r["index"])] == held
    preds = [np.asarray(Image.open(prediction_path(tmp_path, r))) > 0 for r in records if r["held_out"]]
    truths = [reader[r["index"]].mask for r in records if r["held_out"]]
    giou, ciou = giou_ciou(preds, truths)
    found = results["splits"]["synthetic/test"]["held_out"]
    assert (found["giou"], found["ciou"], found["count"]) == (
        pytest.approx(giou, abs=1e-12),
        pytest.approx(ciou, abs=1e-12),
        sum(held),
    )


def test_resumed_evaluation_skips_done_items_and_gives_identical_results(
    lens, export_root, tmp_path, monkeypatch
):
    splits = _splits(export_root)
    full = evaluate(lens, splits, tmp_path / "full", batch_size=4)
    lines = (tmp_path / "full" / PER_SAMPLE_NAME).read_text().splitlines()

    # An interrupted run: five test items written (batch 0-3 complete, batch 4-7 not), then a cut line.
    (tmp_path / "resumed" / PARTS_DIR).mkdir(parents=True)
    (tmp_path / "resumed" / PARTS_DIR / "rank0.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    shutil.copy(tmp_path / "full" / IDENTITY_NAME, tmp_path / "resumed")  # written before any record
    calls = _count_prepared(lens, monkeypatch)
    assert evaluate(lens, splits, tmp_path / "resumed", batch_size=4) == full
    assert sum(calls) == len(lines) - 4  # batches are fixed: the unfinished one is re-run whole
    resumed = (tmp_path / "resumed" / PER_SAMPLE_NAME).read_text().splitlines()
    assert [json.loads(x) for x in resumed] == [json.loads(x) for x in lines]

    calls.clear()  # a finished evaluation is not redone
    assert evaluate(lens, splits, tmp_path / "resumed", batch_size=4) == full and calls == []


class _Rank:
    """The part of an Accelerator that evaluation uses: one of two processes, played by a thread."""

    def __init__(self, index: int, barrier: threading.Barrier):
        self.num_processes, self.process_index, self.is_main_process = 2, index, index == 0
        self.barrier = barrier

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=60)

    def autocast(self):
        return contextlib.nullcontext()


def test_sharded_evaluation_gathers_the_same_results(lens, export_root, tmp_path, monkeypatch):
    lens.eval()  # both "processes" share this module: no train/eval switching between them
    splits = _splits(export_root)
    # batch size 1: the same batches (hence the same rounding) however the items are sharded
    single = evaluate(lens, splits, tmp_path / "single", batch_size=1, limit=LIMIT)
    calls = _count_prepared(lens, monkeypatch)
    barrier = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        ranks = [
            pool.submit(evaluate, lens, splits, tmp_path / "sharded", 1, _Rank(r, barrier), LIMIT)
            for r in (0, 1)
        ]
        results = [rank.result() for rank in ranks]
    assert results == [single, single]  # gathered, and handed to every process
    assert sum(calls) == LIMIT * len(splits)  # every item scored once, by one process
    assert not list((tmp_path / "sharded" / PARTS_DIR).glob("*.jsonl"))
    sharded = (tmp_path / "sharded" / PER_SAMPLE_NAME).read_text()
    assert sharded == (tmp_path / "single" / PER_SAMPLE_NAME).read_text()


def test_evaluation_from_the_feature_cache_matches(lens, export_root, tmp_path):
    lens.config.data.reason_seg_root = str(export_root)
    raw = evaluate(lens, eval_splits(lens.config, ["reason_seg/val"]), tmp_path / "raw", batch_size=4)
    split = _splits(export_root)[0]
    key = CacheKey.from_config(lens.config, "reason_seg", "val", train=False)
    build_cache(lens, split.data, tmp_path / "cache" / "reason_seg" / "val", key, shard_size=8, batch_size=4)
    cached_splits = eval_splits(lens.config, cache_root=tmp_path / "cache")
    assert [s.label for s in cached_splits] == ["reason_seg/val"]
    cached = evaluate(lens, cached_splits, tmp_path / "cached", batch_size=4)
    found, expected = cached["splits"]["reason_seg/val"], raw["splits"]["reason_seg/val"]
    assert found["overall"]["count"] == expected["overall"]["count"] == len(split.data)
    for subset in expected:
        assert found[subset]["giou"] == pytest.approx(expected[subset]["giou"], abs=1e-4)
        assert found[subset]["ciou"] == pytest.approx(expected[subset]["ciou"], abs=1e-4)
    shutil.rmtree(tmp_path / "cache")


def test_synthetic_eval_scenes_picks_the_scenes_scored_and_keys_the_cache():
    """data.datasets.synthetic.eval_scenes: the first N scenes' every query, null the whole split (default 100);
    caches record N for evaluation splits only."""
    world = {"seed": 0, "height": 64, "width": 64, "val_size": 7}
    per_scene = [len(scene.segmentation_queries()) for scene in SyntheticWorld(**world).split("val")]
    for scenes, expected in ((3, sum(per_scene[:3])), (None, sum(per_scene)), (100, sum(per_scene))):
        data = DataConfig(datasets={"synthetic": {**world, "eval_scenes": scenes}})
        assert len(build_eval_dataset(data, "synthetic", "val")) == expected
    config = LensConfig(data=DataConfig(datasets={"synthetic": {"seed": 0, "eval_scenes": 3}}))
    assert json.loads(CacheKey.from_config(config, "synthetic", "val", train=False).options) == {
        "seed": 0,
        "eval_scenes": 3,
    }
    assert json.loads(CacheKey.from_config(config, "synthetic", "train", train=True).options) == {"seed": 0}
    assert CacheKey.from_config(config, "reason_seg", "val", train=False).options == "{}"
    with pytest.raises(ValueError, match="unknown key.*'sede'"):
        build_eval_dataset(DataConfig(datasets={"synthetic": {"sede": 0}}), "synthetic", "val")
