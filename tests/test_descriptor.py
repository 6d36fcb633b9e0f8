"""The descriptor model (paper S1.3-S1.4): permutation and masking behaviour, dropout."""

from __future__ import annotations

import torch

from lens.descriptor import KeypointDescriptor


def _inputs(B: int = 2, m: int = 5, p: int = 9, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=gen), torch.randn(B, m, p, d, generator=gen)


def _descriptor() -> KeypointDescriptor:
    torch.manual_seed(0)
    return KeypointDescriptor(16, 8, num_heads=4).eval()


@torch.no_grad()
def test_keypoint_order_permutes_the_descriptions_and_nothing_else():
    model = _descriptor()
    query, neighbourhoods = _inputs()
    valid = torch.tensor([[True, True, False, True, True], [True, False, True, True, False]])
    out, used = model(query, neighbourhoods, valid)
    assert out.shape == (2, 6, 8) and torch.equal(used, valid)
    order = torch.tensor([3, 0, 4, 2, 1])
    again, _ = model(query, neighbourhoods[:, order], valid[:, order])
    torch.testing.assert_close(again[:, 0], out[:, 0], rtol=1e-5, atol=1e-6)  # f_s's global description
    torch.testing.assert_close(again[:, 1:], out[:, 1:][:, order], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_invalid_keypoints_have_no_effect():
    """Whatever an invalid keypoint's neighbourhood holds, the global and the valid descriptions are unchanged,
    and they equal what the descriptor gives with the invalid keypoints removed altogether."""
    model = _descriptor()
    query, neighbourhoods = _inputs(seed=1)
    valid = torch.tensor([[True, False, True, False, True], [False, True, True, True, False]])
    out, _ = model(query, neighbourhoods, valid)
    noisy = neighbourhoods.clone()
    noisy[~valid] = 1e3 * torch.randn_like(noisy[~valid])
    again, _ = model(query, noisy, valid)
    keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), valid], 1)
    torch.testing.assert_close(again[keep], out[keep], rtol=0, atol=0)
    for b in range(2):  # without the invalid slots at all
        alone, _ = model(query[b : b + 1], neighbourhoods[b : b + 1, valid[b]], valid[b : b + 1, valid[b]])
        torch.testing.assert_close(alone[0], out[b][keep[b]], rtol=1e-5, atol=1e-6)


def test_global_only_dropout_drops_keypoints_in_training_only():
    model = _descriptor()
    model.global_only_prob = 1.0
    query, neighbourhoods = _inputs()
    valid = torch.ones(2, 5, dtype=torch.bool)
    model.train()
    assert not model(query, neighbourhoods, valid)[1].any()
    model.eval()
    assert model(query, neighbourhoods, valid)[1].all()
