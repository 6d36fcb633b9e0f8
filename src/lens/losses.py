"""Training objective (paper eq. 5-7): λ_dice·Dice + λ_bce·BCE on the mask, plus BCE on A_c.

Mask losses follow LISA (``dice_loss`` / ``sigmoid_ce_loss`` in its model/LISA.py), with pixels marked
``IGNORE_INDEX`` removed from both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lens.config import LossConfig
from lens.data.types import IGNORE_INDEX

DICE_SCALE = 1000.0  # LISA divides sums by this so the smoothing eps stays meaningful on large masks
DICE_EPS = 1e-6


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """1 − soft Dice of one mask. logits (H, W); target (H, W) uint8 with 0/1/IGNORE_INDEX."""
    valid = target != IGNORE_INDEX
    probs = logits.sigmoid()[valid] / DICE_SCALE
    truth = (target[valid] == 1).float()
    numerator = 2 * (probs * truth).sum()
    denominator = probs.sum() + truth.sum() / DICE_SCALE
    return 1 - (numerator + DICE_EPS) / (denominator + DICE_EPS)


def mask_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy over the non-ignored pixels of one mask."""
    valid = target != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid].float(), (target[valid] == 1).float())


def attention_loss(attention_map: Tensor, target: Tensor, cells: Tensor | None = None) -> Tensor:
    """Eq. (5): mean BCE between A_c (B, gh, gw) in [0, 1] and the mask's per-cell coverage (B, gh, gw), over
    the ``cells`` (B, gh, gw) bool of each image's own grid (all cells when None; the padding of a batch that
    mixes grid sizes is excluded, the MLLM's own padding cells count, as background).

    A_c is a probability, not a logit, so this is plain BCE, which autocast refuses to run in low precision:
    it is computed in float32 with autocast off (bf16 training on GPU would otherwise stop here).
    """
    with torch.autocast(attention_map.device.type, enabled=False):
        if cells is None:
            return F.binary_cross_entropy(attention_map.float(), target.float().clamp(0, 1))
        return F.binary_cross_entropy(attention_map.float()[cells], target.float().clamp(0, 1)[cells])


def lens_loss(
    mask_logits: list[Tensor],  # per sample (H_i, W_i) logits at original size
    targets: list[Tensor],  # per sample (H_i, W_i) uint8 0/1/IGNORE_INDEX
    attention_map: Tensor,  # (B, gh, gw)
    attention_target: Tensor,  # (B, gh, gw)
    weights: LossConfig,
    cells: Tensor | None = None,  # (B, gh, gw) bool: each image's own grid (None: all cells)
) -> dict[str, Tensor]:
    """All loss terms, averaged over the batch, and their weighted total under ``"loss"``."""
    dice = torch.stack([dice_loss(x, t) for x, t in zip(mask_logits, targets, strict=True)]).mean()
    bce = torch.stack([mask_bce_loss(x, t) for x, t in zip(mask_logits, targets, strict=True)]).mean()
    attn = attention_loss(attention_map, attention_target, cells)
    total = weights.dice_weight * dice + weights.bce_weight * bce + weights.attention_weight * attn
    return {"loss": total, "dice_loss": dice, "bce_loss": bce, "attention_loss": attn}
