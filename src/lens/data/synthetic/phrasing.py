"""Phrasings of the synthetic world's text: the same meaning said many ways, from a seen or a held-out pool.

The world's generators decide *what* is said (which object, which attributes, which relation or clue: a
``Ref``); this module decides *how*. ``"canonical"`` is the world's original wording, kept exactly (it is
rendered by ``queries.py`` itself and stored in ``Ref.text``). The other phrasings compose a wording from
pools: synonyms of non-attribute words, word orders (pre- vs post-nominal), request frames for sentence
queries, question frames for VQA, distractor clauses and typos. Every pool is split into a *seen* part
(drawn by ``"varied"``, the phrasing training may use) and a *held-out* part (drawn only by ``"held_out"``,
for the held-out-phrasing evaluation splits), so a held-out wording is never one any training saw.
Attribute words (colours, shapes, sizes and their synonyms) and the reasoning clues are shared by both
parts: they are what makes a query resolvable, and a word never seen in training could not be resolved.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from lens.data.synthetic.language import (
    OBJECT_NOUN,
    OBJECT_PLURAL,
    PLURALS,
    REASONING_LONG,
    REASONING_NOUNS,
    VQA_TEMPLATES,
    Description,
)

T = TypeVar("T")

CANONICAL, VARIED, HELD_OUT = "canonical", "varied", "held_out"
PHRASINGS: tuple[str, ...] = (CANONICAL, VARIED, HELD_OUT)
WORLD_PHRASINGS: tuple[str, ...] = (CANONICAL, VARIED)  # a world (hence its train split) never says held-out
SEEN = "seen"  # pool part ``"varied"`` draws from; ``"held_out"`` draws from the part of the same name

TYPO_RATE = 0.08  # chance that a sentence query or a VQA question gets one typo in a frame word
DISTRACTOR_RATE = 0.3  # chance that a sentence query gets a distractor clause


@dataclass(frozen=True)
class Pool:
    """Interchangeable wordings, split into those training may see and those kept for evaluation."""

    seen: tuple[str, ...]
    held_out: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.seen or not self.held_out or set(self.seen) & set(self.held_out):
            raise ValueError(f"a pool needs disjoint, non-empty seen and held-out parts: {self}")

    def part(self, name: str) -> tuple[str, ...]:
        return self.seen if name == SEEN else self.held_out


# ------------------------------------------------------------------ attribute synonyms (shared, never held out)
# Only real, unambiguous synonyms: "big" / "little" for the two sizes, "violet" for the one purple.
ATTRIBUTE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "large": ("large", "big"),
    "small": ("small", "little"),
    "purple": ("purple", "violet"),
}

# ------------------------------------------------------------------ noun phrases
# What an object is called when its shape is left unsaid (canonical: "object"), singular -> plural.
GENERIC_NOUNS = Pool(("object", "thing", "shape", "one"), ("item", "figure"))
# "ones" is no plural of a generic noun ("how many ones are there?"): plural "one" is said "objects".
GENERIC_PLURALS: dict[str, str] = {
    n: n + "s" for n in (*GENERIC_NOUNS.seen, *GENERIC_NOUNS.held_out) if n != "one"
}
# Word orders of a description with at least one adjective; the held-out part also has shape-only forms.
# {det} article, {adjectives} pre-nominal adjectives, {noun}, {predicates} "big and red", {size} {colour}.
ORDERS = Pool(
    ("{det} {adjectives} {noun}", "{det} {noun} that is {predicates}"),
    (
        "{det} {noun} which is {predicates}",
        "{det} {size} {noun} in {colour}",
        "{det} {adjectives} {generic} shaped like a {shape}",
    ),
)
ORDER_NEEDS: dict[str, tuple[str, ...]] = {  # the description's attributes an order cannot do without
    ORDERS.seen[1]: ("predicates",),
    ORDERS.held_out[0]: ("predicates",),
    ORDERS.held_out[1]: ("colour",),
    ORDERS.held_out[2]: ("shape",),
}
# Relations between two objects, keyed by the canonical word (language.RELATIONS).
RELATION_WORDS: dict[str, Pool] = {
    "left of": Pool(("left of", "to the left of"), ("on the left of", "on the left side of")),
    "right of": Pool(("right of", "to the right of"), ("on the right of", "on the right side of")),
    "above": Pool(("above", "higher than"), ("further up than", "higher up than")),
    "below": Pool(("below", "lower than"), ("beneath", "further down than")),
}
RELATION_FRAMES = Pool(
    ("{target} {relation} {anchor}", "{target} that is {relation} {anchor}"),
    ("{target} which is {relation} {anchor}", "{target} placed {relation} {anchor}"),
)
# Extremes, keyed by the canonical word (language.EXTREMES); {target} is a noun phrase without article.
EXTREME_FRAMES: dict[str, Pool] = {
    "leftmost": Pool(
        ("the leftmost {target}", "the {target} furthest to the left"),
        ("the {target} farthest to the left", "the {target} nearest the left edge"),
    ),
    "rightmost": Pool(
        ("the rightmost {target}", "the {target} furthest to the right"),
        ("the {target} farthest to the right", "the {target} nearest the right edge"),
    ),
    "topmost": Pool(
        ("the topmost {target}", "the {target} furthest up"),
        ("the {target} farthest up", "the {target} nearest the top edge"),
    ),
    "bottommost": Pool(
        ("the bottommost {target}", "the {target} furthest down"),
        ("the {target} farthest down", "the {target} nearest the bottom edge"),
    ),
}

# ------------------------------------------------------------------ reasoning queries
REASONING_NOUN_POOL = Pool(REASONING_NOUNS, GENERIC_NOUNS.held_out)
CLUE_FRAMES = Pool(("the {noun} that {clue}",), ("the {noun} which {clue}",))
CLUE_JOINS = Pool((" and ",), (", and ",))
# Request frames of sentence (reasoning_long) queries: the canonical ones, polite and terse ones.
REQUEST_FRAMES = Pool(
    (
        *REASONING_LONG,
        "please segment the {noun} that {clue}.",
        "segment the {noun} that {clue}.",
        "find the {noun} that {clue}.",
        "could you show me the {noun} that {clue}?",
        "which {noun} {clue}? show it, please.",
    ),
    (
        "kindly highlight the {noun} that {clue}.",
        "mark the {noun} that {clue}.",
        "i need the {noun} that {clue}. outline it for me.",
        "would you be so kind as to outline the {noun} that {clue}?",
        "highlight whichever {noun} {clue}.",
    ),
)
DISTRACTORS = Pool(
    ("ignore the background.", "the background does not matter."),
    ("never mind the background.", "pay no attention to the other shapes."),
)
# Frame words a typo may hit (never an attribute word, a clue or a relation): dropping a letter is seen,
# swapping two neighbouring letters is held out. Each word has one variant per kind, so the set is finite.
TYPO_WORDS: tuple[str, ...] = (
    "please", "picture", "image", "segment", "show", "find", "looking", "something",
    "ignore", "background", "describe", "highlight", "outline", "kindly", "would",
)  # fmt: skip
TYPO_KINDS = Pool(("drop",), ("swap",))

# ------------------------------------------------------------------ VQA question frames, per QA kind
VQA_FRAMES: dict[str, Pool] = {
    "colour": Pool((*VQA_TEMPLATES["colour"], "tell me the colour of {target}."),
                   ("what is the colour of {target}?", "name the colour of {target}.")),
    "shape": Pool((*VQA_TEMPLATES["shape"], "what is the shape of {target}?"),
                  ("which form does {target} have?", "name the form of {target}.")),
    "size": Pool((*VQA_TEMPLATES["size"], "is {target} large or small?"),
                 ("would you call {target} small or large?", "what size is {target}, small or large?")),
    "count": Pool((*VQA_TEMPLATES["count"], "count the {things}."),
                  ("what is the number of {things} here?", "how many {things} does the picture contain?")),
    "exists": Pool((*VQA_TEMPLATES["exists"], "does the image contain {thing}?"),
                   ("is {thing} present?", "does the picture include {thing}?")),
    "relation": Pool(VQA_TEMPLATES["relation"], ("would you say {target} is {relation} {anchor}?",)),
    "position": Pool((*VQA_TEMPLATES["position"], "which side of the image is {target} on?"),
                     ("in what part of the picture do you find {target}?",
                      "where in the picture is {target} located?")),
    "caption": Pool((*VQA_TEMPLATES["caption"], "what is in the image?"),
                    ("give a short description of the picture.", "tell me what this picture contains.")),
    "identify": Pool((*VQA_TEMPLATES["identify"], "name {target}."),
                     ("what would you call {target}?", "tell me what {target} is.")),
}  # fmt: skip
assert set(VQA_FRAMES) == set(VQA_TEMPLATES)


@dataclass(frozen=True)
class Ref:
    """What a noun phrase (or a reasoning sentence) means, so that any phrasing can say it.

    Attributes:
        desc: the attributes said of the object (for a clue, what the clues identify).
        text: the canonical wording, rendered by the world's own generators.
        article: "the", "a" (indefinite: "is there a red ring?"), or "plural" ("red rings").
        relation, anchor: "<desc> left of <anchor>"; canonical relation words (``language.RELATIONS``).
        extreme: "the leftmost <desc>"; a canonical word of ``language.EXTREMES``.
        clues: indirect predicates ("has a hole in it"), in spoken order; set for reasoning queries.
        sentence: a reasoning_long query (a request frame around the clues) rather than a noun phrase.
    """

    desc: Description
    text: str
    article: str = "the"
    relation: str | None = None
    anchor: Description | None = None
    extreme: str | None = None
    clues: tuple[str, ...] = ()
    sentence: bool = False


def check_phrasing(phrasing: str, allowed: Sequence[str] = PHRASINGS) -> str:
    if phrasing not in allowed:
        raise ValueError(f"unknown phrasing {phrasing!r}; expected one of {tuple(allowed)}")
    return phrasing


def typo(word: str, kind: str) -> str:
    """The one misspelling of ``word`` of a kind: "drop" a middle letter, or "swap" it with the one before."""
    k = len(word) // 2
    if kind == "drop":
        return word[:k] + word[k + 1 :]
    if kind == "swap":
        return word[: k - 1] + word[k] + word[k - 1] + word[k + 1 :]
    raise ValueError(f"unknown typo kind {kind!r}")


class Phraser:
    """Says ``Ref`` meanings and VQA questions in one phrasing, drawing every choice from ``rng``.

    Arguments:
        phrasing: "varied" (seen pools) or "held_out" (held-out pools); "canonical" needs no phraser.
    """

    def __init__(self, phrasing: str, rng: np.random.Generator):
        if check_phrasing(phrasing) == CANONICAL:
            raise ValueError("the canonical phrasing is the generators' own text; no Phraser renders it")
        self.part, self.rng = (SEEN if phrasing == VARIED else HELD_OUT), rng

    def _pick(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def _from(self, pool: Pool) -> str:
        return self._pick(pool.part(self.part))

    def _word(self, word: str) -> str:
        return self._pick(ATTRIBUTE_SYNONYMS.get(word, (word,)))

    # -------------------------------------------------------------- noun phrases
    def description(self, desc: Description, article: str = "the", pre_nominal: bool = False) -> str:
        """``desc`` as a noun phrase ("the big red ring", "a ring that is red"); ``article=""`` for none.

        ``pre_nominal`` keeps adjectives before the noun, for phrases inside a relation or an extreme.
        """
        generic = self._from(GENERIC_NOUNS)
        adjectives = [self._word(w) for w in (desc.size, desc.colour) if w]
        if article == "plural":
            noun = PLURALS[desc.shape] if desc.shape else GENERIC_PLURALS.get(generic, OBJECT_PLURAL)
            return " ".join([*adjectives, noun])
        slots = {
            "det": "a" if article == "a" else article,
            "adjectives": " ".join(adjectives),
            "noun": desc.shape or generic,
            "generic": generic,
            "predicates": " and ".join(adjectives),
            "size": self._word(desc.size) if desc.size else "",
            "colour": self._word(desc.colour) if desc.colour else "",
            "shape": desc.shape or "",
        }
        orders = [ORDERS.seen[0]] if pre_nominal else self._orders(desc)
        text = " ".join(self._pick(orders).format(**slots).split())  # drop the spaces of empty slots
        return _indefinite(text) if article == "a" else text

    def _orders(self, desc: Description) -> list[str]:
        said = {
            "predicates": bool(desc.size or desc.colour),
            "colour": bool(desc.colour),
            "shape": bool(desc.shape),
        }
        usable = [o for o in ORDERS.part(self.part) if all(said[n] for n in ORDER_NEEDS.get(o, ()))]
        return usable or [ORDERS.seen[0]]  # "the object": no order applies, the generic noun carries it

    def _clue(self, clues: Sequence[str]) -> str:
        return self._from(CLUE_JOINS).join(clues)

    def noun_phrase(self, ref: Ref) -> str:
        """A referring expression or short reasoning clue for ``ref`` (never a sentence)."""
        if ref.clues:
            return self._from(CLUE_FRAMES).format(
                noun=self._from(REASONING_NOUN_POOL), clue=self._clue(ref.clues)
            )
        if ref.relation is not None:
            assert ref.anchor is not None
            return self._from(RELATION_FRAMES).format(
                target=self.description(ref.desc, pre_nominal=True),
                relation=self._from(RELATION_WORDS[ref.relation]),
                anchor=self.description(ref.anchor, pre_nominal=True),
            )
        if ref.extreme is not None:
            target = self.description(ref.desc, article="", pre_nominal=True)
            return self._from(EXTREME_FRAMES[ref.extreme]).format(target=target)
        return self.description(ref.desc, ref.article)

    def _noisy(self, text: str) -> str:
        """``text`` with, at ``TYPO_RATE``, one frame word misspelt."""
        if self.rng.random() >= TYPO_RATE:
            return text
        words = [w for w in TYPO_WORDS if re.search(rf"\b{w}\b", text)]
        if not words:
            return text
        word = self._pick(words)
        return re.sub(rf"\b{word}\b", typo(word, self._from(TYPO_KINDS)), text, count=1)

    def sentence(self, ref: Ref) -> str:
        """A reasoning_long request for ``ref``: a request frame, maybe a distractor clause, maybe a typo."""
        text = self._from(REQUEST_FRAMES).format(
            noun=self._from(REASONING_NOUN_POOL), clue=self._clue(ref.clues)
        )
        if self.rng.random() < DISTRACTOR_RATE:
            distractor = self._from(DISTRACTORS)
            text = f"{distractor} {text}" if self.rng.random() < 0.5 else f"{text} {distractor}"
        return self._noisy(text)

    def query(self, ref: Ref) -> str:
        """A segmentation query: a sentence for reasoning_long, a noun phrase otherwise."""
        return self.sentence(ref) if ref.sentence else self.noun_phrase(ref)

    def question(self, kind: str, slots: Mapping[str, Ref | str]) -> str:
        """A VQA question of ``kind`` about ``slots`` (the ``Ref``s and relation word its canonical form filled)."""
        said: dict[str, str] = {}
        for name, value in slots.items():
            if isinstance(value, str):  # a relation, said with a synonym of this phrasing
                said[name] = self._from(RELATION_WORDS[value])
            elif kind == "relation":  # "is the red ring above the star?": adjectives before the noun
                said[name] = self.description(value.desc, pre_nominal=True)
            else:
                said[name] = self.noun_phrase(value)
        return self._noisy(self._from(VQA_FRAMES[kind]).format(**said))


def _indefinite(text: str) -> str:
    """ "a" before a vowel sound becomes "an" (only the first article, the one this module wrote)."""
    head, _, rest = text.partition(" ")
    return f"an {rest}" if head == "a" and rest[:1] in tuple("aeiou") else text


def phrasing_text() -> Iterator[str]:
    """Every literal any non-canonical phrasing may emit (templates with placeholders), typos included."""
    for synonyms in ATTRIBUTE_SYNONYMS.values():
        yield from synonyms
    yield from (*GENERIC_PLURALS, *GENERIC_PLURALS.values(), " and ")
    pools = [
        ORDERS,
        RELATION_FRAMES,
        CLUE_FRAMES,
        CLUE_JOINS,
        REQUEST_FRAMES,
        DISTRACTORS,
        REASONING_NOUN_POOL,
    ]
    for pool in [*pools, *RELATION_WORDS.values(), *EXTREME_FRAMES.values(), *VQA_FRAMES.values()]:
        yield from (*pool.seen, *pool.held_out)
    yield from (typo(word, kind) for word in TYPO_WORDS for kind in (*TYPO_KINDS.seen, *TYPO_KINDS.held_out))
    yield from ("a", "an", "the", OBJECT_NOUN)


def pool_entries(part: str) -> list[str]:
    """Every entry of the ``part`` ("seen" or "held_out") of every pool of wordings, templates unfilled."""
    pools = [ORDERS, RELATION_FRAMES, CLUE_FRAMES, CLUE_JOINS, REQUEST_FRAMES, DISTRACTORS, GENERIC_NOUNS]
    pools += [REASONING_NOUN_POOL, *RELATION_WORDS.values(), *EXTREME_FRAMES.values(), *VQA_FRAMES.values()]
    return [entry for pool in pools for entry in pool.part(part)]
