"""Semantic-segmentation readers and question templates, on tiny fixtures in each dataset's on-disk format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from lens.data.semantic import (
    ADE20KReader,
    CocoStuffReader,
    LabelMapReader,
    MapillaryReader,
    PacoLvisReader,
    PascalPartReader,
    part_phrase,
    read_ade20k_class_names,
)
from lens.data.templates import LONG_QUESTION_TEMPLATES, SHORT_QUESTION_TEMPLATES, format_question
from lens.data.types import IGNORE_INDEX

X = IGNORE_INDEX


def write_image(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image saved at ``path`` (JPEG or PNG by suffix); returns it as decoded from disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return np.asarray(Image.open(path).convert("RGB"))  # independent decode (JPEG is lossy)


def write_label(path: Path, label: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette:  # Mapillary ships palette PNGs whose indices are the class values
        image.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
        assert image.mode == "P"
    image.save(path)


def by_query(samples):
    return {s.query: s for s in samples}


# ---------------------------------------------------------------- ADE20K

ADE_INFO = (
    "Idx\tRatio\tTrain\tVal\tName\n"
    "1\t0.1576\t11664\t1172\twall\n"
    "2\t0.1072\t6046\t612\tbuilding, edifice\n"
    "3 \t0.0878\t8265\t796\tsky\n"  # the real file has stray spaces after some indices and names
    "4\t0.0621\t9336\t917\tfloor, flooring \n"
    "5\t0.0480\t6678\t641\ttree\n"
)
# Raw ADE values: 0 = "other" (ignored), v = class v - 1; 9 has no name in this short list (ignored).
ADE_LABEL = np.array(
    [
        [0, 1, 1, 2, 2, 2],
        [0, 1, 1, 2, 2, 9],
        [3, 3, 4, 4, 5, 5],
        [3, 3, 4, 4, 5, 0],
    ]
)


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    root.mkdir()
    (root / "objectInfo150.txt").write_text(ADE_INFO)
    write_image(root / "images/training/ADE_train_00000001.jpg", 4, 6, seed=1)
    write_label(root / "annotations/training/ADE_train_00000001.png", ADE_LABEL)
    write_image(root / "images/training/ADE_train_00000002.jpg", 4, 6, seed=2)
    write_label(root / "annotations/training/ADE_train_00000002.png", np.zeros((4, 6)))  # only "other"
    return root


def test_ade20k_class_names_first_synonym(ade_root: Path, tmp_path: Path) -> None:
    assert read_ade20k_class_names(ade_root / "objectInfo150.txt") == [
        "wall",
        "building",
        "sky",
        "floor",
        "tree",
    ]
    lisa = tmp_path / "ade20k_classes.json"
    lisa.write_text(json.dumps(["wall", "building", "sky"]))
    assert read_ade20k_class_names(lisa) == ["wall", "building", "sky"]


def test_ade20k_masks_and_ignore(ade_root: Path) -> None:
    reader = ADE20KReader(ade_root, num_classes_per_sample=None)
    assert len(reader) == 2
    samples = reader[0]
    assert [s.query for s in samples] == ["wall", "building", "sky", "floor", "tree"]
    expected_building = np.array(
        [
            [X, 0, 0, 1, 1, 1],
            [X, 0, 0, 1, 1, X],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, X],
        ],
        dtype=np.uint8,
    )
    building = by_query(samples)["building"]
    np.testing.assert_array_equal(building.mask, expected_building)
    assert building.mask.dtype == np.uint8
    np.testing.assert_array_equal(
        by_query(samples)["tree"].mask[2:], [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, X]]
    )
    image = np.asarray(Image.open(ade_root / "images/training/ADE_train_00000001.jpg").convert("RGB"))
    for s in samples:
        np.testing.assert_array_equal(s.image, image)
        assert (s.source, s.is_sentence) == ("ade20k", False)
    assert samples[0].name == "ADE_train_00000001:wall"
    assert reader[1] == []  # nothing but "other"


def test_at_most_k_classes_deterministic_per_seed_epoch_index(ade_root: Path) -> None:
    reader = ADE20KReader(ade_root, num_classes_per_sample=3, seed=7)
    present = {"wall", "building", "sky", "floor", "tree"}
    draws = []
    for epoch in range(10):
        queries = [s.query for s in reader.sample(0, epoch)]
        assert len(queries) == 3 and len(set(queries)) == 3 and set(queries) <= present
        assert queries == [s.query for s in ADE20KReader(ade_root, seed=7).sample(0, epoch)]  # fresh reader
        draws.append(tuple(queries))
    assert len(set(draws)) > 1  # the draw changes with the epoch
    reader.set_epoch(4)
    assert [s.query for s in reader[0]] == list(draws[4])
    masks = by_query(reader[0])
    full = by_query(ADE20KReader(ade_root, num_classes_per_sample=None)[0])
    for query, s in masks.items():
        np.testing.assert_array_equal(s.mask, full[query].mask)


def test_index_errors_and_iteration(ade_root: Path) -> None:
    reader = ADE20KReader(ade_root)
    with pytest.raises(IndexError):
        reader[2]
    assert len(list(reader)) == 2
    with pytest.raises(ValueError, match="num_classes_per_sample"):
        ADE20KReader(ade_root, num_classes_per_sample=0)


# ---------------------------------------------------------------- COCO-Stuff

COCOSTUFF_CLASSES = "0: unlabeled\n1: person\n2: bicycle\n3: building-other\n4: grass\n"
# Values are category id - 1: 0 person, 1 bicycle, 2 building-other (dropped), 3 grass; 255 unlabeled.
COCOSTUFF_LABEL = np.array([[0, 0, 1, 255], [2, 2, 3, 3], [3, 3, 3, 0]])


def test_cocostuff_drops_dash_classes_and_ignores_255(tmp_path: Path) -> None:
    (tmp_path / "cocostuff_classes.txt").write_text(COCOSTUFF_CLASSES)
    write_label(tmp_path / "cocostuff/train2017/000000000009.png", COCOSTUFF_LABEL)
    image = write_image(tmp_path / "coco/train2017/000000000009.jpg", 3, 4)
    reader = CocoStuffReader(
        tmp_path / "cocostuff/train2017",
        tmp_path / "coco/train2017",
        tmp_path / "cocostuff_classes.txt",
        num_classes_per_sample=None,
    )
    samples = by_query(reader[0])
    assert list(samples) == ["person", "bicycle", "grass"]  # never asks for "building-other"
    np.testing.assert_array_equal(samples["grass"].mask, [[0, 0, 0, X], [X, X, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(samples["person"].mask, [[1, 1, 0, X], [X, X, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(samples["person"].image, image)


def test_missing_image_is_reported(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text(COCOSTUFF_CLASSES)
    write_label(tmp_path / "labels/000000000009.png", COCOSTUFF_LABEL)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="000000000009.jpg"):
        CocoStuffReader(tmp_path / "labels", tmp_path / "images", tmp_path / "classes.txt")


# ---------------------------------------------------------------- Mapillary Vistas


def test_mapillary_readable_names_palette_labels(tmp_path: Path) -> None:
    labels = [
        {"name": "animal--bird", "readable": "Bird", "evaluate": True},
        {"name": "construction--flat--road", "readable": "Road", "evaluate": True},
        {
            "name": "marking--discrete--crosswalk-zebra",
            "readable": "Lane Marking - Crosswalk",
            "evaluate": True,
        },
        {"name": "void--unlabeled", "readable": "Unlabeled", "evaluate": False},
    ]
    (tmp_path / "config_v2.0.json").write_text(json.dumps({"labels": labels}))
    write_label(tmp_path / "training/v2.0/labels/abc.png", np.array([[0, 1, 1], [2, 3, 1]]), palette=True)
    write_image(tmp_path / "training/images/abc.jpg", 2, 3)
    samples = by_query(MapillaryReader(tmp_path, num_classes_per_sample=None)[0])
    assert list(samples) == ["bird", "road", "lane marking - crosswalk"]
    np.testing.assert_array_equal(samples["road"].mask, [[0, 1, 1], [0, X, 1]])


def test_label_values_sharing_a_name_form_one_class(tmp_path: Path) -> None:
    write_label(tmp_path / "l/a.png", np.array([[1, 2, 3], [7, 2, 1]]))
    write_image(tmp_path / "i/a.jpg", 2, 3)

    class TwoCars(LabelMapReader):
        source = "test"

    reader = TwoCars([tmp_path / "i/a.jpg"], [tmp_path / "l/a.png"], {1: "car", 2: "car", 3: "road"}, None)
    samples = by_query(reader[0])
    assert list(samples) == ["car", "road"]
    np.testing.assert_array_equal(samples["car"].mask, [[1, 1, 0], [X, 1, 1]])


# ---------------------------------------------------------------- PACO-LVIS / PASCAL-Part


def test_part_phrase() -> None:
    assert part_phrase("dog:head") == "the head of the dog"
    assert part_phrase("car_(automobile):wheel") == "the wheel of the car"
    assert part_phrase("potted plant:pot") == "the pot of the potted plant"
    assert part_phrase("trash_can") == "trash can"
    with pytest.raises(ValueError):
        part_phrase("a:b:c")


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_paco_lvis_union_per_category(tmp_path: Path) -> None:
    h, w = 5, 7
    head_a, head_b, wheel, can = (np.zeros((h, w), np.uint8) for _ in range(4))
    head_a[0:2, 0:2] = 1
    head_b[3:5, 5:7] = 1
    wheel[2, 1:6] = 1
    can[4, 0] = 1
    categories = [
        {"id": 1, "name": "dog:head"},
        {"id": 2, "name": "car_(automobile):wheel"},
        {"id": 3, "name": "trash_can"},
        {"id": 4, "name": "dog"},
    ]
    images = [
        {"id": 10, "file_name": "train2017/000000000010.jpg", "height": h, "width": w},
        {"id": 11, "file_name": "train2017/000000000011.jpg", "height": h, "width": w},  # no annotations
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "segmentation": rle(head_a), "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2]},
        {"id": 2, "image_id": 10, "category_id": 3, "segmentation": rle(can), "iscrowd": 0, "area": 1, "bbox": [0, 4, 1, 1]},
        {"id": 3, "image_id": 10, "category_id": 2, "segmentation": rle(wheel), "iscrowd": 0, "area": 5, "bbox": [1, 2, 5, 1]},
        {"id": 4, "image_id": 10, "category_id": 1, "segmentation": rle(head_b), "iscrowd": 0, "area": 4, "bbox": [5, 3, 2, 2]},
    ]  # fmt: skip
    ann_file = tmp_path / "paco_lvis_v1_train.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    image = write_image(tmp_path / "coco/train2017/000000000010.jpg", h, w)

    reader = PacoLvisReader(ann_file, tmp_path / "coco", num_classes_per_sample=None)
    assert len(reader) == 1  # image 11 has nothing to ask for
    samples = reader[0]
    assert [s.query for s in samples] == ["the head of the dog", "the wheel of the car", "trash can"]
    masks = by_query(samples)
    np.testing.assert_array_equal(masks["the head of the dog"].mask, head_a | head_b)
    np.testing.assert_array_equal(masks["the wheel of the car"].mask, wheel)
    np.testing.assert_array_equal(masks["trash can"].mask, can)
    np.testing.assert_array_equal(samples[0].image, image)
    assert samples[0].source == "paco_lvis"
    assert len(PacoLvisReader(ann_file, tmp_path / "coco", num_classes_per_sample=2)[0]) == 2


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_pascal_part_file_names_and_source(tmp_path: Path) -> None:
    part = np.zeros((3, 4), np.uint8)
    part[1, 1:3] = 1
    data = {
        "images": [{"id": 2008000002, "file_name": "2008_000002.jpg", "height": 3, "width": 4}],
        "annotations": [
            {"id": 0, "image_id": 2008000002, "category_id": 83, "segmentation": rle(part), "iscrowd": 0}
        ],
        "categories": [{"id": 83, "name": "potted plant:plant"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(data))
    write_image(tmp_path / "JPEGImages/2008_000002.jpg", 3, 4)
    (sample,) = PascalPartReader(tmp_path / "train.json", tmp_path / "JPEGImages")[0]
    assert (sample.query, sample.source) == ("the plant of the potted plant", "pascal_part")
    np.testing.assert_array_equal(sample.mask, part)


# ---------------------------------------------------------------- question templates


def test_templates_have_no_seg_token_or_chat_markup() -> None:
    for template in SHORT_QUESTION_TEMPLATES + LONG_QUESTION_TEMPLATES:
        assert "[SEG]" not in template and "<image>" not in template and "USER" not in template


def test_format_question_evaluation_prompts_match_lisa() -> None:
    assert format_question("dog", False) == "What is dog in this image? Please output segmentation mask."
    assert (
        format_question("Which object keeps food cold?", True)
        == "Which object keeps food cold? Please output segmentation mask."
    )
    assert format_question("  the thing that keeps food cold ", True) == (
        "the thing that keeps food cold. Please output segmentation mask."
    )
    with pytest.raises(ValueError):
        format_question("  ", False)


def test_format_question_training_draws_every_template_deterministically() -> None:
    rng = random.Random(0)
    drawn = [format_question("the head of the dog", False, rng) for _ in range(200)]
    replay = random.Random(0)
    assert drawn == [format_question("the head of the dog", False, replay) for _ in range(200)]
    assert set(drawn) == {
        "What is the head of the dog in this image? Please output segmentation mask.",
        "Can you segment the head of the dog in this image?",
        "Please segment the head of the dog in this image.",
        "What is the head of the dog in this image? Please respond with segmentation mask.",
    }
    long = {format_question("Find the fruit.", True, rng) for _ in range(50)}
    assert long == {
        "Find the fruit. Please output segmentation mask.",
        "Find the fruit. Please respond with segmentation mask.",
    }
