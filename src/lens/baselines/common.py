"""What the trained comparison systems share: the mask loss LENS trains with, and the names of what trains."""

from __future__ import annotations

from torch import Tensor, nn

from lens.config import LossConfig
from lens.losses import batched_mask_losses


def mask_losses(mask_logits: list[Tensor], targets: list[Tensor], weights: LossConfig) -> dict[str, Tensor]:
    """λ_dice·Dice + λ_bce·BCE on the masks (LENS's own mask terms, no L_attn), averaged over the batch."""
    dice, bce = batched_mask_losses(mask_logits, targets)
    return {"loss": weights.dice_weight * dice + weights.bce_weight * bce, "dice_loss": dice, "bce_loss": bce}


def requires_grad_names(module: nn.Module) -> list[str]:
    """Every parameter of ``module`` left trainable, by name: what its checkpoint saves."""
    return [name for name, p in module.named_parameters() if p.requires_grad]
