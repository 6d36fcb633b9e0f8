"""Intent routing by label likelihood (Algorithm S1, line 1): the frozen MLLM scores each label, never generates.

The few-shot prompt lists the three intents with one-word labels and a handful of worked examples, then the
user's turn; the router compares log P(label | prompt, image) of the three labels and takes the largest.
Labels are number words ("one", "two", "three") because every tokenizer we ship for has them as single
tokens, including the synthetic world's 181-word one (where "dialogue" or "segmentation" would be unknown).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from lens.backbone import Backbone

INTENTS: tuple[str, ...] = ("dialogue", "segmentation", "follow_up")


@dataclass
class RouterPrompt:
    """The few-shot prompt; every field is text the MLLM reads, so it is the router's whole "training"."""

    labels: dict[str, str] = field(
        default_factory=lambda: {"dialogue": "one", "segmentation": "two", "follow_up": "three"}
    )
    instruction: str = (
        "which kind of request is this? one: a question about the image. two: a request to segment "
        "something. three: a question about the object segmented before."
    )
    examples: tuple[tuple[str, str], ...] = (
        ("what colour is the ring?", "dialogue"),
        ("please segment the red star.", "segmentation"),
        ("what shape is the thing you found?", "follow_up"),
    )
    turn_format: str = "request: {text} kind:"
    # Contextual calibration ("Calibrate Before Use", Zhao et al. 2021): label scores minus their scores for
    # this content-free turn, which removes the MLLM's prior preference for one label word.
    content_free: str | None = "n/a"

    def __post_init__(self) -> None:
        if set(self.labels) != set(INTENTS) or len(set(self.labels.values())) != len(INTENTS):
            raise ValueError(f"labels must name each of {INTENTS} with a distinct word, got {self.labels}")
        for _, intent in self.examples:
            if intent not in INTENTS:
                raise ValueError(f"example intent {intent!r} is not one of {INTENTS}")

    def render(self, text: str, shots: int | None = None) -> str:
        examples = self.examples if shots is None else self.examples[len(self.examples) - shots :]
        lines = [self.instruction]
        lines += [f"{self.turn_format.format(text=t)} {self.labels[i]}" for t, i in examples]
        lines.append(self.turn_format.format(text=text.strip()))
        return " ".join(lines)


@dataclass
class Route:
    intent: str  # one of INTENTS
    log_likelihoods: dict[str, float]  # per intent (minus the content-free turn's when calibrated)


class Router:
    """Classifies a user turn with the MLLM's own label likelihoods.

    Arguments:
        backbone: the frozen MLLM (any ``Backbone`` with ``score_continuations``).
        prompt: the few-shot prompt; examples are dropped (oldest first) when the prompt would not fit
            ``max_prompt_tokens``.
    """

    def __init__(
        self, backbone: Backbone, prompt: RouterPrompt | None = None, max_prompt_tokens: int | None = None
    ):
        self.backbone = backbone
        self.prompt = prompt or RouterPrompt()
        self.max_prompt_tokens = (
            max_prompt_tokens if max_prompt_tokens is not None else _text_budget(backbone)
        )

    def _fits(self, text: str) -> bool:
        if self.max_prompt_tokens is None:
            return True
        tokenizer = getattr(getattr(self.backbone, "processor", None), "tokenizer", None)
        return tokenizer is None or len(tokenizer(text)["input_ids"]) <= self.max_prompt_tokens

    def __call__(self, text: str, image: Image.Image) -> Route:
        shots = len(self.prompt.examples)
        prompt = self.prompt.render(text, shots)
        while shots > 0 and not self._fits(prompt):
            shots -= 1
            prompt = self.prompt.render(text, shots)
        labels = [" " + self.prompt.labels[i] for i in INTENTS]
        scores = self.backbone.score_continuations(image, prompt, labels)  # (3,)
        if self.prompt.content_free is not None:
            blank = self.prompt.render(self.prompt.content_free, shots)
            scores = scores - self.backbone.score_continuations(image, blank, labels)
        best = int(torch.as_tensor(scores).argmax())
        return Route(INTENTS[best], {i: float(s) for i, s in zip(INTENTS, scores, strict=True)})

    def batch(self, texts: Sequence[str], images: Sequence[Image.Image]) -> list[Route]:
        return [self(t, i) for t, i in zip(texts, images, strict=True)]


def _text_budget(backbone: Backbone, margin: int = 16) -> int | None:
    """Text tokens that fit the MLLM's context beside the image and chat template (None: unknown)."""
    config = getattr(getattr(backbone, "model", None), "config", None)
    context = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    grid = getattr(backbone, "grid_size", None)
    if context is None or grid is None:
        return None
    return context - int(grid[0]) * int(grid[1]) - margin
