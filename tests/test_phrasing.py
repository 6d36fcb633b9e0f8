"""Phrasings of the synthetic world: canonical text unchanged, paired rewordings that still mean their target,
held-out wordings that no training text contains, and a vocabulary covering every phrasing and prompt."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from lens.agent.router import RouterPrompt
from lens.config import DataConfig
from lens.data.registry import get_dataset
from lens.data.synthetic import (
    COLOURS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    SyntheticWorld,
    tokenize_words,
    world_vocabulary,
)
from lens.data.synthetic.dataset import world_from_config
from lens.data.synthetic.language import AGENT_PROMPT_WORDS, PLURALS
from lens.data.synthetic.phrasing import (
    DISTRACTORS,
    EXTREME_FRAMES,
    ORDERS,
    RELATION_WORDS,
    TYPO_WORDS,
    VQA_FRAMES,
    pool_entries,
    typo,
)
from lens.data.templates import LONG_QUESTION_TEMPLATES, SHORT_QUESTION_TEMPLATES
from test_synthetic import clue_description, refer

PHRASINGS = ("canonical", "varied", "held_out")
NUM_SCENES = 100  # per split for the held-out-text check (300 scenes)
# sha256 (first 16 hex digits) of image, VQA and queries (text, kind, is_sentence, name, mask) of scenes 0-2
# of each split of SyntheticWorld(seed=0), computed with main at 21c40d9, before phrasings existed.
MAIN_HASHES = {
    ("train", 0): "f6c3be5653afb654", ("train", 1): "f91c4a0e0d017235", ("train", 2): "376a03956c6ba412",
    ("val", 0): "e21ddc41b92dd41d", ("val", 1): "51b3d2627b3ac29d", ("val", 2): "d83373ce04b72b68",
    ("test", 0): "8106b168f128a8a4", ("test", 1): "6795f61a2d0536bf", ("test", 2): "cbccbf020572d364",
}  # fmt: skip
MAIN_VOCABULARY = (172, "4c30be4a06013a4c")  # len and sha256 of " ".join(world_vocabulary()) at 21c40d9

# An independent reading of the rewordings, back to canonical grammar (test_synthetic.refer reads that).
SYNONYMS = {"big": "large", "little": "small", "violet": "purple"}
GENERIC = r"(?:object|thing|shape|one|item|figure)"
EXTREME_WORDS = {"left": "leftmost", "right": "rightmost", "up": "topmost", "top": "topmost"}
EXTREME_WORDS |= {"down": "bottommost", "bottom": "bottommost"}
RELATION_CANON = {
    "left of": r"(?:to the left of|on the left side of|on the left of|left of)",
    "right of": r"(?:to the right of|on the right side of|on the right of|right of)",
    "above": r"(?:above|higher up than|higher than|further up than)",
    "below": r"(?:below|lower than|beneath|further down than)",
}
ADJECTIVE = "|".join([*SIZES, *COLOURS])


def canonical_form(text: str) -> str:
    """A reworded referring expression said the canonical way ("the ring which is big and red" -> "the large
    red ring"), by hand-written rules that share nothing with the generator."""
    words = [SYNONYMS.get(w, w) for w in text.split()]
    text = " ".join(words)
    text = re.sub(rf"\b{GENERIC}\b", "object", text)
    for relation, pattern in RELATION_CANON.items():
        text = re.sub(rf" (?:that is |which is |placed )?{pattern} ", f" {relation} ", text)
    if m := re.fullmatch(r"the (.+) (?:furthest|farthest) (?:to the )?(left|right|up|down)", text):
        text = f"the {EXTREME_WORDS[m[2]]} {m[1]}"
    if m := re.fullmatch(r"the (.+) nearest the (left|right|top|bottom) edge", text):
        text = f"the {EXTREME_WORDS[m[2]]} {m[1]}"

    def order(m: re.Match[str]) -> str:  # post-nominal attributes before the noun again
        noun, attributes = m[1], m[2].split(" and ")
        return f"the {' '.join(attributes)} {noun}"

    text = re.sub(rf"the (\w+) (?:that|which) is ((?:{ADJECTIVE})(?: and (?:{ADJECTIVE}))?)\b", order, text)
    text = re.sub(
        rf"the (?:({ADJECTIVE}) )?(\w+) in ({ADJECTIVE})\b", lambda m: f"the {m[1] or ''} {m[3]} {m[2]}", text
    )
    text = re.sub(r"the ((?:\w+ )*?)object shaped like a (\w+)", r"the \1\2", text)
    return " ".join(text.split())


def scene_hash(scene: Scene) -> str:
    h = hashlib.sha256(scene.image.tobytes())
    for qa in scene.vqa():
        h.update(repr(tuple(qa)).encode())
    for q in scene.segmentation_queries():
        h.update(repr((q.sample.query, q.kind, q.sample.is_sentence, q.sample.name)).encode())
        h.update(q.sample.mask.tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=0)


@pytest.fixture(scope="module")
def scenes(world: SyntheticWorld) -> list[Scene]:
    return [world.scene(split, i) for split in SPLITS for i in range(20)]


# ---------------------------------------------------------------- canonical text and determinism


def test_canonical_phrasing_is_mains_text(world: SyntheticWorld) -> None:
    for (split, index), expected in MAIN_HASHES.items():
        assert scene_hash(world.scene(split, index)) == expected, (split, index)
    vocabulary = world_vocabulary()
    assert (
        len(vocabulary),
        hashlib.sha256(" ".join(vocabulary).encode()).hexdigest()[:16],
    ) == MAIN_VOCABULARY
    scene = world.scene("val", 4)
    assert scene.vqa() == scene.vqa("canonical")
    assert [q.sample.query for q in scene.segmentation_queries()] == [
        q.sample.query for q in scene.segmentation_queries("canonical")
    ]


def test_phrasings_are_deterministic_per_scene(world: SyntheticWorld) -> None:
    for phrasing in ("varied", "held_out"):
        a = [q.sample.query for q in world.scene("test", 5).segmentation_queries(phrasing)]
        world.scene("test", 2).segmentation_queries(phrasing)  # other scenes first must not matter
        b = [q.sample.query for q in SyntheticWorld(seed=0).scene("test", 5).segmentation_queries(phrasing)]
        assert a == b
        assert world.scene("test", 5).vqa(phrasing) == SyntheticWorld(seed=0).scene("test", 5).vqa(phrasing)
    varied = SyntheticWorld(seed=0, phrasing="varied").scene("train", 3)
    assert [q.sample.query for q in varied.segmentation_queries()] == [
        q.sample.query for q in world.scene("train", 3).segmentation_queries("varied")
    ]


def test_phrasings_pair_the_same_queries_and_answers(scenes: list[Scene]) -> None:
    changed = {"varied": 0, "held_out": 0}
    total = 0
    for scene in scenes:
        canonical, canonical_qa = scene.segmentation_queries(), scene.vqa()
        total += len(canonical)
        for phrasing in changed:
            queries = scene.segmentation_queries(phrasing)
            assert [(q.kind, q.target, q.sample.name, q.sample.is_sentence) for q in queries] == [
                (q.kind, q.target, q.sample.name, q.sample.is_sentence) for q in canonical
            ]
            assert all(
                np.array_equal(a.sample.mask, b.sample.mask) for a, b in zip(queries, canonical, strict=True)
            )
            changed[phrasing] += sum(
                a.sample.query != b.sample.query for a, b in zip(queries, canonical, strict=True)
            )
            qas = scene.vqa(phrasing)
            assert [(qa.answer, qa.kind) for qa in qas] == [(qa.answer, qa.kind) for qa in canonical_qa]
    assert changed["held_out"] == total  # every held-out query is reworded
    assert changed["varied"] > 0.4 * total  # seen pools include the canonical wordings


def test_world_settings_reject_unknown_and_held_out_phrasings(world: SyntheticWorld) -> None:
    with pytest.raises(ValueError, match="phrasing"):
        SyntheticWorld(phrasing="held_out")  # a world's train split may never say held-out text
    with pytest.raises(ValueError, match="phrasing"):
        SyntheticWorld(phrasing="fancy")
    with pytest.raises(ValueError, match="phrasing"):
        world.scene("val", 0).vqa(phrasing="fancy")
    data = DataConfig(datasets={"synthetic": {"phrasing": "varied"}})
    assert world_from_config(data).phrasing == "varied"


# ---------------------------------------------------------------- rewordings still mean their target


def test_reworded_queries_mean_exactly_their_target(scenes: list[Scene]) -> None:
    attribute_words = {*SHAPES, *COLOURS, *SIZES, *PLURALS.values(), *SYNONYMS}
    forms = set()
    for scene in scenes:
        for phrasing in ("varied", "held_out"):
            for query in scene.segmentation_queries(phrasing):
                text, target = query.sample.query, query.target
                assert text == text.strip() and "  " not in text, text
                if query.kind == "no_target" and not query.ref.clues:  # said like a referring query
                    assert refer(canonical_form(text), scene.objects) == [], text  # describes no object
                    forms.add("no_target")
                if query.kind == "no_target":
                    continue
                if query.kind == "referring":
                    assert not set(".?") & set(text), text  # a noun phrase, for LENS's own prompt
                    index = next(k for k, o in enumerate(scene.objects) if o is target)
                    assert refer(canonical_form(text), scene.objects) == [index], (text, canonical_form(text))
                    forms.add(phrasing)
                else:  # clues identify the target: no attribute word may give it away
                    assert not attribute_words & set(tokenize_words(text)), text
                    shape, colour = clue_description(text)
                    fits = [
                        o for o in scene.objects if shape in (None, o.shape) and colour in (None, o.colour)
                    ]
                    assert fits == [target], text
    assert forms == {"varied", "held_out", "no_target"}


def test_reworded_vqa_answers_fit_the_question(scenes: list[Scene]) -> None:
    checked = 0
    for scene in scenes:
        for phrasing in ("varied", "held_out"):
            for question, answer, kind in scene.vqa(phrasing):
                if kind not in ("colour", "shape", "size"):
                    continue
                for frame in VQA_FRAMES[kind].seen + VQA_FRAMES[kind].held_out:
                    pattern = re.escape(frame).replace(re.escape("{target}"), "(?P<target>.+)")
                    if m := re.fullmatch(pattern, question):
                        break
                else:  # a typo in the frame: find the frame word by word
                    continue
                (k,) = refer(canonical_form(m["target"]), scene.objects)
                assert getattr(scene.objects[k], kind) == answer, question
                checked += 1
    assert checked > 200


# ---------------------------------------------------------------- held-out text stays held out

SLOT_WORDS = {  # what each placeholder of a pool entry can be filled with, as a regex
    "det": r"(?:the|an?)",
    "size": "|".join([*SIZES, "big", "little"]),
    "colour": "|".join([*COLOURS, "violet"]),
    "shape": "|".join(SHAPES),
    "noun": "|".join([*SHAPES, "object", "thing", "shape", "one", "item", "figure"]),
    "generic": "|".join(["object", "thing", "shape", "one", "item", "figure"]),
    "relation": "|".join(p for pool in RELATION_WORDS.values() for p in (*pool.seen, *pool.held_out)),
}
SLOT_WORDS["adjectives"] = SLOT_WORDS["predicates"] = rf"(?:{SLOT_WORDS['size']}|{SLOT_WORDS['colour']})"
OPTIONAL_SLOTS = ("det", "size", "adjectives")  # may be empty ("the ring in red", "ring furthest up")


def template_pattern(template: str) -> re.Pattern[str]:
    """Text made from a pool entry: placeholders filled from ``SLOT_WORDS`` (any words for the others)."""
    parts = re.split(r"\{([a-z_]+)\} ?", template)
    regex = re.escape(parts[0])
    for slot, literal in zip(parts[1::2], parts[2::2], strict=True):
        space = " " if template.find("{" + slot + "} ") >= 0 else ""
        filled = f"(?:{SLOT_WORDS[slot]})" if slot in SLOT_WORDS else r"[a-z',]+(?: [a-z',]+)*?"
        regex += f"(?:{filled}{space})?" if slot in OPTIONAL_SLOTS else f"{filled}{space}"
        regex += re.escape(literal)
    return re.compile(rf"(?<![a-z]){regex}(?![a-z])")


def texts(scenes: list[Scene], phrasing: str) -> list[str]:
    return [qa.question for s in scenes for qa in s.vqa(phrasing)] + [
        q.sample.query for s in scenes for q in s.segmentation_queries(phrasing)
    ]


@pytest.mark.slow
def test_held_out_text_never_appears_in_training_or_seen_splits(world: SyntheticWorld) -> None:
    scenes = [world.scene(split, i) for split in SPLITS for i in range(NUM_SCENES)]
    seen = [t for phrasing in ("canonical", "varied") for t in texts(scenes, phrasing)]
    held = texts([s for s in scenes if not s.name.startswith("train")], "held_out")
    # Token level: words only the held-out pools (and held-out typos) say.
    seen_tokens = {w for t in seen for w in tokenize_words(t)}
    held_pool_tokens = {
        w for t in pool_entries("held_out") for w in tokenize_words(re.sub(r"\{\w+\}", " ", t))
    }
    held_pool_tokens |= {typo(w, "swap") for w in TYPO_WORDS}
    only_held = held_pool_tokens - set(world_vocabulary()) - {typo(w, "drop") for w in TYPO_WORDS}
    only_held -= {w for t in pool_entries("seen") for w in tokenize_words(re.sub(r"\{\w+\}", " ", t))}
    assert {"item", "figure", "beneath", "farthest", "kindly", "whichever"} <= only_held
    assert not seen_tokens & only_held, seen_tokens & only_held
    # Template level: no seen text is made from a held-out pool entry; every held-out text is.
    patterns = {t: template_pattern(t) for t in pool_entries("held_out")}
    for text in seen:
        assert not [t for t, p in patterns.items() if p.search(text)], text
    unmarked = [t for t in held if not any(p.search(t) for p in patterns.values())]
    assert len(unmarked) <= 0.1 * len(held), unmarked[:10]  # those left were hit by a typo in the frame
    assert all(set(tokenize_words(t)) & (only_held | {typo(w, "swap") for w in TYPO_WORDS}) for t in unmarked)


def test_template_pattern_tells_held_out_from_seen_wordings() -> None:
    held = template_pattern(ORDERS.held_out[1])  # "{det} {size} {noun} in {colour}"
    assert held.search("the big ring in red") and held.search("the ring in violet")
    assert not held.search("what is the red ring in this image?")
    assert template_pattern(EXTREME_FRAMES["leftmost"].held_out[1]).search(
        "the red ring nearest the left edge"
    )
    assert template_pattern(DISTRACTORS.held_out[0]).search("never mind the background. mark it.")


# ---------------------------------------------------------------- typos and vocabulary


def test_typos_misspell_one_letter() -> None:
    assert typo("please", "drop") == "plese" and typo("please", "swap") == "plaese"
    assert typo("show", "drop") == "shw" and typo("show", "swap") == "sohw"
    canonical = set(world_vocabulary())
    for word in TYPO_WORDS:
        for kind in ("drop", "swap"):
            assert typo(word, kind) != word and typo(word, kind) not in canonical, (word, kind)
    with pytest.raises(ValueError):
        typo("please", "insert")


def test_vocabulary_v2_covers_every_phrasing_and_prompt(scenes: list[Scene]) -> None:
    old, new = world_vocabulary(), world_vocabulary(version=2)
    assert new == sorted(set(new)) and set(old) < set(new)
    used = {w for phrasing in PHRASINGS for t in texts(scenes, phrasing) for w in tokenize_words(t)}
    assert used <= set(new), used - set(new)
    assert len(used) > 0.75 * len(new)  # lists what is said (typos are rare, so not all of them show up)
    prompts = [re.sub(r"\{\w+\}", " ", t) for t in (*SHORT_QUESTION_TEMPLATES, *LONG_QUESTION_TEMPLATES)]
    assert {w for t in prompts for w in tokenize_words(t)} <= set(new)
    assert {"output", "segmentation", "mask"} <= set(new) - set(old)
    with pytest.raises(ValueError, match="version"):
        world_vocabulary(version=3)


def test_agent_prompt_words_match_the_router_prompt() -> None:
    prompt = RouterPrompt()
    parts = [prompt.instruction, re.sub(r"\{\w+\}", " ", prompt.turn_format), prompt.content_free or ""]
    parts += [*prompt.labels.values(), *(text for text, _ in prompt.examples)]
    tokens = {w for part in parts for w in tokenize_words(part)}
    assert tokens == set(AGENT_PROMPT_WORDS)  # drift in RouterPrompt fails here
    assert set(tokenize_words(prompt.render("please segment the ring.", 3))) <= set(
        world_vocabulary(version=2)
    )


# ---------------------------------------------------------------- held-out evaluation splits


def test_held_out_phrasing_eval_splits_pair_with_the_seen_ones() -> None:
    spec = get_dataset("synthetic")
    assert {"val", "test", "val_heldout_phrasing", "test_heldout_phrasing"} <= set(spec.eval_splits)
    data = DataConfig(datasets={"synthetic": {"eval_scenes": 3}})
    seen, held = spec.eval_reader(data, "test"), spec.eval_reader(data, "test_heldout_phrasing")
    assert len(seen) == len(held) > 0
    for a, b in zip(seen, held, strict=True):
        assert (a.name, a.kind, a.held_out, a.is_sentence) == (b.name, b.kind, b.held_out, b.is_sentence)
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.image, b.image)
        assert a.query != b.query
    assert spec.cache_options(data, "test", False) != spec.cache_options(data, "test_heldout_phrasing", False)
    with pytest.raises(ValueError, match="train_heldout_phrasing"):
        spec.eval_reader(data, "train_heldout_phrasing")
