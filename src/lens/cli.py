"""The ``lens`` command line: demo, predict, export (and train / eval / cache, see docs/training.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lens.assets import SYNTHETIC_LENS

app = typer.Typer(
    help="LENS: segmentation as a plug-in for a frozen multimodal LLM.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

# Errors a user can cause (bad path, unreadable image, bad config, wrong checkpoint): one line, no traceback.
USER_ERRORS = (OSError, ValueError)


def _run(job, *args, **kwargs):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return job(*args, **kwargs)
    except USER_ERRORS as error:
        console.print(f"[bold red]error:[/bold red] {error}")
        raise typer.Exit(code=2) from None


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where figures and scores.json go")] = Path("outputs/demo"),
    queries: Annotated[int, typer.Option(help="test-split queries to segment")] = 8,
    questions: Annotated[int, typer.Option(help="VQA questions to ask the frozen MLLM")] = 6,
    checkpoint: Annotated[
        str, typer.Option(help="LENS checkpoint directory or lens: asset")
    ] = SYNTHETIC_LENS,
    device: str = "cpu",
) -> None:
    """Run the whole method offline on the synthetic world with the shipped small models."""
    from lens.demo import run_demo

    _run(run_demo, out, queries, questions, checkpoint, device, Console())


@app.command()
def predict(
    image: Annotated[Path, typer.Argument(help="image file")],
    text: Annotated[str, typer.Argument(help="what to segment, e.g. 'Please segment the red ring.'")],
    checkpoint: Annotated[
        str, typer.Option(help="LENS checkpoint directory or lens: asset")
    ] = SYNTHETIC_LENS,
    out: Annotated[Path, typer.Option(help="figure to write")] = Path("outputs/prediction.png"),
    device: str = "cpu",
) -> None:
    """Segment what TEXT asks for in IMAGE and save a figure (mask, A_c, keypoints)."""

    def job() -> None:
        from PIL import Image

        from lens.visualize import lens_figure
        from lens.weights import load_lens

        if not image.is_file():
            raise FileNotFoundError(f"no image at {image}")
        picture = Image.open(image).convert("RGB")
        prediction = load_lens(checkpoint, device).eval().predict(picture, text)
        out.parent.mkdir(parents=True, exist_ok=True)
        lens_figure(picture, prediction, text).save(out)
        Console().print(
            f"mask covers {int(prediction.mask.sum())} px, score {prediction.score:.3f}; figure: {out}"
        )

    _run(job)


@app.command("export-world")
def export_world(
    out: Annotated[Path, typer.Argument(help="directory to write {split}/<name>.jpg + .json into")],
    split: str = "test",
    scenes: Annotated[int | None, typer.Option(help="number of scenes (default: whole split)")] = None,
    seed: int = 0,
) -> None:
    """Export a synthetic-world split in ReasonSeg's on-disk format."""

    def job() -> None:
        from lens.data.synthetic import SyntheticWorld, export_split

        count = export_split(SyntheticWorld(seed=seed), split, out, num_scenes=scenes)
        Console().print(f"wrote {count} samples to {out / split}")

    _run(job)


if __name__ == "__main__":
    app()
