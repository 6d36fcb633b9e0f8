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


def sam_decode(decoder: nn.Module, embeddings: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor]:
    """SAM's own mask decoder on ``sparse`` prompt embeddings (B, n, d_s) with its no-mask dense prompt: the
    way LISA hands its ``[SEG]`` embedding to SAM (``text_embeds`` of its prompt encoder). Returns single-mask
    low-resolution logits (B, h, w) and SAM's predicted IoU (B,)."""
    if decoder.name != "sam":
        raise ValueError(f"this system drives SAM's mask decoder directly; got the {decoder.name!r} decoder")
    sam, dtype = decoder.sam, embeddings.dtype
    B, (h, w) = embeddings.shape[0], embeddings.shape[-2:]
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B, -1, h, w)
    image_pe = sam.get_image_wide_positional_embeddings().expand(B, -1, -1, -1)
    masks, iou = sam.mask_decoder(
        image_embeddings=embeddings,
        image_positional_embeddings=image_pe.to(dtype),
        sparse_prompt_embeddings=sparse[:, None].to(dtype),  # (B, 1, n, d_s): one prompt set per image
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=False,
    )
    return masks[:, 0, 0], iou[:, 0, 0]
