"""Training loop on tiny models (CPU, fp32): exact resume, trainable-only checkpoints, LR schedule, cache path."""

from __future__ import annotations

import dataclasses
import json
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_lens
from lens.cache import CacheKey, build_cache
from lens.checkpoints import CHECKPOINTS, LENS_SUBDIR, latest_checkpoint
from lens.config import LensConfig
from lens.data.loader import (
    SYNTHETIC,
    MixtureBatchSampler,
    build_eval_dataset,
    build_train_datasets,
    train_ratios,
)
from lens.data.mixing import MixtureSampler
from lens.data.synthetic import SyntheticWorld
from lens.data.templates import format_question
from lens.evaluation import EvalSplit
from lens.tiny import build_tiny_models
from lens.training import FINAL, LOG_NAME, LoopOptions, TrainData, build_train_data, train
from lens.weights import WEIGHTS_NAME, save_lens_weights, strip_frozen_encoders

LR, WARMUP, STEPS = 1e-3, 1, 4


def _config() -> LensConfig:
    config = LensConfig()
    config.backbone.dtype = "float32"
    config.data.synthetic_seed = 0
    config.data.num_workers = 0
    config.data.num_classes_per_sample = 2
    config.train = dataclasses.replace(
        config.train, lr=LR, warmup_steps=WARMUP, max_steps=STEPS, batch_size=1, grad_accum_steps=2
    )
    return config


def _data(config: LensConfig) -> TrainData:
    world = SyntheticWorld(seed=0, height=64, width=64, train_size=6, val_size=1)
    train = build_train_datasets(config.data, config.train.seed, world)
    val = EvalSplit(SYNTHETIC, "val", build_eval_dataset(config.data, SYNTHETIC, "val", world))
    return TrainData(dict(train), train_ratios(config.data), val)


def _fresh_lens():
    """Each run gets its own tiny models: training changes SAM's mask decoder in place."""
    return make_lens(build_tiny_models(seed=0), backbone__dtype="float32")


OPTIONS = LoopOptions(save_every=100, eval_every=2, eval_limit=2, keep_checkpoints=1)


@pytest.mark.slow
def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    config = _config()
    initial = {k: v.clone() for k, v in _fresh_lens().trainable_state_dict().items()}
    full = train(config, tmp_path / "full", model=_fresh_lens(), data=_data(config), options=OPTIONS)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    # linear warm-up over one step, then linear decay to zero at STEPS (LISA's WarmupDecayLR)
    assert [r["lr"] for r in full] == pytest.approx([0.0, LR, LR * 2 / 3, LR / 3])
    assert "val_giou" in full[1] and "val_giou" in full[3] and "val_giou" not in full[2]

    stopped = dataclasses.replace(OPTIONS, stop_at_step=2)
    first = train(config, tmp_path / "cut", model=_fresh_lens(), data=_data(config), options=stopped)
    assert first == full[:2]
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000002"
    assert not (tmp_path / "cut" / FINAL).exists()
    with pytest.raises(FileExistsError):
        train(config, tmp_path / "cut", model=_fresh_lens(), data=_data(config), options=OPTIONS)

    # a fresh process: new model (initial weights), new datasets; everything else comes from the checkpoint
    rest = train(
        config,
        tmp_path / "cut",
        resume=True,
        model=_fresh_lens(),
        data=_data(config),
        options=OPTIONS,
    )
    assert rest == full[2:]  # identical losses, learning rates and validation metrics, to the last bit
    assert (tmp_path / "cut" / LOG_NAME).read_text() == (tmp_path / "full" / LOG_NAME).read_text()
    a, b = (
        load_file(tmp_path / "full" / FINAL / WEIGHTS_NAME),
        load_file(tmp_path / "cut" / FINAL / WEIGHTS_NAME),
    )
    assert a.keys() == b.keys() == initial.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # it did train

    # checkpoints hold the trainable tensors only
    checkpoint = latest_checkpoint(tmp_path / "cut")
    saved = load_file(checkpoint / "model.safetensors")
    assert saved.keys() == initial.keys()
    assert (checkpoint / LENS_SUBDIR / WEIGHTS_NAME).is_file()
    assert [p.name for p in (tmp_path / "cut" / CHECKPOINTS).glob("step_*")] == [checkpoint.name]  # keep=1


@pytest.mark.slow
def test_training_from_the_feature_cache_without_an_mllm(tmp_path):
    config = _config()
    config.train = dataclasses.replace(config.train, max_steps=2)
    data = _data(config)
    lens = _fresh_lens().eval()
    key = CacheKey.from_config(config, SYNTHETIC, "train", train=True, seed=config.train.seed)
    build_cache(lens, data.train[SYNTHETIC], tmp_path / "cache" / SYNTHETIC / "train", key, shard_size=4)
    val_key = CacheKey.from_config(config, SYNTHETIC, "val", train=False)
    build_cache(lens, data.val.data, tmp_path / "cache" / SYNTHETIC / "val", val_key, shard_size=4)

    options = dataclasses.replace(OPTIONS, eval_every=0)  # 0: validate at the last step only
    raw = train(config, tmp_path / "raw", model=_fresh_lens(), data=data, options=options)
    assert ["val_giou" in r for r in raw] == [False, True]
    cached_data = build_train_data(config, tmp_path / "cache")
    assert cached_data.val.label == "synthetic/val" and cached_data.ratios == {SYNTHETIC: 1.0}
    no_mllm = strip_frozen_encoders(_fresh_lens())  # prepare() would raise: nothing runs the MLLM
    assert not any(n.startswith("backbone.") for n, _ in no_mllm.named_parameters())
    cached = train(config, tmp_path / "cached", model=no_mllm, data=cached_data, options=options)
    # epoch-0 draws are what the cache holds, so the first steps see the same rows
    for a, b in zip(raw, cached, strict=True):
        assert b.keys() == a.keys()
        assert [b[k] for k in a] == pytest.approx([a[k] for k in a], rel=1e-4, abs=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "cached" / LOG_NAME).read_text().splitlines()]
    assert logged == cached


def test_init_from_starts_the_trainable_weights_from_a_checkpoint(tmp_path):
    """A warm restart: weights from ``train.init_from``, a fresh optimizer and schedule (lr 0: nothing moves)."""
    source = _fresh_lens()
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.5)  # unlike any fresh initialisation
    save_lens_weights(source, tmp_path / "source")
    config = _config()
    config.train = dataclasses.replace(
        config.train, lr=0.0, max_steps=1, grad_accum_steps=1, init_from=str(tmp_path / "source")
    )
    data = dataclasses.replace(_data(config), val=None)
    records = train(config, tmp_path / "restart", model=_fresh_lens(), data=data, options=OPTIONS)
    assert [r["step"] for r in records] == [1] and records[0]["lr"] == 0.0
    final = load_file(tmp_path / "restart" / FINAL / WEIGHTS_NAME)
    expected = source.trainable_state_dict()
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)

    config.train = dataclasses.replace(config.train, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(config, tmp_path / "missing", model=_fresh_lens(), data=data, options=OPTIONS)


def _sampler() -> MixtureSampler:
    return MixtureSampler({"a": range(5), "b": range(3)}, {"a": 1.0, "b": 2.0}, seed=1)


def test_batch_sampler_shards_processes_and_resumes_from_consumed_batches():
    global_batches = list(islice(iter(MixtureBatchSampler(_sampler(), batch_size=4)), 6))
    ranks = [list(islice(iter(MixtureBatchSampler(_sampler(), 2, 2, r)), 6)) for r in (0, 1)]
    assert [x + y for x, y in zip(*ranks, strict=True)] == global_batches  # a partition of the same draws

    seen: dict[str, int] = {}
    for key in (k for batch in global_batches for k in batch):  # the k-th draw of a dataset is in pass k // n
        n = 5 if key.name == "a" else 3
        assert key.epoch == seen.get(key.name, 0) // n
        seen[key.name] = seen.get(key.name, 0) + 1
    a_draws = [k.index for batch in global_batches for k in batch if k.name == "a"][:5]
    assert sorted(a_draws) == [0, 1, 2, 3, 4]  # every item once per pass

    batches = MixtureBatchSampler(_sampler(), batch_size=2)
    produced = list(islice(iter(batches), 5))  # data-loader workers ran ahead ...
    batches.mark_consumed()
    batches.mark_consumed()  # ... but training consumed two batches
    state = json.loads(json.dumps(batches.state_dict()))
    resumed = MixtureBatchSampler(_sampler(), batch_size=2)
    resumed.load_state_dict(state)
    assert list(islice(iter(resumed), 3)) == produced[2:]


def test_training_rows_draw_templates_from_the_seed_and_evaluation_rows_use_the_first():
    config = _config()
    world = SyntheticWorld(seed=0, height=64, width=64, train_size=3, val_size=1)
    first, again = (build_train_datasets(config.data, 7, world)[SYNTHETIC] for _ in range(2))
    rows = {(i, e): first.rows(i, e) for i in range(3) for e in range(3)}
    assert all(
        rows[k] == [] or _texts(again.rows(*k)) == _texts(rows[k]) for k in rows
    )  # pure in (seed, key)
    assert len({tuple(_texts(r)) for r in rows.values()}) > 3  # epochs redraw queries and templates
    val = build_eval_dataset(config.data, SYNTHETIC, "val", world)
    for i in range(len(val)):
        (row,) = val.rows(i)
        assert row["instruction"] == format_question(row["query"], row["is_sentence"])


def _texts(rows: list[dict]) -> list[str]:
    return [r["instruction"] for r in rows]
