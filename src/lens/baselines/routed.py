"""The routed LISA-style baseline: LENS's router in front of two models, the original MLLM and a fine-tuned LISA.

A reviewer's fair comparison for the agent (``lens.agent``): fine-tuning the MLLM for segmentation costs it
its chat (docs/results.md), so a deployment that wants both could keep the original MLLM for dialogue and call
a separately fine-tuned LISA only for masks. ``RoutedSystem`` is that deployment, turn for turn as
``LensAgent`` (Algorithm S1): the same router (``Router`` with ``RouterPrompt()`` on the original, untouched
MLLM) sends each user turn to

* dialogue: the original MLLM's ``generate``;
* segmentation (or a follow-up with nothing in memory): the fine-tuned LISA-style model (``lens.baselines.lisa``),
  whose mask goes to the conversation's memory and whose reply is LISA's own answer ("Sure, it is [SEG].");
* follow-up: the original MLLM on the original image beside its overlay, exactly as ``LensAgent`` does.

What it costs is memory: two MLLMs instead of one (``memory_report``). ``lens.world.turns`` scores it, or any
agent with ``LensAgent``'s call signature, on the synthetic world's turns (routing, VQA, gIoU, follow-ups).

    python -m lens.baselines.routed memory --lisa runs/lisa/model
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from PIL import Image
from torch import nn

from lens.agent.agent import AgentReply, LensAgent
from lens.agent.conversation import Conversation
from lens.agent.router import Route, Router, RouterPrompt
from lens.assets import SYNTHETIC_LENS
from lens.backbone import Backbone
from lens.baselines.lisa import LisaModel
from lens.images import DEFAULT_MAX_PIXELS, load_image
from lens.model import LensModel
from lens.pipeline import Segmentation, instruction

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# LISA behind LensPipeline's call


class LisaPipeline:
    """A LISA-style model behind ``LensPipeline``'s ``pipe(image, query) -> Segmentation``.

    The query gets LENS's instruction template (``lens.pipeline.instruction``), as LensAgent's segmentation
    turns do and as LISA was trained. LISA has no presence calibration: ``present`` means a non-empty mask.

    Arguments:
        model: a trained ``LisaModel`` (or a subclass: READ); put in eval mode.
        max_pixels: larger images are refused before decoding.
        raw_queries: pass queries to the MLLM as written instead of in the training template.
    """

    def __init__(
        self, model: LisaModel, max_pixels: int | None = DEFAULT_MAX_PIXELS, raw_queries: bool = False
    ):
        if not isinstance(model, LisaModel):
            raise ValueError(f"LisaPipeline needs a LisaModel, got {type(model).__name__}")
        self.model = model.eval()
        self.max_pixels, self.raw_queries = max_pixels, raw_queries

    @property
    def reply(self) -> str:
        """LISA's answer to a segmentation request: the mask is decoded from its [SEG] state (teacher-forced,
        as LISA validates), so this is the reply that goes with the mask."""
        return self.model.config.baseline.answer

    @torch.inference_mode()
    def __call__(self, image: Any, query: str) -> Segmentation:
        start = time.perf_counter()
        picture = load_image(image, max_pixels=self.max_pixels)
        inputs = self.model.prepare([picture], [instruction(query, self.raw_queries)])
        out = self.model(inputs)
        logits = out.mask_logits[0].float()  # (H, W) at the original size
        mask = (logits > self.model.config.decoder.mask_threshold).cpu().numpy()
        geometry = inputs.geometries[0]
        gh, gw = geometry.grid_size
        return Segmentation(
            query=query,
            mask=mask,
            present=bool(mask.any()),
            presence=None,
            score=float(out.iou_scores[0]),
            keypoints=np.zeros((0, 2), np.float32),  # LISA prompts SAM with one embedding, no points
            keypoints_inside=np.zeros(0, bool),
            attention_map=out.attention_map[0, :gh, :gw].float().cpu().numpy(),
            geometry=geometry,
            image=picture,
            timings={"predict_s": time.perf_counter() - start, "queries": 1},
        )


# ----------------------------------------------------------------------------------------------------------
# The routed system


class RoutedSystem(LensAgent):
    """Router and chat on the original MLLM, masks from a separately fine-tuned LISA: ``LensAgent``'s call.

    ``system(conversation, text, image=None, intent=None) -> AgentReply``; ``intent`` skips the router (oracle).
    Dialogue and follow-up turns run ``LensAgent``'s own code on ``backbone``; segmentation turns run LISA.

    Arguments:
        backbone: the original MLLM, never fine-tuned (a different copy from ``lisa.model.backbone``: LISA's
            fine-tuning changes its model and tokenizer in place).
        lisa: the fine-tuned system (``LisaPipeline``).
        router: intent classifier (default: ``Router(backbone, RouterPrompt())``, as LensAgent's).
        max_new_tokens: length of dialogue and follow-up answers.
    """

    def __init__(
        self,
        backbone: Backbone,
        lisa: LisaPipeline,
        router: Router | None = None,
        max_new_tokens: int = 32,
    ):
        if backbone is lisa.model.backbone:
            raise ValueError("the original MLLM must be its own copy, not the fine-tuned one")
        self.pipeline = lisa  # what LensAgent segments with
        self.backbone = backbone  # what LensAgent chats with
        self.router = router or Router(backbone, RouterPrompt())
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_checkpoint(
        cls, lisa_checkpoint: str | Path, device: str | torch.device = "cpu", **kwargs: Any
    ) -> RoutedSystem:
        """The fine-tuned system from its checkpoint, and once more the original MLLM its config names."""
        from lens.weights import checkpoint_config, load_frozen_backbone, load_lens

        _, config = checkpoint_config(lisa_checkpoint)
        lisa = load_lens(lisa_checkpoint, device)  # its own MLLM copy, fine-tuned in place, and SAM
        if not isinstance(lisa, LisaModel):
            raise ValueError(
                f"{lisa_checkpoint} holds a {config.baseline.system or 'LENS'} model, not a LISA-style one"
            )
        # Without a second SAM: only the MLLM is needed twice.
        return cls(load_frozen_backbone(config, device).eval(), LisaPipeline(lisa), **kwargs)

    @classmethod
    def from_pretrained(cls, checkpoint: str = "", **kwargs: Any) -> RoutedSystem:  # type: ignore[override]
        """LensAgent's loader, here of a LISA checkpoint (there is no shipped one)."""
        if not checkpoint:
            raise ValueError("RoutedSystem needs a LISA-style checkpoint directory")
        return cls.from_checkpoint(checkpoint, **kwargs)

    def _act(
        self,
        conversation: Conversation,
        text: str,
        image: Image.Image,
        routed: str,
        route: Route | None,
        timings: dict[str, float],
    ) -> AgentReply:
        reply = super()._act(conversation, text, image, routed, route, timings)
        if reply.intent == "segmentation":  # LISA answers with its own words, not LensAgent's
            reply.text = self.pipeline.reply
        return reply


# ----------------------------------------------------------------------------------------------------------
# Memory


def tensor_bytes(modules: Iterable[nn.Module], seen: set[Any] | None = None) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor once (by device and data pointer).

    ``seen`` (updated in place) holds tensors counted before, which are not counted again: shared or tied
    weights, and what an earlier part of a deployment already holds.
    """
    seen = set() if seen is None else seen
    total = 0
    for module in modules:
        for tensor in chain(module.parameters(), module.buffers()):
            pointer = tensor.data_ptr()
            key = (str(tensor.device), pointer) if pointer else ("id", id(tensor))  # meta / empty tensors
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def deployment_bytes(parts: dict[str, Sequence[nn.Module]]) -> dict[str, Any]:
    """Bytes each named part holds beyond the parts before it, and their total (shared tensors once)."""
    seen: set[Any] = set()
    counted = {name: tensor_bytes(modules, seen) for name, modules in parts.items()}
    return {"total_bytes": sum(counted.values()), "parts": counted}


def lens_parts(model: LensModel) -> dict[str, Sequence[nn.Module]]:
    """LENS: one frozen MLLM, SAM, and the rest of the model (head, keypoints, descriptor)."""
    return {"mllm": [model.backbone], "sam": [model.decoder], "head_descriptor": [model]}


def lisa_parts(model: LisaModel) -> dict[str, Sequence[nn.Module]]:
    """LISA alone: the fine-tuned MLLM (base weights, LoRA, new embeddings and LM head), SAM, the projection."""
    return {"fine_tuned_mllm": [model.backbone], "sam": [model.decoder], "projection": [model]}


def routed_parts(system: RoutedSystem) -> dict[str, Sequence[nn.Module]]:
    """The routed deployment: the original MLLM next to everything LISA holds."""
    return {"original_mllm": [system.backbone], **lisa_parts(system.pipeline.model)}


def _base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")  # peft keeps a LoRA layer's frozen weight as base_layer


def shared_frozen_bytes(original: nn.Module, fine_tuned: nn.Module) -> int:
    """Bytes of ``original``'s tensors equal (name, shape, dtype, values) to one of ``fine_tuned``'s: what a
    deployment holding one copy of the frozen weights, swapping LISA's trained tensors in and out per turn,
    would not need twice. Not a deployment we run: the lower bound on the routed system's second MLLM."""
    theirs = {
        _base_name(n): t
        for n, t in chain(fine_tuned.named_parameters(), fine_tuned.named_buffers())
        if "lora_" not in n
    }
    shared = 0
    for name, tensor in chain(original.named_parameters(), original.named_buffers()):
        other = theirs.get(name)
        if (
            other is not None
            and other.shape == tensor.shape
            and other.dtype == tensor.dtype
            and torch.equal(other.detach().cpu(), tensor.detach().cpu())
        ):
            shared += tensor.numel() * tensor.element_size()
    return shared


def memory_report(lens: LensModel, routed: RoutedSystem) -> dict[str, Any]:
    """What each deployment holds in parameters and buffers: LENS, routed LISA, LISA alone."""
    lisa = routed.pipeline.model
    report = {
        "lens": deployment_bytes(lens_parts(lens)),
        "routed_lisa": deployment_bytes(routed_parts(routed)),
        "lisa": deployment_bytes(lisa_parts(lisa)),
    }
    shared = shared_frozen_bytes(routed.backbone.model, lisa.backbone.model)
    report["routed_lisa"]["original_mllm_equal_to_fine_tuned_bytes"] = shared
    for name in ("routed_lisa", "lisa"):
        report[name]["relative_to_lens"] = report[name]["total_bytes"] / report["lens"]["total_bytes"]
    return report


def memory_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (MiB)."""
    names = {"lens": "LENS", "routed_lisa": "routed LISA", "lisa": "LISA alone"}
    lines = ["| deployment | parts (MiB) | total (MiB) | × LENS |", "|---|---|---:|---:|"]
    for key, label in names.items():
        entry = report[key]
        parts = ", ".join(f"{p} {b / 2**20:.2f}" for p, b in entry["parts"].items())
        ratio = entry.get("relative_to_lens", 1.0)
        lines.append(f"| {label} | {parts} | {entry['total_bytes'] / 2**20:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Turn-level scoring


def _dump(data: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(data, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)


app = typer.Typer(add_completion=False)


@app.callback()
def _commands() -> None:
    """The routed LISA-style baseline (``memory``; turn scores are ``python -m lens.world.turns``)."""


@app.command()
def memory(
    lisa: Annotated[Path, typer.Option(help="checkpoint directory of the fine-tuned LISA-style system")],
    lens: Annotated[str, typer.Option(help="LENS checkpoint (directory or lens: asset)")] = SYNTHETIC_LENS,
    device: Annotated[str, typer.Option(help="where the models are loaded")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="also write the report here as JSON")] = None,
) -> None:
    """Parameter + buffer bytes of LENS, the routed LISA deployment and LISA alone (shared tensors once)."""
    from lens.weights import load_lens

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = memory_report(load_lens(lens, device), RoutedSystem.from_checkpoint(lisa, device))
    report["checkpoints"] = {"lens": lens, "lisa": str(lisa)}
    typer.echo(memory_table(report))
    _dump(report, out)


if __name__ == "__main__":
    app()
