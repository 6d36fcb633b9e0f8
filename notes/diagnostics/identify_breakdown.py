"""Identify questions by the kind of phrase they ask about, and which of the three answer words come out right.

python notes/diagnostics/identify_breakdown.py MLLM   # e.g. runs/mllm-identify; first 100 test scenes
"""

import re
import sys

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lens.assets import resolve_model_id
from lens.data.synthetic import SyntheticWorld
from lens.world.vqa import answer_questions

torch.set_num_threads(2)
source = resolve_model_id(sys.argv[1])
model = LlavaForConditionalGeneration.from_pretrained(source)
processor = AutoProcessor.from_pretrained(source)
scenes = SyntheticWorld(seed=0).split("test")[:100]
items = [(scene, qa) for scene in scenes for qa in scene.vqa() if qa.kind == "identify"]
answers = answer_questions(model, processor, [(scene.image, qa.question) for scene, qa in items], 64, 6)


def phrase_kind(question: str) -> str:
    if " that " in question:
        return "clue"
    if re.search(r"\b(left of|right of|above|below)\b", question):
        return "relation"
    return "extreme" if "most " in question else "attributes"


rows: dict[str, list] = {}
for (_, qa), answer in zip(items, answers, strict=True):
    said, truth = answer.split(), qa.answer.split()
    words = [len(said) == 3 and said[i] == truth[i] for i in range(3)]
    rows.setdefault(phrase_kind(qa.question), []).append([said == truth, *words])
print("phrase kind, questions, right: all three words / size / colour / shape")
for kind, right in sorted(rows.items()):
    print(kind, len(right), *np.mean(right, axis=0).round(3))
