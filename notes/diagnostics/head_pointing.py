"""A_c pointing: is the A_c argmax on the target, and how much A_c mass falls on it? (val, first 40 scenes)

python notes/diagnostics/head_pointing.py CHECKPOINT [SCENES]   # e.g. lens:synthetic/lens 30
"""

import sys

import numpy as np
import torch

from lens.data.loader import SyntheticQueries
from lens.data.synthetic import SyntheticWorld
from lens.data.templates import format_question
from lens.metrics import giou_ciou
from lens.weights import load_lens

torch.set_num_threads(1)
model = load_lens(sys.argv[1]).eval()
qs = SyntheticQueries(SyntheticWorld(seed=0), "val", num_scenes=int(sys.argv[2]) if len(sys.argv) > 2 else 30)
items = [qs[i] for i in range(len(qs))]
hit = mass = n = 0
preds, targets = [], []
for q in items:
    p = model.predict(q.sample.image, format_question(q.sample.query, q.sample.is_sentence, None))
    preds.append(p.mask)
    targets.append(q.sample.mask)
    if q.kind == "no_target":
        continue
    g = p.geometry
    cover = g.mask_to_grid(torch.from_numpy((q.sample.mask == 1).astype(np.float32))).numpy() > 0.5
    a = p.attention_map
    hit += cover.flat[a.argmax()]
    mass += (a * cover).sum() / max(a.sum(), 1e-9)
    n += 1
print(
    f"{sys.argv[1]}: pointing {hit / n:.3f}  A_c mass on target {mass / n:.3f}  gIoU/cIoU {giou_ciou(preds, targets)}  ({len(items)} queries)"
)
