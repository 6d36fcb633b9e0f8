"""Every comparison system of docs/results.md, trained on the same data and budget and scored the same way.

For each system and seed: train it with ``lens train`` (a subprocess, so that its wall time and peak memory are
its own; resumed if a run is already there), score it with ``lens eval``'s own evaluation on the val, test and
held-out-phrasing splits, ask its MLLM the world's test questions (general ability: a frozen system's MLLM must
answer exactly as the base model does), and measure A_c pointing. LENS's f_s alignment (the head's layer-2
evidence) is measured once per LENS run. Everything lands in ``RUNS/results.json``; ``--docs`` rewrites the
generated tables of docs/results.md (between its ``<!-- results:NAME -->`` markers) from that file.

    python scripts/results.py run --runs ~/runs/results --steps 1000 --seeds 0 --docs docs/results.md
    python scripts/results.py figure --runs ~/runs/results --out docs/results_figure.png
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from lens.config import LensConfig
from lens.data.synthetic.dataset import world_from_config
from lens.evaluation import EvalSplit, eval_splits, evaluate
from lens.geometry import ImageGeometry
from lens.weights import load_frozen, load_lens

logger = logging.getLogger("results")

TRAINED = ("lens", "lisa", "read", "flmm", "self1e")  # trained through `lens train` (baseline.system)
SYSTEMS = (*TRAINED, "training_free")
FROZEN = ("lens", "flmm", "training_free")  # the MLLM is never changed: it must answer as the base model
SPLITS = ("synthetic/val", "synthetic/test", "synthetic/test_heldout_phrasing")
RESULTS = "results.json"

app = typer.Typer(add_completion=False)


def read_record(path: Path) -> dict[str, Any]:
    """The results file: ``{"<system>/s<seed>" or "ablation:<row>/s<seed>": entry}``; empty when absent."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise typer.BadParameter(
            f"{path} is not a results file ({error}); nothing was overwritten"
        ) from error
    if not isinstance(record, dict):
        raise typer.BadParameter(
            f"{path} is not a results file (a JSON object of entries); nothing was overwritten"
        )
    return record


def update_record(path: Path, key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Set one entry of the results file and return the whole record. The file is re-read under a lock, so that
    runs scoring different systems at once keep each other's entries, and written through a temporary file, so
    that an interrupted write loses nothing."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = read_record(path)
        results[key] = entry
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        partial.replace(path)
    return results


def run_dir(root: Path, system: str, seed: int) -> Path:
    return root / f"{system}-s{seed}"


def train_system(
    config: Path,
    system: str,
    seed: int,
    steps: int,
    root: Path,
    threads: int,
    extra: Sequence[str],
    name: str | None = None,
) -> dict[str, Any]:
    """Train one system in a subprocess (into ROOT/<name or system>-s<seed>); wall time and the peak resident
    memory of its main process."""
    out = run_dir(root, name or system, seed)
    meta_file = out / "train_meta.json"
    if (out / "model").is_dir() and meta_file.is_file():
        return json.loads(meta_file.read_text())
    settings = [f"train.max_steps={steps}", f"train.seed={seed}", *extra]
    if system != "lens":
        settings.append(f"baseline.system={system}")
    command = [sys.executable, "-m", "lens.cli", "train", str(config), "--output-dir", str(out)]
    command += [a for s in settings for a in ("--set", s)]
    if (out / "checkpoints").is_dir():
        command.append("--resume")
    logger.info("%s", shlex.join(command))
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"training {system} (seed {seed}) failed: {shlex.join(command)}")
    meta = {
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
        "threads": threads,
        "steps": steps,
        "command": shlex.join(command),
    }
    meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def load_system(root: Path, system: str, seed: int, config: LensConfig, layer: int) -> torch.nn.Module:
    if system == "training_free":
        from lens.baselines.training_free import TrainingFreeSettings, build_training_free

        return build_training_free(config, TrainingFreeSettings(layer, 1, config.keypoints.nms_radius))
    return load_lens(run_dir(root, system, seed) / "model").eval()


def trainable_parameters(model: torch.nn.Module) -> int:
    names = set(model.trainable_names())
    return sum(p.numel() for n, p in model.named_parameters() if n in names and p.is_floating_point())


def seg_style(answer: str, template: str, seg_token: str) -> bool:
    """The reply a segmentation request gets (LISA's "Sure, it is [SEG].", or its opening words)."""
    from lens.data.synthetic.language import tokenize_words

    head = tokenize_words(template.split(seg_token)[0])
    return seg_token.lower() in answer.lower() or (bool(head) and tokenize_words(answer)[: len(head)] == head)


def ability(
    model: torch.nn.Module, scenes: Sequence[Any], base_answers: list[str] | None
) -> tuple[dict[str, Any], list[str]]:
    """VQA exact match on the scenes' questions, by kind (captions apart), the fraction of answers shaped like
    a segmentation reply, and the fraction identical to the base MLLM's answers."""
    from lens.world.vqa import CAPTION_KIND, answer_questions, exact_match

    items = [qa for scene in scenes for qa in scene.vqa()]
    pairs = [(scene.image, qa.question) for scene in scenes for qa in scene.vqa()]
    backbone = model.backbone
    answers = answer_questions(backbone.model, backbone.processor, pairs, batch_size=32)
    right = [exact_match(a, qa.answer) for a, qa in zip(answers, items, strict=True)]
    baseline = model.config.baseline
    styled = [seg_style(a, baseline.answer, baseline.seg_token) for a in answers]
    short = [r for r, qa in zip(right, items, strict=True) if qa.kind != CAPTION_KIND]
    captions = [r for r, qa in zip(right, items, strict=True) if qa.kind == CAPTION_KIND]
    out = {
        "vqa": float(np.mean(short)),
        "caption": float(np.mean(captions)) if captions else float("nan"),
        "seg_style_replies": float(np.mean(styled)),
        "questions": len(items),
    }
    if base_answers is not None:
        out["same_as_base"] = float(np.mean([a == b for a, b in zip(answers, base_answers, strict=True)]))
    return out, answers


@torch.inference_mode()
def pointing(model: torch.nn.Module, split: EvalSplit, limit: int, batch_size: int = 8) -> float:
    """A_c pointing: of the queries with a target, the fraction whose map's highest cell (on the image) has its
    centre on the target (``lens.probe.cell_centres_on``), as ``lens probe`` scores the MLLM's own attention."""
    from lens.batches import lens_inputs
    from lens.probe import cell_centres_on

    hits = []
    rows_all = [r for i in range(min(limit, len(split.data))) for r in split.data.rows(i, 0)]  # queries
    for start in range(0, len(rows_all), batch_size):
        rows = rows_all[start : start + batch_size]
        out = model(lens_inputs(model, rows))
        for b, row in enumerate(rows):
            target = torch.as_tensor(np.asarray(row.mask)) == 1
            if not target.any():
                continue
            image = row.image
            geometry = ImageGeometry(
                model.backbone.grid_frame(image.width, image.height),
                model.decoder.frame(image.width, image.height),
            )
            gh, gw = geometry.grid_size
            heat = out.attention_map[b, :gh, :gw].float().cpu()
            valid = geometry.valid_cells()
            heat = torch.where(valid, heat, torch.full_like(heat, -1.0))
            on = cell_centres_on(geometry, target)  # (gh, gw) bool
            hits.append(bool(on.flatten()[int(heat.flatten().argmax())]))
    return float(np.mean(hits)) if hits else float("nan")


@torch.inference_mode()
def alignment(model: torch.nn.Module, split: EvalSplit, limit: int) -> dict[str, float]:
    """How much more f_s (the head's layer-2 state at the answer start) resembles the target's layer-2 image
    features than other objects' (the alignment the paper credits layer 2 with): mean cosine similarity with the
    mean feature of the cells whose centre is on the target, and on each other object of the scene."""
    from lens.batches import lens_inputs
    from lens.probe import cell_centres_on

    reader = split.data.reader  # lens.data.synthetic.dataset.SyntheticQueries: one query per item
    target_sims, other_sims, wins = [], [], []
    for index in range(min(limit, len(reader))):
        query, (scene_index, _) = reader.query(index), reader._items[index]
        if query.target is None:
            continue
        row = split.data.rows(index, 0)[0]
        inputs = lens_inputs(model, [row])
        f = inputs.features.to(model.device)
        head = model.head(
            f.hidden_states, f.attention_mask, f.position_ids, f.image_positions, f.grid_sizes, f.text_span,
            f.image_index, f.shared_length,
        )  # fmt: skip
        geometry = f.geometries[0]
        gh, gw = geometry.grid_size
        cells = head.hidden_states[0, f.image_positions[0, : gh * gw]]  # (N, d) layer-2 image features
        f_s = head.hidden_states[0, f.answer_index[0]]  # (d,)

        def similarity(mask: np.ndarray, geometry=geometry, cells=cells, f_s=f_s) -> float | None:
            on = cell_centres_on(geometry, torch.as_tensor(mask)).flatten().to(cells.device)
            if not on.any():
                return None
            return float(torch.nn.functional.cosine_similarity(cells[on].mean(0), f_s, dim=0))

        mine = similarity(query.target.mask)
        others = [
            s
            for o in reader.scenes[scene_index].objects
            if o is not query.target
            and not np.array_equal(o.mask, query.target.mask)
            and (s := similarity(o.mask)) is not None
        ]
        if mine is None or not others:
            continue
        target_sims.append(mine)
        other_sims += others
        wins.append(mine > max(others))
    return {
        "target": float(np.mean(target_sims)),
        "others": float(np.mean(other_sims)),
        "target_most_similar": float(np.mean(wins)),
        "queries": len(wins),
    }


def scores(results: dict[str, Any]) -> dict[str, Any]:
    """gIoU / cIoU per split and subset, from ``lens.evaluation.evaluate``'s results."""
    out = {}
    for label, table in results["splits"].items():
        out[label] = {
            name: {"giou": v["giou"], "ciou": v["ciou"], "count": v["count"]} for name, v in table.items()
        }
    return out


@app.command("run")
def main(
    runs: Annotated[Path, typer.Option(help="run directories and results.json (outside the work tree)")],
    config: Annotated[Path, typer.Option(help="the recipe every system shares")] = Path(
        "configs/synthetic.yaml"
    ),
    systems: Annotated[str, typer.Option(help="comma-separated, of " + ",".join(SYSTEMS))] = ",".join(
        SYSTEMS
    ),
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps for every trained system")] = 1000,
    seeds: Annotated[str, typer.Option(help="comma-separated training seeds")] = "0",
    eval_limit: Annotated[
        int | None, typer.Option(min=1, help="first N queries of each split (default: all)")
    ] = None,
    vqa_scenes: Annotated[int, typer.Option(min=1, help="test scenes whose questions are asked")] = 50,
    pointing_queries: Annotated[
        int, typer.Option(min=1, help="test queries for A_c pointing and alignment")
    ] = 400,
    threads: Annotated[int, typer.Option(min=1, help="torch threads of each training")] = 1,
    layer: Annotated[
        int, typer.Option(min=1, help="the training-free system's layer (lens probe's best)")
    ] = 3,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="extra section.key=value for every run")
    ] = None,
    docs: Annotated[Path | None, typer.Option(help="rewrite this file's generated tables")] = None,
    train_only: Annotated[bool, typer.Option(help="train, then stop (score later)")] = False,
    record: Annotated[
        Path | None, typer.Option(help="the results file (default RUNS/results.json; commit it to keep it)")
    ] = None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs.mkdir(parents=True, exist_ok=True)
    chosen = systems.split(",")
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        raise typer.BadParameter(f"unknown systems {unknown}; known: {SYSTEMS}")
    cfg = LensConfig.from_yaml(config).override(list(set_ or []))
    results_file = record or runs / RESULTS
    results = read_record(results_file)
    seed_list = [int(s) for s in seeds.split(",")]
    for system in chosen:
        for seed in seed_list if system in TRAINED else [0]:
            if system in TRAINED:
                train_system(config, system, seed, steps, runs, threads, list(set_ or []))
    if train_only:
        return
    world = world_from_config(cfg.data)
    test_scenes = [world.scene("test", i) for i in range(vqa_scenes)]
    base = None
    for system in chosen:
        for seed in seed_list if system in TRAINED else [0]:
            key = f"{system}/s{seed}"
            if (
                key in results
                and results[key].get("steps") == steps
                and results[key].get("eval_limit") == eval_limit
                and "source" not in results[key]  # a carried-over row is re-scored when its run is there
            ):
                continue
            model = load_system(runs, system, seed, cfg, layer)
            entry: dict[str, Any] = {"system": system, "seed": seed, "steps": steps, "eval_limit": eval_limit}
            if system in TRAINED:
                entry["train"] = json.loads((run_dir(runs, system, seed) / "train_meta.json").read_text())
            entry["trainable_parameters"] = trainable_parameters(model) if system != "training_free" else 0
            splits = eval_splits(model.config if system != "training_free" else cfg, list(SPLITS))
            out = runs / "eval" / f"{system}-s{seed}"
            entry["scores"] = scores(
                evaluate(model, splits, out, batch_size=8, limit=eval_limit, method=system)
            )
            if base is None:
                base_model = load_frozen(cfg)[0]
                from lens.world.vqa import answer_questions

                pairs = [(s.image, qa.question) for s in test_scenes for qa in s.vqa()]
                base = answer_questions(base_model.model, base_model.processor, pairs, batch_size=32)
                del base_model
            entry["ability"], _ = ability(model, test_scenes, base)
            test = next(s for s in splits if s.split == "test")
            entry["pointing"] = pointing(model, test, pointing_queries)
            if system == "lens":
                entry["alignment"] = alignment(model, test, pointing_queries)
            results = update_record(results_file, key, entry)
            logger.info("%s: %s", key, json.dumps({k: v for k, v in entry.items() if k != "scores"}))
    if docs is not None:
        write_docs(docs, results)


@app.command("tables")
def tables_command(
    record: Annotated[Path, typer.Option(help="a results file written by `run` / `ablations`")],
    docs: Annotated[Path, typer.Option(help="rewrite this file's generated tables")] = Path(
        "docs/results.md"
    ),
) -> None:
    """Regenerate the tables of ``docs`` from a results file alone (no training, no scoring)."""
    if not record.is_file():
        raise typer.BadParameter(f"no results file at {record}")
    write_docs(docs, read_record(record))
    typer.echo(f"rewrote the generated tables of {docs} from {record}")


@torch.inference_mode()
def masks_of(model: torch.nn.Module, rows: list[Any]) -> list[np.ndarray]:
    """Each row's binary mask from ``model`` (any system), as ``lens eval`` thresholds it."""
    from lens.batches import lens_inputs

    out = model(lens_inputs(model, rows))
    return [(m.float() > model.config.decoder.mask_threshold).cpu().numpy() for m in out.mask_logits]


@app.command()
def figure(
    runs: Annotated[Path, typer.Option(help="the run directories of `main`")],
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("docs/results_figure.png"),
    config: Annotated[Path, typer.Option(help="the recipe every system shares")] = Path(
        "configs/synthetic.yaml"
    ),
    systems: Annotated[str, typer.Option(help="comma-separated systems, LENS first")] = ",".join(SYSTEMS),
    queries: Annotated[str, typer.Option(help="comma-separated test query indices")] = "0,5,12,21",
    seed: Annotated[int, typer.Option(help="which seed's runs")] = 0,
    layer: Annotated[int, typer.Option(min=1, help="the training-free system's layer")] = 3,
    height: Annotated[int, typer.Option(min=32, help="rows of each picture")] = 128,
) -> None:
    """Per test query: the image, LENS's A_c with its keypoints (white inside the mask, red outside), the ground
    truth, then every system's mask."""
    from PIL import Image, ImageDraw

    from lens.visualize import TRUTH_COLOUR, lens_figure, overlay_mask, panel

    cfg = LensConfig.from_yaml(config)
    names = systems.split(",")
    test = next(s for s in eval_splits(cfg, ["synthetic/test"]))
    rows = [test.data.rows(int(i), 0)[0] for i in queries.split(",")]
    masks: dict[str, list[np.ndarray]] = {}
    lens_panels = []
    for name in names:
        model = load_system(runs, name, seed, cfg, layer)
        masks[name] = masks_of(model, rows)
        if name == "lens":
            for row in rows:
                prediction = model.predict(row.image, row.instruction)
                lens_panels.append(
                    lens_figure(row.image, prediction, row.query, np.asarray(row.mask), height)
                )
        del model
    lines = []
    for i, row in enumerate(rows):
        pictures = [overlay_mask(row.image, np.asarray(row.mask) == 1, TRUTH_COLOUR)]
        titles = ["ground truth"]
        for name in names:
            pictures.append(overlay_mask(row.image, masks[name][i]))
            titles.append(name)
        strip = panel(pictures, titles, height)
        if lens_panels:
            head = lens_panels[i].crop((0, 0, lens_panels[i].width, lens_panels[i].height))
            both = Image.new("RGB", (head.width + 8 + strip.width, max(head.height, strip.height)), "white")
            both.paste(head, (0, 0))
            both.paste(strip, (head.width + 8, both.height - strip.height))
            strip = both
        lines.append(strip)
    width = max(line.width for line in lines)
    sheet = Image.new("RGB", (width, sum(line.height + 6 for line in lines)), "white")
    y = 0
    for line in lines:
        sheet.paste(line, (0, y))
        ImageDraw.Draw(sheet).line(
            [(0, y + line.height + 2), (width, y + line.height + 2)], fill=(200, 200, 200)
        )
        y += line.height + 6
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    typer.echo(f"wrote {out} ({sheet.width} x {sheet.height})")


@app.command()
def ablations(
    runs: Annotated[Path, typer.Option(help="run directories and results.json (outside the work tree)")],
    rows: Annotated[str, typer.Option(help="comma-separated rows of scripts/ablations.py")],
    config: Annotated[Path, typer.Option(help="the recipe every row overrides")] = Path(
        "configs/synthetic.yaml"
    ),
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps of every row")] = 1000,
    seed: Annotated[int, typer.Option(help="the training seed (one seed for the ablation rows)")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads of each training")] = 1,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="first N queries of each split")] = None,
    pointing_queries: Annotated[int, typer.Option(min=1, help="test queries for A_c pointing")] = 400,
    docs: Annotated[Path | None, typer.Option(help="rewrite this file's generated tables")] = None,
    train_only: Annotated[bool, typer.Option(help="train, then stop (score later)")] = False,
    record: Annotated[Path | None, typer.Option(help="the results file (default RUNS/results.json)")] = None,
) -> None:
    """LENS's ablation rows (scripts/ablations.py), trained on the same budget as the systems and scored alike."""
    import importlib.util

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = importlib.util.spec_from_file_location("ablation_rows", Path(__file__).with_name("ablations.py"))
    table = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = table  # its dataclasses look their module up
    spec.loader.exec_module(table)
    chosen = rows.split(",")
    unknown = sorted(set(chosen) - set(table.ROWS))
    if unknown:
        raise typer.BadParameter(f"unknown rows {unknown}; known: {sorted(table.ROWS)}")
    for row in chosen:
        train_system(
            config, "lens", seed, steps, runs, threads, list(table.ROWS[row]), name=f"ablation-{row}"
        )
    if train_only:
        return
    results_file = record or runs / RESULTS
    results = read_record(results_file)
    for row in chosen:
        key = f"ablation:{row}/s{seed}"
        if (
            key in results
            and results[key].get("steps") == steps
            and results[key].get("eval_limit") == eval_limit
            and "source" not in results[key]  # a carried-over row is re-scored when its run is there
        ):
            continue
        directory = run_dir(runs, f"ablation-{row}", seed)
        model = load_lens(directory / "model").eval()
        splits = eval_splits(model.config, list(SPLITS))
        entry: dict[str, Any] = {
            "system": "lens",
            "ablation": row,
            "overrides": list(table.ROWS[row]),
            "seed": seed,
            "steps": steps,
            "eval_limit": eval_limit,
            "train": json.loads((directory / "train_meta.json").read_text()),
            "trainable_parameters": trainable_parameters(model),
        }
        out = runs / "eval" / f"ablation-{row}-s{seed}"
        entry["scores"] = scores(evaluate(model, splits, out, batch_size=8, limit=eval_limit, method=row))
        entry["pointing"] = pointing(model, next(s for s in splits if s.split == "test"), pointing_queries)
        results = update_record(results_file, key, entry)
        logger.info("%s: pointing %.3f", key, entry["pointing"])
    if docs is not None:
        write_docs(docs, results)


@app.command()
def sensitivity(
    runs: Annotated[Path, typer.Option(help="where the evaluation records and sensitivity.json go")],
    checkpoint: Annotated[str, typer.Option(help="a trained LENS")] = "lens:synthetic/lens",
    settings: Annotated[
        str, typer.Option(help="semicolon-separated rows of comma-separated section.key=value")
    ] = "keypoints.nms_radius=1;keypoints.nms_radius=2;keypoints.nms_radius=3;keypoints.nms_radius=4;"
    "keypoints.max_points=4;keypoints.max_points=8",
    split: Annotated[str, typer.Option(help="dataset/split")] = "synthetic/test",
    limit: Annotated[int | None, typer.Option(min=1, help="first N queries")] = None,
    docs: Annotated[Path | None, typer.Option(help="rewrite this file's sensitivity table")] = None,
) -> None:
    """Inference-time sensitivity of one trained LENS: the same weights scored with keypoint settings changed
    (NMS radius, m), which need no retraining (the reviewers' NMS question)."""
    import dataclasses

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = load_lens(checkpoint).eval()
    trained = model.config
    chosen = eval_splits(trained, [split])
    file = runs / "sensitivity.json"
    rows: dict[str, Any] = json.loads(file.read_text()) if file.is_file() else {}
    for row in ["", *settings.split(";")]:
        name = row or "as trained"
        model.config = trained.override([a for a in row.split(",") if a])
        results = evaluate(
            model, chosen, runs / "sensitivity" / (row or "trained").replace("=", "-"), limit=limit
        )
        overall = results["splits"][split]["overall"]
        rows[name] = {"giou": overall["giou"], "ciou": overall["ciou"], "count": overall["count"]}
        logger.info("%s: %s", name, rows[name])
    model.config = dataclasses.replace(trained)
    runs.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(rows, indent=1) + "\n")
    if docs is not None:
        lines = [f"| keypoint setting at inference | {split} gIoU / cIoU |", "|---|---:|"]
        lines += [f"| {k} | {v['giou']:.3f} / {v['ciou']:.3f} |" for k, v in rows.items()]
        _replace_block(docs, "sensitivity", "\n".join(lines))


def _mean_std(values: list[float]) -> str:
    if not values or any(v != v for v in values):
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _name(system: str, entries: list[dict[str, Any]]) -> str:
    """The row's name, marked when an entry's record was carried over rather than written by a scoring run."""
    return system + (" †" if any("source" in e for e in entries) else "")


def _footnote(entries: list[dict[str, Any]]) -> str:
    sources = sorted({e["source"] for e in entries if "source" in e})
    return "".join(f"\n\n† {source}" for source in sources)


def tables(results: dict[str, Any]) -> dict[str, str]:
    """The generated Markdown blocks of docs/results.md from ``results.json``."""
    by_system: dict[str, list[dict[str, Any]]] = {}
    for entry in results.values():
        if "ablation" not in entry:
            by_system.setdefault(entry["system"], []).append(entry)
    order = [s for s in SYSTEMS if s in by_system]
    note = _footnote([e for e in results.values() if "ablation" not in e])
    lines = [
        "| system | seeds | trainable parameters | training peak RSS | training wall time | test cIoU | VQA (no captions) | captions | same answers as base | segmentation-style replies |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system in order:
        entries = by_system[system]
        e0 = entries[0]
        train = [e["train"] for e in entries if "train" in e]
        peak = f"{np.mean([t['peak_rss_mb'] for t in train]) / 1024:.2f} GiB" if train else "—"
        wall = (
            f"{np.mean([t['wall_s'] for t in train]) / 60:.0f} min ({train[0]['threads']} thread)"
            if train
            else "—"
        )
        lines.append(
            f"| {_name(system, entries)} | {len(entries)} | {e0['trainable_parameters']:,} | {peak} | {wall} | "
            f"{_mean_std([e['scores']['synthetic/test']['overall']['ciou'] for e in entries])} | "
            f"{_mean_std([e['ability']['vqa'] for e in entries])} | {_mean_std([e['ability']['caption'] for e in entries])} | "
            f"{_mean_std([e['ability'].get('same_as_base', float('nan')) for e in entries])} | "
            f"{_mean_std([e['ability']['seg_style_replies'] for e in entries])} |"
        )
    table1 = "\n".join(lines) + note
    head = "| system | val gIoU / cIoU | test gIoU / cIoU | test short | test long | test no-target gIoU | held-out phrasing gIoU / cIoU |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for system in order:
        entries = by_system[system]

        def pair(split: str, subset: str = "overall", entries: list = entries) -> str:
            g = [e["scores"][split].get(subset, {}).get("giou", float("nan")) for e in entries]
            c = [e["scores"][split].get(subset, {}).get("ciou", float("nan")) for e in entries]
            return f"{_mean_std(g)} / {_mean_std(c)}"

        def one(split: str, subset: str, entries: list = entries) -> str:
            return _mean_std([e["scores"][split].get(subset, {}).get("giou", float("nan")) for e in entries])

        lines.append(
            f"| {_name(system, entries)} | {pair('synthetic/val')} | {pair('synthetic/test')} | {one('synthetic/test', 'short')} | "
            f"{one('synthetic/test', 'long')} | {one('synthetic/test', 'kind:no_target')} | {pair('synthetic/test_heldout_phrasing')} |"
        )
    table2 = "\n".join(lines) + note
    lines = ["| system | A_c pointing (test queries with a target) |", "|---|---:|"]
    for system in order:
        entries = by_system[system]
        lines.append(f"| {_name(system, entries)} | {_mean_std([e['pointing'] for e in entries])} |")
    evidence = "\n".join(lines) + note
    align = [e["alignment"] for e in by_system.get("lens", []) if "alignment" in e]
    if align:
        a = align[0]
        evidence += (
            "\n\n| f_s vs layer-2 image features (LENS) | cosine |\n|---|---:|\n"
            f"| target's cells | {a['target']:.3f} |\n| other objects' cells | {a['others']:.3f} |\n"
            f"| target the most similar object ({a['queries']} queries) | {a['target_most_similar']:.3f} |"
        )
    lines = [
        "| LENS ablation | overrides | trainable parameters | val gIoU / cIoU | test gIoU / cIoU | test short | test long | test no-target gIoU | held-out phrasing gIoU / cIoU | A_c pointing |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ablation_seeds = {e["seed"] for e in results.values() if "ablation" in e} or {0}
    recipe = [e for e in by_system.get("lens", []) if e["seed"] in ablation_seeds][:1]
    rows = [("lens (the recipe)", "", e) for e in recipe]
    rows += [(e["ablation"], " ".join(e["overrides"]), e) for e in results.values() if "ablation" in e]
    for name, overrides, e in rows:

        def cell(split: str, subset: str = "overall", e: dict = e) -> str:
            v = e["scores"][split].get(subset, {})
            return f"{v['giou']:.3f} / {v['ciou']:.3f}" if "ciou" in v else "n/a"

        test = e["scores"]["synthetic/test"]
        subsets = [
            f"{test[k]['giou']:.3f}" if k in test else "n/a" for k in ("short", "long", "kind:no_target")
        ]
        cells = [
            cell("synthetic/val"),
            cell("synthetic/test"),
            *subsets,
            cell("synthetic/test_heldout_phrasing"),
        ]
        lines.append(
            f"| {name} | {overrides or '—'} | {e['trainable_parameters']:,} | {' | '.join(cells)} | {e['pointing']:.3f} |"
        )
    return {"table1": table1, "table2": table2, "evidence": evidence, "ablations": "\n".join(lines)}


def _replace_block(path: Path, name: str, block: str) -> None:
    """Replace the ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` block of ``path`` with ``block``."""
    text = path.read_text()
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no <!-- results:{name} --> block")
    path.write_text(pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text))


def write_docs(path: Path, results: dict[str, Any]) -> None:
    """Rewrite each generated block of ``path`` from ``results``."""
    for name, block in tables(results).items():
        _replace_block(path, name, block)


if __name__ == "__main__":
    app()
