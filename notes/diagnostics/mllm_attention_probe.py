"""Which MLLM layer's own text->image attention points at the query's target?

python notes/diagnostics/mllm_attention_probe.py   # 80 val queries with a target
"""

import dataclasses

import numpy as np
import torch
from PIL import Image

from lens.assets import resolve_model_id
from lens.backbone import load_backbone
from lens.config import LensConfig
from lens.data.loader import SyntheticQueries
from lens.data.synthetic import SyntheticWorld
from lens.data.templates import format_question

torch.set_num_threads(1)
cfg = LensConfig.from_yaml("configs/synthetic.yaml")
bb = load_backbone(dataclasses.replace(cfg.backbone, model_id=resolve_model_id(cfg.backbone.model_id)))
bb.model.set_attn_implementation("eager")
qs = SyntheticQueries(SyntheticWorld(seed=0), "val", num_scenes=40)
items = [q for q in (qs[i] for i in range(len(qs))) if q.kind != "no_target"][:80]
L = bb.model.config.text_config.num_hidden_layers
hits = np.zeros((L, 2))
mass = np.zeros((L, 2))
for start in range(0, len(items), 16):
    chunk = items[start : start + 16]
    images = [Image.fromarray(q.sample.image) for q in chunk]
    texts = [format_question(q.sample.query, q.sample.is_sentence, None) for q in chunk]
    inp = bb._inputs(images, texts)
    with torch.no_grad():
        out = bb.model(**inp, output_attentions=True)
    ispan, tspan = bb._spans(inp["input_ids"], inp["attention_mask"].bool())
    feats = bb.encode(images, texts)
    for b, q in enumerate(chunk):
        g = feats.geometries[b]
        cover = g.mask_to_grid(torch.from_numpy((q.sample.mask == 1).astype(np.float32))).flatten()  # (144,)
        i0, i1 = ispan[b].tolist()
        t0, t1 = tspan[b].tolist()
        for layer in range(L):
            a = out.attentions[layer][b].mean(0)  # (Lq, Lk)
            for j, rows in enumerate([slice(t0, t1), slice(t1 - 1, t1)]):
                m = a[rows, i0:i1].mean(0)
                m = m / m.sum()
                hits[layer, j] += float(cover[m.argmax()] > 0.5)
                mass[layer, j] += float((m * (cover > 0.5)).sum())
n = len(items)
area = None
print("layer  pointing(mean text)  mass(mean text)  pointing(last tok)  mass(last tok)")
for layer in range(L):
    print(
        layer + 1,
        *(
            f"{v:.3f}"
            for v in (hits[layer, 0] / n, mass[layer, 0] / n, hits[layer, 1] / n, mass[layer, 1] / n)
        ),
    )
