"""The descriptor model (paper §3.2, S1.3-S1.4): what each keypoint *means* for the query.

For keypoint i, the start-of-answer feature f_s asks its p×p neighbourhood of layer-2 features "is this the
target?" by cross-attention, giving a local description d_i. Then f_s and all d_i self-attend, so the
global description can arbitrate between overlapping or redundant keypoints, and everything is projected to
the mask decoder's prompt width: D = [f_s; d_1..d_m], of shape (m + 1, d_s).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm attention + MLP block: queries attend to a key/value set (itself, for self-attention)."""

    def __init__(self, dim: int, num_heads: int, cross: bool, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else None
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, queries: Tensor, keys: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        q = self.norm_q(queries)
        kv = q if self.norm_kv is None else self.norm_kv(keys)
        x = queries + self.attn(q, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class KeypointDescriptor(nn.Module):
    """(f_s, keypoint neighbourhoods, validity) -> descriptions D for the mask decoder.

    Arguments:
        dim: width of the backbone features (d).
        out_dim: the decoder's prompt width (d_s; 256 for SAM).
        num_heads: attention heads of both attention steps.
        global_only_prob: S1.4's training-time dropout: with this probability per sample, keypoint
            descriptions are dropped and only the global description prompts the decoder.
        width: None (the paper): attend at the backbone's width d. Else f_s and the neighbourhood features go
            through one Linear(d, width) first (both are layer-2 features, one space), so both attention
            steps and their MLPs run at ``width`` (the "narrow descriptor" ablation).
        keypoint_descriptions: False (ablation): no cross-attention, no d_i; D is [f_s] alone, (B, 1, d_s).
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        num_heads: int = 8,
        global_only_prob: float = 0.5,
        width: int | None = None,
        keypoint_descriptions: bool = True,
    ):
        super().__init__()
        inner = dim if width is None else width
        if inner % num_heads:
            raise ValueError(f"descriptor width {inner} is not divisible by num_heads={num_heads}")
        self.global_only_prob = global_only_prob
        if width is not None:  # only when set: the paper's state dict is unchanged
            self.narrow = nn.Linear(dim, width)
        self.cross = Block(inner, num_heads, cross=True) if keypoint_descriptions else None
        self.mix = Block(inner, num_heads, cross=False)
        self.proj = nn.Sequential(nn.LayerNorm(inner), nn.Linear(inner, out_dim))

    def forward(
        self,
        query: Tensor,  # (B, d) f_s², the start-of-answer feature from head layer 2
        neighbourhoods: Tensor,  # (B, m, p*p, d) features sampled around each keypoint
        valid: Tensor,  # (B, m) bool
    ) -> tuple[Tensor, Tensor]:
        """Returns D (B, 1 + m, out_dim) with the global description first, and the validity (B, m)
        actually used (all False for samples that drew S1.4's global-only dropout). Without keypoint
        descriptions: D (B, 1, out_dim) and a (B, 0) validity."""
        narrow = getattr(self, "narrow", None)
        if narrow is not None:
            query = narrow(query)  # (B, w)
        if self.cross is None:  # self-attention over {f_s} alone
            return self.proj(self.mix(query[:, None])), valid[:, :0]
        if narrow is not None:
            neighbourhoods = narrow(neighbourhoods)  # (B, m, p*p, w)
        B, m, n, d = neighbourhoods.shape
        if self.training and self.global_only_prob > 0:
            keep = torch.rand(B, 1, device=valid.device) >= self.global_only_prob
            valid = valid & keep
        # Cross-attention, one keypoint at a time in parallel: f_s queries each neighbourhood.
        q = query[:, None, None, :].expand(B, m, 1, d).reshape(B * m, 1, d)
        local = self.cross(q, neighbourhoods.reshape(B * m, n, d)).view(B, m, d)  # d_i
        # Self-attention over {f_s} ∪ {d_i}; invalid keypoints are neither keys nor used downstream.
        tokens = torch.cat([query[:, None], local], dim=1)  # (B, 1 + m, d)
        padding = torch.cat([torch.zeros_like(valid[:, :1]), ~valid], dim=1)  # (B, 1 + m), True = ignore
        tokens = self.mix(tokens, key_padding_mask=padding)
        return self.proj(tokens), valid
