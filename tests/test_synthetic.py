"""The synthetic world: determinism, exact masks, unambiguous text, held-out pairs and an exact export."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lens.data.reason_seg import ReasonSegDataset
from lens.data.synthetic import (
    COLOURS,
    HELD_OUT_PAIRS,
    QUERY_KINDS,
    SHAPES,
    SIZES,
    SPLITS,
    Placement,
    Scene,
    SceneObject,
    SyntheticWorld,
    export_split,
    mask_to_rectangles,
    mask_to_shapes,
    tokenize_words,
    world_vocabulary,
)
from lens.data.synthetic.language import COLOUR_CLUES, PLURALS, SHAPE_CLUES
from lens.data.synthetic.scene import EXTENT, MIN_VISIBLE_FRACTION, compose, rasterize

NUM_SCENES = 40  # per split, for the properties checked on generated scenes
NUMBERS = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six"])}
SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
ATTRIBUTE_VALUES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES}


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=0)


@pytest.fixture(scope="module")
def scenes(world: SyntheticWorld) -> list[Scene]:
    return [world.scene(split, i) for split in SPLITS for i in range(NUM_SCENES)]


def pil_fill(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """(H, W) uint8: how a ReasonSeg reader fills the exported polygons."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        points = [tuple(p) for p in shape["points"]]
        draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas)


def reachable_from_border(free: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of ``free`` 4-connected to the image border (a plain flood fill)."""
    reached = np.zeros_like(free)
    reached[0, :], reached[-1, :], reached[:, 0], reached[:, -1] = free[0], free[-1], free[:, 0], free[:, -1]
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= free
        if (grown == reached).all():
            return reached
        reached = grown


# ---------------------------------------------------------------- determinism and splits


def test_same_seed_same_scene_and_text(world: SyntheticWorld) -> None:
    a = SyntheticWorld(seed=0).split("train")[7]
    world.scene("train", 3)  # generating other scenes first must not matter
    b = world.split("train")[7]
    assert np.array_equal(a.image, b.image)
    assert [(o.shape, o.colour, o.size, o.centre) for o in a.objects] == [
        (o.shape, o.colour, o.size, o.centre) for o in b.objects
    ]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects, strict=True))
    assert a.vqa() == b.vqa()
    qa, qb = a.segmentation_queries(), b.segmentation_queries()
    assert [(q.sample.query, q.kind) for q in qa] == [(q.sample.query, q.kind) for q in qb]
    assert all(np.array_equal(x.sample.mask, y.sample.mask) for x, y in zip(qa, qb, strict=True))


def test_different_index_or_seed_differs(world: SyntheticWorld) -> None:
    images = [world.scene("train", i).image for i in range(4)] + [
        SyntheticWorld(seed=1).scene("train", 0).image
    ]
    assert len({im.tobytes() for im in images}) == len(images)


def test_splits_are_disjoint(scenes: list[Scene]) -> None:
    assert len({s.image.tobytes() for s in scenes}) == len(scenes)
    assert len({s.name for s in scenes}) == len(scenes)


def test_split_is_a_sequence(world: SyntheticWorld) -> None:
    split = SyntheticWorld(seed=0, val_size=5).split("val")
    assert len(split) == 5 and len(split[1:3]) == 2
    assert np.array_equal(split[-1].image, world.scene("val", 4).image)
    with pytest.raises(IndexError):
        split[5]
    with pytest.raises(ValueError):
        world.split("dev")


# ---------------------------------------------------------------- rendering and masks


def test_rasterize_square_matches_hand_computed_pixels() -> None:
    # Half side 0.8 * 10 = 8 around 20.0: pixel centres x + 0.5 in [12, 28] -> x in 12..27.
    mask = rasterize(Placement("square", "red", "large", (20.0, 20.0), 10.0), 40, 40)
    expected = np.zeros((40, 40), bool)
    expected[12:28, 12:28] = True
    assert np.array_equal(mask, expected)


def test_compose_paints_in_depth_order() -> None:
    bottom = Placement("square", "red", "large", (20.0, 20.0), 10.0)
    top = Placement("square", "blue", "large", (30.0, 20.0), 10.0)  # covers x 22..37
    image, (under, over) = compose([bottom, top], np.zeros((40, 40, 3), np.uint8))
    expected_under = np.zeros((40, 40), bool)
    expected_under[12:28, 12:22] = True
    assert np.array_equal(under.mask, expected_under)
    assert over.mask.sum() == 16 * 16
    assert (image[under.mask] == COLOURS["red"]).all() and (image[over.mask] == COLOURS["blue"]).all()
    assert under.bbox == (12, 12, 22, 28)


def test_shapes_fit_their_extent_and_differ() -> None:
    masks = {}
    for shape in SHAPES:
        placement = Placement(shape, "red", "large", (32.0, 32.0), 20.0, angle=10.0)
        mask = rasterize(placement, 64, 64)
        ys, xs = np.nonzero(mask)
        assert np.hypot(xs + 0.5 - 32, ys + 0.5 - 32).max() <= EXTENT * 20.0
        masks[shape] = mask.tobytes()
    assert len(set(masks.values())) == len(SHAPES)


def test_generated_masks_are_exact_and_visible(scenes: list[Scene]) -> None:
    object_colours = np.array(list(COLOURS.values()))  # (C, 3)
    for scene in scenes:
        assert 2 <= len(scene.objects) <= 6
        covered = np.zeros(scene.image.shape[:2], bool)
        for obj in scene.objects:
            assert (scene.image[obj.mask] == COLOURS[obj.colour]).all()
            assert not (covered & obj.mask).any()  # visible masks never overlap
            covered |= obj.mask
            full = rasterize(obj, *scene.image.shape[:2])
            assert (obj.mask <= full).all() and obj.area >= MIN_VISIBLE_FRACTION * full.sum()
        # Completeness: no pixel outside every mask shows an object colour.
        rest = scene.image[~covered]  # (P, 3)
        assert not (rest[:, None, :] == object_colours[None]).all(-1).any()


def test_ring_masks_have_a_hole(scenes: list[Scene]) -> None:
    ring = Scene.from_placements([Placement("ring", "blue", "large", (64.0, 64.0), 20.0)]).objects[0]
    assert not ring.mask[64, 64] and not reachable_from_border(~ring.mask)[64, 64]
    rings = [(s, o) for s in scenes for o in s.objects if o.shape == "ring"]
    assert len(rings) >= 5
    for scene, obj in rings:
        cx, cy = (int(c) for c in obj.centre)
        assert not obj.mask[cy, cx]
        if np.array_equal(obj.mask, rasterize(obj, *scene.image.shape[:2])):  # unoccluded: hole enclosed
            assert not reachable_from_border(~obj.mask)[cy, cx]


# ---------------------------------------------------------------- VQA on a hand-made scene

HAND = [  # (shape, colour, size, centre, radius), with the answers a person would give
    ("ring", "red", "large", (28.0, 64.0), 18.0),  # left
    ("square", "yellow", "large", (60.0, 26.0), 15.0),  # top
    ("circle", "green", "large", (64.0, 106.0), 16.0),  # bottom
    ("square", "blue", "small", (100.0, 64.0), 9.0),  # right
    ("star", "blue", "small", (104.0, 18.0), 9.0),  # top-right corner: no single side
]
HAND_SIDES = ["left", "top", "bottom", "right", None]


@pytest.fixture(scope="module")
def hand_scene() -> Scene:
    return Scene.from_placements([Placement(*p) for p in HAND], background="striped")


AXES = {  # (axis, sign): which way along x (0) or y (1) a spatial word points
    **{"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)},
    **{"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)},
}


def described(text: str) -> list[str]:
    """Every "the [size] [colour] noun" phrase in ``text``, in order."""
    adjectives = "|".join([*SIZES, *COLOURS])
    nouns = "|".join([*SHAPES, "object"])
    return re.findall(rf"\bthe (?:(?:{adjectives}) )*(?:{nouns})\b", text)


def resolve(phrase: str, objects: list[SceneObject]) -> list[int]:
    """Indices of the objects fitting the attribute words of ``phrase`` ("the small square": all small squares)."""
    words = set(tokenize_words(phrase))
    return [
        k
        for k, obj in enumerate(objects)
        if all(
            getattr(obj, name) == w for name, values in ATTRIBUTE_VALUES.items() for w in values if w in words
        )
    ]


def refer(text: str, objects: list[SceneObject]) -> list[int]:
    """An independent reading of a referring expression: the objects it could mean, by plain comparisons."""
    if m := re.fullmatch(r"the (leftmost|rightmost|topmost|bottommost) (.+)", text):
        axis, sign = AXES[m[1]]
        candidates = resolve(m[2], objects)
        best = max(sign * objects[k].centre[axis] for k in candidates)
        return [k for k in candidates if sign * objects[k].centre[axis] == best]
    phrases = described(text)
    if len(phrases) == 2:  # "the ring left of the blue star"
        axis, sign = AXES[next(r for r in ("left of", "right of", "above", "below") if f" {r} " in text)]
        (anchor,) = resolve(phrases[1], objects)
        candidates = [k for k in resolve(phrases[0], objects) if k != anchor]
        return [k for k in candidates if sign * (objects[k].centre[axis] - objects[anchor].centre[axis]) > 0]
    assert phrases == [text], text
    return resolve(text, objects)


def test_vqa_answers_on_hand_made_scene(hand_scene: Scene) -> None:
    qas, objects = hand_scene.vqa(), hand_scene.objects
    kinds = {qa.kind for qa in qas}
    assert kinds == {
        "colour",
        "shape",
        "size",
        "count",
        "exists",
        "relation",
        "position",
        "caption",
        "identify",
    }
    for question, answer, kind in qas:
        if kind in ("colour", "shape", "size", "position"):
            (target,) = described(question)
            (k,) = resolve(target, objects)  # unambiguous: exactly one object fits
            expected = HAND_SIDES[k] if kind == "position" else getattr(objects[k], kind)
            assert answer == expected, question
        elif kind == "count":
            thing = re.match(r"how many (.+?) (are there|can you see)\?", question).group(1).split()
            noun = SINGULAR.get(thing[-1], "")  # "objects" names no shape
            assert NUMBERS[answer] == len(resolve(" ".join(thing[:-1] + [noun]), objects)), question
        elif kind == "exists":
            assert answer == ("yes" if resolve(question, objects) else "no"), question
        elif kind == "relation":
            (a,), (b,) = (resolve(phrase, objects) for phrase in described(question))
            axis, sign = AXES[
                next(r for r in ("left of", "right of", "above", "below") if f" {r} " in question)
            ]
            assert answer == ("yes" if sign * (HAND[a][3][axis] - HAND[b][3][axis]) > 0 else "no"), question
    caption = next(qa.answer for qa in qas if qa.kind == "caption")
    assert caption == (
        "a large red ring, a large yellow square, a large green circle, a small blue square and a small blue star"
        " on a striped background."
    )
    counts = {q: a for q, a, k in qas if k == "count"}
    assert counts.get("how many squares are there?", counts.get("how many squares can you see?")) == "two"
    assert not any(q == "what colour is the square?" for q, _, _ in qas)  # two squares: ambiguous


# ---------------------------------------------------------------- segmentation queries


def clue_description(text: str) -> tuple[str | None, str | None]:
    """(shape, colour) named indirectly by the clue phrases in ``text``."""
    shapes = [s for s, clues in SHAPE_CLUES.items() if any(c in text for c in clues)]
    colours = [c for c, clues in COLOUR_CLUES.items() if any(p in text for p in clues)]
    assert len(shapes) <= 1 and len(colours) <= 1, text
    return (shapes or [None])[0], (colours or [None])[0]


def test_identify_questions_name_the_one_object_their_phrase_means(
    scenes: list[Scene], hand_scene: Scene
) -> None:
    asked = 0
    for scene in [hand_scene, *scenes[:20]]:
        objects = scene.objects
        for question, answer, kind in scene.vqa():
            if kind != "identify":
                continue
            asked += 1
            phrase = re.fullmatch(r"what is (.+?)( in this image)?\?", question)[1]
            if re.match(r"the (object|shape|one|thing) that ", phrase):  # a reasoning clue
                shape, colour = clue_description(phrase)
                (k,) = [
                    k
                    for k, o in enumerate(objects)
                    if shape in (None, o.shape) and colour in (None, o.colour)
                ]
            else:
                (k,) = refer(phrase, objects)
            obj = objects[k]
            assert answer == f"{obj.size} {obj.colour} {obj.shape}", question
    assert asked >= 100


def test_every_query_has_an_unambiguous_target(scenes: list[Scene]) -> None:
    attribute_words = set(SHAPES) | set(COLOURS) | set(SIZES) | set(PLURALS.values())
    kinds = set()
    for scene in scenes:
        for query in scene.segmentation_queries():
            kinds.add(query.kind)
            sample, target = query.sample, query.target
            assert sample.source == "synthetic"
            assert sample.is_sentence == bool(set(".?") & set(sample.query))  # long forms are sentences
            if query.kind == "no_target":
                assert target is None and not sample.mask.any()
                continue
            assert np.array_equal(sample.mask, target.mask.astype(np.uint8)) and sample.mask.any()
            assert sample.is_sentence == (query.kind == "reasoning_long")
            if query.kind.startswith("reasoning"):
                assert not attribute_words & set(tokenize_words(sample.query)), sample.query
                shape, colour = clue_description(sample.query)
                fits = [o for o in scene.objects if shape in (None, o.shape) and colour in (None, o.colour)]
                assert fits == [target], sample.query
    assert kinds == set(QUERY_KINDS)


def test_no_target_queries_describe_absent_objects(scenes: list[Scene]) -> None:
    queries = [q for s in scenes for q in s.segmentation_queries()]
    no_target = [q for q in queries if q.kind == "no_target"]
    assert 0.05 < len(no_target) / len(queries) < 0.15  # default fraction 0.1
    scene_of = {s.name: s for s in scenes}
    for query in no_target:
        scene = scene_of[query.sample.name.rsplit("_", 1)[0]]
        shape, colour = clue_description(query.sample.query)
        if shape is None and colour is None:  # referring style: "the red star", "the ring"
            words = set(tokenize_words(query.sample.query))
            shape = next((s for s in SHAPES if s in words), None)
            colour = next((c for c in COLOURS if c in words), None)
        assert not [o for o in scene.objects if shape in (None, o.shape) and colour in (None, o.colour)]
    none = SyntheticWorld(seed=0, no_target_fraction=0.0)
    assert not [
        q for i in range(10) for q in none.scene("val", i).segmentation_queries() if q.kind == "no_target"
    ]


def test_referring_queries_mean_their_target(scenes: list[Scene], hand_scene: Scene) -> None:
    hand_queries = [q for q in hand_scene.segmentation_queries() if q.kind == "referring"]
    assert len(hand_queries) == len(HAND)  # every object of the hand-made scene can be referred to
    forms = set()
    for scene in [*scenes, hand_scene]:
        for query in scene.segmentation_queries():
            if query.kind == "referring":
                index = next(k for k, o in enumerate(scene.objects) if o is query.target)
                assert refer(query.sample.query, scene.objects) == [index], query.sample.query
                forms.add("most" if "most " in query.sample.query else len(described(query.sample.query)))
    assert forms == {"most", 1, 2}  # attributes alone, relative to an anchor, extremes


def test_spatial_words_need_clearly_separated_centres() -> None:
    # 3 px apart horizontally (under the gap), 65 px apart vertically; seeds vary the templates drawn.
    placements = [
        Placement("circle", "red", "large", (60.0, 30.0), 15.0),
        Placement("circle", "blue", "large", (63.0, 95.0), 15.0),
    ]
    words = set()
    for seed in range(10):
        scene = Scene.from_placements(placements, seed=seed)
        texts = [qa.question for qa in scene.vqa()] + [q.sample.query for q in scene.segmentation_queries()]
        words |= {w for text in texts for w in tokenize_words(text)}
    assert not words & {"left", "right", "leftmost", "rightmost"}
    assert {"above", "below", "topmost", "bottommost"} <= words


def test_held_out_pairs_are_never_train_targets(world: SyntheticWorld) -> None:
    in_images, test_targets = set(), set()
    for i in range(150):
        train = world.scene("train", i)
        in_images |= {(o.colour, o.shape) for o in train.objects} & HELD_OUT_PAIRS
        for query in train.segmentation_queries():
            assert query.target is None or (query.target.colour, query.target.shape) not in HELD_OUT_PAIRS
            assert not any(f"{c} {s}" in query.sample.query for c, s in HELD_OUT_PAIRS), query.sample.query
        for query in world.scene("test", i).segmentation_queries():
            if query.target is not None:
                test_targets.add((query.target.colour, query.target.shape))
    assert in_images == HELD_OUT_PAIRS  # they do appear in training images, just never as targets
    assert test_targets >= HELD_OUT_PAIRS


# ---------------------------------------------------------------- vocabulary


def test_tokenize_words() -> None:
    assert tokenize_words("Is the red ring left of the blue square?") == [
        "is", "the", "red", "ring", "left", "of", "the", "blue", "square", "?",
    ]  # fmt: skip
    assert tokenize_words("a, b. it's") == ["a", ",", "b", ".", "it", "'", "s"]


def test_every_generated_text_is_in_the_vocabulary(scenes: list[Scene], hand_scene: Scene) -> None:
    vocabulary = world_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    assert {"?", ".", ",", "'", "zero", "six", "yes", "no", "left", "bottom"} <= set(vocabulary)
    texts = set()
    for scene in [*scenes, hand_scene]:
        texts |= {t for qa in scene.vqa() for t in qa[:2]}
        texts |= {q.sample.query for q in scene.segmentation_queries()}
    used = {token for text in texts for token in tokenize_words(text)}
    assert used <= set(vocabulary), used - set(vocabulary)
    assert len(used) > 0.9 * len(vocabulary)  # the vocabulary lists what is said, not far more


# ---------------------------------------------------------------- ReasonSeg export


def test_pil_fills_degenerate_rectangles_inclusively() -> None:
    for x0, y0, x1, y1 in [(2, 3, 2, 3), (1, 1, 1, 4), (0, 2, 5, 2), (1, 1, 3, 4)]:
        expected = np.zeros((6, 7), np.uint8)
        expected[y0 : y1 + 1, x0 : x1 + 1] = 1
        shape = {"points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}
        assert np.array_equal(pil_fill([shape], 6, 7), expected), (x0, y0, x1, y1)


def test_rectangles_cover_random_masks_exactly() -> None:
    rng = np.random.default_rng(0)
    for density in (0.1, 0.5, 0.9):
        mask = rng.random((23, 31)) < density
        painted = np.zeros(mask.shape, int)
        for x0, y0, x1, y1 in mask_to_rectangles(mask):
            painted[y0 : y1 + 1, x0 : x1 + 1] += 1
        assert np.array_equal(painted, mask.astype(int))  # disjoint, and exactly the mask
        assert np.array_equal(pil_fill(mask_to_shapes(mask), *mask.shape), mask.astype(np.uint8))
    assert mask_to_rectangles(np.zeros((4, 4), bool)) == []
    assert mask_to_rectangles(np.ones((4, 5), bool)) == [(0, 0, 4, 3)]


def test_export_round_trip(tmp_path, world: SyntheticWorld) -> None:
    count = export_split(world, "val", tmp_path, num_scenes=3)
    queries = [q for i in range(3) for q in world.scene("val", i).segmentation_queries()]
    assert count == len(queries) == len(list((tmp_path / "val").glob("*.json")))
    read_back = {s.name: s for s in ReasonSegDataset(tmp_path, "val")}  # the project's ReasonSeg reader
    for query in queries:
        sample = query.sample
        record = json.loads((tmp_path / "val" / f"{sample.name}.json").read_text())
        assert record["text"] == [sample.query] and record["is_sentence"] == sample.is_sentence
        assert all(s["label"] == "target" and s["shape_type"] == "polygon" for s in record["shapes"])
        assert (record["shapes"] == []) == (query.kind == "no_target")
        assert np.array_equal(pil_fill(record["shapes"], *sample.mask.shape), sample.mask)
        read = read_back[sample.name]
        assert np.array_equal(read.mask, sample.mask)
        assert (read.query, read.is_sentence) == (sample.query, sample.is_sentence)
        assert read.image.shape == sample.image.shape
        assert np.abs(read.image.astype(int) - sample.image).mean() < 4  # JPEG is lossy, but only slightly
