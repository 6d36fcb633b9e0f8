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

What it costs is memory: two MLLMs instead of one (``memory_report``). ``score_turns`` scores any agent with
``LensAgent``'s call signature on the synthetic world's turns (routing, VQA, gIoU, follow-ups).

    python -m lens.baselines.routed memory --lisa runs/lisa/model
    python -m lens.baselines.routed score --lisa runs/lisa/model --scenes 100
    python -m lens.baselines.routed score --lens lens:synthetic/lens --scenes 100
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import torch
import typer
from PIL import Image
from torch import nn

from lens.agent.agent import FIXED_REPLY, NOT_FOUND_REPLY, AgentReply, LensAgent
from lens.agent.conversation import Conversation
from lens.agent.router import Route, Router, RouterPrompt
from lens.assets import SYNTHETIC_LENS, resolve_model_id
from lens.backbone import Backbone, load_backbone
from lens.baselines.lisa import LisaModel
from lens.data.synthetic import Scene, SyntheticWorld
from lens.images import DEFAULT_MAX_PIXELS, load_image
from lens.metrics import IoUAccumulator
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
        from lens.weights import checkpoint_config, load_lens

        _, config = checkpoint_config(lisa_checkpoint)
        lisa = load_lens(lisa_checkpoint, device)  # its own MLLM copy, fine-tuned in place, and SAM
        if not isinstance(lisa, LisaModel):
            raise ValueError(
                f"{lisa_checkpoint} holds a {config.baseline.system or 'LENS'} model, not a LISA-style one"
            )
        # As lens.weights.load_frozen loads it, without a second SAM: only the MLLM is needed twice.
        original = dataclasses.replace(config.backbone, model_id=resolve_model_id(config.backbone.model_id))
        return cls(load_backbone(original, device=device).eval(), LisaPipeline(lisa), **kwargs)

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


class Agent(Protocol):
    """What ``score_turns`` drives: ``LensAgent``'s call."""

    def __call__(
        self, conversation: Conversation, text: str, image: Any | None = None, intent: str | None = None
    ) -> AgentReply: ...


@dataclass(frozen=True)
class SceneTurns:
    """One scene's conversation: a VQA question, a segmentation request, a follow-up about its target."""

    image: np.ndarray  # (H, W, 3) uint8
    question: str  # dialogue
    answer: str
    request: str  # segmentation, worded as the router's training turns are (lens.world.skills)
    mask: np.ndarray  # (H, W) uint8 target of the request
    follow_up: str
    follow_up_answer: str  # about the request's target


def scene_turns(scene: Scene, rng: np.random.Generator, held_out: bool = False) -> SceneTurns:
    """A random non-caption VQA question, a request for one of the scene's targets, and a follow-up on it;
    ``held_out``: in the world's held-out phrasing and frames, which no model trained on."""
    from lens.data.synthetic.phrasing import HELD_OUT
    from lens.world.skills import follow_up_answers, follow_up_questions, segmentation_requests
    from lens.world.vqa import CAPTION_KIND

    phrasing = HELD_OUT if held_out else None
    questions = [qa for qa in scene.vqa(phrasing) if qa.kind != CAPTION_KIND]
    qa = questions[int(rng.integers(len(questions)))]
    requests = segmentation_requests(scene, rng, held_out)  # one per query, in the queries' order
    queries = scene.segmentation_queries(phrasing)
    targeted = [(r, q) for r, q in zip(requests, queries, strict=True) if q.target is not None]
    request, query = targeted[int(rng.integers(len(targeted)))]
    answers = follow_up_answers(scene, query.target)
    frames = [(f, kind) for f, kind in follow_up_questions(held_out) if kind in answers]
    frame, kind = frames[int(rng.integers(len(frames)))]
    return SceneTurns(scene.image, qa.question, qa.answer, request, query.sample.mask, frame, answers[kind])


def is_segmentation_reply(reply: AgentReply, seg_token: str = "[SEG]") -> bool:
    """Whether a reply is a segmentation's: a mask came with it, or its text is a segmentation reply."""
    return (
        reply.intent == "segmentation"
        or reply.segmentation is not None
        or seg_token in reply.text
        or reply.text in (FIXED_REPLY, NOT_FOUND_REPLY)
    )


def _mean(values: Sequence[float | bool]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def score_turns(
    system: Agent,
    scenes: Sequence[Scene],
    seed: int = 0,
    oracle: bool = False,
    follow_up: bool = True,
    held_out: bool = False,
    seg_token: str = "[SEG]",
) -> dict[str, Any]:
    """Each scene as one conversation (dialogue, segmentation, follow-up turn) through ``system``.

    Arguments:
        system: anything with ``LensAgent``'s call (``RoutedSystem``, ``LensAgent``).
        scenes: synthetic-world scenes (``SyntheticWorld().split("test")[:n]``).
        oracle: give each turn its true intent (the router is skipped; its accuracy is then 1 by design).
        follow_up: also ask the follow-up turn.
        held_out: word the turns in the world's held-out phrasing and frames (``scene_turns``).

    Returns:
        router accuracy (overall, by intent, confusion), the dialogue turns' VQA exact match and fraction of
        segmentation-style replies, the segmentation turns' gIoU / cIoU (a turn not segmented scores an empty
        mask), and the follow-ups' exact match.
    """
    from lens.world.vqa import exact_match

    rng = np.random.default_rng([seed, 27])
    routed: dict[str, list[str]] = defaultdict(list)
    vqa, seg_style, follow = [], [], []
    ious = IoUAccumulator()
    start = time.perf_counter()
    for scene in scenes:
        turns = scene_turns(scene, rng, held_out)
        conversation = Conversation()
        conversation.add_image(Image.fromarray(turns.image))
        asked = [(turns.question, "dialogue"), (turns.request, "segmentation")]
        asked += [(turns.follow_up, "follow_up")] if follow_up else []
        for text, intent in asked:
            reply = system(conversation, text, intent=intent if oracle else None)
            routed[intent].append(reply.routed)
            if intent == "dialogue":
                vqa.append(exact_match(reply.text, turns.answer))
                seg_style.append(is_segmentation_reply(reply, seg_token))
            elif intent == "segmentation":  # a turn answered without a mask scores an empty one
                shown = None if reply.segmentation is None else reply.segmentation.mask
                pred = np.zeros(turns.mask.shape, bool) if shown is None else np.asarray(shown, bool)
                ious.update(pred, turns.mask)
            else:
                follow.append(exact_match(reply.text, turns.follow_up_answer))
    turns_done = sum(len(v) for v in routed.values())
    segmentation = ious.compute()
    return {
        "num_scenes": len(scenes),
        "oracle": oracle,
        "held_out": held_out,
        "router": {
            "accuracy": _mean([r == i for i, rs in routed.items() for r in rs]),
            "by_intent": {i: _mean([r == i for r in rs]) for i, rs in routed.items()},
            "confusion": {i: dict(Counter(rs)) for i, rs in routed.items()},
        },
        "dialogue": {
            "vqa_exact_match": _mean(vqa),
            "segmentation_style_fraction": _mean(seg_style),
            "num_turns": len(vqa),
        },
        "segmentation": {
            "giou": float(segmentation["giou"]),
            "ciou": float(segmentation["ciou"]),
            "num_turns": int(segmentation["count"]),
        },
        "follow_up": {"exact_match": _mean(follow), "num_turns": len(follow)},
        "seconds_per_turn": (time.perf_counter() - start) / max(turns_done, 1),
    }


# ----------------------------------------------------------------------------------------------------------
# Command line


app = typer.Typer(add_completion=False)


def _dump(data: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(data, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)


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


@app.command()
def score(
    lisa: Annotated[Path | None, typer.Option(help="score the routed system on this LISA checkpoint")] = None,
    lens: Annotated[str | None, typer.Option(help="score LensAgent on this LENS checkpoint instead")] = None,
    scenes: Annotated[int, typer.Option(help="first scenes of the split, one conversation each")] = 100,
    split: Annotated[str, typer.Option(help="synthetic-world split")] = "test",
    oracle: Annotated[bool, typer.Option(help="give every turn its true intent (no router)")] = False,
    held_out: Annotated[bool, typer.Option(help="turns in the world's held-out phrasing")] = False,
    seed: Annotated[int, typer.Option(help="draws the turns of each scene")] = 0,
    device: Annotated[str, typer.Option(help="where the models are loaded")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="also write the scores here as JSON")] = None,
) -> None:
    """Turn-level scores (routing, VQA, gIoU, follow-ups) of the routed system or of LensAgent."""
    if (lisa is None) == (lens is None):
        raise typer.BadParameter("give exactly one of --lisa and --lens")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if lisa is not None:
        system: Agent = RoutedSystem.from_checkpoint(lisa, device)
    else:
        from lens.pipeline import LensPipeline

        system = LensAgent(LensPipeline.from_pretrained(lens, device=device))
    chosen = SyntheticWorld().split(split)[:scenes]
    result = score_turns(system, chosen, seed=seed, oracle=oracle, held_out=held_out)
    result.update(system="routed_lisa" if lisa is not None else "lens_agent", checkpoint=str(lisa or lens))
    result["split"] = split
    _dump(result, out)


if __name__ == "__main__":
    app()
