"""What every Hugging Face ``*ForConditionalGeneration`` adapter shares; a family module adds only its layout.

A family subclass names its transformers class and says, per prompt, which image tokens hold the cells of
the image's attention grid and how that grid sits on the original image (``image_layout``). Everything
else is the same for all families: the model's own chat template, right padding, the early exit by forward
hook on decoder layer k, the text span, ``generate``, the layer spec read from the text config and the
layer state in the head's (Llama) parameter names.

The full multimodal forward runs (``model.model(**processor outputs)``) and is stopped after layer k, so
whatever the family does inside it (multimodal RoPE ids, Qwen3-VL's deepstack injection into early layers,
any-resolution packing) is exactly what the head sees.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel, ProcessorMixin

from lens.backbone.base import (
    Backbone,
    BackboneFeatures,
    DecoderFrameFn,
    LayerSpec,
    RopeSpec,
    image_geometries,
    quantized_loading,
    run_until,
    unique_images,
)
from lens.geometry import GridFrame


def images_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``cls`` without its video processor, if it has one: video processors need torchvision (not a LENS
    dependency) and LENS only ever passes images. Loads and behaves as ``cls`` otherwise."""
    if "video_processor" not in cls.get_attributes():
        return cls

    def get_attributes(_: type) -> list[str]:
        return [a for a in cls.get_attributes() if a != "video_processor"]

    # cls's __init__ unchanged (video_processor=None); ProcessorMixin only checks, saves and loads attributes
    return type(f"{cls.__name__}ImagesOnly", (cls,), {"get_attributes": classmethod(get_attributes)})


class _Tapped(Exception):
    def __init__(self, hidden_states: Tensor):
        super().__init__()
        self.hidden_states = hidden_states


def run_until_input_of(forward: Callable[..., object], layer: nn.Module, **inputs: Tensor) -> Tensor:
    """Call ``forward(**inputs)`` and return the hidden states handed to ``layer``, stopping before it runs.

    For stacks that change the residual stream between layers (Qwen3-VL adds deepstack features after each
    of its first layers), the input of layer k + 1 is what the head's mirrored layers must see.
    """

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Tapped(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward(**inputs)
    except _Tapped as stop:
        return stop.hidden_states
    finally:
        handle.remove()
    raise RuntimeError(f"{type(layer).__name__} was never called during the forward pass")


@dataclass
class Prefix:
    """A prompt prefix run once (``HFBackbone.encode_prefix``): the template and image tokens of one image."""

    image: Image.Image  # the image it shows, checked against every prompt that uses it
    input_ids: Tensor  # (P,) its token ids, checked likewise
    hidden: Tensor  # (1, P, d) its residual stream after layer k
    cache: DynamicCache  # its keys / values in layers 1..k (copied, never extended, by each use)


def _cache_kwarg(model: nn.Module) -> str:
    # transformers renamed the KV-cache argument of the forward from past_key_values to cache (5.2x)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a is b or (a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes())


@dataclass
class ImageLayout:
    """Where one prompt's image grid lives: cell n (row-major over (grid_h, grid_w)) is token ``positions[n]``."""

    positions: Tensor  # (grid_h * grid_w,) long, sequence indices
    frame: GridFrame


class FrozenHFModel:
    """What every adapter over a transformers ``*ForConditionalGeneration`` shares, from ``self.model``,
    ``self.processor``, ``self._inputs`` and ``self.decoder_layers``: layer states for the head (the families'
    decoder layers already use the Llama names ``self_attn.q_proj``, ``mlp.gate_proj``, ...), the untouched
    MLLM's answers, and the likelihood of answer starts (the agent's router)."""

    model: PreTrainedModel
    processor: ProcessorMixin
    decoder_layers: nn.ModuleList
    _inputs: Callable[..., dict[str, Tensor]]

    def decoder_layer_state(self, index: int) -> dict[str, Tensor]:
        n = len(self.decoder_layers)
        if not 1 <= index <= n:
            raise ValueError(f"the backbone has decoder layers 1..{n}; cannot copy layer {index}")
        return {k: v.detach().clone() for k, v in self.decoder_layers[index - 1].state_dict().items()}

    def generate(
        self, images: Sequence[Image.Image], instructions: Sequence[str], max_new_tokens: int = 32
    ) -> list[str]:
        answers = []
        for image, text in zip(images, instructions, strict=True):  # one at a time: no left-padding games
            inputs = self._inputs([image], [text])
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1] :]
            answers.append(self.processor.tokenizer.decode(new, skip_special_tokens=True).strip())
        return answers

    def score_continuations(
        self, image: Image.Image, instruction: str, continuations: Sequence[str]
    ) -> Tensor:
        # The agent's router: the prompt once per continuation, the continuation's log-probs summed.
        if not continuations:
            raise ValueError("score_continuations needs at least one continuation")
        inputs = self._inputs([image] * len(continuations), [instruction] * len(continuations))
        prompt = inputs["input_ids"]  # (C, P), identical rows
        tokenizer = self.processor.tokenizer
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        if any(not i for i in ids):
            raise ValueError(f"a continuation tokenizes to nothing: {list(continuations)}")
        longest = max(map(len, ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        tail = torch.tensor([i + [pad] * (longest - len(i)) for i in ids], device=prompt.device)  # (C, T)
        real = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids], device=prompt.device)
        with torch.inference_mode():
            logits = self.model(
                input_ids=torch.cat([prompt, tail], 1),
                attention_mask=torch.cat([inputs["attention_mask"], real], 1),
                **_extend_per_token(inputs, prompt.shape, tail.shape[1]),
            ).logits[:, prompt.shape[1] - 1 : -1]  # (C, T, V): the logits that predict each tail token
        scores = logits.float().log_softmax(-1).gather(-1, tail[..., None])[..., 0]  # (C, T)
        return (scores * real).sum(1).cpu()


def _extend_per_token(inputs: dict[str, Tensor], shape: torch.Size, extra: int) -> dict[str, Tensor]:
    """The processor's other inputs for prompts grown by ``extra`` text tokens: per-token tensors shaped like
    the ids (Qwen's ``mm_token_type_ids``) get 0, "text", for the new tokens; the rest pass as they are."""
    out = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if isinstance(value, Tensor) and value.shape == shape:
            value = torch.cat([value, value.new_zeros(shape[0], extra)], 1)
        out[key] = value
    return out


class HFBackbone(FrozenHFModel, Backbone):
    """A frozen transformers MLLM run up to decoder layer k. Subclasses set the class attributes and
    implement ``image_layout``; a family that needs other model inputs overrides ``_model_inputs``."""

    model_class: ClassVar[type[PreTrainedModel]]
    processor_class: ClassVar[type[ProcessorMixin]]
    DEFAULT_LAYER_FRACTION: ClassVar[float]
    # Tap the input of layer k + 1 instead of the output of layer k (they differ when the stack adds to the
    # residual stream between layers); the last layer's output is tapped when k is the last layer.
    tap_next_input: ClassVar[bool] = False
    # Prompts on one image may run their common start (template + image) once: only for 1-D RoPE stacks that
    # add nothing between layers, where a prompt's first P tokens do not depend on what follows them.
    shares_prefix: ClassVar[bool] = False
    # hub ids this adapter is for -> their decoder depth (for ``lens info``'s default k = fraction * depth)
    HUB_MODELS: ClassVar[dict[str, int]] = {}

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, layer: int | None = None):
        super().__init__()
        depth = self.text_config(model).num_hidden_layers
        if layer is None:
            layer = max(1, round(self.DEFAULT_LAYER_FRACTION * depth))
        if not 1 <= layer <= depth:
            raise ValueError(f"layer must be in [1, {depth}], got {layer}")
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.layer = layer
        processor.tokenizer.padding_side = "right"  # real tokens first: text spans end at the real length

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        layer: int | None = None,
        revision: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        quantization: str | None = None,
    ) -> HFBackbone:
        """Load ``model_id`` (hub id or local directory) into ``model_class`` with its own processor."""
        loading = quantized_loading(quantization, dtype, device)  # {} unless 4-bit / 8-bit
        model = cls.model_class.from_pretrained(model_id, revision=revision, dtype=dtype, **loading)
        processor = images_only(cls.processor_class).from_pretrained(model_id, revision=revision)
        return cls(model if loading else model.to(device), processor, layer=layer)

    @staticmethod
    def text_config(model: PreTrainedModel) -> object:
        return model.config.get_text_config()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    # ----- family hooks ---------------------------------------------------------------------------------------
    def grid_frame(self, width: int, height: int) -> GridFrame:
        """How the family lays its attention grid over a ``width`` x ``height`` image (no model run)."""
        raise NotImplementedError

    def image_layout(self, inputs: dict[str, Tensor], images: Sequence[Image.Image]) -> list[ImageLayout]:
        """Per prompt: the grid cells' tokens and the grid's frame on the original image."""
        raise NotImplementedError

    def position_ids(self, inputs: dict[str, Tensor]) -> Tensor:
        """What the decoder layers use as positions: (B, L) 0..n-1 under right padding (1-D RoPE families)."""
        input_ids = inputs["input_ids"]
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def _model_inputs(
        self, inputs: dict[str, Tensor], position_ids: Tensor, images: Sequence[Image.Image]
    ) -> dict[str, object]:
        """Keyword arguments of ``model.model``: the processor's outputs, positions passed explicitly, and —
        when prompts repeat an image (several queries per image in training) — the vision tower's outputs
        computed once per distinct image, handed over as ``mm_encoder_outputs`` (the model's own path for
        precomputed features) instead of ``pixel_values``."""
        model_inputs: dict[str, object] = {**inputs, "position_ids": position_ids}
        unique, index = unique_images(images)
        if len(unique) == len(images):
            return model_inputs
        defaults = dict(getattr(self.processor, "images_kwargs", None) or {})  # as the processor passes them
        rgb = [im.convert("RGB") for im in unique]
        vision = self.processor.image_processor(rgb, **{**defaults, "return_tensors": "pt"})
        wanted = inspect.signature(self.model.model.get_image_features).parameters
        kwargs = {k: v.to(self.device) for k, v in vision.items() if k in wanted and isinstance(v, Tensor)}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        features = self.model.model.get_image_features(**kwargs, return_dict=True)
        features.pooler_output = self._per_prompt(features.pooler_output, unique, index.tolist())
        if getattr(features, "deepstack_features", None):  # Qwen3-VL: per layer, per image
            features.deepstack_features = [
                list(f[i] for i in index.tolist()) for f in features.deepstack_features
            ]
        del model_inputs["pixel_values"]
        model_inputs["mm_encoder_outputs"] = {"image": features}
        return model_inputs

    def _per_prompt(self, features: object, unique: Sequence[Image.Image], index: list[int]) -> object:
        """The distinct images' projected features, repeated in prompt order (``index``: image of each prompt).
        Families whose ``get_image_features`` returns one entry per image (Qwen, LLaVA-NeXT) need nothing else."""
        return [features[i] for i in index]

    # ----- shared -----------------------------------------------------------------------------------------------
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
        if not images:
            raise ValueError("got no images")
        rgb = [image.convert("RGB") for image in images]
        enc = self.processor(  # right padding whatever the processor's default (InternVL's is left)
            images=rgb,
            text=self._prompts(instructions),
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        enc = dict(enc)
        enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return {k: v.to(self.device) for k, v in enc.items() if isinstance(v, Tensor)}

    def image_tokens(self, input_ids: Tensor) -> list[Tensor]:
        """Per prompt, the sequence indices (ascending) of its image-placeholder tokens."""
        return [torch.nonzero(row == self.image_token_id).flatten() for row in input_ids]

    def encode(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        decoder_frame: DecoderFrameFn | None = None,
        prefix: object | None = None,
    ) -> BackboneFeatures:
        """Families with ``shares_prefix`` run the template + image once when every prompt shows one image
        (``prefix`` from ``encode_prefix``, or computed here); the others run every prompt whole."""
        if prefix is not None and not isinstance(prefix, Prefix):
            raise ValueError(
                f"{type(self).__name__} got a prefix of another backbone: {type(prefix).__name__}"
            )
        inputs = self._inputs(images, instructions)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"].bool()
        n_real = attention_mask.sum(1)  # (B,)
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        if not (attention_mask == (steps < n_real[:, None])).all():
            raise ValueError("expected right padding (real tokens first)")
        layouts = self.image_layout(inputs, images)
        ends = torch.stack(
            [tokens[-1] + 1 for tokens in self.image_tokens(input_ids)]
        )  # (B,) after the image
        text_span = torch.stack([ends, n_real], 1)  # (B, 2)
        if (text_span[:, 1] <= text_span[:, 0]).any():
            raise ValueError("a prompt has no text tokens after its image")
        n_cells = max(len(lay.positions) for lay in layouts)
        image_positions = torch.full((len(images), n_cells), -1, dtype=torch.long, device=input_ids.device)
        for b, lay in enumerate(layouts):
            image_positions[b, : len(lay.positions)] = lay.positions
        grids = [lay.frame for lay in layouts]
        position_ids = self.position_ids(inputs)  # (B, L) or (3, B, L)
        shared = 0
        with torch.inference_mode():
            if (
                prefix is None
                and self.shares_prefix
                and len(images) > 1
                and len(unique_images(images)[0]) == 1
            ):
                start = int(text_span[0, 0])  # one image, one template: the same start in every prompt
                if (text_span[:, 0] == start).all() and (input_ids[:, :start] == input_ids[:1, :start]).all():
                    prefix = self._run_prefix(images[0], inputs, start)
            if prefix is not None and not all(_same_pixels(im, prefix.image) for im in images):
                raise ValueError("the prompts show another image than this prefix")
            if prefix is not None and not self._starts_with(input_ids, prefix):
                prefix = None  # the tokenizer merged the template's last token into a text: run whole
            if prefix is not None:
                shared = len(prefix.input_ids)
                hidden = self._run_rest(inputs, position_ids, prefix)
            else:
                hidden = self._run(self._model_inputs(inputs, position_ids, images))
        return BackboneFeatures(
            hidden_states=hidden.clone(),  # clone: inference-mode tensors cannot enter autograd
            attention_mask=attention_mask.clone(),
            position_ids=position_ids.clone(),
            image_positions=image_positions,
            grid_sizes=torch.tensor([[g.grid_h, g.grid_w] for g in grids], device=input_ids.device),
            text_span=text_span,
            answer_index=text_span[:, 1] - 1,
            geometries=image_geometries(grids, decoder_frame),
            image_index=unique_images(images)[1].to(input_ids.device),
            shared_length=shared,  # 0 unless one image's template + image ran once (shares_prefix)
        )

    @staticmethod
    def _starts_with(input_ids: Tensor, prefix: Prefix) -> bool:
        P = len(prefix.input_ids)
        return input_ids.shape[1] > P and bool(
            (input_ids[:, :P] == prefix.input_ids.to(input_ids.device)).all()
        )

    def encode_prefix(self, image: Image.Image) -> Prefix | None:
        """The template + image (every token before the instruction) through layers 1..k, once per image."""
        if not self.shares_prefix:
            return None
        inputs = self._inputs([image], [""])
        start = int(self.image_tokens(inputs["input_ids"])[0][-1]) + 1  # the first text position
        with torch.inference_mode():
            return self._run_prefix(image, inputs, start)

    def _run_prefix(self, image: Image.Image, inputs: dict[str, Tensor], length: int) -> Prefix:
        """Row 0's first ``length`` tokens (template + image) through layers 1..k, keeping their cache."""
        cache = DynamicCache()
        model_inputs = {k: v[:1] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        model_inputs = {k: v[:, :length] for k, v in model_inputs.items()}
        model_inputs["position_ids"] = self.position_ids(model_inputs)
        pixels = {k: v for k, v in self._inputs([image], [""]).items() if k not in model_inputs}
        hidden = run_until(
            self.model.model,
            self.decoder_layers[self.layer - 1],
            **model_inputs,
            **pixels,
            **{_cache_kwarg(self.model.model): cache},
            use_cache=True,
        )
        return Prefix(image, model_inputs["input_ids"][0].clone(), hidden.clone(), cache)

    def _run_rest(self, inputs: dict[str, Tensor], position_ids: Tensor, prefix: Prefix) -> Tensor:
        """(B, L, d): every prompt's tokens after the P shared ones, attending to the prefix's cache."""
        P, B = len(prefix.input_ids), len(inputs["input_ids"])
        cache = copy.deepcopy(prefix.cache)
        cache.reorder_cache(torch.zeros(B, dtype=torch.long, device=prefix.hidden.device))  # (B, kv, P, hd)
        rest = run_until(  # (B, L - P, d): text tokens only, no image inputs
            self.model.model,
            self.decoder_layers[self.layer - 1],
            input_ids=inputs["input_ids"][:, P:],
            attention_mask=inputs["attention_mask"],
            position_ids=position_ids[:, P:],
            **{_cache_kwarg(self.model.model): cache},
            use_cache=True,
        )
        return torch.cat([prefix.hidden.expand(B, -1, -1), rest], 1)

    def _run(self, model_inputs: dict[str, Tensor]) -> Tensor:
        """(B, L, d): the residual stream after decoder layer k, from the full forward stopped there."""
        if self.tap_next_input and self.layer < len(self.decoder_layers):
            return run_until_input_of(
                self.model.model, self.decoder_layers[self.layer], **model_inputs, use_cache=False
            )
        return run_until(
            self.model.model, self.decoder_layers[self.layer - 1], **model_inputs, use_cache=False
        )

    def layer_spec(self) -> LayerSpec:
        c = self.text_config(self.model)
        attention = self.decoder_layers[0].self_attn
        rope = dict(getattr(c, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"the head mirrors un-scaled RoPE only, got {rope.get('rope_type')}")
        return LayerSpec(
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            rms_norm_eps=c.rms_norm_eps,
            rope=self.rope_spec(rope),
            hidden_act=c.hidden_act,
            # read off the modules: Qwen2-style layers have q/k/v bias and no o bias whatever the config says
            q_bias=attention.q_proj.bias is not None,
            k_bias=attention.k_proj.bias is not None,
            v_bias=attention.v_proj.bias is not None,
            o_bias=attention.o_proj.bias is not None,
            mlp_bias=self.decoder_layers[0].mlp.gate_proj.bias is not None,
            qk_norm=hasattr(attention, "q_norm"),
        )

    def rope_spec(self, rope: dict) -> RopeSpec:
        return RopeSpec("default", float(rope.get("rope_theta", 10000.0)))
