"""Adapters for Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``) and
Qwen3-VL (``Qwen3VLForConditionalGeneration``, e.g. ``Qwen/Qwen3-VL-8B-Instruct``).

Native dynamic resolution: the processor resizes each image (``smart_resize``) to a multiple of
``patch_size * merge_size`` pixels per side, aspect ratio kept to within one such step, no padding, no crop.
The vision tower sees (grid_t, grid_h, grid_w) = ``image_grid_thw`` patches and merges each 2x2 block into
one LLM token, row-major, so an image's attention grid is (grid_h / 2, grid_w / 2) cells, each covering
``W / gw`` x ``H / gh`` original pixels: ``GridFrame.resize``. One batch mixes grid sizes freely.

Positions are Qwen's multimodal rotary ids, (3, B, L) (temporal, height, width), computed by the model's own
``get_rope_index`` and passed to the forward so the head gets exactly what layer k used. Qwen2.5-VL: q/k/v
bias, no o bias, ``mrope`` sections; Qwen3-VL: q/k RMSNorm, interleaved ``mrope``, and deepstack features
the model adds to the visual tokens after each of its first decoder layers, between layers: the adapter
taps the input of layer k + 1 (layer k's output plus deepstack feature k when k is one of those layers), the
residual stream the mirrored layers k + 1, k + 2 would read. Prompts are never prefix-shared (``shared_length = 0``):
the position ids of the text after the image depend on the image's grid, and Qwen3-VL's deepstack states
would need their own cache path; running each prompt whole is correct for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from PIL import Image
from torch import Tensor
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from lens.backbone.base import RopeSpec
from lens.backbone.hf import HFBackbone, ImageLayout
from lens.geometry import GridFrame


class Qwen2_5_VLBackbone(HFBackbone):
    """Frozen Qwen2.5-VL run up to decoder layer k."""

    model_class: ClassVar[type] = Qwen2_5_VLForConditionalGeneration
    processor_class: ClassVar[type] = Qwen2_5_VLProcessor
    rope_kind: ClassVar[str] = "mrope"
    # LLaVA-1.5's paper choice (14 of 32) as a fraction of depth: k = 12 of Qwen2.5-VL-7B's 28 layers.
    DEFAULT_LAYER_FRACTION: ClassVar[float] = 14 / 32
    HUB_MODELS: ClassVar[dict[str, int]] = {"Qwen/Qwen2.5-VL-7B-Instruct": 28}

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def position_ids(self, inputs: dict[str, Tensor]) -> Tensor:
        """(3, B, L): the model's own multimodal rotary ids (what its forward computes when given none)."""
        position_ids, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return position_ids

    def grid_frame(self, width: int, height: int) -> GridFrame:
        """The processor's ``smart_resize`` to a multiple of patch x merge pixels, one cell per merged patch."""
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        h, w = smart_resize(height, width, factor, ip.size["shortest_edge"], ip.size["longest_edge"])
        return GridFrame.resize(width, height, h // factor, w // factor)

    def image_layout(self, inputs: dict[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        thw = inputs["image_grid_thw"]  # (B, 3): one image per prompt, in prompt order
        layouts = []
        for image, tokens, (t, h, w) in zip(
            images, self.image_tokens(inputs["input_ids"]), thw.tolist(), strict=True
        ):
            frame = self.grid_frame(image.width, image.height)
            gh, gw = h // self.merge_size, w // self.merge_size
            if (frame.grid_h, frame.grid_w) != (gh, gw) or t != 1 or len(tokens) != gh * gw:
                raise ValueError(
                    f"a {image.width}x{image.height} image should give one frame of {frame.grid_h}x{frame.grid_w} "
                    f"merged patches, got image_grid_thw {(t, h, w)} and {len(tokens)} image tokens"
                )
            # merged tokens are row-major over (gh, gw): cell n is the prompt's n-th image token
            layouts.append(ImageLayout(tokens, frame))
        return layouts

    def rope_spec(self, rope: dict) -> RopeSpec:
        return RopeSpec(self.rope_kind, float(rope.get("rope_theta", 10000.0)), tuple(rope["mrope_section"]))


class Qwen3VLBackbone(Qwen2_5_VLBackbone):
    """Frozen Qwen3-VL run up to decoder layer k (q/k norm, interleaved mrope, deepstack kept)."""

    model_class: ClassVar[type] = Qwen3VLForConditionalGeneration
    processor_class: ClassVar[type] = Qwen3VLProcessor
    rope_kind: ClassVar[str] = "mrope_interleaved"
    # deepstack features are added to the visual tokens after each of the first decoder layers, outside the
    # layers: the head must see layer k's output with them, i.e. layer k + 1's input
    tap_next_input: ClassVar[bool] = True
    # Same fraction as LLaVA-1.5's k = 14 of 32: k = 16 of Qwen3-VL-8B's 36 layers, past the deepstack layers.
    DEFAULT_LAYER_FRACTION: ClassVar[float] = 14 / 32
    HUB_MODELS: ClassVar[dict[str, int]] = {"Qwen/Qwen3-VL-8B-Instruct": 36}
