"""The mask-decoder contract (paper §3.3): keypoints + descriptions in, mask logits out.

A decoder bridge wraps one promptable mask decoder (SAM, SAM-HQ, SAM 2, ...). Everything decoder-specific lives
behind it: its image encoder and the features it returns (opaque to the rest of LENS: one tensor for SAM, a
tuple for SAM 2), its input frame, its point encoding, its no-mask dense prompt, and which of its tensors train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from lens.geometry import DecoderFrame

# A decoder's image features, as its own image encoder returns them; LENS only batches, moves and caches them.
ImageEmbeddings = Tensor | tuple[Tensor, ...]


class MaskDecoderBridge(nn.Module):
    """A frozen image encoder + a (possibly trainable) mask decoder, prompted by LENS descriptions.

    Subclasses set ``name`` (the ``DECODERS`` key = ``DecoderConfig.name``) and ``prompt_dim`` (d_s, the width of
    the descriptions), and implement the members below.
    """

    name: ClassVar[str]
    prompt_dim: int

    def frame(self, width: int, height: int) -> DecoderFrame:
        """How an original ``width`` x ``height`` image sits in this decoder's input."""
        raise NotImplementedError

    def embed_images(self, images: Sequence[Image.Image]) -> ImageEmbeddings:
        """Image-encoder features of a batch (frozen, inference mode): run once per image, cacheable."""
        raise NotImplementedError

    @staticmethod
    def select(embeddings: ImageEmbeddings, index: Tensor) -> ImageEmbeddings:
        """Rows ``index`` (a (B,) long tensor) of a batch of embeddings: one row per prompt."""
        if isinstance(embeddings, Tensor):
            return embeddings[index.to(embeddings.device)]
        return tuple(e[index.to(e.device)] for e in embeddings)

    @staticmethod
    def move(
        embeddings: ImageEmbeddings,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageEmbeddings:
        """Embeddings moved to ``device`` and cast to ``dtype`` (each left as is when None)."""
        if isinstance(embeddings, Tensor):
            return embeddings.to(device=device, dtype=dtype)
        return tuple(MaskDecoderBridge.move(e, device, dtype) for e in embeddings)

    def forward(
        self,
        embeddings: ImageEmbeddings,  # batch of B, as ``embed_images`` / ``select`` give them
        descriptions: Tensor,  # (B, 1 + m, d_s) global description first; (B, m) without one (an ablation)
        points: Tensor,  # (B, m, 2) x, y in decoder-frame pixels (continuous); m may be 0
        valid: Tensor,  # (B, m) bool
    ) -> tuple[Tensor, Tensor]:
        """Low-resolution mask logits (B, h, w) in the decoder frame and the predicted IoU (B,)."""
        raise NotImplementedError

    def drop_image_encoder(self) -> None:
        """Free the image encoder (in place): training on cached embeddings never runs it."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype image embeddings should have when they enter ``forward``."""
        return next(self.parameters()).dtype

    def configure_image_encoder(
        self, attention: str | None = None, dtype: torch.dtype | None = None, compile: bool = False
    ) -> None:
        """Speed settings of the frozen image encoder (``DecoderConfig``; in place).

        ``attention``: ``"sdpa"`` (fused kernels; the default transformers builds) or ``"eager"``; SAM and SAM-HQ
        pick their attention class when built, so the modules are switched here, not only the config.
        ``dtype``: run the encoder alone in this dtype (e.g. bfloat16); embeddings come out in ``self.dtype``.
        ``compile``: ``torch.compile`` the encoder's forward (module names, hence checkpoints, unchanged).
        """
        encoder = self.sam.vision_encoder
        if attention is not None:
            set_image_encoder_attention(self.sam, attention)
        if dtype is not None and dtype != next(encoder.parameters()).dtype:
            if self.name == "sam2":  # its embedding step runs mask-decoder convolutions on encoder outputs
                raise ValueError("decoder.image_encoder_dtype is supported for sam and sam_hq, not sam2")
            encoder.to(dtype)
        if compile:
            encoder.compile()


def set_image_encoder_attention(model: nn.Module, implementation: str) -> None:
    """Switch a SAM / SAM-HQ / SAM 2 model's attention to ``implementation`` ("eager" | "sdpa"), in place.

    SAM and SAM-HQ choose their vision-attention class at construction (``*_VISION_ATTENTION_CLASSES``), so
    ``set_attn_implementation`` alone would leave the modules as built; the SDPA class subclasses the eager
    one with the same parameters, so swapping the class is exact. SAM 2 reads its config at every call.
    """
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"image-encoder attention must be 'eager' or 'sdpa', got {implementation!r}")
    import transformers.models.sam.modeling_sam as sam
    import transformers.models.sam_hq.modeling_sam_hq as sam_hq

    for classes in (sam.SAM_VISION_ATTENTION_CLASSES, sam_hq.SAM_HQ_VISION_ATTENTION_CLASSES):
        for module in model.modules():
            if type(module) in classes.values():
                module.__class__ = classes[implementation]
    encoder = model.vision_encoder
    for module in encoder.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation

    def trainable_names(self) -> list[str]:
        """Exactly the tensors that train, relative to this module: what a LENS checkpoint saves of it."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        train_mask_decoder: bool = True,
    ) -> MaskDecoderBridge:
        raise NotImplementedError
