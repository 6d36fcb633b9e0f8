"""One-click mIoU of a SAM checkpoint on the first scenes of a split, to compare train against test (over/underfit).

python notes/diagnostics/sam_one_click.py [SAM] [SPLIT] [SCENES]   # e.g. lens:synthetic/sam train 300
"""

import sys

import torch
from transformers import SamModel, SamProcessor

from lens.assets import resolve_model_id
from lens.data.synthetic import SyntheticWorld
from lens.world.sam import point_ious

torch.set_num_threads(1)
source = resolve_model_id(sys.argv[1] if len(sys.argv) > 1 else "lens:synthetic/sam")
split = sys.argv[2] if len(sys.argv) > 2 else "test"
num_scenes = int(sys.argv[3]) if len(sys.argv) > 3 else 300
model = SamModel.from_pretrained(source, local_files_only=True).eval()
processor = SamProcessor.from_pretrained(source, local_files_only=True)
ious, _ = point_ious(model, processor, SyntheticWorld(seed=0).split(split)[:num_scenes])
print(f"{source} {split}[:{num_scenes}]: one-click mIoU {ious.mean():.4f} over {len(ious)} objects")
