"""Turn-level scores of an agent on the synthetic world: routing, dialogue VQA, masks and follow-ups.

Any agent with ``LensAgent``'s call signature (``lens.agent.LensAgent``, the routed LISA-style baseline
``lens.baselines.routed.RoutedSystem``) gets one conversation per scene: a dialogue turn (a VQA question), a
segmentation turn (a query with a target) and a follow-up about it, each scored against the world's answer.

    python -m lens.world.turns --lisa runs/lisa/model --scenes 100 [--oracle]
    python -m lens.world.turns --lens lens:synthetic/lens --scenes 100 [--oracle]
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import typer
from PIL import Image

from lens.agent.agent import FIXED_REPLY, NOT_FOUND_REPLY, AgentReply, LensAgent
from lens.agent.conversation import Conversation
from lens.baselines.routed import RoutedSystem
from lens.data.synthetic import Scene, SyntheticWorld
from lens.metrics import IoUAccumulator

logger = logging.getLogger(__name__)

app = typer.Typer(add_completion=False)


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


def _dump(data: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(data, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)


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
