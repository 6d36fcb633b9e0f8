"""Adapter for Hugging Face LLaVA-1.5 (``LlavaForConditionalGeneration``, e.g. ``llava-hf/llava-1.5-7b-hf``)."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from transformers import (
    AutoProcessor,
    DynamicCache,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from lens.backbone.base import (
    Backbone,
    BackboneFeatures,
    DecoderFrameFn,
    LayerSpec,
    RopeSpec,
    first_of_each,
    image_geometries,
    quantized_loading,
    run_until,
    shared_prefix_length,
    unique_images,
)
from lens.backbone.hf import FrozenHFModel
from lens.geometry import GridFrame

logger = logging.getLogger(__name__)


# transformers renamed the KV-cache argument of the decoder's forward from past_key_values to cache (5.2x)
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlavaModel.forward).parameters else "past_key_values"


def pad_not_crop(processor: LlavaProcessor) -> None:
    """Make the processor pad images to a square (as LLaVA-1.5 was trained) instead of centre-cropping.

    ``llava-hf`` checkpoints ship a ``CLIPImageProcessor`` that resizes the short side and centre-crops,
    which silently hides the left/right (or top/bottom) of non-square images from the MLLM and breaks the
    grid → image mapping. LLaVA-1.5 itself pads to a square with the mean colour; we do the same.
    """
    ip = processor.image_processor
    if not hasattr(ip, "pad_to_square"):
        logger.info("Replacing %s with a pad-to-square LLaVA image processor", type(ip).__name__)
        ip = LlavaImageProcessorPil(
            size=ip.size,
            crop_size=ip.crop_size,
            resample=ip.resample,
            image_mean=ip.image_mean,
            image_std=ip.image_std,
        )
        processor.image_processor = ip
    ip.do_pad = True
    ip.do_center_crop = False  # a square padded image resized on its short side is already square


@dataclass
class LlavaPrefix:
    """A prompt prefix run once (``LlavaBackbone.encode_prefix``): template and image tokens of one image."""

    image: Image.Image  # the image it shows, checked against every prompt that uses it
    input_ids: Tensor  # (P,) the prefix's token ids, checked likewise
    hidden: Tensor  # (1, P, d) its hidden states after layer k
    cache: DynamicCache  # its keys / values in layers 1..k (copied, never extended, by each use)


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()


class LlavaBackbone(FrozenHFModel, Backbone):
    """Frozen LLaVA-1.5 that runs only its first ``layer`` decoder layers.

    Arguments:
        model: the MLLM; it is frozen and put in eval mode here and never changes afterwards.
        processor: its ``LlavaProcessor`` (tokenizer with the model's own chat template).
        layer: k, the 1-based decoder layer whose output the head reads.
    """

    # The paper's k = 14 of LLaVA-1.5-7B's 32 layers: grounding is readable in the middle of the stack.
    DEFAULT_LAYER_FRACTION = 14 / 32
    HUB_MODELS = {"llava-hf/llava-1.5-7b-hf": 32}  # hub id -> decoder depth, for `lens info`

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        processor: LlavaProcessor,
        layer: int | None = None,
    ):
        super().__init__()
        text_config = model.config.text_config
        if layer is None:
            layer = max(1, round(self.DEFAULT_LAYER_FRACTION * text_config.num_hidden_layers))
        if not 1 <= layer <= text_config.num_hidden_layers:
            raise ValueError(f"layer must be in [1, {text_config.num_hidden_layers}], got {layer}")
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.layer = layer
        pad_not_crop(processor)
        processor.tokenizer.padding_side = "right"  # positions of real tokens stay 0..n-1
        vision = model.config.vision_config
        self.mllm_size = vision.image_size
        side = vision.image_size // vision.patch_size
        self.grid_size = (side, side)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        layer: int | None = None,
        revision: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        quantization: str | None = None,
    ) -> LlavaBackbone:
        loading = quantized_loading(quantization, dtype, device)  # {} unless 4-bit / 8-bit
        model = LlavaForConditionalGeneration.from_pretrained(
            model_id, revision=revision, dtype=dtype, **loading
        )
        processor = AutoProcessor.from_pretrained(model_id, revision=revision)
        return cls(model if loading else model.to(device), processor, layer=layer)

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def _prompts(self, instructions: Sequence[str]) -> list[str]:
        # The model's own chat template; add_generation_prompt ends the prompt with the assistant marker,
        # so the last prompt token is the start of the answer.
        return [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                add_generation_prompt=True,
            )
            for text in instructions
        ]

    def _inputs(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> dict[str, Tensor]:
        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
        rgb = [image.convert("RGB") for image in images]
        enc = self.processor(images=rgb, text=self._prompts(instructions), padding=True, return_tensors="pt")
        side = enc["pixel_values"].shape[-1]
        if enc["pixel_values"].shape[-2] != side or side != self.mllm_size:
            raise RuntimeError(
                f"processor produced {tuple(enc['pixel_values'].shape)}, not {self.mllm_size}²"
            )
        enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return {k: v.to(self.device) for k, v in enc.items()}

    def grid_frame(self, width: int, height: int) -> GridFrame:
        """LLaVA-1.5 pads to a centred square and resizes it onto the vision tower's fixed grid."""
        return GridFrame.pad_to_square(width, height, *self.grid_size)

    def encode(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        decoder_frame: DecoderFrameFn | None = None,
        prefix: LlavaPrefix | None = None,
    ) -> BackboneFeatures:
        inputs = self._inputs(images, instructions)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"].bool()
        image_span, text_span = self._spans(input_ids, attention_mask)  # checks the prompts first
        if prefix is not None:  # one image, its template + image already through layers 1..k
            shared = prefix.input_ids.shape[0]
            same_image = all(im is prefix.image or _same_pixels(im, prefix.image) for im in images)
            if not same_image or not (input_ids[:, :shared] == prefix.input_ids.to(input_ids.device)).all():
                raise ValueError("the prompts do not start with this prefix (another image or template)")
            image_index = torch.zeros(len(images), dtype=torch.long)
            with torch.inference_mode():
                rest = self.model.model.get_input_embeddings()(
                    input_ids[:, shared:]
                )  # (B, L - P, d) text only
                hidden = self._run_rest(
                    rest, inputs["attention_mask"], prefix.hidden, prefix.cache, image_index
                )
        else:
            image_index = unique_images(images)[1]  # (B,) which distinct image each prompt shows
            repeated = len(set(image_index.tolist())) < len(image_index)
            same = input_ids == input_ids[:1]  # (B, L) token ids; equal ids on one image: equal embeddings
            shared = shared_prefix_length(same, attention_mask, text_span[:, 0]) if repeated else 0
            with torch.inference_mode():
                embeds = self._embed(input_ids, inputs["pixel_values"], image_index)
                hidden = self._run(embeds, inputs["attention_mask"], image_index, shared)
        geometries = image_geometries([self.grid_frame(im.width, im.height) for im in images], decoder_frame)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        n_image = self.grid_size[0] * self.grid_size[1]
        image_positions = image_span[:, :1] + torch.arange(n_image, device=input_ids.device)  # (B, N)
        return BackboneFeatures(
            hidden_states=hidden.clone(),  # clone: inference-mode tensors cannot enter autograd
            attention_mask=attention_mask.clone(),
            position_ids=positions.clone(),
            image_positions=image_positions,
            grid_sizes=torch.tensor([self.grid_size] * len(images), device=input_ids.device),
            text_span=text_span,
            answer_index=text_span[:, 1] - 1,
            geometries=geometries,
            image_index=image_index.to(input_ids.device),
            shared_length=shared,
        )

    def _run(self, embeds: Tensor, attention_mask: Tensor, image_index: Tensor, shared: int) -> Tensor:
        """Hidden states (B, L, d) after layer k. The first ``shared`` tokens, the same in every prompt on an
        image (chat template and image), run once per image and the rest of each prompt attends to their
        cache: three queries on a scene cost one image prefix, not three."""
        layer, model = self.decoder_layers[self.layer - 1], self.model.model
        if shared == 0:
            return run_until(
                model, layer, inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
            )
        first = first_of_each(image_index)
        prefix, cache = self._run_prefix(embeds[first, :shared], attention_mask[first, :shared])
        return self._run_rest(embeds[:, shared:], attention_mask, prefix, cache, image_index)

    def _run_prefix(self, embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, DynamicCache]:
        """Hidden states (U, P, d) after layer k of U prompt prefixes, and their keys / values in layers 1..k."""
        cache = DynamicCache()
        hidden = run_until(
            self.model.model,
            self.decoder_layers[self.layer - 1],
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            **{CACHE_KWARG: cache},
            use_cache=True,
        )
        return hidden, cache

    def _run_rest(
        self, embeds: Tensor, attention_mask: Tensor, prefix: Tensor, cache: DynamicCache, image_index: Tensor
    ) -> Tensor:
        """Hidden states (B, L, d): each prompt's tokens after the P shared ones (``embeds``: (B, L - P, d)),
        attending to the cached prefix of its image (``prefix``: (U, P, d), ``cache`` for U rows, left unchanged)."""
        cache = copy.deepcopy(cache)
        cache.reorder_cache(image_index.to(embeds.device))  # layers 1..k: (B, heads, P, head_dim)
        rest = run_until(  # (B, L - P, d)
            self.model.model,
            self.decoder_layers[self.layer - 1],
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            **{CACHE_KWARG: cache},
            use_cache=True,
        )
        return torch.cat([prefix[image_index.to(prefix.device)], rest], 1)

    @torch.inference_mode()
    def encode_prefix(self, image: Image.Image) -> LlavaPrefix:
        """Chat template + image (every token before the instruction) through layers 1..k, once per image."""
        inputs = self._inputs([image], [""])
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"].bool()
        shared = int(self._spans(input_ids, attention_mask)[1][0, 0])  # the first text position
        embeds = self._embed(input_ids[:, :shared], inputs["pixel_values"], torch.zeros(1, dtype=torch.long))
        hidden, cache = self._run_prefix(embeds, inputs["attention_mask"][:, :shared])
        return LlavaPrefix(image, input_ids[0, :shared].clone(), hidden.clone(), cache)

    def _embed(self, input_ids: Tensor, pixel_values: Tensor, image_index: Tensor) -> Tensor:
        """Token embeddings (B, L, d) with the projected vision features in the image tokens, the vision tower
        run once per distinct image (``image_index``: (B,) which distinct image each prompt shows)."""
        model = self.model.model
        features = model.get_image_features(
            pixel_values=pixel_values[first_of_each(image_index)],
            vision_feature_layer=self.model.config.vision_feature_layer,
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        features = torch.stack(list(features))[image_index.to(input_ids.device)]  # (B, n_image, d)
        embeds = model.get_input_embeddings()(input_ids)  # (B, L, d)
        is_image = (input_ids == self.model.config.image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(is_image, features.to(embeds.dtype))

    def _spans(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[start, end) of the image tokens and of the prompt tokens after them, per row."""
        is_image = input_ids == self.model.config.image_token_id  # (B, L)
        n_image = self.grid_size[0] * self.grid_size[1]
        counts = is_image.sum(1)
        if (counts != n_image).any():
            raise ValueError(f"expected {n_image} image tokens per prompt, got {counts.tolist()}")
        start = is_image.int().argmax(1)  # first image token
        end = start + n_image
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        contiguous = ((positions >= start[:, None]) & (positions < end[:, None])) == is_image
        if not contiguous.all():
            raise ValueError("image tokens are not contiguous in the prompt")
        n_real = attention_mask.sum(1)
        if not (attention_mask == (positions < n_real[:, None])).all():
            raise ValueError("expected right padding (real tokens first)")
        return torch.stack([start, end], 1), torch.stack([end, n_real], 1)

    def layer_spec(self) -> LayerSpec:
        c = self.model.config.text_config
        rope = dict(getattr(c, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"the head mirrors default RoPE only, got {rope.get('rope_type')}")
        return LayerSpec(
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            rms_norm_eps=c.rms_norm_eps,
            rope=RopeSpec("default", float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))),
            hidden_act=c.hidden_act,
            q_bias=c.attention_bias,
            k_bias=c.attention_bias,
            v_bias=c.attention_bias,
            o_bias=c.attention_bias,
            mlp_bias=c.mlp_bias,
        )
