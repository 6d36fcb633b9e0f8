"""What can be said about a scene: VQA pairs and captions, and segmentation queries with their target masks.

Every question or query is asked only when its answer is unambiguous: a description is used only when exactly
one visible object fits it, and spatial words only when the centres involved are clearly apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import NamedTuple, TypeVar

import numpy as np

from lens.data.synthetic.language import (
    ATTRIBUTES,
    CAPTION,
    CLUE_JOIN,
    COLOUR_CLUES,
    EXTREME_REFERRING,
    EXTREMES,
    NO,
    NUMBER_WORDS,
    REASONING_LONG,
    REASONING_NOUNS,
    REASONING_SHORT,
    RELATIONAL_REFERRING,
    RELATIONS,
    SHAPE_CLUES,
    SIDES,
    VQA_TEMPLATES,
    YES,
    Description,
    join_list,
)
from lens.data.synthetic.phrasing import Phraser, Ref
from lens.data.synthetic.scene import COLOURS, SHAPES, SceneObject
from lens.data.types import Sample

T = TypeVar("T")

QUERY_KINDS: tuple[str, ...] = ("referring", "reasoning_short", "reasoning_long", "no_target")
SOURCE = "synthetic"

RELATION_GAP = 0.08  # centres closer than this (fraction of the image side) along an axis are neither side
POSITION_OFFSET = 0.15  # "where is X?" needs X's centre this far (fraction of the side) from the image centre
POSITION_DOMINANCE = 0.5  # ... and its offset along the other axis at most this fraction of that

# Attribute subsets a referring description may say; reasoning clues exist for colour and shape only.
ATTRIBUTE_SETS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour",),
    ("size",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour"),
    ("size", "colour", "shape"),
)
CLUE_SETS: tuple[tuple[str, ...], ...] = (("shape",), ("colour",), ("colour", "shape"))
# (axis, sign): axis 0 is x, 1 is y; sign -1 means "smaller coordinate" (left / up).
_RELATION_AXES = dict(zip(RELATIONS, ((0, -1), (0, 1), (1, -1), (1, 1)), strict=True))
_EXTREME_AXES = dict(zip(EXTREMES, ((0, -1), (0, 1), (1, -1), (1, 1)), strict=True))


class QA(NamedTuple):
    question: str
    answer: str
    kind: str  # a key of VQA_TEMPLATES


@dataclass(frozen=True)
class SegQuery:
    """A segmentation sample and how it was made.

    Attributes:
        sample: image, query text and target mask (all zeros for ``no_target``).
        kind: one of ``QUERY_KINDS``.
        target: the object the query describes; None for ``no_target``.
        ref: what the query says (attributes, relation, extreme or clues), whatever its phrasing.
    """

    sample: Sample
    kind: str
    target: SceneObject | None
    ref: Ref | None = None


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def unique_descriptions(
    obj: SceneObject, objects: Sequence[SceneObject], attribute_sets: Sequence[Sequence[str]] = ATTRIBUTE_SETS
) -> list[Description]:
    """The descriptions of ``obj`` (one per attribute set) that fit no other object of ``objects``."""
    descriptions = [Description.of(obj, attributes) for attributes in attribute_sets]
    return [d for d in descriptions if sum(d.matches(o) for o in objects) == 1]


def _side(delta: float, gap: float) -> int:
    return -1 if delta <= -gap else 1 if delta >= gap else 0


def relation_holds(a: SceneObject, b: SceneObject, relation: str, gap: float) -> bool | None:
    """Whether ``a`` is ``relation`` (e.g. "left of") ``b``; None when their centres are too close to tell."""
    axis, sign = _RELATION_AXES[relation]
    side = _side(a.centre[axis] - b.centre[axis], gap)
    return None if side == 0 else side == sign


def position_of(obj: SceneObject, height: int, width: int) -> str | None:
    """The side of the image ("left", "right", "top", "bottom") holding ``obj``; None if central or diagonal."""
    offsets = ((obj.centre[0] - width / 2) / width, (obj.centre[1] - height / 2) / height)
    main = int(abs(offsets[1]) > abs(offsets[0]))  # 0: horizontal, 1: vertical
    if abs(offsets[main]) < POSITION_OFFSET or abs(offsets[1 - main]) > POSITION_DOMINANCE * abs(
        offsets[main]
    ):
        return None
    return SIDES[2 * main + int(offsets[main] > 0)]


def extreme_of(candidates: Sequence[SceneObject], extreme: str, gap: float) -> SceneObject | None:
    """The one candidate that is clearly the ``extreme`` (e.g. "leftmost"), if any and if there are two or more."""
    axis, sign = _EXTREME_AXES[extreme]
    ordered = sorted(candidates, key=lambda o: sign * o.centre[axis], reverse=True)  # most extreme first
    if len(ordered) < 2 or sign * (ordered[0].centre[axis] - ordered[1].centre[axis]) < gap:
        return None
    return ordered[0]


def _said(desc: Description, article: str = "the") -> Ref:
    """``desc`` as a canonical noun phrase ("the red ring", "a red ring", "red rings")."""
    return Ref(desc, desc.plural() if article == "plural" else desc.phrase(article), article=article)


def caption(objects: Sequence[SceneObject], background: str) -> str:
    """One sentence naming every object, left to right."""
    ordered = sorted(objects, key=lambda o: o.centre[0])
    names = [Description.of(o, ATTRIBUTES).phrase("a") for o in ordered]
    return CAPTION.format(objects=join_list(names), background=background)


def scene_vqa(
    objects: Sequence[SceneObject],
    background: str,
    height: int,
    width: int,
    rng: np.random.Generator,
    phraser: Phraser | None = None,
) -> list[QA]:
    """Questions with one-word answers about every object, count and pair, a caption, and "identify" questions.

    An identify question names the object a referring expression or a reasoning clue picks out ("what is the
    thing that has five points?" → "small red star"); its answer is the object's size, colour and shape.
    ``rng`` chooses what is asked (and the canonical wording); a ``phraser`` (with its own generator) rewords
    each question, so every phrasing asks the same questions with the same answers.
    """
    gap = RELATION_GAP * min(height, width)
    qas: list[QA] = []

    def ask(kind: str, answer: str, **slots: Ref | str) -> None:
        template = _pick(rng, VQA_TEMPLATES[kind])
        if phraser is not None:
            question = phraser.question(kind, slots)
        else:
            question = template.format(**{k: v if isinstance(v, str) else v.text for k, v in slots.items()})
        qas.append(QA(question, answer, kind))

    for obj in objects:
        described = unique_descriptions(obj, objects)
        for attribute in ("colour", "shape", "size"):  # never name the attribute asked about
            usable = [d for d in described if attribute not in d.attributes]
            if usable:
                ask(attribute, getattr(obj, attribute), target=_said(_pick(rng, usable)))
        side = position_of(obj, height, width)
        if side and described:
            ask("position", side, target=_said(_pick(rng, described)))

    shapes = sorted({o.shape for o in objects})
    absent_shapes = [s for s in SHAPES if s not in shapes]
    counted = [Description(shape=s) for s in shapes + ([_pick(rng, absent_shapes)] if absent_shapes else [])]
    counted += [Description(colour=c) for c in sorted({o.colour for o in objects})] + [Description()]
    for desc in counted:
        ask("count", NUMBER_WORDS[sum(desc.matches(o) for o in objects)], things=_said(desc, "plural"))

    present = sorted({(o.colour, o.shape) for o in objects})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    chosen = rng.choice(len(absent), size=min(len(present), len(absent)), replace=False)
    for (colour, shape), answer in [(p, YES) for p in present] + [(absent[i], NO) for i in chosen]:
        ask("exists", answer, thing=_said(Description(colour=colour, shape=shape), "a"))

    for a, b in combinations(objects, 2):
        a, b = (b, a) if rng.random() < 0.5 else (a, b)
        names_a, names_b = unique_descriptions(a, objects), unique_descriptions(b, objects)
        relations = [r for r in RELATIONS if relation_holds(a, b, r, gap) is not None]
        if names_a and names_b and relations:
            relation = _pick(rng, relations)
            anchor, target = _said(_pick(rng, names_b)), _said(_pick(rng, names_a))
            ask(
                "relation",
                YES if relation_holds(a, b, relation, gap) else NO,
                target=target,
                relation=relation,
                anchor=anchor,
            )

    ask("caption", caption(objects, background))

    # Asked last, so the questions above stay what they were before this kind existed.
    for obj in objects:
        name = Description.of(obj, ATTRIBUTES).phrase("")
        groups = [g for g in _referring(obj, objects, gap, frozenset()) if g]
        if groups:
            ask("identify", name, target=_pick(rng, _pick(rng, groups)))
        clued = unique_descriptions(obj, objects, CLUE_SETS)
        if clued:
            ask("identify", name, target=_reasoning(_pick(rng, clued), False, rng))
    return qas


def _referring(
    obj: SceneObject, objects: Sequence[SceneObject], gap: float, unspeakable: frozenset[tuple[str, str]]
) -> list[list[Ref]]:
    """Unambiguous referring expressions for ``obj``, grouped as [by attributes, by relation, by extreme].

    An anchor ("... left of the red star") is never named by an ``unspeakable`` (colour, shape) pair.
    """
    by_attributes = [_said(d) for d in unique_descriptions(obj, objects)]
    # What the target itself may be called, from "the object" to "the large red ring".
    partial = [Description(), *(Description.of(obj, a) for a in ATTRIBUTE_SETS)]
    by_relation = []
    for anchor in objects:
        anchor_names = [
            d for d in unique_descriptions(anchor, objects) if (d.colour, d.shape) not in unspeakable
        ]
        if anchor is obj or not anchor_names:
            continue
        anchor_name = min(anchor_names, key=lambda d: len(d.attributes))
        others = [o for o in objects if o is not anchor]
        for relation in RELATIONS:
            if not relation_holds(obj, anchor, relation, gap):
                continue
            holds = [relation_holds(o, anchor, relation, gap) for o in others]
            for desc in partial:
                fitting = [h for o, h in zip(others, holds, strict=True) if desc.matches(o)]
                if fitting.count(True) == 1 and None not in fitting:  # obj is the one True
                    text = RELATIONAL_REFERRING.format(
                        target=desc.phrase(), relation=relation, anchor=anchor_name.phrase()
                    )
                    by_relation.append(Ref(desc, text, relation=relation, anchor=anchor_name))
    by_extreme = [
        Ref(desc, EXTREME_REFERRING.format(extreme=extreme, target=desc.phrase("")), extreme=extreme)
        for desc in partial
        for extreme in EXTREMES
        if extreme_of([o for o in objects if desc.matches(o)], extreme, gap) is obj
    ]
    return [by_attributes, by_relation, by_extreme]


def _clues(desc: Description, rng: np.random.Generator) -> list[str]:
    """Indirect predicates ("has a hole in it", "is coloured like grass") true together of exactly ``desc``."""
    clues = [_pick(rng, SHAPE_CLUES[desc.shape])] if desc.shape else []
    clues += [_pick(rng, COLOUR_CLUES[desc.colour])] if desc.colour else []
    return clues[:: _pick(rng, (1, -1))]


def _reasoning(desc: Description, long: bool, rng: np.random.Generator) -> Ref:
    if long:
        template = _pick(rng, REASONING_LONG)
        clues = _clues(desc, rng)
        return Ref(desc, template.format(clue=CLUE_JOIN.join(clues)), clues=tuple(clues), sentence=True)
    noun = _pick(rng, REASONING_NOUNS)
    clues = _clues(desc, rng)
    return Ref(desc, REASONING_SHORT.format(noun=noun, clue=CLUE_JOIN.join(clues)), clues=tuple(clues))


def scene_segmentation_queries(
    image: np.ndarray,
    objects: Sequence[SceneObject],
    name: str,
    rng: np.random.Generator,
    excluded_targets: frozenset[tuple[str, str]] = frozenset(),
    no_target_fraction: float = 0.0,
    phraser: Phraser | None = None,
) -> list[SegQuery]:
    """One referring, one short and one long reasoning query per object where possible, plus no-target queries.

    Arguments:
        image: (H, W, 3) uint8, shared by every returned sample.
        excluded_targets: (colour, shape) pairs held out of training: never the target, nor named at all.
        no_target_fraction: expected fraction of the returned queries that describe an absent object.
        phraser: rewords every query (its own generator); None keeps the canonical text. ``rng`` alone
            decides the queries, kinds and targets, so they are the same in every phrasing.
    """
    if not 0.0 <= no_target_fraction < 1.0:
        raise ValueError(f"no_target_fraction must be in [0, 1), got {no_target_fraction}")
    gap = RELATION_GAP * min(image.shape[:2])
    made: list[tuple[str, Ref, SceneObject | None]] = []  # (kind, meaning, target)
    for obj in objects:
        if (obj.colour, obj.shape) in excluded_targets:
            continue
        groups = [g for g in _referring(obj, objects, gap, excluded_targets) if g]
        if groups:
            made.append(("referring", _pick(rng, _pick(rng, groups)), obj))
        clued = unique_descriptions(obj, objects, CLUE_SETS)
        if clued:
            made.append(("reasoning_short", _reasoning(_pick(rng, clued), False, rng), obj))
            made.append(("reasoning_long", _reasoning(_pick(rng, clued), True, rng), obj))

    candidates = [Description(shape=s) for s in SHAPES] + [Description(colour=c) for c in COLOURS]
    candidates += [
        Description(colour=c, shape=s) for c in COLOURS for s in SHAPES if (c, s) not in excluded_targets
    ]
    absent = [d for d in candidates if not any(d.matches(o) for o in objects)]
    # Unbiased: E[n] = len(made) * f / (1 - f), so no-target queries make up f of the total on average.
    num_absent = (
        int(len(made) * no_target_fraction / (1 - no_target_fraction) + rng.random()) if absent else 0
    )
    for _ in range(num_absent):
        desc, style = _pick(rng, absent), _pick(rng, QUERY_KINDS[:3])
        ref = _said(desc) if style == "referring" else _reasoning(desc, style == "reasoning_long", rng)
        made.append(("no_target", ref, None))

    queries = []
    for k, (kind, ref, target) in enumerate(made):
        mask = np.zeros(image.shape[:2], np.uint8) if target is None else target.mask.astype(np.uint8)
        text = ref.text if phraser is None else phraser.query(ref)
        sample = Sample(image, text, mask, is_sentence=ref.sentence, source=SOURCE, name=f"{name}_{k:02d}")
        queries.append(SegQuery(sample, kind, target, ref))
    return queries
