"""A small, fully offline world of coloured shapes in which the whole LENS method can run end to end.

Scenes come with exact masks, VQA pairs and captions (to pretrain a small MLLM), and referring, reasoning and
no-target segmentation queries, in the canonical wording or composed from seen / held-out phrasing pools
(``phrasing.py``). Everything is deterministic from a seed.
"""

from lens.data.synthetic.export import export_split, mask_to_rectangles, mask_to_shapes, write_reason_seg
from lens.data.synthetic.language import Description, tokenize_words, world_vocabulary
from lens.data.synthetic.phrasing import PHRASINGS, Phraser, Ref
from lens.data.synthetic.queries import QA, QUERY_KINDS, SegQuery
from lens.data.synthetic.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Placement, SceneObject
from lens.data.synthetic.world import HELD_OUT_PAIRS, SPLITS, Scene, SceneSplit, SyntheticWorld

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT_PAIRS",
    "PHRASINGS",
    "QA",
    "QUERY_KINDS",
    "Ref",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Description",
    "Phraser",
    "Placement",
    "Scene",
    "SceneObject",
    "SceneSplit",
    "SegQuery",
    "SyntheticWorld",
    "export_split",
    "mask_to_rectangles",
    "mask_to_shapes",
    "tokenize_words",
    "world_vocabulary",
    "write_reason_seg",
]
