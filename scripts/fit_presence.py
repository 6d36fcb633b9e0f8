"""Fit the presence calibration of a LENS checkpoint on the synthetic world, and score it on the test split.

Every segmentation query of the first ``--val-scenes`` val scenes (target and no-target) is run through the
checkpoint; a class-balanced logistic model on ``lens.pipeline.presence_features`` learns "is the target
there"; the first ``--test-scenes`` test scenes measure it. Written to ``<checkpoint>/presence.json``
(``--out`` elsewhere), which ``LensPipeline.from_pretrained`` loads.

    python scripts/fit_presence.py                      # the shipped lens:synthetic/lens
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image
from tqdm.auto import tqdm

from lens.assets import SYNTHETIC_LENS
from lens.data.synthetic import SyntheticWorld
from lens.data.templates import format_question
from lens.metrics import IoUAccumulator
from lens.pipeline import (
    PRESENCE_FEATURES,
    PRESENCE_FILE,
    LensPipeline,
    PresenceCalibrator,
    presence_features,
)

logger = logging.getLogger("fit_presence")


def collect(pipe: LensPipeline, world: SyntheticWorld, split: str, scenes: int) -> dict:
    """Features, labels, predicted and true masks of every query of the first ``scenes`` scenes."""
    rows: dict[str, list] = {"x": [], "present": [], "mask": [], "truth": [], "kind": []}
    for index in tqdm(range(scenes), desc=f"{split} scenes"):
        scene = world.scene(split, index)
        queries = scene.segmentation_queries()
        texts = [format_question(q.sample.query, q.sample.is_sentence) for q in queries]
        predictions = pipe.model.predict(Image.fromarray(scene.image), texts)
        for query, prediction in zip(queries, predictions, strict=True):
            features = presence_features(prediction)
            rows["x"].append([features[name] for name in PRESENCE_FEATURES])
            rows["present"].append(query.kind != "no_target")
            rows["mask"].append(prediction.mask)
            rows["truth"].append(query.sample.mask)
            rows["kind"].append(query.kind)
    rows["x"], rows["present"] = np.array(rows["x"]), np.array(rows["present"])
    return rows


def report(calibrator: PresenceCalibrator, rows: dict) -> dict:
    z = (rows["x"] - np.array(calibrator.mean)) / np.array(calibrator.std)
    decided = 1 / (1 + np.exp(-(z @ np.array(calibrator.weights) + calibrator.bias))) >= calibrator.threshold
    truth = rows["present"]
    plain, gated = IoUAccumulator(), IoUAccumulator()
    for k, (mask, target, keep) in enumerate(zip(rows["mask"], rows["truth"], decided, strict=True)):
        plain.update(mask, target, key=k)
        gated.update(mask if keep else np.zeros_like(mask), target, key=k)
    return {
        "queries": int(len(truth)),
        "no_target_queries": int((~truth).sum()),
        "accuracy": float((decided == truth).mean()),
        "balanced_accuracy": float(
            ((decided & truth).sum() / truth.sum() + (~decided & ~truth).sum() / (~truth).sum()) / 2
        ),
        "target_recall": float((decided & truth).sum() / truth.sum()),
        "no_target_recall": float((~decided & ~truth).sum() / (~truth).sum()),
        "iou_score_only_balanced_accuracy": iou_score_baseline(rows),
        "giou_ciou_without_presence": plain.compute(),
        "giou_ciou_with_presence": gated.compute(),
    }


def iou_score_baseline(rows: dict) -> float:
    """Best balanced accuracy any threshold on SAM's IoU head alone reaches (an upper bound for it)."""
    iou, truth = rows["x"][:, PRESENCE_FEATURES.index("iou_score")], rows["present"]
    best = 0.0
    for t in np.unique(iou):
        d = iou >= t
        best = max(best, ((d & truth).sum() / truth.sum() + (~d & ~truth).sum() / (~truth).sum()) / 2)
    return float(best)


def main(
    checkpoint: str = SYNTHETIC_LENS,
    val_scenes: Annotated[int, typer.Option(help="first scenes of the val split to fit on")] = 200,
    test_scenes: Annotated[int, typer.Option(help="first scenes of the test split to score")] = 200,
    out: Annotated[Path | None, typer.Option(help="default: <checkpoint>/presence.json")] = None,
    threads: int = 1,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    pipe = LensPipeline.from_pretrained(checkpoint, device="cpu", presence=None)
    world = SyntheticWorld(seed=pipe.model.config.data.synthetic_seed or 0)
    val = collect(pipe, world, "val", val_scenes)
    calibrator = PresenceCalibrator.fit(val["x"], val["present"], PRESENCE_FEATURES)
    test = collect(pipe, world, "test", test_scenes)
    calibrator.fitted_on = {
        "checkpoint": checkpoint,
        "split": "synthetic/val",
        "scenes": val_scenes,
        "queries": int(len(val["present"])),
        "command": shlex.join(["python", "scripts/fit_presence.py", *sys.argv[1:]]),
        "val": report(calibrator, val),
        "test": report(calibrator, test) | {"scenes": test_scenes},
    }
    from lens.pipeline import checkpoint_directory

    path = calibrator.save(out or checkpoint_directory(checkpoint) / PRESENCE_FILE)
    logger.info("wrote %s", path)
    print(json.dumps(calibrator.fitted_on, indent=2))


if __name__ == "__main__":
    typer.run(main)
