"""SAM behind the decoder contract (paper §3.3): keypoints + descriptions become SAM's sparse prompts.

SAM labels a point prompt with a learned "positive"/"negative" embedding; LENS replaces that label with the
point's *description* d_i, so the decoder learns from the MLLM what each point means. Positions use SAM's own
positional encoding; f_s has no position, so it gets a learned [CLS] one. The image encoder runs once per
image, frozen (its embeddings can be cached); only the mask decoder may train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import SamModel, SamProcessor

from lens.decoders.base import MaskDecoderBridge
from lens.geometry import DecoderFrame


class SamFamilyDecoder(MaskDecoderBridge):
    """What SAM, SAM-HQ and SAM 2 share behind LENS: a frozen model ``self.sam`` whose mask decoder may train,
    a learned [CLS] position for f_s, and the prompts — descriptions in place of point labels, SAM's padding
    point for invalid keypoints, the no-mask dense prompt. Subclasses freeze what cannot reach the single mask
    and say how points are encoded, embeddings made and the mask decoder called."""

    def __init__(self, sam: nn.Module, processor: object, train_mask_decoder: bool):
        super().__init__()
        self.sam = sam.requires_grad_(False)
        self.sam.mask_decoder.requires_grad_(train_mask_decoder)
        self.processor = processor
        self.prompt_dim = sam.config.prompt_encoder_config.hidden_size
        self.image_size = sam.config.prompt_encoder_config.image_size
        self.cls_position = nn.Parameter(torch.randn(1, self.prompt_dim) * 0.02)  # [CLS] position of f_s

    def train(self, mode: bool = True) -> SamFamilyDecoder:
        super().train(mode)
        self.sam.vision_encoder.eval()  # frozen parts never switch to training behaviour
        self.sam.prompt_encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.cls_position.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.sam.mask_decoder.parameters()).dtype

    def trainable_names(self) -> list[str]:
        """[CLS] position, and the mask decoder when it trains, less the parts the subclass froze because they
        cannot reach LENS's single mask or loss: exactly the parameters left with ``requires_grad``."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def encode_points(self, points: Tensor) -> Tensor:
        """(B, m, 2) decoder-frame pixels -> (B, m, d_s) SAM's positional encoding of the points."""
        # Our coordinates are continuous (pixel centres at +0.5), so no extra half-pixel shift here.
        return self.sam.shared_image_embedding(points / self.image_size)

    def prompts(
        self,
        descriptions: Tensor,  # (B, g + m, d_s) global description first (g = 1; 0 in the ablation without it)
        points: Tensor,  # (B, m, 2) x, y in decoder input pixels (continuous)
        valid: Tensor,  # (B, m) bool
        image_embeddings: Tensor,  # (B, d_s, h, w)
    ) -> dict[str, Tensor]:
        """The mask decoder's prompt inputs, in the embeddings' dtype: sparse (B, 1, g + m, d_s), dense and
        image-wide positional embeddings (B, d_s, h, w)."""
        sam, d = self.sam, descriptions.dtype
        B, (h, w), dtype = descriptions.shape[0], image_embeddings.shape[-2:], image_embeddings.dtype
        g = descriptions.shape[1] - points.shape[1]
        if g not in (0, 1):
            raise ValueError(f"{descriptions.shape[1]} descriptions for {points.shape[1]} points")
        keypoint_prompts = descriptions[:, g:] + self.encode_points(points).to(d)
        # Invalid slots become SAM's own padding point, exactly as SAM pads its point prompts.
        padding = sam.prompt_encoder.not_a_point_embed.weight.to(d)  # (1, d_s)
        keypoint_prompts = torch.where(valid[..., None], keypoint_prompts, padding)
        prompts = [descriptions[:, :1] + self.cls_position.to(d)] if g else []
        sparse = torch.cat([*prompts, keypoint_prompts], dim=1)[:, None]  # (B, 1, g + m, d_s)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B, -1, h, w)
        image_pe = sam.get_image_wide_positional_embeddings().expand(B, -1, -1, -1)
        return {
            "image_positional_embeddings": image_pe.to(dtype),
            "sparse_prompt_embeddings": sparse.to(dtype),
            "dense_prompt_embeddings": dense.to(dtype),
        }


class SamDecoder(SamFamilyDecoder):
    """Hugging Face ``SamModel`` (ViT-B / L / H) driven by LENS prompts.

    Arguments:
        sam: the SAM model; its image encoder and prompt encoder are frozen here.
        processor: its ``SamProcessor`` (resize longest side + normalise + pad bottom-right).
        train_mask_decoder: whether the mask decoder is fine-tuned with the head (paper: yes).
    """

    name: ClassVar[str] = "sam"

    def __init__(self, sam: SamModel, processor: SamProcessor, train_mask_decoder: bool = True):
        super().__init__(sam, processor, train_mask_decoder)
        # Parts that cannot influence LENS's single-mask output or loss stay as pretrained (and out of the
        # optimizer and DDP's unused set): SAM's IoU head and the hypernetworks of the multimask outputs.
        decoder = self.sam.mask_decoder
        decoder.iou_prediction_head.requires_grad_(False)
        for mlp in decoder.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)

    def frame(self, width: int, height: int) -> DecoderFrame:
        """``SamImageProcessor``: longest side resized to the input size, padded bottom-right."""
        return DecoderFrame.longest_side(width, height, self.image_size)

    def drop_image_encoder(self) -> None:
        self.sam.vision_encoder = _NoImageEncoder()

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """SAM image-encoder features (B, d_s, h, w): run once per image, cacheable."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
            "pixel_values"
        ]
        dtype = self.sam.vision_encoder.patch_embed.projection.weight.dtype
        return self.sam.get_image_embeddings(pixels.to(self.device, dtype)).to(self.dtype).clone()

    def forward(
        self,
        embeddings: Tensor,  # (B, d_s, h, w) SAM image-encoder output
        descriptions: Tensor,  # (B, 1 + m, d_s) global description first
        points: Tensor,  # (B, m, 2) x, y in SAM input pixels (continuous)
        valid: Tensor,  # (B, m) bool
    ) -> tuple[Tensor, Tensor]:
        """Returns low-resolution mask logits (B, 4h, 4w) and SAM's predicted IoU (B,)."""
        masks, iou = self.sam.mask_decoder(
            image_embeddings=embeddings,
            **self.prompts(descriptions, points, valid, embeddings),
            multimask_output=False,
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
    ) -> SamDecoder:
        """SAM from a hub id (e.g. ``facebook/sam-vit-huge``) or a local ``save_pretrained`` directory."""
        sam = SamModel.from_pretrained(model_id, revision=revision, dtype=dtype).to(device).eval()
        processor = SamProcessor.from_pretrained(model_id, revision=revision)
        return cls(sam, processor, train_mask_decoder=train_mask_decoder).to(device)


class _NoImageEncoder(nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError("SAM's image encoder was dropped: this LENS model reads cached SAM embeddings")
