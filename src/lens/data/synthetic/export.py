"""Export synthetic queries in ReasonSeg's on-disk format, with masks that survive the round trip exactly.

ReasonSeg stores masks as polygons that readers fill with PIL (``ImageDraw.polygon(points, fill=v, outline=v)``),
which paints a polygon with integer vertices inclusively, outline included. So any pixel set is encoded
exactly by splitting it into axis-aligned rectangles of pixels and writing each as its four corner pixels,
[(x0, y0), (x1, y0), (x1, y1), (x0, y1)] with inclusive indices (a single pixel is four equal points).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from lens.data.synthetic.queries import SegQuery
from lens.data.synthetic.world import SyntheticWorld

logger = logging.getLogger(__name__)

TARGET_LABEL = "target"
JPEG_QUALITY = 95


def mask_to_rectangles(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Cover the nonzero pixels of ``mask`` (H, W) by disjoint rectangles (x0, y0, x1, y1), ends inclusive.

    Horizontal runs of each row are merged with identical runs of the rows below, so a shape needs about one
    rectangle per change of its outline rather than one per row.
    """
    mask = np.asarray(mask, bool)
    rectangles: list[tuple[int, int, int, int]] = []
    open_runs: dict[tuple[int, int], int] = {}  # (x0, x1) -> first row
    for y, row in enumerate([*mask, np.zeros(mask.shape[1], bool)]):  # a blank row closes every run
        edges = np.flatnonzero(
            np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        )  # starts, ends alternating
        runs = {(int(x0), int(x1) - 1) for x0, x1 in zip(edges[::2], edges[1::2], strict=True)}
        for run in [r for r in open_runs if r not in runs]:
            rectangles.append((run[0], open_runs.pop(run), run[1], y - 1))
        for run in runs - open_runs.keys():
            open_runs[run] = y
    return sorted(rectangles, key=lambda r: (r[1], r[0]))


def mask_to_shapes(mask: np.ndarray, label: str = TARGET_LABEL) -> list[dict]:
    """ReasonSeg ``shapes`` entries (labelme polygons) that rasterise back to exactly ``mask``."""
    return [
        {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "shape_type": "polygon"}
        for x0, y0, x1, y1 in mask_to_rectangles(mask)
    ]


def write_reason_seg(queries: Iterable[SegQuery], directory: str | Path) -> int:
    """Write each query as ``<name>.jpg`` + ``<name>.json`` in ``directory``; returns how many were written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for query in queries:
        sample = query.sample
        Image.fromarray(sample.image).save(directory / f"{sample.name}.jpg", quality=JPEG_QUALITY)
        record = {
            "text": [sample.query],
            "is_sentence": sample.is_sentence,
            "shapes": mask_to_shapes(sample.mask == 1),
            "kind": query.kind,  # not part of ReasonSeg; readers ignore it
        }
        (directory / f"{sample.name}.json").write_text(json.dumps(record))
        count += 1
    return count


def export_split(
    world: SyntheticWorld, split: str, out_dir: str | Path, num_scenes: int | None = None
) -> int:
    """Write the queries of the first ``num_scenes`` scenes of ``split`` to ``{out_dir}/{split}/``."""
    count = write_reason_seg(world.split(split).segmentation_queries(num_scenes), Path(out_dir) / split)
    logger.info("wrote %d %s queries to %s", count, split, Path(out_dir) / split)
    return count
