"""SAM-HQ behind the decoder contract: SAM with a high-quality output token (Ke et al., NeurIPS 2023).

SAM-HQ keeps SAM's image encoder, prompt encoder and frame (longest side + pad) and adds, in its mask decoder, an
HQ output token whose mask is computed from the decoder's features fused with *early* ViT features (the output of
the first global-attention block). Its image embedding is therefore a pair, opaque to the rest of LENS. LENS's
single mask is SAM's single-mask output plus the HQ mask (``hq_token_only=False``, SAM-HQ's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor
from transformers import SamHQModel, SamHQProcessor

from lens.decoders.sam import SamDecoder


class SamHQDecoder(SamDecoder):
    """Hugging Face ``SamHQModel`` (e.g. ``syscv-community/sam-hq-vit-huge``) driven by LENS prompts.

    Prompting (descriptions as point labels, SAM's point encoding and padding point, a learned [CLS] position
    for f_s), the frame and the frozen parts are SAM's. The trainable tensors are SAM's plus SAM-HQ's additions
    (HQ token, its hypernetwork, the feature-fusion convolutions): all reach the single mask.

    Arguments:
        sam: the SAM-HQ model; its image encoder and prompt encoder are frozen here.
        processor: its ``SamHQProcessor``.
        train_mask_decoder: whether the mask decoder is fine-tuned with the head.
    """

    name: ClassVar[str] = "sam_hq"

    def __init__(self, sam: SamHQModel, processor: SamHQProcessor, train_mask_decoder: bool = True):
        super().__init__(sam, processor, train_mask_decoder=train_mask_decoder)

    def embed_images(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
        """(image embeddings (B, d_s, h, w), early ViT features (B, h, w, d_vit)): once per image, cacheable.

        Only the first global block's output is kept: it is the only intermediate SAM-HQ's decoder reads. Both are
        returned as ordinary tensors (cloned outside inference mode): the HQ fusion convolutions that train take
        them as inputs, and autograd cannot save inference tensors.
        """
        embeddings, vit_features = self._encode(images)
        return embeddings.clone(), vit_features.clone()

    @torch.inference_mode()
    def _encode(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
            "pixel_values"
        ]
        dtype = self.sam.vision_encoder.patch_embed.projection.weight.dtype
        embeddings, intermediate = self.sam.get_image_embeddings(pixels.to(self.device, dtype))
        return embeddings.to(self.dtype), intermediate[0].to(self.dtype)

    def forward(
        self,
        embeddings: tuple[Tensor, Tensor],  # (B, d_s, h, w), (B, h, w, d_vit)
        descriptions: Tensor,  # (B, 1 + m, d_s) global description first
        points: Tensor,  # (B, m, 2) x, y in decoder input pixels (continuous)
        valid: Tensor,  # (B, m) bool
    ) -> tuple[Tensor, Tensor]:
        """Returns low-resolution mask logits (B, 4h, 4w) and SAM's predicted IoU (B,)."""
        image_embeddings, vit_features = embeddings
        masks, iou = self.sam.mask_decoder(
            image_embeddings=image_embeddings,
            **self.prompts(descriptions, points, valid, image_embeddings),
            multimask_output=False,
            hq_token_only=False,
            intermediate_embeddings=[vit_features],
        )
        return masks[:, 0, 0], iou[:, 0, 0]  # (B, 4h, 4w), (B,)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        train_mask_decoder: bool = True,
    ) -> SamHQDecoder:
        """SAM-HQ from a hub id (``syscv-community/sam-hq-vit-{base,large,huge}``) or a local directory."""
        sam = SamHQModel.from_pretrained(model_id, revision=revision, dtype=dtype).to(device).eval()
        processor = SamHQProcessor.from_pretrained(model_id, revision=revision)
        return cls(sam, processor, train_mask_decoder=train_mask_decoder).to(device)
