"""Every piece of text the synthetic world can say, and the word-level tokenisation it is written for.

All canonical templates live here (the pools of the other phrasings in ``phrasing.py``) so that
``world_vocabulary`` can list every token by reading them, rather than by sampling scenes and hoping to have
seen every word.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lens.data.synthetic.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES
from lens.data.templates import LONG_QUESTION_TEMPLATES, SHORT_QUESTION_TEMPLATES

_TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")  # words, numbers, and any other character on its own
_FIELD = re.compile(r"\{[a-z_]+\}")  # a template's placeholder
PUNCTUATION: tuple[str, ...] = ("?", ".", ",", "'")

PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
YES, NO = "yes", "no"
SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")  # answers to "where is ...?"
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
EXTREMES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
ATTRIBUTES: tuple[str, ...] = ("size", "colour", "shape")  # in the order adjectives are spoken
OBJECT_NOUN, OBJECT_PLURAL = "object", "objects"  # stands in for a shape word the description leaves out

# Indirect descriptions (predicates after "the object that ..."): each is true of exactly one shape / colour.
SHAPE_CLUES: dict[str, tuple[str, ...]] = {
    "circle": ("is perfectly round without a hole", "looks like a full moon", "is round like a coin"),
    "square": ("has four right angles", "looks like a tile on a chessboard"),
    "triangle": ("has three corners", "has three straight sides", "looks like a pyramid seen from the side"),
    "star": ("has five points", "looks like a starfish", "has five pointed tips"),
    "ring": ("has a hole in it", "looks like a donut", "is shaped like a wedding band"),
    "cross": (
        "looks like a plus sign",
        "looks like the symbol for addition",
        "has four arms of equal length",
    ),
    "diamond": (
        "looks like a kite",
        "is shaped like a rhombus",
        "has corners pointing up, down, left and right",
    ),
    "hexagon": ("has six sides", "has six corners", "looks like a honeycomb cell"),
}
COLOUR_CLUES: dict[str, tuple[str, ...]] = {
    "red": (
        "is coloured like a ripe tomato",
        "has the colour of a fire truck",
        "is the colour of a strawberry",
    ),
    "green": ("is coloured like grass", "has the colour of fresh leaves", "is the colour of a frog"),
    "blue": ("has the colour of the sky", "is the colour of the deep sea", "is coloured like a clear sky"),
    "yellow": ("has the colour of a ripe banana", "is the colour of a lemon", "is coloured like a sunflower"),
    "purple": ("has the colour of lavender", "is the colour of a plum", "is coloured like an eggplant"),
    "orange": ("has the colour of a carrot", "is coloured like a pumpkin", "is the colour of a tangerine"),
}
assert set(SHAPE_CLUES) == set(SHAPES) and set(COLOUR_CLUES) == set(COLOURS)

VQA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is {target}?", "which colour does {target} have?"),
    "shape": ("what shape is {target}?", "which shape is {target}?"),
    "size": ("is {target} small or large?", "how big is {target}, small or large?"),
    "count": ("how many {things} are there?", "how many {things} can you see?"),
    "exists": ("is there {thing}?", "can you see {thing}?"),
    "relation": ("is {target} {relation} {anchor}?",),
    "position": ("where is {target}?", "in which part of the image is {target}?"),
    "caption": ("describe the image.", "what does the picture show?"),
    # Name the object a referring expression or a reasoning clue picks out (answer: "small red ring"), as
    # LLaVA-1.5's grounded VQA does: the only questions whose answer needs the whole phrase resolved.
    "identify": ("what is {target} in this image?", "what is {target}?"),
}
CAPTION = "{objects} on a {background} background."
RELATIONAL_REFERRING = "{target} {relation} {anchor}"
EXTREME_REFERRING = "the {extreme} {target}"
REASONING_SHORT = "the {noun} that {clue}"
REASONING_NOUNS: tuple[str, ...] = ("object", "shape", "one", "thing")
REASONING_LONG: tuple[str, ...] = (
    "something in this picture {clue}. which part of the image shows it?",
    "which object in this image {clue}? please segment it.",
    "i am looking for the thing that {clue}. where is it in the picture?",
    "there is an object here that {clue}. can you find it and show me where it is?",
    "look at the shapes in this picture. please point out the one that {clue}.",
)
CLUE_JOIN = " and "

# Every token of the agent's router prompt (lens.agent.router.RouterPrompt: instruction, turn format, labels,
# content-free turn, examples). lens.data may not import lens.agent; tests/test_phrasing.py checks this list
# against RouterPrompt() so the two cannot drift apart.
AGENT_PROMPT_WORDS: tuple[str, ...] = (
    "which", "kind", "of", "request", "is", "this", "?", "one", ":", "a", "question", "about", "the", "image",
    ".", "two", "to", "segment", "something", "three", "object", "segmented", "before", "n", "/", "what",
    "colour", "ring", "please", "red", "star", "shape", "thing", "you", "found",
)  # fmt: skip
VOCABULARY_VERSIONS: tuple[int, ...] = (1, 2)


def tokenize_words(text: str) -> list[str]:
    """Split text the way the world's word-level tokenizer does: lowercase words, each punctuation mark alone."""
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Description:
    """A set of attribute values ("large", "red", "ring"); ``None`` leaves an attribute unsaid."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    @classmethod
    def of(cls, obj: object, attributes: Sequence[str]) -> Description:
        """The description of ``obj`` (anything with size, colour and shape) that says only ``attributes``."""
        return cls(**{name: getattr(obj, name) for name in attributes})

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(name for name in ATTRIBUTES if getattr(self, name) is not None)

    def matches(self, obj: object) -> bool:
        return (
            (self.size is None or self.size == obj.size)  # type: ignore[attr-defined]
            and (self.colour is None or self.colour == obj.colour)  # type: ignore[attr-defined]
            and (self.shape is None or self.shape == obj.shape)  # type: ignore[attr-defined]
        )

    def phrase(self, article: str = "the") -> str:
        """Spoken form, e.g. "the large red ring", "a red object", "an orange star"; ``article=""`` for none."""
        words = [w for w in (self.size, self.colour) if w] + [self.shape or OBJECT_NOUN]
        if article in ("a", "an"):
            article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words] if article else words)

    def plural(self) -> str:
        """Plural form, e.g. "large red rings", "red objects", "objects"."""
        words = [w for w in (self.size, self.colour) if w]
        return " ".join([*words, PLURALS[self.shape] if self.shape else OBJECT_PLURAL])


def join_list(items: Sequence[str]) -> str:
    """Items as a spoken list: "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _all_text() -> Iterator[str]:
    """Every literal the generators may emit, templates with their placeholders removed."""
    yield from PUNCTUATION
    yield from (*SHAPES, *PLURALS.values(), *COLOURS, *SIZES, *BACKGROUNDS, *NUMBER_WORDS, YES, NO)
    yield from (*SIDES, *RELATIONS, *EXTREMES, OBJECT_NOUN, OBJECT_PLURAL, "a", "an", "the", "and")
    for clues in (*SHAPE_CLUES.values(), *COLOUR_CLUES.values(), *VQA_TEMPLATES.values()):
        yield from clues
    yield from (CAPTION, RELATIONAL_REFERRING, EXTREME_REFERRING, REASONING_SHORT, *REASONING_NOUNS)
    yield from (*REASONING_LONG, CLUE_JOIN)


def world_vocabulary(version: int = 1) -> list[str]:
    """Every token (see ``tokenize_words``) the synthetic world's text can contain, sorted.

    Version 1 (the default, which the shipped tokenizer was built from) covers the canonical phrasing only.
    Version 2, a superset, adds every token of every phrasing (seen and held-out pools, typos included), of
    LENS's prompt templates (``lens.data.templates``) and of the agent's router prompt (``AGENT_PROMPT_WORDS``).
    """
    if version not in VOCABULARY_VERSIONS:
        raise ValueError(f"unknown world vocabulary version {version}; expected one of {VOCABULARY_VERSIONS}")
    texts: list[str] = list(_all_text())
    if version >= 2:
        from lens.data.synthetic.phrasing import phrasing_text  # phrasing.py builds on this module

        texts += [*phrasing_text(), *SHORT_QUESTION_TEMPLATES, *LONG_QUESTION_TEMPLATES, *AGENT_PROMPT_WORDS]
    return sorted({token for text in texts for token in tokenize_words(_FIELD.sub(" ", text))})
