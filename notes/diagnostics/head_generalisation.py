"""Attention-only training on streaming train queries; pointing on held-out val queries.

python notes/diagnostics/head_generalisation.py CONFIG LR STEPS   # e.g. configs/synthetic.yaml 1e-3 400
"""

import sys

import numpy as np
import torch
from PIL import Image

from lens.config import LensConfig
from lens.data.loader import SyntheticQueries
from lens.data.synthetic import SyntheticWorld
from lens.data.templates import format_question
from lens.losses import attention_loss
from lens.weights import build_lens

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = LensConfig.from_yaml(sys.argv[1])
model = build_lens(cfg, torch.device("cpu"))
world = SyntheticWorld(seed=0)
train = world.split("train")
val = [
    q
    for q in (lambda s: [s[i] for i in range(len(s))])(SyntheticQueries(world, "val", num_scenes=40))
    if q.kind != "no_target"
][:160]


def prep(qs):
    return model.prepare(
        [Image.fromarray(q.sample.image) for q in qs],
        [format_question(q.sample.query, q.sample.is_sentence, None) for q in qs],
        [q.sample.mask for q in qs],
    )


vb = [prep(val[i : i + 32]) for i in range(0, len(val), 32)]
opt = torch.optim.AdamW(model.head.parameters(), lr=float(sys.argv[2]))


def step(inp, train_):
    f = inp.features
    h = model.head(f.hidden_states, f.attention_mask, f.position_ids, f.image_span, f.text_span, f.grid_size)
    tgt = torch.stack([g.mask_to_grid(m) for g, m in zip(f.geometries, inp.masks, strict=False)])
    loss = attention_loss(h.attention_map, tgt)
    if train_:
        opt.zero_grad()
        loss.backward()
        opt.step()
    am = h.attention_map.detach().flatten(1).argmax(1)
    return loss.item(), (tgt.flatten(1)[torch.arange(len(am)), am] > 0.5).float().mean().item()


rng = np.random.default_rng(0)
for it in range(int(sys.argv[3]) + 1):
    if it % 100 == 0:
        with torch.no_grad():
            r = [step(b, False) for b in vb]
        print(
            it,
            "val loss",
            round(np.mean([x[0] for x in r]), 4),
            "val pointing",
            round(np.mean([x[1] for x in r]), 3),
            flush=True,
        )
    qs = []
    while len(qs) < 16:
        sq = [q for q in train[int(rng.integers(len(train)))].segmentation_queries() if q.kind != "no_target"]
        qs += sq[:2]
    step(prep(qs), True)
