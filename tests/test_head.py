import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from lens.backbone import LayerSpec
from lens.head import SegmentationHead, causal_mask, rotary, text_to_image_attention
from lens.losses import attention_loss

SPEC = LayerSpec(
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


def _inputs(B=2, L=12, image=(2, 8), text_end=(12, 10)):
    torch.manual_seed(0)
    hidden = torch.randn(B, L, SPEC.hidden_size)
    attention_mask = torch.arange(L)[None] < torch.tensor(text_end)[:, None]
    positions = torch.arange(L).expand(B, L)
    image_span = torch.tensor([image] * B)
    text_span = torch.stack([image_span[:, 1], torch.tensor(text_end)], 1)
    return hidden, attention_mask, positions, image_span, text_span


def test_layer_matches_hf_llama_decoder_layer():
    """The head mirrors the backbone layer exactly: same weights, same output (independent reference)."""
    config, hf_layer = _hf_layer()
    head = SegmentationHead(SPEC)
    head.layers[0].load_state_dict(hf_layer.state_dict())
    hidden, attention_mask, positions, *_ = _inputs(B=1, text_end=(12,))
    mask = causal_mask(attention_mask, torch.float32)
    rope = LlamaRotaryEmbedding(config)(hidden, positions[:1])
    expected = hf_layer(hidden, attention_mask=mask, position_embeddings=rope)
    rope = rotary(positions[:1], SPEC.head_dim, SPEC.rope_theta, torch.float32)
    for need_probs in (True, False):  # explicit probabilities (layer 1) and the fused kernel (layer 2)
        ours, probs, _ = head.layers[0](hidden, rope, mask, need_probs=need_probs)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert (probs is not None) == need_probs


def test_shared_image_prefix_runs_once_with_the_same_result_and_gradients():
    """Three prompts, the first and last on one image: running their shared first P tokens once per image
    must give what the plain forward gives, outputs and gradients alike."""
    hidden, attention_mask, positions, image_span, text_span = _inputs(B=3, text_end=(12, 10, 11))
    P = 8  # template (2 tokens) + 6 image tokens; the text starts here
    hidden[2, :P] = hidden[0, :P]  # same image, same template
    head = SegmentationHead(SPEC)
    outputs, grads = [], []
    for index, shared in ((None, 0), (torch.tensor([0, 1, 0]), P)):
        x = hidden.clone().requires_grad_()
        out = head(x, attention_mask, positions, image_span, text_span, (2, 3), index, shared)
        real = attention_mask[..., None]
        loss = (out.hidden_states * real).square().sum() + out.attention_map.square().sum()
        head.zero_grad()
        loss.backward()
        outputs.append((out.hidden_states * real, out.attention_map))
        grads.append([p.grad.clone() for p in head.parameters()])
    for ours, plain in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    for ours, plain in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)


def _hf_layer() -> tuple[LlamaConfig, LlamaDecoderLayer]:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6
    )
    config._attn_implementation = "eager"
    hf_layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    for p in hf_layer.parameters():  # RMSNorm weights are ones by default: make the test sensitive to them
        torch.nn.init.normal_(p, std=0.1)
    return config, hf_layer


def test_attention_map_is_eq1_over_the_reference_attention_probabilities():
    """A_c from HF's own Llama attention (eager, same weights): per sample, the mean over heads and over the
    real text rows of their attention to each image column; attention_scores is that times n_image."""
    config, hf_layer = _hf_layer()
    head = SegmentationHead(SPEC)
    head.layers[0].load_state_dict(hf_layer.state_dict())
    hidden, attention_mask, positions, image_span, text_span = _inputs(text_end=(12, 10))
    with torch.no_grad():
        out = head(hidden, attention_mask, positions, image_span, text_span, (2, 3))
        rope = LlamaRotaryEmbedding(config)(hidden, positions)
        _, probs = hf_layer.self_attn(
            hf_layer.input_layernorm(hidden),
            position_embeddings=rope,
            attention_mask=causal_mask(attention_mask, torch.float32),
        )  # (B, heads, L, L)
    for b, (end, (i0, i1)) in enumerate(zip((12, 10), image_span.tolist(), strict=True)):
        expected = probs[b, :, i1:end, i0:i1].mean(0).mean(0).view(2, 3)  # text rows 8..end-1
        torch.testing.assert_close(out.attention_map[b], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.attention_scores[b], 6 * expected, rtol=1e-5, atol=1e-6)
        assert 0 < float(expected.sum()) <= 1  # a share of each text row's probability mass


def test_attention_loss_is_eq5_on_the_plain_mean():
    # Two cells, the first a target: A_c = (0.3, 0.1) of the text rows' attention.
    a = torch.tensor([[[0.3, 0.1]]], requires_grad=True)
    loss = attention_loss(a, torch.tensor([[[1.0, 0.0]]]))
    loss.backward()
    assert loss.item() == pytest.approx(-(math.log(0.3) + math.log(0.9)) / 2, rel=1e-6)
    # The target cell is pulled up with -1/(2 A_c); the non-target one pushed down with 1/(2 (1 - A_c)).
    torch.testing.assert_close(a.grad, torch.tensor([[[-1 / 0.6, 1 / 1.8]]]))


def test_text_to_image_attention_by_hand():
    # B=1, h=2 heads, L=4: tokens 0,1 image; 2,3 text.
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 0, 2] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    probs[0, 1, 2] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    probs[0, 0, 3] = torch.tensor([0.0, 0.2, 0.4, 0.4])
    probs[0, 1, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    text_mask = torch.tensor([[False, False, True, True]])
    got = text_to_image_attention(probs, torch.tensor([[0, 2]]), text_mask, 2)
    # heads mean: row2 -> [0.75, 0.25], row3 -> [0, 0.1]; text mean -> [0.375, 0.175]
    torch.testing.assert_close(got, torch.tensor([[0.375, 0.175]]))


def test_causal_mask_is_applied():
    """Changing a later token never changes A_c rows computed for earlier tokens, nor image features."""
    head = SegmentationHead(SPEC)
    hidden, attention_mask, positions, image_span, text_span = _inputs(B=1, text_end=(12,))
    out1 = head(hidden, attention_mask, positions, image_span, text_span, (2, 3))
    changed = hidden.clone()
    changed[:, -1] += 5.0
    out2 = head(changed, attention_mask, positions, image_span, text_span, (2, 3))
    torch.testing.assert_close(out1.hidden_states[:, :-1], out2.hidden_states[:, :-1])
    assert not torch.allclose(out1.hidden_states[:, -1], out2.hidden_states[:, -1])
    mask = causal_mask(attention_mask, torch.float32)[0, 0]
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    assert (mask[upper] < -1e30).all() and (mask[~upper] == 0).all()


def test_padding_tokens_are_invisible():
    head = SegmentationHead(SPEC)
    hidden, attention_mask, positions, image_span, text_span = _inputs(text_end=(12, 10))
    out1 = head(hidden, attention_mask, positions, image_span, text_span, (2, 3))
    noisy = hidden.clone()
    noisy[1, 10:] = torch.randn(2, SPEC.hidden_size) * 100  # padding of sample 1
    out2 = head(noisy, attention_mask, positions, image_span, text_span, (2, 3))
    torch.testing.assert_close(out1.attention_map, out2.attention_map)
    torch.testing.assert_close(out1.hidden_states[1, :10], out2.hidden_states[1, :10])
