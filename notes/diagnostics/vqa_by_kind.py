"""VQA exact-match accuracy of an MLLM checkpoint on the first test scenes, by question kind.

python notes/diagnostics/vqa_by_kind.py [MLLM] [KIND ...]   # e.g. lens:synthetic/mllm identify (all kinds: none)
"""

import json
import sys
import time

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lens.assets import resolve_model_id
from lens.data.synthetic import SyntheticWorld
from lens.world.vqa import evaluate_vqa

torch.set_num_threads(1)
source = resolve_model_id(sys.argv[1] if len(sys.argv) > 1 else "lens:synthetic/mllm")
model = LlavaForConditionalGeneration.from_pretrained(source)
processor = AutoProcessor.from_pretrained(source)
start = time.perf_counter()
scenes = SyntheticWorld(seed=0).split("test")[:200]
result = evaluate_vqa(model, processor, scenes, batch_size=64, kinds=sys.argv[2:] or None)
result["seconds"] = round(time.perf_counter() - start, 1)
print(json.dumps(result, indent=2))
