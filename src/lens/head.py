"""The segmentation head (paper §3.1): two transformer layers shaped exactly like one backbone decoder layer.

Layer 1 recomputes the full causal attention explicitly, because its text→image part *is* the output we
supervise: A_c, the grounding map. Layer 2 enhances the features; its start-of-answer token becomes the
semantic query f_s. Parameter names follow Llama's (``self_attn.q_proj``, ``mlp.gate_proj``, ...) so the
head can start from backbone layers k+1 and k+2 with a plain ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from lens.backbone.base import LayerSpec, RopeSpec, first_of_each, span_mask
from lens.geometry import to_padded_grid

KV = tuple[Tensor, Tensor]  # rotated keys and values (B, kv_heads, tokens, head_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary(position_ids: Tensor, head_dim: int, rope: RopeSpec, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin tables (B, 1, L, head_dim) of the backbone's RoPE kind for its own position ids.

    ``position_ids``: (B, L) for ``"default"`` (Llama); (3, B, L) temporal / height / width ids for the
    multimodal kinds, where each rotary frequency pair reads one of the three ids: ``"mrope"`` (Qwen2/2.5-VL)
    gives the first ``sections[0]`` pairs to t, the next ``sections[1]`` to h, the rest to w;
    ``"mrope_interleaved"`` (Qwen3-VL) cycles t, h, w over the pairs, t filling the tail.
    """
    inv_freq = 1.0 / rope.theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim
    )
    if rope.kind == "default":
        if position_ids.dim() != 2:
            raise ValueError(f"default RoPE takes (B, L) position ids, got {tuple(position_ids.shape)}")
        freqs = position_ids[..., None].float() * inv_freq  # (B, L, head_dim / 2)
    else:
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"{rope.kind} takes (3, B, L) position ids, got {tuple(position_ids.shape)}")
        freqs = _mrope_frequencies(position_ids[..., None].float() * inv_freq, rope)  # (B, L, head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _mrope_frequencies(freqs: Tensor, rope: RopeSpec) -> Tensor:
    """(3, B, L, pairs) per-axis angles -> (B, L, pairs): which axis each frequency pair rotates with."""
    sections = rope.sections
    if sum(sections) != freqs.shape[-1]:
        raise ValueError(f"rope sections {sections} must sum to head_dim / 2 = {freqs.shape[-1]}")
    pair = torch.arange(freqs.shape[-1], device=freqs.device)
    if rope.kind == "mrope":  # contiguous blocks t | h | w
        axis = torch.bucketize(pair, torch.tensor(sections, device=freqs.device).cumsum(0), right=True)
    else:  # "mrope_interleaved": pair j reads axis j % 3 while that axis has pairs left, else t
        axis = pair % 3
        axis = torch.where((axis == 1) & (pair >= 3 * sections[1]), 0, axis)
        axis = torch.where((axis == 2) & (pair >= 3 * sections[2]), 0, axis)
    return freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    """Multi-head (grouped-query) self-attention; returns its probabilities only when asked for them."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        d, hd = spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(d, spec.num_heads * hd, bias=spec.q_bias)
        self.k_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=spec.k_bias)
        self.v_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=spec.v_bias)
        self.o_proj = nn.Linear(spec.num_heads * hd, d, bias=spec.o_bias)
        if spec.qk_norm:  # Qwen3: RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, need_probs: bool, past: KV | None = None
    ) -> tuple[Tensor, Tensor | None, KV]:
        """Attention of x's L tokens to ``past`` (keys and values of P earlier tokens, if any) and to themselves.

        Returns the output, the probabilities (B, h, L, P + L) if asked, and x's own rotated keys and values.
        """
        B, L, _ = x.shape
        s = self.spec
        q = self.q_proj(x).view(B, L, s.num_heads, s.head_dim).transpose(1, 2)  # (B, h, L, hd)
        k = self.k_proj(x).view(B, L, s.num_kv_heads, s.head_dim).transpose(1, 2)  # (B, kv, L, hd)
        v = self.v_proj(x).view(B, L, s.num_kv_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        own = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, kv, P + L, hd)
        groups = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, h, P + L, hd)
        if need_probs:  # A¹ of eq. (1), explicit because it is supervised
            scores = q @ k.transpose(-1, -2) * s.head_dim**-0.5 + mask  # (B, h, L, P + L)
            probs = scores.float().softmax(-1).to(q.dtype)
            out = probs @ v
        else:  # the same attention through the fused kernel: no (B, h, L, P + L) tensors kept for backward
            probs, out = None, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, s.num_heads * s.head_dim)
        return self.o_proj(out), probs, own


class MLP(nn.Module):
    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = ACT2FN[spec.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class HeadLayer(nn.Module):
    """One pre-norm decoder layer, the mirror of the backbone's."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor,
        need_probs: bool = False,
        past: KV | None = None,
    ) -> tuple[Tensor, Tensor | None, KV]:
        attn, probs, kv = self.self_attn(self.input_layernorm(x), rope, mask, need_probs, past)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), probs, kv


@dataclass
class HeadOutput:
    hidden_states: Tensor  # (B, L, d) H²_out: layer-2 features of every token
    attention_map: Tensor  # (B, gh_max, gw_max) A_c: mean text→image attention (eq. 1), supervised by eq. 5
    attention_scores: Tensor  # (B, gh_max, gw_max) n_img · A_c: 1 where a cell holds its uniform share


def causal_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive (B, 1, L, L) mask: a query sees earlier real tokens only (M_a of eq. 1)."""
    L = attention_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask[:, None, :]  # (B, L, L)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


def text_to_image_attention(probs: Tensor, image_positions: Tensor, text_mask: Tensor) -> Tensor:
    """Average of A¹[text rows, image-cell columns] over heads and text tokens: (B, h, Lq, L) -> (B, N).

    The Lq rows may be the last rows of the prompt only (``text_mask``: (B, Lq)); columns are all L tokens.
    ``image_positions`` (B, N) names the column of each grid cell; cells at -1 (beyond the image's grid) get 0.
    """
    mean_heads = probs.float().mean(1)  # (B, Lq, L)
    cols = image_positions.clamp(min=0)  # (B, N)
    to_image = mean_heads.gather(2, cols[:, None, :].expand(-1, mean_heads.shape[1], -1))  # (B, Lq, N)
    weights = text_mask.float()  # (B, Lq)
    a_c = (to_image * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    return torch.where(image_positions >= 0, a_c, torch.zeros_like(a_c))


class SegmentationHead(nn.Module):
    """Two backbone-shaped layers: attention refinement (→ A_c), then feature enhancement.

    A_c is eq. 1 as written: the mean over text tokens of their attention to each image token, a
    probability mass in [0, 1] that eq. 5's BCE supervises directly. Its scale matters for training: the
    positive cells' −log A_c pulls attention mass onto the target with a gradient ~1/A_c, while the many
    negative cells cost only ~A_c each. We first scaled A_c by n_image (a cell holding its uniform share
    scores 1) and clipped or saturated it at 1: that weighted the ~94% negative cells n_image times more,
    and the head learnt to move attention off the image altogether (every text token parked on the
    attention sink, A_c ≈ 0.01 everywhere) instead of onto the query's target. Keypoints read
    ``attention_scores`` = n_image · A_c, the same map on a readable scale (NMS is scale-free).
    """

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList([HeadLayer(spec), HeadLayer(spec)])

    def forward(
        self,
        hidden_states: Tensor,  # (B, L, d) backbone layer-k output
        attention_mask: Tensor,  # (B, L) bool
        position_ids: Tensor,  # (B, L) or (3, B, L) for the mrope kinds
        image_positions: Tensor,  # (B, N) sequence index of each grid cell's token, -1 beyond the image's grid
        grid_sizes: Tensor,  # (B, 2) (gh_i, gw_i)
        text_span: Tensor,  # (B, 2)
        image_index: Tensor | None = None,  # (B,) which distinct image each prompt shows
        shared_length: int = 0,  # P: prompts showing the same image agree on their first P tokens
    ) -> HeadOutput:
        """With ``image_index`` and P > 0, the shared first P tokens (template and image, no text token) run
        once per distinct image and the rest of each prompt attends to them: the same result, fewer rows.

        A_c comes out on the batch's padded grid (B, gh_max, gw_max), zero outside each image's own grid."""
        x = hidden_states.to(self.layers[0].input_layernorm.weight.dtype)
        mask = causal_mask(attention_mask, x.dtype)  # (B, 1, L, L)
        rope = rotary(position_ids, self.spec.head_dim, self.spec.rope, x.dtype)  # (B, 1, L, hd) x2
        P = shared_length if image_index is not None else 0
        if P > 0:
            index = image_index.to(x.device)
            first = first_of_each(image_index)
            shared = x[first, :P]  # (U, P, d)
            shared_rope = (rope[0][first, :, :P], rope[1][first, :, :P])
            shared_mask = mask[first][..., :P, :P]
        x, rope, mask = x[:, P:], (rope[0][:, :, P:], rope[1][:, :, P:]), mask[..., P:, :]  # (B, L - P, ...)
        probs = None
        for i, layer in enumerate(self.layers):
            past = None
            if P > 0:
                shared, _, (k, v) = layer(shared, shared_rope, shared_mask)
                past = (k[index], v[index])  # (B, kv, P, hd)
            x, layer_probs, _ = layer(x, rope, mask, need_probs=i == 0, past=past)
            probs = layer_probs if i == 0 else probs  # A¹: layer 1 recomputes attention
        if P > 0:
            x = torch.cat([shared[index], x], 1)  # (B, L, d)

        text_mask = span_mask(text_span, x.shape[1])[:, P:]  # (B, L - P): every text row is after P
        a_c = text_to_image_attention(probs, image_positions, text_mask)  # (B, N) eq. 1
        gh, gw = int(grid_sizes[:, 0].max()), int(grid_sizes[:, 1].max())
        a_c = to_padded_grid(a_c, grid_sizes, gh, gw)  # (B, gh_max, gw_max)
        n_image = (grid_sizes[:, 0] * grid_sizes[:, 1]).to(a_c.dtype)[:, None, None]  # (B, 1, 1)
        return HeadOutput(hidden_states=x, attention_map=a_c, attention_scores=a_c * n_image)
