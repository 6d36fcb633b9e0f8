import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from lens.backbone import LayerSpec, RopeSpec
from lens.head import SegmentationHead, causal_mask, rotary, text_to_image_attention
from lens.losses import attention_loss

SPEC = LayerSpec(
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    rms_norm_eps=1e-6,
)


def _inputs(B=2, L=12, image=(2, 8), text_end=(12, 10)):
    torch.manual_seed(0)
    hidden = torch.randn(B, L, SPEC.hidden_size)
    attention_mask = torch.arange(L)[None] < torch.tensor(text_end)[:, None]
    positions = torch.arange(L).expand(B, L)
    image_positions = torch.arange(*image).expand(B, -1)  # (B, 6) cells of a 2 x 3 grid
    text_span = torch.stack([torch.full((B,), image[1]), torch.tensor(text_end)], 1)
    return hidden, attention_mask, positions, image_positions, text_span


GRID = torch.tensor([2, 3])


def test_layer_matches_hf_llama_decoder_layer():
    """The head mirrors the backbone layer exactly: same weights, same output (independent reference)."""
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6
    )
    config._attn_implementation = "eager"
    hf_layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    for p in hf_layer.parameters():  # RMSNorm weights are ones by default: make the test sensitive to them
        torch.nn.init.normal_(p, std=0.1)
    head = SegmentationHead(SPEC)
    head.layers[0].load_state_dict(hf_layer.state_dict())
    hidden, attention_mask, positions, *_ = _inputs(B=1, text_end=(12,))
    mask = causal_mask(attention_mask, torch.float32)
    rope = LlamaRotaryEmbedding(config)(hidden, positions[:1])
    expected = hf_layer(hidden, attention_mask=mask, position_embeddings=rope)
    rope = rotary(positions[:1], SPEC.head_dim, SPEC.rope, torch.float32)
    for need_probs in (True, False):  # explicit probabilities (layer 1) and the fused kernel (layer 2)
        ours, probs, _ = head.layers[0](hidden, rope, mask, need_probs=need_probs)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert (probs is not None) == need_probs


@pytest.mark.parametrize("rope", [RopeSpec(), RopeSpec("mrope", 1e4, (2, 1, 1))])
def test_shared_image_prefix_runs_once_with_the_same_result_and_gradients(rope: RopeSpec):
    """Three prompts, the first and last on one image: running their shared first P tokens once per image
    must give what the plain forward gives, outputs and gradients alike (1-D and 3-D position ids)."""
    hidden, attention_mask, positions, image_positions, text_span = _inputs(B=3, text_end=(12, 10, 11))
    if rope.kind != "default":  # (t, h, w) ids: the 2 x 3 image cells get their row / column, text runs on
        positions = torch.stack([positions, positions, positions]).clone()
        positions[1, :, 2:8] = 2 + torch.arange(6) // 3
        positions[2, :, 2:8] = 2 + torch.arange(6) % 3
    P = 8  # template (2 tokens) + 6 image tokens; the text starts here
    hidden[2, :P] = hidden[0, :P]  # same image, same template
    head = SegmentationHead(dataclasses.replace(SPEC, rope=rope))
    outputs, grads = [], []
    for index, shared in ((None, 0), (torch.tensor([0, 1, 0]), P)):
        x = hidden.clone().requires_grad_()
        out = head(
            x,
            attention_mask,
            positions,
            image_positions,
            GRID.expand(len(hidden), 2),
            text_span,
            index,
            shared,
        )
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


def _hf_llama_layer() -> LlamaDecoderLayer:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6
    )
    config._attn_implementation = "eager"
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer, config


def test_attention_map_is_transformers_attention_averaged_over_heads_and_text_rows():
    """A_c against an independent reference: Llama's own eager attention weights of layer 1, averaged over heads
    and the text rows, at the image columns (eq. 1); scores = n_image * A_c with n_image = 6 here."""
    hf_layer, config = _hf_llama_layer()
    head = SegmentationHead(SPEC)
    head.layers[0].load_state_dict(hf_layer.state_dict())
    hidden, attention_mask, positions, image_positions, text_span = _inputs(B=1, text_end=(12,))
    rope = LlamaRotaryEmbedding(config)(hidden, positions)
    _, weights = hf_layer.self_attn(
        hf_layer.input_layernorm(hidden), rope, causal_mask(attention_mask, torch.float32)
    )  # (1, heads, L, L)
    expected = weights.mean(1)[0, 8:12][:, 2:8].mean(0).view(2, 3)  # text rows 8..11, image tokens 2..7
    out = head(hidden, attention_mask, positions, image_positions, GRID.expand(1, 2), text_span)
    torch.testing.assert_close(out.attention_map[0], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.attention_scores[0], 6 * expected, rtol=1e-5, atol=1e-6)


def test_mixed_grid_sizes_pad_the_map_and_match_each_prompt_alone():
    """A 2 x 3 and a 1 x 2 image in one batch: A_c is (2, 2, 3), zero outside the small image's grid, and each
    prompt's own cells equal what the head gives for that prompt alone."""
    head = SegmentationHead(SPEC)
    hidden, attention_mask, positions, image_positions, text_span = _inputs(text_end=(12, 10))
    image_positions = image_positions.clone()
    image_positions[1, 2:] = -1  # prompt 1 shows a 1 x 2 grid on tokens 2, 3 (tokens 4..7: not grid cells)
    sizes = torch.tensor([[2, 3], [1, 2]])
    out = head(hidden, attention_mask, positions, image_positions, sizes, text_span)
    assert out.attention_map.shape == (2, 2, 3)
    assert (out.attention_map[1, 1] == 0).all() and out.attention_map[1, 0, 2] == 0
    alone = head(
        hidden[1:], attention_mask[1:], positions[1:], image_positions[1:, :2], sizes[1:], text_span[1:]
    )
    torch.testing.assert_close(out.attention_map[1, :1, :2], alone.attention_map[0])
    torch.testing.assert_close(out.attention_scores[1, :1, :2], 2 * alone.attention_map[0])
    mass = out.attention_map.flatten(1).sum(1)  # the average text row's attention on its image's cells
    assert (mass > 0).all() and (mass <= 1 + 1e-6).all()


def _qwen_rotary(kind: str, sections: tuple[int, int, int], head_dim: int = 16):
    """transformers' own text rotary embedding of Qwen2-VL ("mrope") or Qwen3-VL ("mrope_interleaved")."""
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": list(sections)}
    kwargs = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    if kind == "mrope":
        from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig as Config

        config = Config(rope_parameters=rope, **kwargs)
        return qwen.Qwen2VLRotaryEmbedding(config), qwen.Qwen2VLDecoderLayer, config
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig as Config

    config = Config(rope_parameters=rope, head_dim=head_dim, **kwargs)
    return qwen.Qwen3VLTextRotaryEmbedding(config), qwen.Qwen3VLTextDecoderLayer, config


@pytest.mark.parametrize(
    ("kind", "sections"),
    [
        ("mrope", (2, 3, 3)),
        ("mrope", (4, 2, 2)),
        ("mrope_interleaved", (2, 3, 3)),
        ("mrope_interleaved", (4, 2, 2)),
    ],
)
def test_mrope_tables_match_transformers(kind: str, sections: tuple[int, int, int]):
    """Multimodal RoPE on random 3-D (t, h, w) position ids: cos / sin equal transformers' own Qwen code."""
    hf_rotary, _, _ = _qwen_rotary(kind, sections)
    positions = torch.randint(0, 60, (3, 2, 11), generator=torch.Generator().manual_seed(0))
    cos, sin = hf_rotary(torch.zeros(1, dtype=torch.float32), positions)  # (B, L, head_dim)
    ours = rotary(positions, 16, RopeSpec(kind, 1e4, sections), torch.float32)
    torch.testing.assert_close(ours[0][:, 0], cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1][:, 0], sin, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["mrope", "mrope_interleaved"])
def test_layer_matches_transformers_qwen_layers(kind: str):
    """Qwen2-VL (q / k / v bias, no o bias) and Qwen3-VL (q_norm / k_norm) layers, mirrored from their LayerSpec
    and loaded with the family's own state dict, give the family's own output."""
    hf_rotary, layer_class, config = _qwen_rotary(kind, (2, 3, 3))
    config._attn_implementation = "eager"
    hf_layer = layer_class(config, layer_idx=0).eval()
    for p in hf_layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    qwen2 = kind == "mrope"
    spec = LayerSpec(
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        rms_norm_eps=config.rms_norm_eps,
        rope=RopeSpec(kind, 1e4, (2, 3, 3)),
        q_bias=qwen2,
        k_bias=qwen2,
        v_bias=qwen2,
        qk_norm=not qwen2,
    )
    head = SegmentationHead(spec)
    head.layers[0].load_state_dict(hf_layer.state_dict())  # strict: the same parameter names and shapes
    hidden = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(1))
    positions = torch.randint(0, 20, (3, 1, 9), generator=torch.Generator().manual_seed(2))
    mask = causal_mask(torch.ones(1, 9, dtype=torch.bool), torch.float32)
    expected = hf_layer(hidden, attention_mask=mask, position_embeddings=hf_rotary(hidden, positions))
    expected = expected[0] if isinstance(expected, tuple) else expected
    ours, _, _ = head.layers[0](
        hidden, rotary(positions, 16, spec.rope, torch.float32), mask, need_probs=True
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


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
    got = text_to_image_attention(probs, torch.tensor([[0, 1]]), text_mask)
    # heads mean: row2 -> [0.75, 0.25], row3 -> [0, 0.1]; text mean -> [0.375, 0.175]
    torch.testing.assert_close(got, torch.tensor([[0.375, 0.175]]))


def test_causal_mask_is_applied():
    """Changing a later token never changes A_c rows computed for earlier tokens, nor image features."""
    head = SegmentationHead(SPEC)
    hidden, attention_mask, positions, image_positions, text_span = _inputs(B=1, text_end=(12,))
    out1 = head(hidden, attention_mask, positions, image_positions, GRID.expand(len(hidden), 2), text_span)
    changed = hidden.clone()
    changed[:, -1] += 5.0
    out2 = head(changed, attention_mask, positions, image_positions, GRID.expand(len(hidden), 2), text_span)
    torch.testing.assert_close(out1.hidden_states[:, :-1], out2.hidden_states[:, :-1])
    assert not torch.allclose(out1.hidden_states[:, -1], out2.hidden_states[:, -1])
    mask = causal_mask(attention_mask, torch.float32)[0, 0]
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    assert (mask[upper] < -1e30).all() and (mask[~upper] == 0).all()


def test_padding_tokens_are_invisible():
    head = SegmentationHead(SPEC)
    hidden, attention_mask, positions, image_positions, text_span = _inputs(text_end=(12, 10))
    out1 = head(hidden, attention_mask, positions, image_positions, GRID.expand(len(hidden), 2), text_span)
    noisy = hidden.clone()
    noisy[1, 10:] = torch.randn(2, SPEC.hidden_size) * 100  # padding of sample 1
    out2 = head(noisy, attention_mask, positions, image_positions, GRID.expand(len(hidden), 2), text_span)
    torch.testing.assert_close(out1.attention_map, out2.attention_map)
    torch.testing.assert_close(out1.hidden_states[1, :10], out2.hidden_states[1, :10])
