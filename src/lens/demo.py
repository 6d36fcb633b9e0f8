"""`lens demo`: the whole method, offline, on the synthetic world's test split with the shipped models."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from lens.assets import SYNTHETIC_LENS
from lens.data.synthetic import QUERY_KINDS, SegQuery, SyntheticWorld
from lens.data.templates import format_question
from lens.metrics import IoUAccumulator
from lens.visualize import lens_figure
from lens.weights import load_lens

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    scores: dict[str, dict[str, float]]  # kind (and "overall") -> {"giou", "ciou", "count"}
    vqa: list[tuple[str, str, str]]  # (question, expected, answered)
    figures: list[Path]


def pick_queries(world: SyntheticWorld, num: int) -> list[SegQuery]:
    """``num`` test-split queries, cycling through the query kinds so each kind is shown."""
    by_kind: dict[str, list[SegQuery]] = defaultdict(list)
    for index in range(world.split_size("test")):
        scene = world.scene("test", index)
        for query in scene.segmentation_queries():
            by_kind[query.kind].append(query)
        if all(len(by_kind[k]) * len(QUERY_KINDS) >= num for k in QUERY_KINDS):
            break
    picked = []
    for i in range(num):
        queue = by_kind[QUERY_KINDS[i % len(QUERY_KINDS)]]
        if queue:
            picked.append(queue.pop(0))
    return picked


def run_demo(
    out_dir: str | Path = "outputs/demo",
    num_queries: int = 8,
    num_questions: int = 6,
    checkpoint: str = SYNTHETIC_LENS,
    device: str = "cpu",
    console: Console | None = None,
) -> DemoResult:
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with console.status(f"loading {checkpoint}"):
        model = load_lens(checkpoint, device).eval()
    world = SyntheticWorld(seed=model.config.data.datasets.get("synthetic", {}).get("seed", 0))

    accumulators = defaultdict(IoUAccumulator)
    figures = []
    for i, query in enumerate(
        track(pick_queries(world, num_queries), description="segmenting", console=console)
    ):
        sample = query.sample
        image = Image.fromarray(sample.image)
        instruction = format_question(sample.query, sample.is_sentence)
        prediction = model.predict(image, instruction)
        for key in (query.kind, "overall"):
            accumulators[key].update(prediction.mask, sample.mask, key=sample.name)
        path = out_dir / f"{i:02d}_{query.kind}.png"
        lens_figure(image, prediction, f"[{query.kind}] {instruction}", truth=sample.mask).save(path)
        figures.append(path)

    vqa = []
    for index in range(num_questions):
        scene = world.scene("test", index)
        qa = scene.vqa()[index % max(1, len(scene.vqa()))]
        answer = model.backbone.generate([Image.fromarray(scene.image)], [qa.question], max_new_tokens=4)[0]
        vqa.append((qa.question, qa.answer, answer))

    scores = {k: acc.compute() for k, acc in accumulators.items()}
    _print(console, scores, vqa, out_dir)
    (out_dir / "scores.json").write_text(json.dumps({"segmentation": scores, "vqa": vqa}, indent=2))
    return DemoResult(scores, vqa, figures)


def _print(console: Console, scores: dict, vqa: list, out_dir: Path) -> None:
    table = Table(title="LENS on the synthetic world (test split)")
    for column in ("query kind", "queries", "gIoU", "cIoU"):
        table.add_column(column)
    for kind in [*QUERY_KINDS, "overall"]:
        if kind in scores:
            s = scores[kind]
            table.add_row(kind, str(s["count"]), f"{s['giou']:.3f}", f"{s['ciou']:.3f}")
    console.print(table)
    answers = Table(title="The frozen MLLM still answers questions")
    for column in ("question", "expected", "MLLM answer"):
        answers.add_column(column)
    for question, expected, answer in vqa:
        answers.add_row(question, expected, answer)
    console.print(answers)
    console.print(f"figures and scores.json written to [bold]{out_dir}[/bold]")
