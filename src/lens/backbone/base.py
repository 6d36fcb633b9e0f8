"""The backbone interface: what the head needs from a frozen MLLM, and nothing more.

A backbone adapter turns (images, instructions) into ``BackboneFeatures``: the hidden states after decoder
layer k, where the image and text tokens are, which token starts the answer, and the image geometry. It
also describes one decoder layer (``LayerSpec``) so the head can mirror it. Adding an MLLM family means
writing one short adapter; the head, keypoints, descriptor and SAM bridge never change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from PIL import Image
from torch import Tensor, nn

from lens.geometry import ImageGeometry


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
class LayerSpec:
    """Shape of one backbone decoder layer (pre-norm, RoPE attention, gated MLP), mirrored by the head."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False


@dataclass
class BackboneFeatures:
    """Everything the head reads from the frozen MLLM, for a batch of B prompts of padded length L.

    Tensors are plain (not inference-mode) tensors so autograd can consume them; they are also exactly
    what the feature cache stores.
    """

    hidden_states: Tensor  # (B, L, d) output of decoder layer k
    attention_mask: Tensor  # (B, L) bool, True on real (non-padding) tokens
    position_ids: Tensor  # (B, L) long, the backbone's own positions (for the head's RoPE)
    image_span: Tensor  # (B, 2) long [start, end) of the image tokens; end - start = grid_h * grid_w
    text_span: Tensor  # (B, 2) long [start, end) of the prompt tokens after the image (A_c averages these)
    answer_index: Tensor  # (B,) long: the start-of-answer token f_s (last prompt token) = text_span[:, 1] - 1
    grid_size: tuple[int, int]  # (grid_h, grid_w) of the image tokens, row-major
    geometries: list[ImageGeometry]  # per image: original size and the MLLM / SAM views
    # Prompts that show the same image agree on their first ``shared_length`` tokens (template and image);
    # the head runs those once per image. None / 0: nothing shared. Cached rows find both in ``stack_cached``.
    image_index: Tensor | None = None  # (B,) long: which distinct image each prompt shows
    shared_length: int = 0

    @property
    def image_mask(self) -> Tensor:  # (B, L) bool
        return span_mask(self.image_span, self.hidden_states.shape[1])

    @property
    def text_mask(self) -> Tensor:  # (B, L) bool
        return span_mask(self.text_span, self.hidden_states.shape[1])

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


class Backbone(nn.Module):
    """A frozen MLLM seen through the head's eyes. Subclasses implement the four members below."""

    layer: int  # k, 1-based

    def encode(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> BackboneFeatures:
        """Run the MLLM up to decoder layer k (inclusive) on one instruction per image, and stop."""
        raise NotImplementedError

    def layer_spec(self) -> LayerSpec:
        raise NotImplementedError

    def decoder_layer_state(self, index: int) -> dict[str, Tensor]:
        """State dict of decoder layer ``index`` (1-based), in LayerSpec naming, to initialise the head."""
        raise NotImplementedError

    def generate(self, images: Sequence[Image.Image], instructions: Sequence[str], **kwargs) -> list[str]:
        """Answer in text with the untouched MLLM (dialogue and follow-ups in the agent)."""
        raise NotImplementedError

    def score_continuations(
        self, image: Image.Image, instruction: str, continuations: Sequence[str]
    ) -> Tensor:
        """(C,) log-likelihood of each continuation as the start of the untouched MLLM's answer (the agent's
        router compares its labels this way, never by free generation). Added by branch `interfaces`."""
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
