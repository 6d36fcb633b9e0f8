"""REFER reader on a tiny REFER-layout fixture: polygon, uncompressed and compressed RLE annotations."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from lens.data.refer import ReferDataset, decode_segmentation, split_matches

H, W = 10, 12


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE written out by hand: column-major run lengths, starting with a 0-run."""
    counts, current, run = [], 0, 0
    for v in m.flatten(order="F"):
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def _compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# COCO polygons: a pixel (r, c) covers [c, c+1) × [r, r+1), so the polygon x0..x1 fills columns x0..x1-1
POLY_MASK = _box(2, 6, 1, 5)
UNCOMPRESSED_MASK = _box(0, 3, 7, 11)
COMPRESSED_MASK = _box(5, 9, 2, 4) | _box(8, 9, 2, 10)  # an L
UNION_MASK = _box(1, 4, 1, 6) | _box(2, 7, 4, 9)  # two overlapping polygons
RLE_LIST_MASK = _box(0, 2, 0, 2) | _box(7, 10, 9, 12)

ANNOTATIONS = [
    (101, 1, [[1, 2, 5, 2, 5, 6, 1, 6]]),
    (102, 1, _uncompressed_rle(UNCOMPRESSED_MASK)),
    (103, 2, _compressed_rle(COMPRESSED_MASK)),
    # a 4-number "polygon" first: pycocotools would read the whole list as boxes
    (104, 3, [[0, 0, 1, 1], [1, 1, 6, 1, 6, 4, 1, 4], [4, 2, 9, 2, 9, 7, 4, 7]]),
    (105, 3, []),
    (106, 2, [_compressed_rle(_box(0, 2, 0, 2)), _compressed_rle(_box(7, 10, 9, 12))]),
]
# (ref_id, ann_id, split, sentences)
REFS = [
    (10, 101, "train", ["The Left Box ", "box on left"]),
    (11, 102, "val", ["top right", "upper right thing", "right"]),
    (12, 103, "val", ["the L"]),
    (13, 104, "testA", ["blob", "two boxes"]),
    (14, 105, "testB", ["nothing"]),
    (15, 106, "train", ["corners"]),
    (16, 101, "train", []),  # no sentence: no sample
]


@pytest.fixture
def refer(tmp_path: Path) -> tuple[Path, Path]:
    refer_root, image_root = tmp_path / "refer_seg", tmp_path / "train2014"
    (refer_root / "refcoco").mkdir(parents=True)
    image_root.mkdir()
    images = []
    for image_id in (1, 2, 3):
        name = f"COCO_train2014_{image_id:012d}.png"
        Image.new("RGB", (W, H), (image_id * 50, 0, 0)).save(image_root / name)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    anns = [
        {"id": a, "image_id": i, "segmentation": s, "category_id": 1, "iscrowd": int(isinstance(s, dict))}
        for a, i, s in ANNOTATIONS
    ]
    instances = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (refer_root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    image_of = {a: i for a, i, _ in ANNOTATIONS}
    refs = [
        {
            "ref_id": r,
            "ann_id": a,
            "image_id": image_of[a],
            "category_id": 1,
            "split": split,
            "sentences": [
                {"sent": s, "raw": s, "sent_id": 100 * r + k, "tokens": s.split()}
                for k, s in enumerate(sents)
            ],
        }
        for r, a, split, sents in REFS
    ]
    with (refer_root / "refcoco" / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f)
    return refer_root, image_root


def test_eval_mode_has_every_sentence(refer: tuple[Path, Path]) -> None:
    ds = ReferDataset(*refer, "refcoco", "val")
    assert [(s.name, s.query) for s in ds] == [
        ("11_0", "top right"),
        ("11_1", "upper right thing"),
        ("11_2", "right"),
        ("12_0", "the L".lower()),
    ]
    assert all(s.source == "refcoco" and not s.is_sentence for s in ds)
    np.testing.assert_array_equal(ds[0].mask, UNCOMPRESSED_MASK)
    np.testing.assert_array_equal(ds[3].mask, COMPRESSED_MASK)
    assert ds[3].image.shape == (H, W, 3) and (ds[3].image[..., 0] == 100).all()
    train = ReferDataset(*refer, "refcoco", "train")
    assert [(s.name, s.query) for s in train] == [
        ("10_0", "the left box"),
        ("10_1", "box on left"),
        ("15_0", "corners"),
    ]
    np.testing.assert_array_equal(train[0].mask, POLY_MASK)
    np.testing.assert_array_equal(train[2].mask, RLE_LIST_MASK)


def test_test_splits_follow_refer(refer: tuple[Path, Path]) -> None:
    names = {
        split: [s.name for s in ReferDataset(*refer, "refcoco", split)]
        for split in ("testA", "testB", "test")
    }
    assert names == {"testA": ["13_0", "13_1"], "testB": ["14_0"], "test": ["13_0", "13_1", "14_0"]}
    ds = ReferDataset(*refer, "refcoco", "test")
    np.testing.assert_array_equal(ds[0].mask, UNION_MASK)
    assert ds[0].mask.max() == 1  # overlapping parts are a union, not a sum
    np.testing.assert_array_equal(ds[2].mask, np.zeros((H, W), np.uint8))
    assert split_matches("testAB", "testB") and not split_matches("testA", "testB")


def test_train_mode_draws_one_sentence_per_ref(refer: tuple[Path, Path]) -> None:
    ds = ReferDataset(*refer, "refcoco", "train", mode="train", seed=7)
    assert len(ds) == 2
    assert ds[1].name == "15_0"
    twin = ReferDataset(*refer, "refcoco", "train", mode="train", seed=7)  # e.g. another DataLoader worker
    drawn = set()
    for epoch in range(16):
        ds.set_epoch(epoch)
        twin.set_epoch(epoch)
        first = ds[0]
        assert ds[0].name == twin[0].name == first.name  # (seed, epoch, index) fixes the draw
        drawn.add((first.name, first.query))
        np.testing.assert_array_equal(first.mask, POLY_MASK)
    assert drawn == {("10_0", "the left box"), ("10_1", "box on left")}  # epochs redraw


def test_decode_segmentation_rejects_wrong_rle_size() -> None:
    rle = _compressed_rle(POLY_MASK)
    with pytest.raises(ValueError, match="RLE size"):
        decode_segmentation(rle, H + 1, W)
    np.testing.assert_array_equal(decode_segmentation(_uncompressed_rle(POLY_MASK), H, W), POLY_MASK)


def test_clear_errors(refer: tuple[Path, Path]) -> None:
    refer_root, image_root = refer
    with pytest.raises(
        FileNotFoundError, match=r"refs\(umd\)\.p not found; refs files there: \['refs\(unc\)\.p'\]"
    ):
        ReferDataset(refer_root, image_root, "refcoco", "val", split_by="umd")
    with pytest.raises(
        ValueError, match=r"no refs in split 'bogus'; splits: \['testA', 'testB', 'train', 'val'\]"
    ):
        ReferDataset(refer_root, image_root, "refcoco", "bogus")
    with pytest.raises(ValueError, match="no default split_by"):
        ReferDataset(refer_root, image_root, "refcocoX", "val")
    with pytest.raises(ValueError, match="mode"):
        ReferDataset(refer_root, image_root, "refcoco", "val", mode="test")  # type: ignore[arg-type]
    (image_root / "COCO_train2014_000000000002.png").unlink()
    ds = ReferDataset(refer_root, image_root, "refcoco", "val")
    with pytest.raises(FileNotFoundError, match=r"image 2 of ref 12: .*000000000002\.png not found"):
        ds[3]
    Image.new("RGB", (W + 1, H)).save(image_root / "COCO_train2014_000000000002.png")
    with pytest.raises(ValueError, match=r"image is \(10, 13\), instances.json says \(10, 12\)"):
        ds[3]
    (refer_root / "refcoco" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json not found"):
        ReferDataset(refer_root, image_root, "refcoco", "val")
