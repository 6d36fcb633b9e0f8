"""Per query on one val scene: A_c per object and each text token's attention mass on the image.

python notes/diagnostics/head_attention_by_token.py CHECKPOINT   # e.g. lens:synthetic/lens
"""

import sys

import numpy as np
import torch
from PIL import Image

from lens.data.synthetic import SyntheticWorld
from lens.data.templates import format_question
from lens.head import causal_mask, rotary
from lens.weights import load_lens

torch.set_num_threads(1)
model = load_lens(sys.argv[1]).eval()
scene = SyntheticWorld(seed=0).split("val")[3]
print([(o.size, o.colour, o.shape) for o in scene.objects])
img = Image.fromarray(scene.image)
texts = [format_question(f"the {o.colour} {o.shape}", False, None) for o in scene.objects]
inp = model.prepare([img] * len(texts), texts)
f = inp.features
with torch.no_grad():
    h = model.head(f.hidden_states, f.attention_mask, f.position_ids, f.image_span, f.text_span, f.grid_size)
    x = f.hidden_states
    mask = causal_mask(f.attention_mask, x.dtype)
    rope = rotary(f.position_ids, model.head.spec.head_dim, model.head.spec.rope_theta, x.dtype)
    _, probs, _ = model.head.layers[0](x, rope, mask, need_probs=True)
for i, o in enumerate(scene.objects):
    cover = f.geometries[i].mask_to_grid(torch.from_numpy(o.mask.astype(np.float32))) > 0.5
    s = h.attention_scores[i]
    per_obj = []
    for _j, o2 in enumerate(scene.objects):
        c2 = f.geometries[i].mask_to_grid(torch.from_numpy(o2.mask.astype(np.float32))) > 0.5
        per_obj.append(round(float(s[c2].mean()), 2) if c2.any() else None)
    t0, t1 = f.text_span[i].tolist()
    i0, i1 = f.image_span[i].tolist()
    img_mass = probs[i].mean(0)[t0:t1, i0:i1].sum(-1)  # per text token, mass on image
    print(texts[i][:40], "mean s per object:", per_obj, "bg", round(float(s[~cover].mean()), 2))
    print("   per-token image mass:", [round(v, 2) for v in img_mass.tolist()])
