"""The agent of Algorithm S1, measured: router accuracy per intent, confusion matrix, end-to-end gIoU / cIoU.

Each test scene of the synthetic world gets a short conversation of mixed turns with known intents, written in
phrasings that appear in none of the world's templates (``DIALOGUE``, ``SEGMENT``, ``FOLLOW_UP`` below are
held out: no model was trained on them). Segmentation turns name an object by one of the world's referring
expressions (``SegQuery`` of kind "referring"), so their target mask is known. Every conversation is run
twice: with the router deciding (routing errors included: a segmentation turn routed to dialogue or to a
follow-up draws no new mask and scores IoU 0), and with oracle routing.

    python benchmarks/agent_routing.py --scenes 60 --out docs/agent_results.json
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image
from tqdm.auto import tqdm

from lens.agent import INTENTS, Conversation, LensAgent
from lens.data.synthetic import SyntheticWorld
from lens.metrics import IoUAccumulator

logger = logging.getLogger("agent_routing")

# Held-out phrasings (none is a template of lens.data.synthetic.language or lens.data.templates).
SEGMENT = (
    "could you highlight {target} for me?",
    "mark {target} in the picture, please.",
    "show me exactly which pixels belong to {target}.",
    "cut out {target}.",
    "draw a mask over {target}.",
    "outline {target} please.",
)
DIALOGUE = (
    "how many shapes do you count here?",
    "tell me what the background looks like.",
    "tell me if anything here is red.",
    "which colours can you spot?",
    "say something about this image.",
    "are there more than three objects?",
)
FOLLOW_UP = (
    "tell me the colour of what you just marked.",
    "is the highlighted object small or large?",
    "what shape did you segment?",
    "where in the image is the one you outlined?",
    "tell me more about the selected object.",
)


def conversations(world: SyntheticWorld, scenes: int, seed: int = 0) -> list[dict]:
    """Per scene: a dialogue turn, a segmentation turn, a follow-up, a second segmentation, a dialogue."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(scenes):
        scene = world.scene("test", index)
        referring = [q for q in scene.segmentation_queries() if q.kind == "referring"]
        if len(referring) < 2:
            continue
        first, second = (referring[i] for i in rng.choice(len(referring), 2, replace=False))

        def pick(options: tuple[str, ...]) -> str:
            return options[int(rng.integers(len(options)))]

        turns = [
            {"text": pick(DIALOGUE), "intent": "dialogue"},
            {
                "text": pick(SEGMENT).format(target=first.sample.query),
                "intent": "segmentation",
                "mask": first,
            },
            {"text": pick(FOLLOW_UP), "intent": "follow_up"},
            {
                "text": pick(SEGMENT).format(target=second.sample.query),
                "intent": "segmentation",
                "mask": second,
            },
            {"text": pick(DIALOGUE), "intent": "dialogue"},
        ]
        out.append({"scene": scene, "turns": turns})
    return out


def run(agent: LensAgent, items: list[dict], oracle: bool) -> dict:
    confusion = Counter()
    iou = IoUAccumulator()
    for item in tqdm(items, desc="oracle" if oracle else "routed"):
        conversation = Conversation()
        conversation.add_image(Image.fromarray(item["scene"].image))
        for k, turn in enumerate(item["turns"]):
            reply = agent(conversation, turn["text"], intent=turn["intent"] if oracle else None)
            confusion[(turn["intent"], reply.routed)] += 1
            if turn["intent"] == "segmentation":
                truth = turn["mask"].sample.mask
                mask = (
                    reply.segmentation.mask if reply.segmentation is not None else np.zeros_like(truth, bool)
                )
                iou.update(mask, truth, key=f"{item['scene'].name}_{k}")
    scores = iou.compute()
    matrix = {t: {p: confusion[(t, p)] for p in INTENTS} for t in INTENTS}
    accuracy = {t: matrix[t][t] / max(1, sum(matrix[t].values())) for t in INTENTS}
    total = sum(confusion.values())
    return {
        "turns": total,
        "router_accuracy": sum(matrix[t][t] for t in INTENTS) / total,
        "accuracy_per_intent": accuracy,
        "confusion": matrix,  # true intent -> routed intent -> turns
        "segmentation_giou": scores["giou"],
        "segmentation_ciou": scores["ciou"],
        "segmentation_turns": scores["count"],
    }


def main(
    checkpoint: str = "lens:synthetic/lens",
    scenes: Annotated[int, typer.Option(help="first test scenes, one 5-turn conversation each")] = 60,
    out: Annotated[Path | None, typer.Option(help="write the results as JSON here")] = None,
    threads: int = 1,
    calibrate: Annotated[bool, typer.Option(help="contextual calibration of the label scores")] = True,
    oracle: Annotated[bool, typer.Option(help="also run with oracle routing")] = True,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    agent = LensAgent.from_pretrained(checkpoint, device="cpu")
    agent.max_new_tokens = 8
    if not calibrate:
        agent.router.prompt.content_free = None
    items = conversations(SyntheticWorld(seed=agent.pipeline.model.config.data.synthetic_seed or 0), scenes)
    results = {"checkpoint": checkpoint, "scenes": scenes, "calibrated": calibrate}
    results["routed"] = run(agent, items, False)
    if oracle:
        results["oracle"] = run(agent, items, True)
    text = json.dumps(results, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")


if __name__ == "__main__":
    typer.run(main)
