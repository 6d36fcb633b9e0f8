"""LENS's ablations (paper Table 2 and beyond) as named rows of ``--set`` overrides of one recipe.

Each row is LENS with config switches flipped (docs/training.md, "Ablation switches"); every switch defaults
to the paper's method. Rows are written for the synthetic world (configs/synthetic.yaml: its MLLM has 6
layers and the shipped k is 5), so "early / middle / last" are k = 2 / 3 / 6, and the head initialised from
backbone layers k+1, k+2 runs at k = 4 (the highest k with two layers above it) beside a random-init k = 4.

    python scripts/ablations.py rows                              # the table
    python scripts/ablations.py params                            # trainable parameters, 7B and synthetic
    python scripts/ablations.py train --runs runs/ablations --rows no_subpixel,m4 --steps 4000
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import torch
import typer
from transformers import LlavaConfig, SamConfig, SamModel

from lens.assets import resolve_model_id
from lens.backbone import LayerSpec, LlavaBackbone
from lens.config import LensConfig
from lens.decoders import SamDecoder
from lens.model import LensModel
from lens.weights import SpecBackbone, backbone_spec

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "synthetic.yaml"

# row -> its overrides of the recipe. "lens" is the recipe itself (k = 5, m = 16, r = 2 cells), so "m16" and
# "nms_r2" repeat it under the sweep's own name.
ROWS: dict[str, tuple[str, ...]] = {
    "lens": (),
    "layer_early": ("backbone.layer=2",),
    "layer_middle": ("backbone.layer=3",),
    "layer_last": ("backbone.layer=6",),  # Table 2 "14th layer -> 30th layer", at the stack's end
    "m4": ("keypoints.max_points=4",),
    "m8": ("keypoints.max_points=8",),
    "m16": ("keypoints.max_points=16",),
    "nms_r1": ("keypoints.nms_radius=1.0",),
    "nms_r2": ("keypoints.nms_radius=2.0",),
    "nms_r3": ("keypoints.nms_radius=3.0",),
    "nms_r4": ("keypoints.nms_radius=4.0",),
    "no_kp_desc": ("descriptor.keypoint_descriptions=false",),  # Table 2 "w/o keypoint description"
    "no_global": ("descriptor.global_description=false",),  # Table 2 "w/o global description"
    "no_attn_loss": ("loss.attention_weight=0",),  # Table 2 "w/o L_attn"
    "no_subpixel": ("keypoints.subpixel=false",),  # §3.2 / S1.2 without the Newton step
    "init_backbone_k4": ("backbone.layer=4", "head.init_from_backbone=true"),
    "random_init_k4": ("backbone.layer=4",),
    "narrow256": ("descriptor.width=256",),  # SAM's prompt width at 7B scale (wider than d = 192 here)
    "narrow64": ("descriptor.width=64",),  # the synthetic SAM's prompt width
}

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


def row_config(row: str, recipe: Path = RECIPE) -> LensConfig:
    if row not in ROWS:
        raise typer.BadParameter(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    return LensConfig.from_yaml(recipe).override(list(ROWS[row]))


# ----- parameter counts ---------------------------------------------------------------------------------------


@dataclass
class Counts:
    head: int
    descriptor: int
    decoder: (
        int  # SAM's mask decoder as LENS trains it (no IoU head, no multimask hypernetworks) + [CLS] position
    )

    @property
    def total(self) -> int:
        return self.head + self.descriptor + self.decoder


def llava_spec(llava: LlavaConfig) -> LayerSpec:
    """The head's layer shape for a LLaVA config, by the backbone's own mapping (it reads only the config)."""
    return LlavaBackbone.layer_spec(SimpleNamespace(model=SimpleNamespace(config=llava)))


def count_trainable(config: LensConfig, spec: LayerSpec, sam: SamConfig) -> Counts:
    """Trainable parameters of LENS built from ``config`` on the meta device: no weights, no download.

    The head's initialisation (``head.init_from_backbone``) and the tapped layer change no shape, so neither
    is needed here (the copy would need the MLLM's weights)."""
    config = config.override(["head.init_from_backbone=false"])
    with torch.device("meta"):
        decoder = SamDecoder(
            SamModel(sam), processor=None, train_mask_decoder=config.decoder.train_mask_decoder
        )
        model = LensModel(config, SpecBackbone(spec, config.backbone.layer), decoder)
    tensors = dict(model.named_parameters())
    sizes = {part: 0 for part in ("head", "descriptor", "decoder")}
    for name in model.trainable_names():
        sizes[name.split(".", 1)[0]] += tensors[name].numel()
    return Counts(**sizes)


def scales(recipe: LensConfig) -> dict[str, tuple[LayerSpec, SamConfig]]:
    """LLaVA-1.5-7B (transformers' ``LlavaConfig()`` defaults: Llama hidden 4096, 32 heads, MLP 11008) with
    SAM ViT-H's mask decoder (``SamConfig()``: every SAM size shares it), and the recipe's own models."""
    return {
        "LLaVA-1.5-7B + SAM": (llava_spec(LlavaConfig()), SamConfig()),
        "synthetic": (
            backbone_spec(recipe.backbone),
            SamConfig.from_pretrained(resolve_model_id(recipe.decoder.model_id)),
        ),
    }


def parameter_table(rows: list[str], recipe: Path = RECIPE) -> dict[str, dict[str, Counts]]:
    """scale -> row -> counts."""
    configs = {row: row_config(row, recipe) for row in rows}
    return {
        scale: {row: count_trainable(config, spec, sam) for row, config in configs.items()}
        for scale, (spec, sam) in scales(configs[rows[0]]).items()
    }


def markdown(table: dict[str, dict[str, Counts]]) -> str:
    """One table per scale; rows with the same counts share a line."""
    lines = []
    for scale, rows in table.items():
        lines += [
            f"**{scale}**",
            "",
            "| rows | head | descriptor | head + descriptor | mask decoder | total |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        groups: dict[tuple[int, ...], list[str]] = {}
        for row, c in rows.items():
            groups.setdefault((c.head, c.descriptor, c.head + c.descriptor, c.decoder, c.total), []).append(
                row
            )
        for cells, names in groups.items():
            lines.append(f"| {', '.join(names)} | " + " | ".join(f"{n:,}" for n in cells) + " |")
        lines.append("")
    return "\n".join(lines)


@app.command()
def rows() -> None:
    """Each row and its overrides."""
    for row, sets in ROWS.items():
        typer.echo(f"{row:18s} {' '.join(f'--set {s}' for s in sets) or '(the recipe)'}")


@app.command()
def params(
    rows: Annotated[str | None, typer.Option(help="comma-separated rows (default: all)")] = None,
    recipe: Annotated[Path, typer.Option(help="the recipe the rows override")] = RECIPE,
) -> None:
    """Trainable parameters of head, descriptor and SAM's mask decoder per row, at 7B and synthetic scale."""
    names = list(ROWS) if rows is None else rows.split(",")
    typer.echo(markdown(parameter_table(names, recipe)))


# ----- training -----------------------------------------------------------------------------------------------


def train_command(row: str, out: Path, steps: int, recipe: Path, extra: list[str]) -> list[str]:
    """The ``lens train`` call of one row (run by this Python, so PYTHONPATH decides which lens)."""
    sets = [*ROWS[row], f"train.max_steps={steps}", *extra]
    return [sys.executable, "-m", "lens.cli", "train", str(recipe), "--output-dir", str(out)] + [
        arg for s in sets for arg in ("--set", s)
    ]


@app.command()
def train(
    runs: Annotated[Path, typer.Option(help="one folder per row: RUNS/<row>")],
    rows: Annotated[str, typer.Option(help="comma-separated rows")],
    steps: Annotated[int, typer.Option(min=1, help="train.max_steps of every row")],
    recipe: Annotated[Path, typer.Option(help="the recipe the rows override")] = RECIPE,
    set_: Annotated[list[str] | None, typer.Option("--set", help="one more override for every row")] = None,
) -> None:
    """Train each row with ``lens train`` into RUNS/<row>; a row whose RUNS/<row>/model exists is skipped."""
    names = rows.split(",")
    for row in names:
        row_config(row, recipe)  # every row named is known and its config valid before anything trains
    for row in names:
        out = runs / row
        if (out / "model").exists():
            typer.echo(f"{row}: {out / 'model'} exists, skipped")
            continue
        command = train_command(row, out, steps, recipe, list(set_ or []))
        typer.echo(f"{row}: {' '.join(command[1:])}")
        subprocess.run(command, check=True, env=os.environ.copy())


if __name__ == "__main__":
    app()
