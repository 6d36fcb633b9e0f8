"""ReasonSeg reader on fixtures written in the on-disk format; masks checked against hand-drawn rectangles."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lens.data.reason_seg import ReasonSegDataset, rasterize_shapes, read_annotation
from lens.data.types import IGNORE_INDEX

H, W = 8, 10


def _rect(label: str, x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
    return {
        "label": label,
        "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
        "group_id": None,
        "shape_type": "polygon",
        "flags": {},
    }


def _expected(*boxes: tuple[int, int, int, int, int]) -> np.ndarray:
    """Mask painted box by box; (x0, y0, x1, y1, value) with inclusive corners, as the polygons' vertices."""
    m = np.zeros((H, W), np.uint8)
    for x0, y0, x1, y1, v in boxes:
        m[y0 : y1 + 1, x0 : x1 + 1] = v
    return m


def test_rectangle_is_inclusive_of_its_vertices() -> None:
    mask = rasterize_shapes([_rect("target", 2, 1, 6, 4)], H, W)
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, _expected((2, 1, 6, 4, 1)))


def test_fractional_vertices_are_truncated() -> None:
    shape = _rect("target", 2, 1, 6, 4)
    shape["points"] = [[2.9, 1.7], [6.99, 1.0], [6.5, 4.9], [2.2, 4.2]]
    np.testing.assert_array_equal(rasterize_shapes([shape], H, W), _expected((2, 1, 6, 4, 1)))


def test_smaller_ignore_overwrites_larger_target_whatever_the_order() -> None:
    shapes = [_rect("ignore", 3, 2, 5, 4), _rect("target", 0, 0, 9, 7)]  # small listed first
    expected = _expected((0, 0, 9, 7, 1), (3, 2, 5, 4, IGNORE_INDEX))
    np.testing.assert_array_equal(rasterize_shapes(shapes, H, W), expected)
    np.testing.assert_array_equal(rasterize_shapes(shapes[::-1], H, W), expected)


def test_smaller_target_inside_ignore_region() -> None:
    shapes = [_rect("target", 4, 3, 5, 4), _rect("Ignore region", 1, 1, 8, 6)]
    expected = _expected((1, 1, 8, 6, IGNORE_INDEX), (4, 3, 5, 4, 1))
    np.testing.assert_array_equal(rasterize_shapes(shapes, H, W), expected)


def test_flag_shapes_are_skipped_but_only_the_exact_label() -> None:
    shapes = [_rect("FLAG", 0, 0, 9, 7), _rect("target", 2, 1, 3, 2)]
    np.testing.assert_array_equal(rasterize_shapes(shapes, H, W), _expected((2, 1, 3, 2, 1)))
    # LISA compares the whole label: a "flag pole" is an ordinary target
    shapes = [_rect("flag pole", 5, 5, 6, 6)]
    np.testing.assert_array_equal(rasterize_shapes(shapes, H, W), _expected((5, 5, 6, 6, 1)))


def test_equal_areas_earlier_shape_wins() -> None:
    shapes = [_rect("target", 0, 0, 3, 3), _rect("ignore", 2, 2, 5, 5)]
    expected = _expected((2, 2, 5, 5, IGNORE_INDEX), (0, 0, 3, 3, 1))
    np.testing.assert_array_equal(rasterize_shapes(shapes, H, W), expected)


def test_single_vertex_and_empty_list() -> None:
    mask = rasterize_shapes([{"label": "target", "points": [[7.4, 2.6]]}], H, W)
    np.testing.assert_array_equal(mask, _expected((7, 2, 7, 2, 1)))
    np.testing.assert_array_equal(rasterize_shapes([], H, W), np.zeros((H, W), np.uint8))


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="shape 1 needs 'label' and 'points'"):
        rasterize_shapes([_rect("target", 0, 0, 1, 1), {"label": "x"}], H, W)
    with pytest.raises(ValueError, match="shape 0 .*non-empty"):
        rasterize_shapes([{"label": "x", "points": []}], H, W)


def _write(
    split_dir: Path, name: str, texts: list[str], is_sentence: bool, shapes: list, color=(200, 30, 60)
):
    split_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), color).save(split_dir / f"{name}.jpg", quality=95)
    anno = {"text": texts, "is_sentence": is_sentence, "shapes": shapes, "imageHeight": H, "imageWidth": W}
    (split_dir / f"{name}.json").write_text(json.dumps(anno))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    box = [_rect("target", 2, 1, 6, 4)]
    _write(tmp_path / "train", "a", ["the cup", "a mug"], False, box)
    _write(tmp_path / "train", "b", ["What holds hot drinks?  "], True, [_rect("target", 0, 0, 3, 3)])
    _write(tmp_path / "val", "c", ["long one?", "long two?", "long three?"], True, box)
    _write(tmp_path / "val", "d", ["dog", "puppy"], False, [_rect("ignore", 0, 0, 2, 2)])
    return tmp_path


def test_train_has_every_query(root: Path) -> None:
    ds = ReasonSegDataset(root, "train")
    assert [(s.name, s.query, s.is_sentence) for s in ds] == [
        ("a_0", "the cup", False),
        ("a_1", "a mug", False),
        ("b_0", "What holds hot drinks?", True),
    ]
    sample = ds[0]
    assert sample.source == "reason_seg"
    assert sample.image.shape == (H, W, 3) and sample.image.dtype == np.uint8
    assert np.abs(sample.image.astype(int) - [200, 30, 60]).max() < 10  # JPEG, so approximately
    np.testing.assert_array_equal(sample.mask, _expected((2, 1, 6, 4, 1)))
    np.testing.assert_array_equal(ds[-1].mask, _expected((0, 0, 3, 3, 1)))
    with pytest.raises(IndexError):
        ds[3]
    assert [s.name for s in ds[1:]] == ["a_1", "b_0"]


def test_val_uses_first_query_per_image(root: Path) -> None:
    ds = ReasonSegDataset(root, "val")
    assert [(s.name, s.query) for s in ds] == [("c", "long one?"), ("d", "dog")]
    np.testing.assert_array_equal(ds[1].mask, _expected((0, 0, 2, 2, IGNORE_INDEX)))
    assert len(ReasonSegDataset(root, "val", one_query_per_image=False)) == 5


def test_short_and_long_subsets(root: Path) -> None:
    assert [s.name for s in ReasonSegDataset(root, "val", subset="long")] == ["c"]
    assert [s.name for s in ReasonSegDataset(root, "val", subset="short")] == ["d"]
    assert [s.name for s in ReasonSegDataset(root, "train", subset="short")] == ["a_0", "a_1"]
    with pytest.raises(ValueError, match="subset"):
        ReasonSegDataset(root, "val", subset="medium")  # type: ignore[arg-type]


def test_train_one_query_draw_is_seeded(root: Path) -> None:
    picks = {seed: [s.query for s in ReasonSegDataset(root, "train", True, seed=seed)] for seed in range(12)}
    assert picks[3] == [s.query for s in ReasonSegDataset(root, "train", True, seed=3)]
    assert {p[0] for p in picks.values()} == {"the cup", "a mug"}  # both queries of "a" get drawn
    assert all(p[1] == "What holds hot drinks?" for p in picks.values())
    assert [s.name for s in ReasonSegDataset(root, "train", True)] == ["a", "b"]


def test_images_are_read_lazily(root: Path) -> None:
    ds = ReasonSegDataset(root, "val")
    Image.new("RGB", (W, H), (0, 0, 250)).save(root / "val" / "c.jpg", quality=95)
    assert ds[0].image[..., 2].min() > 240


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    split = tmp_path / "val"
    _write(split, "r", ["q"], False, [_rect("target", 0, 0, 2, 1)])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": LabelMe annotates the displayed image
    Image.new("RGB", (W, H)).save(split / "r.jpg", exif=exif)
    sample = ReasonSegDataset(tmp_path, "val")[0]
    assert sample.image.shape == (W, H, 3)
    assert sample.mask.shape == (W, H) and sample.mask.sum() == 6


def test_cp1252_annotation(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(
        json.dumps({"text": ["caf\xe9"], "is_sentence": False, "shapes": []}, ensure_ascii=False).encode(
            "cp1252"
        )
    )
    assert read_annotation(path).texts == ["café"]


def test_clear_errors(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"split folder .*test.* available: \['train', 'val'\]"):
        ReasonSegDataset(root, "test")
    (root / "val" / "d.json").write_text(json.dumps({"text": ["dog"], "shapes": []}))
    with pytest.raises(ValueError, match=r"d\.json: missing key\(s\) \['is_sentence'\]"):
        ReasonSegDataset(root, "val")
    (root / "val" / "d.json").write_text(json.dumps({"text": [], "is_sentence": True, "shapes": []}))
    with pytest.raises(ValueError, match=r"d\.json: 'text' must be a non-empty list"):
        ReasonSegDataset(root, "val")
    (root / "val" / "d.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"d\.jpg has no annotation d\.json"):
        ReasonSegDataset(root, "val")
    (root / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg images"):
        ReasonSegDataset(root, "empty")
    (root / "train" / "a.json").write_text(
        json.dumps({"text": ["t"], "is_sentence": False, "shapes": [{"label": "t"}]})
    )
    with pytest.raises(ValueError, match=r"a\.json: shape 0 needs"):
        ReasonSegDataset(root, "train")[0]
