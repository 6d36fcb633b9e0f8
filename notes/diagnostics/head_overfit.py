"""Can the head's attention learn query discrimination at all? Overfit 64 fixed train queries (attention loss only).

python notes/diagnostics/head_overfit.py CONFIG LR EPOCHS   # e.g. configs/synthetic.yaml 1e-3 60
"""

import sys

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
qs = SyntheticQueries(SyntheticWorld(seed=0), "train", num_scenes=40)
items = [q for q in (qs[i] for i in range(len(qs))) if q.kind != "no_target"][:64]
batches = []
for s in range(0, 64, 16):
    ch = items[s : s + 16]
    batches.append(
        model.prepare(
            [Image.fromarray(q.sample.image) for q in ch],
            [format_question(q.sample.query, q.sample.is_sentence, None) for q in ch],
            [q.sample.mask for q in ch],
        )
    )
params = list(model.head.parameters())
opt = torch.optim.AdamW(params, lr=float(sys.argv[2]))


def run(train):
    hits = n = 0
    tot = 0
    for inp in batches:
        f = inp.features
        h = model.head(
            f.hidden_states, f.attention_mask, f.position_ids, f.image_span, f.text_span, f.grid_size
        )
        tgt = torch.stack([g.mask_to_grid(m) for g, m in zip(f.geometries, inp.masks, strict=False)])
        loss = attention_loss(h.attention_map, tgt)
        if train:
            opt.zero_grad()
            loss.backward()
            opt.step()
        tot += loss.item()
        am = h.attention_map.detach().flatten(1).argmax(1)
        hits += (tgt.flatten(1)[torch.arange(len(am)), am] > 0.5).sum().item()
        n += len(am)
    return tot / len(batches), hits / n


for epoch in range(int(sys.argv[3])):
    loss, p = run(True)
    if epoch % 10 == 0:
        print(epoch, round(loss, 4), "pointing", round(p, 3), flush=True)
print("final", run(False))
