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
        descriptions: Tensor,  # (B, 1 + m, d_s) global description first
        points: Tensor,  # (B, m, 2) x, y in decoder-frame pixels (continuous)
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
