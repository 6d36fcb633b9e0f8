"""The ``lens`` command line: demo, predict, export (and train / eval / cache, see docs/training.md)."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from lens.assets import SYNTHETIC_LENS
from lens.images import DEFAULT_MAX_PIXELS

app = typer.Typer(
    help="LENS: segmentation as a plug-in for a frozen multimodal LLM.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from lens import __version__

        Console().print(f"lens {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """LENS: segmentation as a plug-in for a frozen multimodal LLM."""


# Errors a user can cause (bad path, unreadable image, bad config, wrong checkpoint): one line, no traceback.
# lens.errors.InvalidInput (and its InvalidConfig / InvalidCheckpoint / ImageNotFound) are ValueErrors.
USER_ERRORS = (OSError, ValueError)
INTERRUPTED = "interrupted; rerun the same command to resume"
INTERRUPTED_TRAIN = "interrupted; rerun the same command with --resume to resume"
Positive = typer.Option(min=1)


def _run(job, *args, interrupted: str = INTERRUPTED, **kwargs):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    message = None
    try:
        return job(*args, **kwargs)
    except KeyboardInterrupt:  # Ctrl-C: every long command is resumable, so say so instead of a traceback
        message, code = Text(interrupted), 130
    except USER_ERRORS as error:
        text = " ".join(str(error).split()) or type(error).__name__  # one line, whatever it held
        message, code = Text.assemble(("error: ", "bold red"), text), 2
    # Outside the except block the failed job's frames are freed, so their progress bars close (and print)
    # now, before the message: it stays the last line.
    gc.collect()
    console.print(message, soft_wrap=True)
    raise typer.Exit(code=code)


def _device(name: str) -> str:
    from lens.devices import validate_device

    return str(validate_device(name))


@app.command()
def info() -> None:
    """List the registered backbones (default tap layer per hub model) and mask decoders."""
    from rich.table import Table

    from lens.backbone import BACKBONES
    from lens.decoders import DECODERS

    table = Table("backbone", "class", "k / depth", "hub model", title="backbones (BackboneConfig.name)")
    for name, cls in BACKBONES.items():
        fraction = cls.DEFAULT_LAYER_FRACTION
        models = getattr(cls, "HUB_MODELS", {}) or {"": 0}
        for model_id, depth in models.items():
            k = f"{max(1, round(fraction * depth))} / {depth}" if depth else f"{fraction:.3f} · depth"
            table.add_row(name, cls.__name__, k, model_id)
    Console().print(table)
    table = Table("decoder", "class", "what", title="mask decoders (DecoderConfig.name)")
    for name, cls in DECODERS.items():
        table.add_row(name, cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    Console().print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where figures and scores.json go")] = Path("outputs/demo"),
    queries: Annotated[int, typer.Option(min=1, help="test-split queries to segment")] = 8,
    questions: Annotated[int, typer.Option(min=0, help="VQA questions to ask the frozen MLLM")] = 6,
    checkpoint: Annotated[
        str, typer.Option(help="LENS checkpoint directory or lens: asset")
    ] = SYNTHETIC_LENS,
    device: str = "cpu",
) -> None:
    """Run the whole method offline on the synthetic world with the shipped small models."""
    from lens.demo import run_demo

    _run(lambda: run_demo(out, queries, questions, checkpoint, _device(device), Console()))


@app.command()
def predict(
    image: Annotated[Path, typer.Argument(help="image file")],
    text: Annotated[str, typer.Argument(help="what to segment, e.g. 'Please segment the red ring.'")],
    checkpoint: Annotated[
        str, typer.Option(help="LENS checkpoint directory or lens: asset")
    ] = SYNTHETIC_LENS,
    out: Annotated[Path, typer.Option(help="figure to write")] = Path("outputs/prediction.png"),
    device: str = "cpu",
    max_pixels: Annotated[
        int, typer.Option(min=1, help="refuse larger images (decompression bombs)")
    ] = DEFAULT_MAX_PIXELS,
) -> None:
    """Segment what TEXT asks for in IMAGE and save a figure (mask, A_c, keypoints)."""

    def job() -> None:
        from lens.images import load_image, validate_query
        from lens.visualize import lens_figure
        from lens.weights import load_lens

        picture = load_image(image, max_pixels=max_pixels)  # upright RGB, checked before the model loads
        validate_query(text)
        prediction = load_lens(checkpoint, _device(device)).eval().predict(picture, text)
        out.parent.mkdir(parents=True, exist_ok=True)
        lens_figure(picture, prediction, text).save(out)
        Console().print(
            f"mask covers {int(prediction.mask.sum())} px, score {prediction.score:.3f}; figure: {out}"
        )

    _run(job)


def _config(path: Path, overrides: list[str] | None = None):
    from lens.config import LensConfig

    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    return LensConfig.from_yaml(path).override(overrides or [])


SET_HELP = "override a config value, e.g. --set train.max_steps=4000 (YAML value; repeatable)"


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="LensConfig YAML (see configs/): the whole recipe")],
    output_dir: Annotated[Path, typer.Option(help="checkpoints, logs, final model/")] = Path("runs/lens"),
    resume: Annotated[bool, typer.Option(help="continue from output_dir's latest checkpoint")] = False,
    cache_root: Annotated[Path | None, typer.Option(help="read features from `lens cache` output")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    stop_at_step: Annotated[int | None, typer.Option(help="end this run early; --resume continues")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier run's output in output_dir")] = False,
) -> None:
    """Train the LENS head (Accelerate: run under `accelerate launch` for several GPUs / nodes)."""

    def job() -> None:
        from lens.training import train

        train(
            _config(config, set_),
            output_dir,
            resume,
            cache_root=cache_root,
            stop_at_step=stop_at_step,
            overwrite=overwrite,
        )

    _run(job, interrupted=INTERRUPTED if resume else INTERRUPTED_TRAIN)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[
        str, typer.Argument(help="LENS checkpoint directory (e.g. runs/lens/model) or lens: asset")
    ],
    output_dir: Annotated[Path, typer.Option(help="results.md, results.json, per-sample records")] = Path(
        "runs/eval"
    ),
    config: Annotated[
        Path | None, typer.Option(help="where the data are (default: the checkpoint's)")
    ] = None,
    splits: Annotated[
        str | None, typer.Option(help="comma-separated dataset/split, e.g. reason_seg/val")
    ] = None,
    cache_root: Annotated[Path | None, typer.Option(help="read features from `lens cache` output")] = None,
    batch_size: Annotated[int, Positive] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="items per split (default: all)")] = None,
    save_predictions: bool = False,
) -> None:
    """Evaluate with the reference protocol (gIoU / cIoU; the paper's Table 2 / Table 3 layouts)."""

    def job() -> None:
        from lens.evaluation import evaluate_checkpoint

        evaluate_checkpoint(
            checkpoint,
            output_dir,
            config=None if config is None else _config(config),
            splits=None if splits is None else splits.split(","),
            cache_root=cache_root,
            batch_size=batch_size,
            limit=limit,
            save_predictions=save_predictions,
        )
        Console().print((output_dir / "results.md").read_text())

    _run(job)


@app.command()
def cache(
    config: Annotated[Path, typer.Argument(help="LensConfig YAML naming the models and data")],
    cache_root: Annotated[Path, typer.Option(help="where the sharded safetensors caches go")],
    splits: Annotated[
        str, typer.Option(help="comma-separated splits, e.g. train,val,reason_seg/test")
    ] = "train,val",
    shard_size: Annotated[int, Positive] = 256,
    batch_size: Annotated[int, Positive] = 8,
) -> None:
    """Pre-compute layer-k MLLM features and SAM image embeddings (resumable)."""

    def job() -> None:
        from lens.training import cache_datasets

        done = cache_datasets(_config(config), cache_root, tuple(splits.split(",")), shard_size, batch_size)
        Console().print(f"{len(done)} caches ready under {cache_root}")

    _run(job)


@app.command("probe")
def probe_layers(
    model: Annotated[
        str, typer.Argument(help="frozen MLLM: hub id, directory or lens: asset (lens:synthetic/mllm)")
    ],
    data: Annotated[
        str, typer.Option(help="dataset/split whose target queries are probed")
    ] = "synthetic/val",
    limit: Annotated[int | None, typer.Option(help="queries with a target to score")] = 200,
    backbone: Annotated[
        str | None, typer.Option(help="backbone family (lens.backbone.BACKBONES key; default: the config's)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="LensConfig YAML saying where datasets are")] = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    json_output: Annotated[bool, typer.Option("--json", help="print the result as JSON instead")] = False,
) -> None:
    """How well each layer's own text->image attention points at the target; recommends a tap layer."""

    def job() -> None:
        from lens.probe import print_table, run_probe

        data_config = None if config is None else _config(config).data
        result = run_probe(model, data, limit, backbone, data_config, batch_size, dtype, device)
        if json_output:
            typer.echo(result.to_json())
        else:
            print_table(result, Console())

    _run(job)


@app.command("export-world")
def export_world(
    out: Annotated[Path, typer.Argument(help="directory to write {split}/<name>.jpg + .json into")],
    split: str = "test",
    scenes: Annotated[int | None, typer.Option(min=1, help="number of scenes (default: whole split)")] = None,
    seed: int = 0,
) -> None:
    """Export a synthetic-world split in ReasonSeg's on-disk format."""

    def job() -> None:
        from lens.data.synthetic import SyntheticWorld, export_split

        count = export_split(SyntheticWorld(seed=seed), split, out, num_scenes=scenes)
        Console().print(f"wrote {count} samples to {out / split}")

    _run(job)


from lens.cli_use import register  # noqa: E402  (segment, chat, serve: see lens/cli_use.py)

register(app, _run)

if __name__ == "__main__":
    app()
