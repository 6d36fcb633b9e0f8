"""Every new family through the feature cache: cached rows give the inputs and outputs of the live backbone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from backbone_checks import box_mask, random_image
from lens.backbone import BACKBONES
from lens.batches import lens_inputs
from lens.cache import CachedDataset, CacheKey, build_cache, stack_cached
from lens.config import LensConfig
from lens.data.loader import QueryDataset
from lens.data.types import Sample
from lens.decoders import SamDecoder
from lens.model import LensModel
from lens.tiny import build_sam
from lens.tiny_families import TINY_FAMILIES, build_family


def _items() -> list[list[Sample]]:
    """Three items of different sizes (so different grids); the first has two queries on one image."""

    def sample(w: int, h: int, seed: int, query: str) -> Sample:
        image = np.asarray(random_image(w, h, seed))
        return Sample(image, query, box_mask(w, h, w // 4, h // 4, w // 2, h // 2), source="toy", name=query)

    first = sample(40, 24, 0, "red ring")
    return [
        [first, dataclasses.replace(first, query="square", name="square")],
        [sample(24, 56, 1, "the ring")],
        [sample(33, 47, 2, "the square")],
    ]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_cache_round_trip(family, tmp_path):
    model, processor = build_family(family)
    backbone = BACKBONES[family](model, processor, layer=2)
    config = LensConfig()
    config.backbone.name, config.backbone.layer, config.backbone.dtype = family, 2, "float32"
    config.descriptor.num_heads = 4
    sam, sam_processor = build_sam()
    torch.manual_seed(0)
    lens = LensModel(config, backbone, SamDecoder(sam, sam_processor)).eval()
    dataset = QueryDataset(_items(), "toy", train=True, seed=3)
    key = CacheKey.from_config(config, "toy", "train", train=True, seed=3)
    build_cache(lens, dataset, tmp_path, key, shard_size=2, batch_size=2)
    cached = CachedDataset(tmp_path, key)
    raw = [row for i in range(len(dataset)) for row in dataset.rows(i)]
    rows = [row for i in range(len(cached)) for row in cached.rows(i, epoch=0)]
    expected, inputs = lens_inputs(lens, raw), stack_cached(rows)
    f, g = expected.features, inputs.features
    real = f.attention_mask
    assert torch.equal(g.attention_mask, real)
    torch.testing.assert_close(g.hidden_states[real], f.hidden_states[real], atol=1e-5, rtol=1e-5)
    for name in ("image_positions", "grid_sizes", "text_span", "answer_index"):
        assert torch.equal(getattr(g, name), getattr(f, name)), name
    real_positions = real if f.position_ids.dim() == 2 else real.expand(3, -1, -1)
    assert torch.equal(g.position_ids[real_positions], f.position_ids[real_positions])
    assert g.geometries == f.geometries
    with torch.no_grad():
        out, want = lens(inputs), lens(expected)
    torch.testing.assert_close(out.attention_map, want.attention_map, atol=1e-5, rtol=1e-5)
    for x, y in zip(out.mask_logits, want.mask_logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
