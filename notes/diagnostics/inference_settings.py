"""Inference-time settings of a trained head, chosen on val and checked on test, with no retraining.

1. Keypoints: NMS radius, the number m of keypoints, and the global description alone (no keypoints).
2. Empty-mask gates for no-target queries: draw nothing when the largest mask logit, or the predicted area,
   is below a threshold chosen on val (the no-target test queries score 1 only for an empty mask).
3. Other checkpoints (e.g. weight averages) over the same frozen MLLM and SAM: gIoU on the same inputs.

python notes/diagnostics/inference_settings.py CHECKPOINT [OTHER_CHECKPOINT ...]   # e.g. lens:synthetic/lens

The frozen MLLM and SAM run once per split; each setting reruns only the head and the mask decoder.
"""

import dataclasses
import sys

import numpy as np
import torch

from lens.assets import resolve_model_id
from lens.cache import lens_inputs
from lens.evaluation import eval_splits
from lens.metrics import intersection_union, query_iou
from lens.weights import load_lens, load_lens_weights

torch.set_num_threads(2)
checkpoint, others = sys.argv[1], sys.argv[2:]
model = load_lens(checkpoint).eval()
splits = {s.split: s for s in eval_splits(model.config, ["synthetic/val", "synthetic/test"])}
inputs = {}  # split -> [(LensInputs, [(target mask, kind)])]
with torch.inference_mode():
    for name, split in splits.items():
        batches = []
        for start in range(0, len(split.data), 8):
            rows = [r for i in range(start, min(len(split.data), start + 8)) for r in split.data.rows(i)]
            batch = lens_inputs(model, rows)
            batch.masks = None
            batches.append((batch, [(np.asarray(r["mask"]), r["kind"]) for r in rows]))
        inputs[name] = batches


@torch.inference_mode()
def run(split: str, global_only: bool = False) -> list[dict]:
    """Per query: the mask logits' max, and the area / I / U of the mask the evaluation would score."""
    descriptor = model.descriptor.forward
    if global_only:  # every keypoint marked invalid: only f_s's description reaches SAM
        model.descriptor.forward = lambda f_s, n, valid: descriptor(f_s, n, torch.zeros_like(valid))
    records = []
    try:
        for batch, targets in inputs[split]:
            out = model(batch)
            for logits, (target, kind) in zip(out.mask_logits, targets, strict=True):
                mask = (logits > model.config.decoder.mask_threshold).numpy()
                i, u = intersection_union(mask, target)
                records.append(dict(kind=kind, max_logit=float(logits.max()), area=int(mask.sum()), i=i, u=u))
    finally:
        model.descriptor.forward = descriptor
    return records


def giou(records: list[dict], gate=None) -> float:
    """Mean per-query IoU; a gated query draws an empty mask (I = 0, U = target area)."""
    ious = [
        query_iou(0, r["u"] - r["area"] + r["i"]) if gate and gate(r) else query_iou(r["i"], r["u"])
        for r in records
    ]
    return float(np.mean(ious))


def by_kind(records: list[dict]) -> str:
    kinds = sorted({r["kind"] for r in records})
    return " ".join(f"{k} {giou([r for r in records if r['kind'] == k]):.3f}" for k in kinds)


kp = model.config.keypoints
print(f"{checkpoint}: shipped settings nms_radius {kp.nms_radius}, max_points {kp.max_points}")
settings = [(kp.nms_radius, kp.max_points, False), (kp.nms_radius, kp.max_points, True)]
settings += [(r, kp.max_points, False) for r in (1.0, 1.5, 3.0)] + [
    (kp.nms_radius, m, False) for m in (4, 8, 24)
]
shipped = dataclasses.replace(kp)
for radius, max_points, global_only in settings:
    kp.nms_radius, kp.max_points = radius, max_points  # read by LensModel.forward on every call
    val = run("val", global_only)
    print(
        f"val  radius {radius} m {max_points} global only {global_only}: gIoU {giou(val):.4f} ({by_kind(val)})"
    )
kp.nms_radius, kp.max_points = shipped.nms_radius, shipped.max_points

val, test = run("val"), run("test")
print(f"no gate: val {giou(val):.4f}  test {giou(test):.4f}")


def below(field: str, threshold: float):
    return lambda r: r[field] < threshold


for field, grid in (("max_logit", np.arange(0.0, 10.0, 0.25)), ("area", np.arange(0, 200, 5))):
    best = max(grid, key=lambda t: giou(val, below(field, t)))
    gate = below(field, best)
    print(f"gate {field} < {best:g} (best on val): val {giou(val, gate):.4f}  test {giou(test, gate):.4f}")

for other in others:
    load_lens_weights(model, resolve_model_id(other))
    model.eval()
    print(f"{other}: val {giou(run('val')):.4f}  test {giou(run('test')):.4f}")
