"""A feature-cache shard altered after the build is named when read, never used."""

from __future__ import annotations

import json

import pytest

from lens.cache import MANIFEST_NAME, CachedDataset, build_cache
from lens.errors import InvalidCheckpoint
from test_cache import _key, dataset, lens  # noqa: F401 (fixtures)


def test_a_corrupted_or_missing_shard_is_named(lens, dataset, tmp_path) -> None:  # noqa: F811
    build_cache(lens, dataset, tmp_path, _key(lens), shard_size=2)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert set(manifest["sha256"]) == set(manifest["shards"]) and len(manifest["shards"]) == 2
    assert len(CachedDataset(tmp_path, _key(lens)).rows(3)) == 1  # intact: reads
    shard = tmp_path / manifest["shards"][1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of tensor data: safetensors itself would not notice
    shard.write_bytes(bytes(data))
    cache = CachedDataset(tmp_path, _key(lens))
    cache.rows(0)  # the other shard still reads
    with pytest.raises(InvalidCheckpoint, match=r"shard_00001.safetensors is corrupted.*rebuild the cache"):
        cache.rows(3)
    shard.unlink()
    with pytest.raises(InvalidCheckpoint, match="shard_00001.safetensors is missing"):
        CachedDataset(tmp_path, _key(lens)).rows(2)
