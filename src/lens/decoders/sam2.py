"""SAM 2 (image mode) behind the decoder contract (Ravi et al., 2024).

Differences from SAM that this bridge owns: the frame stretches the image to the square input (no padding,
aspect ratio not kept); the image embedding is a triple (two high-resolution feature maps, already projected
by the mask decoder's ``conv_s0`` / ``conv_s1``, and the stride-16 embedding with SAM 2's "no memory" token
added), which the mask decoder's upscaling path adds back in; the point encoding has its own random-Fourier
matrix (``prompt_encoder.shared_embedding``); and the decoder carries an object-score token.

LENS prompts SAM 2 as it prompts SAM: descriptions replace the point-label embeddings, invalid keypoints become
SAM 2's padding point, f_s gets a learned [CLS] position. LENS always reads output token 0 (single mask):
SAM 2's eval-time fallback to the best multimask output ("dynamic multimask via stability") is switched off,
because those tokens' hypernetworks do not train with LENS and training and evaluation must decode alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import Sam2Model
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from lens.decoders.sam import SamFamilyDecoder
from lens.geometry import DecoderFrame

Sam2Embeddings = tuple[Tensor, Tensor, Tensor]  # (B, d/8, 4h, 4w), (B, d/4, 2h, 2w), (B, d, h, w)


def sam2_image_processor(
    size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> ViTImageProcessorPil:
    """SAM 2's pre-processing (resize to ``size`` x ``size`` bilinear, rescale, ImageNet normalisation) with the
    PIL backend: ``Sam2ImageProcessor`` needs torchvision, which LENS does not depend on. The steps are the same;
    PIL's and torchvision's bilinear resampling may differ in the last bits of a pixel (not measured here: no
    torchvision in this environment)."""
    return ViTImageProcessorPil(
        size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std)
    )


class Sam2Decoder(SamFamilyDecoder):
    """Hugging Face ``Sam2Model`` (e.g. ``facebook/sam2.1-hiera-large``) in image mode, driven by LENS prompts.

    Arguments:
        sam: the SAM 2 model; its image encoder and prompt encoder are frozen here.
        processor: an image processor producing its ``pixel_values`` (``sam2_image_processor``).
        train_mask_decoder: whether the mask decoder is fine-tuned with the head.
    """

    name: ClassVar[str] = "sam2"

    def __init__(self, sam: Sam2Model, processor: ViTImageProcessorPil, train_mask_decoder: bool = True):
        super().__init__(sam, processor, train_mask_decoder)
        decoder = self.sam.mask_decoder
        decoder.dynamic_multimask_via_stability = False  # always output token 0 (see the module docstring)
        # Parts that cannot reach LENS's single mask stay as pretrained: the IoU and object-score heads (their
        # outputs are not in the loss), the multimask hypernetworks, and conv_s0 / conv_s1, which run inside
        # the frozen image embedding (``get_image_features``), not in the decoder's forward.
        frozen = [decoder.iou_prediction_head, decoder.pred_obj_score_head, decoder.conv_s0, decoder.conv_s1]
        for module in [*frozen, *decoder.output_hypernetworks_mlps[1:]]:
            module.requires_grad_(False)

    def frame(self, width: int, height: int) -> DecoderFrame:
        """``Sam2ImageProcessor``: the image stretched to the square input, no padding."""
        return DecoderFrame.stretch(width, height, self.image_size)

    def drop_image_encoder(self) -> None:
        self.sam.vision_encoder = _DroppedImageEncoder()

    def encode_points(self, points: Tensor) -> Tensor:
        """SAM 2's own random-Fourier point encoding (``prompt_encoder.shared_embedding``)."""
        return self.sam.prompt_encoder.shared_embedding(points / self.image_size)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> Sam2Embeddings:
        """SAM 2's image features, as ``Sam2Model.get_image_embeddings`` returns them: once per image, cacheable."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
            "pixel_values"
        ]
        dtype = self.sam.no_memory_embedding.dtype
        feat_s0, feat_s1, embedding = self.sam.get_image_embeddings(pixels.to(self.device, dtype))
        return feat_s0.clone(), feat_s1.clone(), embedding.clone()

    def forward(
        self,
        embeddings: Sam2Embeddings,
        descriptions: Tensor,  # (B, 1 + m, d_s) global description first
        points: Tensor,  # (B, m, 2) x, y in decoder input pixels (continuous)
        valid: Tensor,  # (B, m) bool
    ) -> tuple[Tensor, Tensor]:
        """Returns low-resolution mask logits (B, 4h, 4w) and SAM 2's predicted IoU (B,)."""
        feat_s0, feat_s1, image_embeddings = embeddings
        masks, iou, _, _ = self.sam.mask_decoder(
            image_embeddings=image_embeddings,
            **self.prompts(descriptions, points, valid, image_embeddings),
            multimask_output=False,
            high_resolution_features=[feat_s0, feat_s1],
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
    ) -> Sam2Decoder:
        """SAM 2 from a hub id (``facebook/sam2.1-hiera-{tiny,small,base-plus,large}``) or a local directory."""
        sam = Sam2Model.from_pretrained(model_id, revision=revision, dtype=dtype).to(device).eval()
        settings, _ = ImageProcessingMixin.get_image_processor_dict(model_id, revision=revision)
        size = settings.get("size", {}).get("height", sam.config.prompt_encoder_config.image_size)
        processor = sam2_image_processor(
            size,
            settings.get("image_mean", IMAGENET_DEFAULT_MEAN),
            settings.get("image_std", IMAGENET_DEFAULT_STD),
        )
        return cls(sam, processor, train_mask_decoder=train_mask_decoder).to(device)


class _DroppedImageEncoder(nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError("SAM 2's image encoder was dropped: this LENS model reads cached image embeddings")
