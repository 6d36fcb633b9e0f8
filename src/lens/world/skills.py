"""Instruction skills of the world's MLLM beyond VQA: boxes as text, intent routing and follow-up questions.

LLaVA-1.5's instruction mix holds region data (RefCOCO, Visual Genome) whose boxes are written as normalised
coordinates in text; an MLLM that must write the box of a phrase it reads has to attend to that phrase's object.
The agent (``lens.agent``) needs two more things of its MLLM: to say which kind of request a turn is, in the
router's own prompt, and to answer about the object highlighted in a side-by-side image (Algorithm S1, line 12).
Each skill is a generator of (image, question, answer) items over a ``Scene``:

* ``box``: "please give the bounding box of the large red ring." → "[0.12, 0.30, 0.41, 0.62]"
* ``box_identify``: "what is at [0.12, 0.30, 0.41, 0.62]?" → "large red ring"
* ``intent``: ``RouterPrompt().render(turn, shots)`` → "one" / "two" / "three"
* ``follow_up``: on ``side_by_side(image, overlay_mask(image, mask))``, "what colour is it?" → "red"

Request and follow-up frames are split into seen and held-out ones; training draws only seen frames, so routing
and follow-up accuracy on held-out frames measures phrasings the model never read.

    python -m lens.world.skills evaluate lens:synthetic/mllm --scenes 100   # scores any checkpoint
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from lens.agent.agent import side_by_side
from lens.agent.router import INTENTS, Router, RouterPrompt
from lens.data.synthetic import (
    PHRASINGS,
    QA,
    Description,
    Scene,
    SceneObject,
    SyntheticWorld,
    tokenize_words,
    world_vocabulary,
)
from lens.data.synthetic.language import ATTRIBUTES
from lens.data.synthetic.phrasing import HELD_OUT
from lens.data.synthetic.queries import position_of
from lens.data.templates import LONG_QUESTION_TEMPLATES, SHORT_QUESTION_TEMPLATES
from lens.tiny import split_words
from lens.visualize import overlay_mask

logger = logging.getLogger(__name__)

SKILLS: tuple[str, ...] = ("box", "box_identify", "intent", "follow_up")

BOX_TEMPLATES: tuple[str, ...] = (
    "please give the bounding box of {target}.",
    "what is the bounding box of {target}?",
)
BOX_IDENTIFY_TEMPLATES: tuple[str, ...] = ("what is at {box}?", "which object is at {box}?")
BOX_DECIMALS = 2  # LLaVA-1.5 writes boxes with two decimals
# Two-decimal numbers tokenize as "0" "." "12" with the word tokenizer: every piece of a box's text.
NUMBER_TOKENS: tuple[str, ...] = ("0", "1", *(f"{i:02d}" for i in range(100)))
BOX_PUNCTUATION: tuple[str, ...] = ("[", "]", ",", ".")

# Segmentation requests for the router's "two"; "{q}" is a noun-phrase query. LISA's templates come on top.
REQUEST_FRAMES_SEEN: tuple[str, ...] = (
    "segment {q}.",
    "please segment {q}.",
    "show me {q}.",
    "can you find {q}?",
    "mark {q} in the image.",
)
REQUEST_FRAMES_HELD_OUT: tuple[str, ...] = (
    "highlight {q} for me.",
    "could you outline {q}?",
    "i need a mask of {q}.",
)
# Follow-up questions about the object segmented before, by what they ask; (seen, held-out) frames.
FOLLOW_UP_FRAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (
        ("what colour is it?", "what colour is the highlighted object?", "which colour does it have?"),
        ("what colour is the thing you marked?",),
    ),
    "shape": (
        ("what shape is the thing you found?", "what shape is the highlighted object?", "what shape is it?"),
        ("which shape does the marked one have?",),
    ),
    "size": (
        ("is the highlighted object large or small?", "is it small or large?"),
        ("how big is the thing you marked, small or large?",),
    ),
    "position": (
        ("where is the highlighted object?", "where is it?"),
        ("in which part of the image is the thing you marked?",),
    ),
    "name": (
        ("what is the highlighted object?", "what did you find?"),
        ("what is the thing you marked?",),
    ),
}
MAX_SHOTS = 3  # the router prompt's examples: turns are rendered with 0..3 of them
# Text tokens the router leaves beside the image and chat template (its own ``_text_budget`` margin).
ROUTER_MARGIN = 16


@dataclass(frozen=True)
class SkillItem:
    """One instruction of a skill: ``image`` is None for the scene's own image (shares its prefix row)."""

    qa: QA  # kind: the skill name
    image: np.ndarray | None = None  # (H, W', 3) uint8 when the question is about another image
    detail: str = ""  # what a follow-up asks ("colour", ...) or a turn's intent, for scoring by kind


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of a mask's pixels normalised by width / height: pixel edges, so a full mask is 0..1."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise ValueError("box_of: the mask is empty")
    height, width = mask.shape
    return (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)


def box_text(box: Sequence[float]) -> str:
    """LLaVA-1.5's text form of a box: "[0.12, 0.30, 0.41, 0.62]"."""
    return "[" + ", ".join(f"{v:.{BOX_DECIMALS}f}" for v in box) + "]"


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The four numbers of a generated box, whatever the decoder's spacing ("[ 0 . 12 , ..."); None otherwise."""
    numbers = re.findall(r"\d+(?:\.\d+)?", "".join(tokenize_words(text)))
    if len(numbers) != 4:
        return None
    x1, y1, x2, y2 = (float(n) for n in numbers)
    return x1, y1, x2, y2


def box_iou(a: Sequence[float] | None, b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 for an unparsable (None) or inverted box."""
    if a is None or a[2] <= a[0] or a[3] <= a[1]:
        return 0.0
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _name(obj: SceneObject) -> str:
    return Description.of(obj, ATTRIBUTES).phrase("")  # "large red ring"


def _noun_phrase_queries(scene: Scene) -> list[tuple[str, SceneObject]]:
    """(text, target) of the scene's referring and short reasoning queries: noun phrases with one target."""
    return [
        (q.sample.query, q.target)
        for q in scene.segmentation_queries()
        if q.target is not None and q.kind in ("referring", "reasoning_short")
    ]


def box_items(scene: Scene, rng: np.random.Generator) -> list[SkillItem]:
    """One box question per noun-phrase query of the scene; the answer is its target's visible-mask box."""
    return [
        SkillItem(QA(_pick(rng, BOX_TEMPLATES).format(target=text), box_text(box_of(t.mask)), "box"))
        for text, t in _noun_phrase_queries(scene)
    ]


def box_identify_items(scene: Scene, rng: np.random.Generator) -> list[SkillItem]:
    """The reverse: each object's box → its size, colour and shape."""
    return [
        SkillItem(
            QA(
                _pick(rng, BOX_IDENTIFY_TEMPLATES).format(box=box_text(box_of(o.mask))),
                _name(o),
                "box_identify",
            )
        )
        for o in scene.objects
        if o.mask.any()
    ]


def segmentation_requests(scene: Scene, rng: np.random.Generator, held_out: bool = False) -> list[str]:
    """User turns asking to segment something of the scene: LISA's templates and plain frames (seen ones, or
    only held-out frames), and the long reasoning queries as they are. Held-out turns word the queries in the
    world's held-out phrasing too."""
    requests = []
    for q in scene.segmentation_queries(HELD_OUT if held_out else None):
        if q.sample.is_sentence:
            requests.append(q.sample.query if held_out else _pick(rng, (q.sample.query, *_lisa_long(q))))
        elif held_out:
            requests.append(_pick(rng, REQUEST_FRAMES_HELD_OUT).format(q=q.sample.query))
        else:
            frames = (
                *REQUEST_FRAMES_SEEN,
                *(t.replace("{class_name}", "{q}") for t in SHORT_QUESTION_TEMPLATES),
            )
            query = q.sample.query
            frame = _pick(rng, frames)
            if "the {q}" in frame and query.startswith("the "):
                query = query[len("the ") :]  # as lens.data.templates.format_question does
            requests.append(frame.format(q=query))
    return requests


def _lisa_long(q: Any) -> list[str]:
    return [t.format(sent=q.sample.query) for t in LONG_QUESTION_TEMPLATES]


def follow_up_questions(held_out: bool = False) -> list[tuple[str, str]]:
    """(frame, kind) of every seen (or held-out) follow-up question."""
    return [(f, kind) for kind, frames in FOLLOW_UP_FRAMES.items() for f in frames[int(held_out)]]


def intent_turns(
    scene: Scene, rng: np.random.Generator, per_intent: int, held_out: bool = False
) -> list[tuple[str, str]]:
    """(turn, intent) pairs, ``per_intent`` of each intent (fewer when the scene has fewer)."""
    dialogue = [qa.question for qa in scene.vqa(HELD_OUT if held_out else None)]
    requests = segmentation_requests(scene, rng, held_out)
    follow = [f for f, _ in follow_up_questions(held_out)]
    turns = []
    for intent, pool in zip(INTENTS, (dialogue, requests, follow), strict=True):
        chosen = rng.choice(len(pool), size=min(per_intent, len(pool)), replace=False)
        turns += [(pool[int(i)], intent) for i in chosen]
    return turns


def router_prompt_fits(prompt: RouterPrompt, text: str, shots: int, budget: int) -> bool:
    """The router's own rule (``Router._fits``): the rendered turn, with <s>, fits ``budget`` tokens."""
    return len(split_words(prompt.render(text, shots))) + 1 <= budget


def intent_items(
    scene: Scene, rng: np.random.Generator, budget: int, per_intent: int = 2, held_out: bool = False
) -> list[SkillItem]:
    """Turns in the router's exact prompt with 0..3 shots (fewer when over ``budget`` text tokens, as the router
    drops them) → the intent's label word."""
    prompt = RouterPrompt()
    items = []
    for text, intent in intent_turns(scene, rng, per_intent, held_out):
        shots = int(rng.integers(MAX_SHOTS + 1))
        while shots > 0 and not router_prompt_fits(prompt, text, shots, budget):
            shots -= 1
        items.append(
            SkillItem(QA(prompt.render(text, shots), prompt.labels[intent], "intent"), detail=intent)
        )
    return items


def follow_up_image(scene: Scene, obj: SceneObject) -> np.ndarray:
    """(H, 2W, 3): the scene beside its copy with ``obj`` highlighted, as the agent shows a follow-up."""
    original = Image.fromarray(scene.image)
    return np.asarray(side_by_side(original, overlay_mask(original, obj.mask)))


def follow_up_answers(scene: Scene, obj: SceneObject) -> dict[str, str]:
    """What each follow-up kind answers about ``obj`` (position only when it is clearly on one side)."""
    height, width = scene.image.shape[:2]
    answers = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "name": _name(obj)}
    side = position_of(obj, height, width)
    if side:
        answers["position"] = side
    return answers


def follow_up_items(scene: Scene, rng: np.random.Generator, held_out: bool = False) -> list[SkillItem]:
    """Every follow-up question about one visible object picked at random, on its side-by-side image."""
    objects = [o for o in scene.objects if o.mask.any()]
    obj = _pick(rng, objects)
    image = follow_up_image(scene, obj)
    answers = follow_up_answers(scene, obj)
    return [
        SkillItem(QA(frame, answers[kind], "follow_up"), image=image, detail=kind)
        for frame, kind in follow_up_questions(held_out)
        if kind in answers
    ]


def skill_items(
    scene: Scene, skills: Sequence[str], rng: np.random.Generator, budget: int
) -> list[SkillItem]:
    """Training items of ``skills`` for one scene (seen frames only)."""
    makers = {
        "box": lambda: box_items(scene, rng),
        "box_identify": lambda: box_identify_items(scene, rng),
        "intent": lambda: intent_items(scene, rng, budget),
        "follow_up": lambda: follow_up_items(scene, rng),
    }
    check_skills(skills)
    return [item for skill in skills for item in makers[skill]()]


def check_skills(skills: Sequence[str]) -> None:
    unknown = sorted(set(skills) - set(SKILLS))
    if unknown:
        raise ValueError(f"unknown skills {unknown}; expected some of {list(SKILLS)}")


def router_budget(model: LlavaForConditionalGeneration) -> int:
    """Text tokens the router can use beside the image: context - image tokens - margin (``_text_budget``)."""
    return model.config.text_config.max_position_embeddings - model.config.image_seq_length - ROUTER_MARGIN


def _skill_text() -> Iterator[str]:
    prompt = RouterPrompt()
    yield from (prompt.instruction, prompt.turn_format, prompt.content_free or "", *prompt.labels.values())
    yield from (text for text, _ in prompt.examples)
    yield from (*BOX_TEMPLATES, *BOX_IDENTIFY_TEMPLATES, *REQUEST_FRAMES_SEEN, *REQUEST_FRAMES_HELD_OUT)
    yield from (*SHORT_QUESTION_TEMPLATES, *LONG_QUESTION_TEMPLATES, *NUMBER_TOKENS, *BOX_PUNCTUATION)
    for seen, held_out in FOLLOW_UP_FRAMES.values():
        yield from (*seen, *held_out)


def skill_vocabulary() -> list[str]:
    """The world's extended vocabulary plus every token the skills can write, sorted."""
    base = world_vocabulary(version=2)
    fields = re.compile(r"\{[a-z_]+\}")
    words = {t for text in _skill_text() for t in split_words(fields.sub(" ", text)) if t != "\n"}
    return sorted(set(base) | words)


# ---------------------------------------------------------------------------------------------- evaluation


def _generate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    pairs: list[tuple[np.ndarray, str]],
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    from lens.world.vqa import answer_questions  # vqa imports this module's SKILLS

    return answer_questions(model, processor, pairs, batch_size, max_new_tokens) if pairs else []


def evaluate_skills(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    scenes: Sequence[Scene],
    batch_size: int = 64,
    router_scenes: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Every skill scored on ``scenes`` by greedy generation, seen and held-out frames apart.

    box: mean IoU and acc@0.5 of the parsed box (unparsable: IoU 0); box_identify and follow-up: exact match
    (follow-up by what it asks); intent: accuracy of the generated label, by intent. With ``router_scenes``, the
    agent's own ``Router`` (label likelihoods, calibrated) on a ``LlavaBackbone`` routes the turns of that many
    scenes too.
    """
    from lens.world.vqa import exact_match

    rng = np.random.default_rng([seed, 7])
    budget = router_budget(model)
    prompt = RouterPrompt()
    words = {v: k for k, v in prompt.labels.items()}
    box, ident, intent, intent_held, follow, follow_held = [], [], [], [], [], []
    for scene in scenes:
        box += [(scene.image, i) for i in box_items(scene, rng)]
        ident += [(scene.image, i) for i in box_identify_items(scene, rng)]
        intent += [(scene.image, i) for i in intent_items(scene, rng, budget)]
        intent_held += [(scene.image, i) for i in intent_items(scene, rng, budget, held_out=True)]
        follow += [(i.image, i) for i in follow_up_items(scene, rng)]
        follow_held += [(i.image, i) for i in follow_up_items(scene, rng, held_out=True)]

    def answers(items: list[tuple[np.ndarray, SkillItem]], tokens: int) -> list[str]:
        return _generate(model, processor, [(im, i.qa.question) for im, i in items], batch_size, tokens)

    ious = [
        box_iou(parse_box(a), _numbers(i.qa.answer)) for (_, i), a in zip(box, answers(box, 20), strict=True)
    ]
    metrics: dict[str, Any] = {
        "num_scenes": len(scenes),
        "box": {
            "mean_iou": _mean(ious),
            "acc_at_0.5": _mean([iou >= 0.5 for iou in ious]),
            "num_questions": len(ious),
        },
        "box_identify": {
            "exact_match": _mean(
                [exact_match(a, i.qa.answer) for (_, i), a in zip(ident, answers(ident, 6), strict=True)]
            ),
            "num_questions": len(ident),
        },
    }
    for name, items in (("intent", intent), ("intent_heldout", intent_held)):
        said = [words.get(" ".join(tokenize_words(a)), "none") for a in answers(items, 2)]
        metrics[name] = _by_detail([(i.detail, s == i.detail) for (_, i), s in zip(items, said, strict=True)])
    for name, items in (("follow_up", follow), ("follow_up_heldout", follow_held)):
        said = answers(items, 6)
        metrics[name] = _by_detail(
            [(i.detail, exact_match(a, i.qa.answer)) for (_, i), a in zip(items, said, strict=True)]
        )
    if router_scenes:
        metrics["intent_router"] = _route(model, processor, scenes[:router_scenes], budget, seed)
    return metrics


def _route(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    scenes: Sequence[Scene],
    budget: int,
    seed: int,
) -> dict[str, Any]:
    """The agent's router as it runs (3 shots, dropped to fit; calibrated), on seen and held-out turns."""
    from lens.backbone.llava import LlavaBackbone

    router = Router(LlavaBackbone(model, processor), RouterPrompt(), max_prompt_tokens=budget)
    rng = np.random.default_rng([seed, 8])
    out = {}
    for name, held_out in (("seen", False), ("heldout", True)):
        results = []
        for scene in scenes:
            image = Image.fromarray(scene.image)
            for text, intent in intent_turns(scene, rng, 2, held_out):
                results.append((intent, router(text, image).intent == intent))
        out[name] = _by_detail(results)
    return out


def _numbers(text: str) -> tuple[float, float, float, float]:
    box = parse_box(text)
    assert box is not None, text
    return box


def _mean(values: Sequence[float | bool]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _by_detail(results: Sequence[tuple[str, bool]]) -> dict[str, Any]:
    by: dict[str, list[bool]] = defaultdict(list)
    for detail, right in results:
        by[detail].append(right)
    return {
        "accuracy": _mean([r for _, r in results]),
        "by_kind": {k: _mean(v) for k, v in sorted(by.items())},
        "num_questions": len(results),
    }


app = typer.Typer(add_completion=False)


@app.command()
def evaluate(
    model_dir: Annotated[str, typer.Argument(help="checkpoint directory or lens:synthetic/mllm")],
    scenes: Annotated[int, typer.Option(help="first test scenes to score on")] = 100,
    router_scenes: Annotated[
        int, typer.Option(help="scenes also routed by the agent's Router (0: none)")
    ] = 20,
    batch_size: Annotated[int, typer.Option(help="questions per generate call")] = 64,
    num_threads: Annotated[int, typer.Option(help="CPU threads for torch")] = 1,
    vqa_scenes: Annotated[
        int, typer.Option(help="first test scenes whose VQA is also scored in every phrasing (0: none)")
    ] = 0,
    out: Annotated[Path | None, typer.Option(help="write the metrics here as JSON")] = None,
) -> None:
    """Score a checkpoint on every skill (the shipped MLLM never trained on them: a baseline), and with
    ``--vqa-scenes`` its VQA worded canonically, in the seen varied phrasing and in the held-out one."""
    from lens.assets import checkpoint_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(num_threads)
    source = checkpoint_dir(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(source).eval()
    processor = AutoProcessor.from_pretrained(source)
    test = SyntheticWorld().split("test")[:scenes]
    metrics = evaluate_skills(model, processor, test, batch_size, router_scenes)
    if vqa_scenes:
        from lens.world.vqa import evaluate_vqa  # vqa imports this module

        asked = SyntheticWorld().split("test")[:vqa_scenes]
        metrics["vqa_by_phrasing"] = {
            p: evaluate_vqa(model, processor, asked, batch_size, phrasing=p) for p in PHRASINGS
        }
    text = json.dumps(metrics, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    typer.echo(text)


@app.command()
def vocabulary() -> None:
    """Print the extended vocabulary, one token a line."""
    typer.echo("\n".join(skill_vocabulary()))


if __name__ == "__main__":
    app()
