"""The backbone interface: what the head needs from a frozen MLLM, and nothing more.

A backbone adapter turns (images, instructions) into ``BackboneFeatures``: the hidden states after decoder
layer k, where the image and text tokens are, which token starts the answer, and the image geometry. It
also describes one decoder layer (``LayerSpec``) so the head can mirror it. Adding an MLLM family means
writing one short adapter; the head, keypoints, descriptor and mask decoder never change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from PIL import Image
from torch import Tensor, nn

from lens.geometry import DecoderFrame, GridFrame, ImageGeometry

QUANTIZATIONS = ("4bit", "8bit")


def quantized_loading(quantization: str | None, dtype: torch.dtype, device: str | torch.device) -> dict:
    """``from_pretrained`` keyword arguments for an MLLM in 4-bit (NF4) or 8-bit bitsandbytes weights, or {}.

    Quantized weights are placed by ``device_map`` at load time and cannot be moved afterwards; compute runs in
    ``dtype``. GPU only: bitsandbytes kernels are CUDA kernels.
    """
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"backbone.quantization must be one of {QUANTIZATIONS} or null, got {quantization!r}"
        )
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"backbone.quantization={quantization!r} needs a CUDA device, got {str(device)!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "backbone.quantization needs bitsandbytes: pip install 'lens-seg[quant]'"
        ) from error
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": str(torch.device(device))}}


def unique_images(images: Sequence[Image.Image]) -> tuple[list[Image.Image], Tensor]:
    """The distinct images of a batch and, per input, the index of its copy among them.

    A training batch holds several queries per image (three per scene on the synthetic world); the frozen
    image encoders need to see each image once. Images are compared by content, not identity, since data-loader
    workers hand over copies.
    """
    seen: dict[tuple, int] = {}
    unique: list[Image.Image] = []
    index = []
    for image in images:
        key = (image.mode, image.size, image.tobytes())
        if key not in seen:
            seen[key] = len(unique)
            unique.append(image)
        index.append(seen[key])
    return unique, torch.tensor(index, dtype=torch.long)


def first_of_each(image_index: Tensor) -> list[int]:
    """The first input showing each distinct image, in the order ``unique_images`` numbers them."""
    shows = image_index.tolist()
    return [shows.index(i) for i in range(max(shows) + 1)]


def shared_prefix_length(same: Tensor, attention_mask: Tensor, text_start: Tensor) -> int:
    """P: how many first positions every prompt agrees on (``same``: (B, L) bool, the prompt equals its
    reference there), stopping before any prompt's text and before the shortest prompt's last token.

    Prompts on the same image then agree on their first P positions (template and image), so those can run
    once per image. A prompt's text tokens are never shared (A_c is read from their attention rows).
    """
    agree = same.all(0)  # (L,) position identical in every prompt
    common = int(agree.int().argmin()) if not agree.all() else len(agree)
    return max(0, min(common, int(text_start.min()), int(attention_mask.sum(1).min()) - 1))


@dataclass
class RopeSpec:
    """The backbone's rotary position embedding, mirrored by the head (``lens.head.rotary``)."""

    kind: str = "default"  # "default" (1-D RoPE) | "mrope" (Qwen2/2.5-VL) | "mrope_interleaved" (Qwen3-VL)
    theta: float = 10000.0
    sections: tuple[int, ...] | None = None  # mrope kinds: (t, h, w) counts of rotary frequency pairs

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unknown rope kind {self.kind!r}; known: {ROPE_KINDS}")
        if self.kind != "default" and (self.sections is None or len(self.sections) != 3):
            raise ValueError(f"rope kind {self.kind!r} needs three (t, h, w) sections, got {self.sections}")
        if self.sections is not None:
            self.sections = tuple(int(s) for s in self.sections)


ROPE_KINDS = ("default", "mrope", "mrope_interleaved")


@dataclass
class LayerSpec:
    """Shape of one backbone decoder layer (pre-norm, RoPE attention, gated MLP), mirrored by the head."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeSpec = field(default_factory=RopeSpec)
    hidden_act: str = "silu"
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE (self_attn.q_norm / k_norm)


@dataclass
class BackboneFeatures:
    """Everything the head reads from the frozen MLLM, for a batch of B prompts of padded length L.

    Each prompt's image has its own attention grid (gh_i, gw_i); N = max gh_i * gw_i over the batch. Tensors
    are plain (not inference-mode) tensors so autograd can consume them; they are also what the cache stores.
    """

    hidden_states: Tensor  # (B, L, d) output of decoder layer k
    attention_mask: Tensor  # (B, L) bool, True on real (non-padding) tokens
    position_ids: Tensor  # (B, L) for 1-D RoPE, (3, B, L) for mrope kinds: exactly what layer k used
    # (B, N) long: sequence index of the token of grid cell n (row-major over the image's own (gh_i, gw_i)),
    # -1 beyond gh_i * gw_i. Image tokens that are not grid cells (a tiled family's base view or newline
    # tokens, a thumbnail) appear nowhere here and are not text either.
    image_positions: Tensor
    grid_sizes: Tensor  # (B, 2) long (gh_i, gw_i)
    text_span: Tensor  # (B, 2) long [start, end) of the prompt tokens after the image (A_c averages these)
    answer_index: Tensor  # (B,) long: the start-of-answer token f_s (last prompt token) = text_span[:, 1] - 1
    geometries: list[ImageGeometry]  # per prompt: its image's grid frame and decoder frame
    # Prompts that show the same image agree on their first ``shared_length`` tokens (template and image);
    # the head runs those once per image. None / 0: nothing shared. Cached rows find both in ``stack_cached``.
    image_index: Tensor | None = None  # (B,) long: which distinct image each prompt shows
    shared_length: int = 0

    @property
    def text_mask(self) -> Tensor:  # (B, L) bool
        return span_mask(self.text_span, self.hidden_states.shape[1])

    @property
    def max_grid(self) -> tuple[int, int]:
        """(gh_max, gw_max): the padded grid every per-image map of this batch is laid out on."""
        return int(self.grid_sizes[:, 0].max()), int(self.grid_sizes[:, 1].max())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BackboneFeatures:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                floating = dtype is not None and value.is_floating_point()
                value = value.to(device, dtype) if floating else value.to(device)
            moved[f.name] = value
        return BackboneFeatures(**moved)


def span_mask(span: Tensor, length: int) -> Tensor:
    """(B, L) bool: True on positions in [start, end) of each row's span (B, 2)."""
    positions = torch.arange(length, device=span.device)  # (L,)
    return (positions >= span[:, :1]) & (positions < span[:, 1:])  # (B, L)


# The decoder's frame for an original (width, height): ``MaskDecoderBridge.frame``.
DecoderFrameFn = Callable[[int, int], DecoderFrame]


def image_geometries(
    grids: Sequence[GridFrame], decoder_frame: DecoderFrameFn | None = None
) -> list[ImageGeometry]:
    """Pair each image's grid frame with the decoder's frame (the identity frame when no decoder is named)."""
    frame = decoder_frame or DecoderFrame.identity
    return [ImageGeometry(g, frame(g.width, g.height)) for g in grids]


class Backbone(nn.Module):
    """A frozen MLLM seen through the head's eyes. Subclasses implement the four members below."""

    layer: int  # k, 1-based
    # k when from_pretrained gets layer=None: round(fraction * number of decoder layers); each adapter says why
    DEFAULT_LAYER_FRACTION: float

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        layer: int | None = None,
        revision: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> Backbone:
        """The frozen MLLM from a hub id or local directory, tapped at ``layer`` (None: the family default)."""
        raise NotImplementedError

    def encode(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        decoder_frame: DecoderFrameFn | None = None,
        prefix: object | None = None,
    ) -> BackboneFeatures:
        """Run the MLLM up to decoder layer k (inclusive) on one instruction per image, and stop.

        ``decoder_frame(width, height)`` gives the mask decoder's frame of an image (the model passes
        ``decoder.frame``); the adapter pairs it with its own grid frame in ``BackboneFeatures.geometries``.
        ``prefix`` is what ``encode_prefix`` returned for the (single) image all prompts show: the adapter then
        runs only each prompt's own tokens. Results equal the plain path to float tolerance."""
        raise NotImplementedError

    def grid_frame(self, width: int, height: int) -> GridFrame:
        """How this family lays its attention grid over a ``width`` x ``height`` image."""
        raise NotImplementedError

    def encode_prefix(self, image: Image.Image) -> object | None:
        """The text-independent start of every prompt on ``image`` (template + image) through layers 1..k, for
        ``encode(prefix=...)``; None where the family cannot share one (``encode`` then runs everything)."""
        return None

    def layer_spec(self) -> LayerSpec:
        raise NotImplementedError

    def decoder_layer_state(self, index: int) -> dict[str, Tensor]:
        """State dict of decoder layer ``index`` (1-based) in the head's (Llama) parameter names:
        ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``self_attn.{q,k}_norm``, ``post_attention_layernorm``,
        ``mlp.{gate,up,down}_proj``, so ``HeadConfig.init_from_backbone`` works for every family."""
        raise NotImplementedError

    def generate(self, images: Sequence[Image.Image], instructions: Sequence[str], **kwargs) -> list[str]:
        """Answer in text with the untouched MLLM (dialogue and follow-ups in the agent)."""
        raise NotImplementedError

    def layer_attentions(
        self, images: Sequence[Image.Image], instructions: Sequence[str], **encode_kwargs: object
    ) -> tuple[BackboneFeatures, list[Tensor]]:
        """``encode`` through the LAST decoder layer, plus every layer's own attention probabilities averaged
        over heads: one (B, Lq, L) tensor per layer, rows = the last Lq positions (all L unless a shared
        prefix ran from a cache). For ``lens probe``; needs ``decoder_layers`` and eager attention (switched on
        here, restored after), which every Hugging Face decoder family supports.
        """
        from transformers import PreTrainedModel

        layers = self.decoder_layers
        model = next(m for m in self.modules() if isinstance(m, PreTrainedModel))
        captured: dict[int, Tensor] = {}

        def record(index: int) -> Callable[..., None]:
            def hook(_module: nn.Module, _args: tuple, output: tuple) -> None:
                if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                    raise RuntimeError(f"decoder layer {index + 1}'s attention returned no weights")
                captured[index] = output[1].float().mean(1)  # (B, Lq, L); a cached 2nd pass overwrites

            return hook

        previous, k = model.config._attn_implementation, self.layer
        handles = [layer.self_attn.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
        try:
            model.set_attn_implementation("eager")
            self.layer = len(layers)
            features = self.encode(images, instructions, **encode_kwargs)
        finally:
            self.layer = k
            model.set_attn_implementation(previous)
            for handle in handles:
                handle.remove()
        return features, [captured[i] for i in range(len(layers))]

    def score_continuations(
        self, image: Image.Image, instruction: str, continuations: Sequence[str]
    ) -> Tensor:
        """(C,) log-likelihood of each continuation as the start of the untouched MLLM's answer (the agent's
        router compares its labels this way, never by free generation)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> Backbone:
        # Frozen means frozen: dropout and friends stay in eval mode whatever the caller asks.
        return super().train(False)


class _EarlyExit(Exception):
    def __init__(self, hidden_states: Tensor):
        super().__init__()
        self.hidden_states = hidden_states


@contextmanager
def stop_after(layer: nn.Module) -> Iterator[None]:
    """Abort the forward pass right after ``layer`` runs, carrying its output out.

    Works for any decoder stack without re-implementing its forward: the remaining layers (18 of 32 for
    LLaVA-1.5-7B at k=14), the final norm and the LM head never run.
    """

    def hook(_module: nn.Module, _args: tuple, output: Tensor | tuple) -> None:
        raise _EarlyExit(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(forward: Callable[..., object], layer: nn.Module, **inputs: Tensor) -> Tensor:
    """Call ``forward(**inputs)`` and return the output of ``layer``, never running what follows it."""
    try:
        with stop_after(layer):
            forward(**inputs)
    except _EarlyExit as stop:
        return stop.hidden_states
    raise RuntimeError(f"{type(layer).__name__} was never called during the forward pass")
