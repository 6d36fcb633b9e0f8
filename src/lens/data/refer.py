"""REFER reader for RefCOCO, RefCOCO+, RefCOCOg and RefCLEF.

Layout (Licheng Yu's REFER release, as LISA reads it in ``utils/refer.py``)::

    {refer_root}/{dataset}/refs({split_by}).p   # pickled list of refs
    {refer_root}/{dataset}/instances.json       # COCO-format images, annotations, categories
    {image_root}/{file_name}                    # COCO train2014 for refcoco*, saiapr_tc-12 for refclef

The evaluation protocol follows LISA's ``utils/dataset.py::ValDataset``: every sentence of every ref in
the split is one query, lower-cased and stripped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from lens.data.types import Sample
from lens.integrity import load_plain_pickle

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
MIN_POLYGON_COORDS = 6  # three (x, y) vertices; pycocotools reads a 4-number list as a box
Mode = Literal["train", "eval"]


def split_matches(ref_split: str, split: str) -> bool:
    """REFER's split semantics: "test" takes every test split, "testA" also takes "testAB", and so on."""
    if split == "test":
        return "test" in ref_split
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    return ref_split == split


def _rle(segm: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """A pycocotools RLE from an uncompressed (``counts`` list) or compressed (``counts`` str) one."""
    if list(segm["size"]) != [height, width]:
        raise ValueError(f"RLE size {segm['size']} differs from the image's ({height}, {width})")
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    counts = segm["counts"]
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/1 mask of a COCO segmentation: polygons, one RLE, or a list of RLEs.

    Parts are merged as a union. (LISA sums the per-part masks, so overlapping parts read 2, which its
    2-bin metric then drops from the target; the union is what the annotation means.) An empty
    segmentation is an empty mask, as in LISA.
    """
    if isinstance(segmentation, dict):
        rles = [_rle(segmentation, height, width)]
    elif all(isinstance(part, dict) for part in segmentation):
        rles = [_rle(part, height, width) for part in segmentation]
    else:
        polygons = [p for p in segmentation if len(p) >= MIN_POLYGON_COORDS]  # shorter ones have no area
        rles = mask_utils.frPyObjects(polygons, height, width) if polygons else []
    if not rles:
        return np.zeros((height, width), np.uint8)
    return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)  # (H, W)


def _load_refs(path: Path, split: str) -> list[dict[str, Any]]:
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("refs(*).p")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"REFER refs file {path} not found; refs files there: {found}")
    # upstream REFER ships the refs as pickle: read as plain data only, so no class or code can run
    refs = load_plain_pickle(path)
    for i, ref in enumerate(refs):
        missing = [k for k in REF_KEYS if k not in ref]
        if missing:
            raise ValueError(f"{path}: ref {i} lacks {missing}")
    chosen = [ref for ref in refs if split_matches(ref["split"], split)]
    if not chosen:
        raise ValueError(f"{path}: no refs in split {split!r}; splits: {sorted({r['split'] for r in refs})}")
    return chosen


class ReferDataset(Sequence[Sample]):
    """Referring-expression samples of one REFER dataset and split, images loaded lazily.

    Arguments:
      refer_root: folder holding ``{dataset}/refs({split_by}).p`` and ``{dataset}/instances.json``.
      image_root: folder the ``file_name`` of instances.json images is relative to.
      dataset: "refcoco", "refcoco+", "refcocog", "refclef" (the folder name under ``refer_root``).
      split: "train", "val", "test", "testA", "testB", ...
      split_by: refs partition ("unc", "umd", "google", "berkeley"); None takes the usual one per dataset.
      mode: "eval": every sentence of every ref is one sample (the reference protocol); "train": one
        sample per ref, its sentence drawn from (seed, epoch, index) so DataLoader workers agree and
        each epoch (``set_epoch``) redraws.
    """

    def __init__(
        self,
        refer_root: str | Path,
        image_root: str | Path,
        dataset: str,
        split: str,
        split_by: str | None = None,
        mode: Mode = "eval",
        seed: int = 0,
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if split_by is None:
            if dataset not in DEFAULT_SPLIT_BY:
                raise ValueError(f"no default split_by for {dataset!r}; known: {sorted(DEFAULT_SPLIT_BY)}")
            split_by = DEFAULT_SPLIT_BY[dataset]
        self.dataset, self.mode, self.seed, self.epoch = dataset, mode, seed, 0
        self.image_root = Path(image_root)
        data_dir = Path(refer_root) / dataset
        self._refs = [r for r in _load_refs(data_dir / f"refs({split_by}).p", split) if r["sentences"]]

        instances_path = data_dir / "instances.json"
        if not instances_path.is_file():
            raise FileNotFoundError(f"REFER instances file {instances_path} not found")
        with instances_path.open() as f:
            instances = json.load(f)
        anns = {ann["id"]: ann for ann in instances["annotations"]}
        images = {img["id"]: img for img in instances["images"]}
        for ref in self._refs:
            if ref["ann_id"] not in anns or ref["image_id"] not in images:
                raise ValueError(
                    f"{instances_path}: ref {ref['ref_id']} points to annotation {ref['ann_id']} / image "
                    f"{ref['image_id']}, not both present"
                )
        self._anns = {r["ann_id"]: anns[r["ann_id"]] for r in self._refs}
        self._images = {r["image_id"]: images[r["image_id"]] for r in self._refs}

        if mode == "eval":
            self._items = [(i, s) for i, ref in enumerate(self._refs) for s in range(len(ref["sentences"]))]
        else:
            self._items = [(i, -1) for i in range(len(self._refs))]  # sentence drawn in __getitem__
        logger.info(
            "%s(%s) %s [%s]: %d refs, %d samples", dataset, split_by, split, mode, len(self._refs), len(self)
        )

    def set_epoch(self, epoch: int) -> None:
        """Train mode: redraw each ref's sentence for this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        ref_index, sent_index = self._items[index]  # raises IndexError past the end
        ref = self._refs[ref_index]
        if sent_index < 0:
            rng = np.random.default_rng((self.seed, self.epoch, ref_index))
            sent_index = int(rng.integers(len(ref["sentences"])))
        info = self._images[ref["image_id"]]
        height, width = info["height"], info["width"]
        path = self.image_root / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {info['id']} of ref {ref['ref_id']}: {path} not found")
        with Image.open(path) as img:  # as stored, no EXIF rotation: instances.json sizes the stored pixels
            image = np.array(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        if image.shape[:2] != (height, width):
            raise ValueError(f"{path}: image is {image.shape[:2]}, instances.json says {(height, width)}")
        try:
            mask = decode_segmentation(self._anns[ref["ann_id"]]["segmentation"], height, width)
        except ValueError as err:
            raise ValueError(f"annotation {ref['ann_id']} of ref {ref['ref_id']}: {err}") from err
        return Sample(
            image=image,
            query=ref["sentences"][sent_index]["sent"].strip().lower(),
            mask=mask,
            is_sentence=False,
            source=self.dataset,
            name=f"{ref['ref_id']}_{sent_index}",
        )
