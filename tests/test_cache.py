"""Feature cache: exact round trip to LensInputs, key refusal, resume without recomputing finished shards."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import box_mask, make_lens, random_image
from lens.cache import (
    MANIFEST_NAME,
    SHARD_NAME,
    CachedDataset,
    CacheKey,
    _item_batches,
    build_cache,
    lens_inputs,
    stack_cached,
)
from lens.data.loader import QueryDataset
from lens.data.types import IGNORE_INDEX, Sample
from lens.weights import backbone_spec, build_lens_for_cache


def _sample(h: int, w: int, seed: int, query: str, sentence: bool = False) -> Sample:
    image = np.asarray(random_image(h, w, seed))
    mask = box_mask(h, w, h // 4, w // 4, h // 2, w // 2)
    mask[0, 0] = IGNORE_INDEX
    return Sample(image, query, mask, is_sentence=sentence, source="toy", name=f"s{seed}_{query[:4]}")


def _items() -> list[list[Sample]]:
    """Four items of different sizes; the first has two queries on one image (as a semantic reader gives)."""
    first = _sample(40, 60, 0, "red ring")
    second_query = dataclasses.replace(
        first, query="square", mask=box_mask(40, 60, 0, 0, 10, 10), name="s0_b"
    )
    return [
        [first, second_query],
        [_sample(50, 30, 1, "what is the colour of the ring?", sentence=True)],
        [_sample(32, 32, 2, "the square")],
        [_sample(24, 48, 3, "image")],
    ]


@pytest.fixture
def lens(tiny_models):
    model = make_lens(tiny_models, backbone__dtype="float32")
    return model.eval()


@pytest.fixture
def dataset() -> QueryDataset:
    return QueryDataset(_items(), "toy", train=True, seed=3)


def _key(lens, split: str = "train") -> CacheKey:
    return CacheKey.from_config(lens.config, "toy", split, train=True, seed=3)


def test_round_trip_gives_the_same_inputs_and_outputs(lens, dataset, tmp_path):
    build_cache(lens, dataset, tmp_path, _key(lens), shard_size=3, batch_size=2)
    cached = CachedDataset(tmp_path, _key(lens))
    assert len(cached) == len(dataset) == 4
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["shards"] == [
        SHARD_NAME.format(s) for s in (0, 1)
    ]

    raw = [row for i in range(len(dataset)) for row in dataset.rows(i)]
    rows = [row for i in range(len(cached)) for row in cached.rows(i, epoch=5)]
    assert len(rows) == len(raw) == 5
    for a, b in zip(raw, rows, strict=True):
        assert {k: a[k] for k in ("instruction", "name", "query", "is_sentence", "index", "part")} == {
            k: b[k] for k in ("instruction", "name", "query", "is_sentence", "index", "part")
        }
        np.testing.assert_array_equal(a["mask"], b["mask"])
    # both rows of item 0 point at the one stored SAM embedding
    assert torch.equal(rows[0]["decoder_embedding"], rows[1]["decoder_embedding"])

    expected_inputs = lens_inputs(lens, raw)  # computed on the fly, padded over these five rows
    inputs = stack_cached(rows)
    f, g = expected_inputs.features, inputs.features
    assert g.hidden_states.shape == f.hidden_states.shape
    real = f.attention_mask
    assert torch.equal(g.attention_mask, real)
    torch.testing.assert_close(g.hidden_states[real], f.hidden_states[real], atol=1e-5, rtol=1e-5)
    for name in ("position_ids", "image_positions", "grid_sizes", "text_span", "answer_index"):
        assert torch.equal(getattr(g, name), getattr(f, name)), name
    assert g.geometries == f.geometries
    torch.testing.assert_close(inputs.decoder_embeddings, expected_inputs.decoder_embeddings)
    # item 0's two rows share their prompt start (template and image) in the head, as on the fly
    assert g.image_index.tolist() == f.image_index.tolist() == [0, 0, 1, 2, 3]
    assert 0 < f.shared_length <= g.shared_length <= int(g.text_span[:, 0].min())

    with torch.no_grad():
        expected, out = lens(expected_inputs), lens(inputs)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention_map, expected.attention_map, atol=1e-5, rtol=1e-5)
    for x, y in zip(out.mask_logits, expected.mask_logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_key_mismatch_is_refused_naming_the_fields(lens, dataset, tmp_path):
    build_cache(lens, dataset, tmp_path, _key(lens), shard_size=4)
    other = dataclasses.replace(_key(lens), layer=3, split="val")
    with pytest.raises(ValueError, match="layer") as err:
        CachedDataset(tmp_path, other)
    assert "split" in str(err.value) and "dtype" not in str(err.value)
    with pytest.raises(ValueError, match="layer"):
        build_cache(lens, dataset, tmp_path, other, shard_size=4)
    with pytest.raises(ValueError, match="items of 2"):
        build_cache(lens, dataset, tmp_path, _key(lens), shard_size=2)
    with pytest.raises(ValueError, match="float32 features .* bfloat16"):
        build_cache(lens, dataset, tmp_path / "bf16", dataclasses.replace(_key(lens), dtype="bfloat16"))


def test_interrupted_build_resumes_without_recomputing_finished_shards(lens, dataset, tmp_path, monkeypatch):
    encode = lens.backbone.encode
    calls: list[int] = []

    def failing_encode(images, instructions, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        calls.append(len(images))
        return encode(images, instructions, **kwargs)

    monkeypatch.setattr(lens.backbone, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_cache(lens, dataset, tmp_path / "cache", _key(lens), shard_size=1)
    done = {s: (tmp_path / "cache" / SHARD_NAME.format(s)).stat().st_mtime_ns for s in (0, 1)}
    assert not (tmp_path / "cache" / SHARD_NAME.format(2)).exists()
    with pytest.raises(ValueError, match="incomplete"):
        CachedDataset(tmp_path / "cache")

    calls.clear()
    monkeypatch.setattr(
        lens.backbone,
        "encode",
        lambda images, texts, **kw: calls.append(len(images)) or encode(images, texts, **kw),
    )
    build_cache(lens, dataset, tmp_path / "cache", _key(lens), shard_size=1)
    assert calls == [1, 1]  # only items 2 and 3 (one row each) were encoded again
    assert {s: (tmp_path / "cache" / SHARD_NAME.format(s)).stat().st_mtime_ns for s in (0, 1)} == done

    build_cache(lens, dataset, tmp_path / "fresh", _key(lens), shard_size=1)
    resumed, fresh = CachedDataset(tmp_path / "cache"), CachedDataset(tmp_path / "fresh")
    for i in range(len(fresh)):
        for a, b in zip(resumed.rows(i), fresh.rows(i), strict=True):
            assert torch.equal(a["hidden_states"], b["hidden_states"])
            assert torch.equal(a["decoder_embedding"], b["decoder_embedding"])
            assert a["instruction"] == b["instruction"]


def test_model_for_the_cache_has_the_same_trainable_parts_and_no_mllm(tiny_models, tmp_path):
    llava, llava_processor, sam, sam_processor = tiny_models
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")
    sam.save_pretrained(tmp_path / "sam")
    sam_processor.save_pretrained(tmp_path / "sam")
    full = make_lens(tiny_models)
    config = full.config
    config.backbone.model_id, config.decoder.model_id = str(tmp_path / "llava"), str(tmp_path / "sam")

    assert backbone_spec(config.backbone) == full.backbone.layer_spec()  # from config.json alone
    lean = build_lens_for_cache(config)
    assert not any(
        n.startswith(("backbone.", "decoder.sam.vision_encoder.")) for n, _ in lean.named_parameters()
    )
    expected = {k: v.shape for k, v in full.trainable_state_dict().items()}
    assert {k: v.shape for k, v in lean.trainable_state_dict().items()} == expected
    with pytest.raises(RuntimeError, match="cached features"):
        lean.prepare([random_image(8, 8)], ["segment the ring"])


def test_shared_prefix_of_cached_rows_stops_at_the_first_difference(lens, dataset, tmp_path):
    build_cache(lens, dataset, tmp_path, _key(lens), shard_size=4, batch_size=8)
    rows = CachedDataset(tmp_path, _key(lens)).rows(0)  # two rows on one image
    shared = stack_cached(rows).features.shared_length
    assert shared > 3
    rows[1]["hidden_states"] = rows[1]["hidden_states"].clone()
    rows[1]["hidden_states"][3, 0] += 1e-3  # position 3 no longer equal: the head may share 0..2 only
    assert stack_cached(rows).features.shared_length == 3
    for row in rows:
        del row["image_id"]  # rows that do not say which image they show share nothing
    f = stack_cached(rows).features
    assert f.image_index is None and f.shared_length == 0


def test_cache_batches_never_split_an_item():
    items = [[1, 2], [3], [4], [5, 6, 7], []]
    assert _item_batches(items, 2) == [[1, 2], [3, 4], [5, 6, 7]]
    assert _item_batches(items, 8) == [[1, 2, 3, 4, 5, 6, 7]]


def test_stack_cached_takes_3d_positions_mixed_grids_and_tuple_embeddings():
    """What a Qwen-style backbone and a SAM 2-style decoder cache: (3, L) positions, per-row grids, two tensors."""
    from lens.geometry import DecoderFrame, GridFrame, ImageGeometry

    def row(n: int, grid: tuple[int, int], image: int) -> dict:
        gh, gw = grid
        g = ImageGeometry(GridFrame.resize(30, 20, gh, gw), DecoderFrame.stretch(30, 20, 64))
        return {
            "image_id": ("cache", 0, image),
            "hidden_states": torch.randn(n, 8),
            "position_ids": torch.stack([torch.arange(n), torch.arange(n) * 2, torch.arange(n) * 3]),
            "grid_size": torch.tensor(grid),
            "image_positions": 1 + torch.arange(gh * gw),
            "text_span": torch.tensor([1 + gh * gw, n]),
            "answer_index": torch.tensor(n - 1),
            "decoder_embedding": (torch.randn(4, 2, 2), torch.randn(2, 4, 4)),
            "geometry": g,
            "mask": np.zeros((20, 30), np.uint8),
        }

    rows = [row(12, (2, 3), 0), row(9, (1, 2), 1)]
    f = stack_cached(rows).features
    assert f.position_ids.shape == (3, 2, 12)
    assert f.position_ids[:, 1, 9:].tolist() == [[9, 10, 11], [17, 18, 19], [25, 26, 27]]  # pads continue
    assert f.image_positions.tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, -1, -1, -1, -1]]
    assert f.grid_sizes.tolist() == [[2, 3], [1, 2]] and f.max_grid == (2, 3)
    embeddings = stack_cached(rows).decoder_embeddings
    assert isinstance(embeddings, tuple) and [e.shape for e in embeddings] == [(2, 4, 2, 2), (2, 2, 4, 4)]
    assert torch.equal(embeddings[1][1], rows[1]["decoder_embedding"][1])
