"""The reference evaluation protocol, written out the way the paper reports it.

Per query the mask logits are binarised (> ``decoder.mask_threshold``, 0) at the original image size and scored
with ``lens.metrics`` (LISA's I / U); gIoU / cIoU are computed per split and per subset (ReasonSeg's short /
long queries, each dataset's query kinds). Results are written as

* ``per_sample.jsonl``: one record per query (I, U, IoU, query, ...), for inspection and for resuming;
* ``results.json`` and ``results.md``: every split, plus the paper's Table 2 (ReasonSeg) and Table 3
  (RefCOCO / RefCOCO+ / RefCOCOg cIoU) layouts when those splits were evaluated (``lens.reporting``).

Evaluation is resumable (items already in the per-sample files are skipped) and sharded: with an
``Accelerator``, process r scores items r, r + P, ... into ``parts/rank{r}.jsonl``; the main process merges
the parts once every process is done. ``output_dir`` must be visible to all processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from lens.batches import lens_inputs
from lens.cache import CachedDataset, CacheKey
from lens.config import LensConfig
from lens.data.loader import ItemSource, Row, build_eval_dataset
from lens.data.registry import configured_datasets, get_dataset, registered_names
from lens.errors import InvalidInput
from lens.integrity import MANIFEST, model_identity, verify_listed, write_manifest
from lens.io import atomic_write, atomic_write_text
from lens.metrics import intersection_union, query_iou
from lens.model import LensModel
from lens.reporting import markdown, summarize, table2, table3
from lens.weights import build_lens, build_lens_for_cache, checkpoint_config, load_lens_weights

logger = logging.getLogger(__name__)

PER_SAMPLE_NAME = "per_sample.jsonl"
PARTS_DIR = "parts"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PREDICTIONS_DIR = "predictions"
IDENTITY_NAME = "eval_identity.json"  # the model, and per split limit / batch size / items, of the records


@dataclass
class EvalSplit:
    dataset: str  # "reason_seg", "refcoco", "synthetic", ...
    split: str  # "val", "test", "testA", ...
    data: ItemSource

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.split}"


class _SingleProcess:
    """What ``evaluate`` needs from an ``Accelerator``, for one process."""

    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self) -> None:
        pass

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def default_splits(config: LensConfig, cache_root: str | Path | None = None) -> list[tuple[str, str]]:
    """(dataset, split) pairs scored when none is named: the default evaluation splits (``DatasetSpec.eval_splits``,
    the paper's tables) of every configured dataset, or of every dataset cached under ``cache_root``."""
    if cache_root is None:
        return [(s.name, split) for s in configured_datasets(config.data) for split in s.eval_splits]
    cached = (
        sorted(d.name for d in Path(cache_root).iterdir() if d.is_dir()) if Path(cache_root).is_dir() else []
    )
    specs = [get_dataset(name) for name in cached if name in registered_names()]
    return [
        (s.name, split) for s in specs for split in s.eval_splits if Path(cache_root, s.name, split).is_dir()
    ]


def eval_splits(
    config: LensConfig, names: Sequence[str] | None = None, cache_root: str | Path | None = None
) -> list[EvalSplit]:
    """Evaluation splits by label ("reason_seg/val", "refcoco/testA", ...), read raw or from ``cache_root``.

    ``names=None`` takes ``default_splits``: configured in ``config.data``, or cached under
    ``cache_root/{dataset}/{split}`` (built with ``train=False``, the reference prompts).
    """
    if names is None:
        pairs = default_splits(config, cache_root)
    else:
        pairs = [(name.split("/", 1)[0], name.split("/", 1)[-1]) for name in names]
    if cache_root is None:
        return [EvalSplit(d, s, build_eval_dataset(config.data, d, s)) for d, s in pairs]
    return [
        EvalSplit(
            d, s, CachedDataset(Path(cache_root, d, s), CacheKey.from_config(config, d, s, train=False))
        )
        for d, s in pairs
    ]


def evaluate_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    config: LensConfig | None = None,
    splits: Sequence[str] | None = None,
    cache_root: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    save_predictions: bool = False,
) -> dict[str, Any]:
    """Evaluate a trained LENS checkpoint (``lens train`` output) with the reference protocol.

    The model comes from the checkpoint's own config; ``config`` (default: the same) says where the data are.
    With ``cache_root`` no MLLM is loaded: features come from ``lens cache`` output. Run it under
    ``accelerate launch`` to shard the items over processes.
    """
    checkpoint, model_config = checkpoint_config(checkpoint)  # a directory, or a shipped ``lens:`` asset
    config = config or model_config
    mixed_precision = model_config.train.mixed_precision if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision)
    build = build_lens_for_cache if cache_root is not None else build_lens
    model = load_lens_weights(build(model_config, accelerator.device), checkpoint)
    chosen = eval_splits(dataclasses.replace(model_config, data=config.data), splits, cache_root)
    if not chosen:
        raise ValueError(
            "nothing to evaluate: configure ReasonSeg / REFER roots, data.datasets, or a cache_root"
        )
    method = model_config.baseline.system or "LENS"  # the tables' row name: the system evaluated
    return evaluate(model, chosen, output_dir, batch_size, accelerator, limit, save_predictions, method)


def read_records(output_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per-sample records already written (merged file and per-process parts), by key.

    A line cut short by a crash is skipped: its item is simply evaluated again. The merged file is checked
    against the checksum ``_write_results`` put in ``manifest.json``: an altered or truncated one is named.
    """
    output_dir = Path(output_dir)
    verify_listed(output_dir, PER_SAMPLE_NAME)
    records: dict[str, dict[str, Any]] = {}
    for path in [output_dir / PER_SAMPLE_NAME, *sorted((output_dir / PARTS_DIR).glob("*.jsonl"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                records[record["key"]] = record
    return records


def prediction_path(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Where ``save_predictions`` puts a query's binary mask (PNG, 255 = foreground)."""
    return (
        Path(output_dir)
        / PREDICTIONS_DIR
        / record["dataset"]
        / record["split"]
        / f"{record['index']:06d}_{record['part']}.png"
    )


def _score(
    model: LensModel, rows: list[Row], split: EvalSplit, dist: Any
) -> list[tuple[dict[str, Any], np.ndarray]]:
    inputs = lens_inputs(model, rows)
    inputs.masks = None  # no loss at evaluation
    with dist.autocast():
        out = model(inputs)
    scored = []
    for row, logits in zip(rows, out.mask_logits, strict=True):
        pred = (logits.float() > model.config.decoder.mask_threshold).cpu().numpy()  # (H, W) bool
        intersection, union = intersection_union(pred, np.asarray(row.mask))
        item = f"{split.label}/{row.index}"
        record = {
            "key": f"{item}/{row.part}",
            "item": item,
            "dataset": split.dataset,
            "split": split.split,
            **{k: getattr(row, k) for k in ("index", "part", "name", "query", "is_sentence", "kind")},
            "held_out": bool(row.held_out),
            "intersection": intersection,
            "union": union,
            "iou": query_iou(intersection, union),
        }
        scored.append((record, pred))
    return scored


@torch.inference_mode()
def evaluate(
    model: LensModel,
    splits: Sequence[EvalSplit],
    output_dir: str | Path,
    batch_size: int = 8,
    accelerator: Any | None = None,
    limit: int | None = None,
    save_predictions: bool = False,
    method: str = "LENS",
    replace_stale: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on ``splits`` (first ``limit`` items of each) and write the per-sample file and tables.

    Records already in ``output_dir`` are reused only when ``eval_identity.json`` says the same model (content
    hash of its trainable weights and config) wrote them with the same limit, batch size and split sizes;
    otherwise the run is refused (``InvalidInput``), or with ``replace_stale`` the old records are removed.

    Arguments:
        accelerator: an ``accelerate.Accelerator`` to shard items over its processes (None: one process).
        method: row name in the Markdown tables.
        replace_stale: drop records of another model instead of refusing (training's validation).

    Returns:
        The content of ``results.json`` (on every process).
    """
    dist = accelerator or _SingleProcess()
    output_dir = Path(output_dir)
    (output_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    if dist.is_main_process:
        _claim(output_dir, model, splits, limit, batch_size, replace_stale)
    dist.wait_for_everyone()
    records = read_records(output_dir).values()
    done = {r["item"] for r in records}
    if save_predictions:  # a rerun asked for predictions: items scored without one are scored again
        done -= {r["item"] for r in records if not prediction_path(output_dir, r).is_file()}
    was_training = model.training
    model.eval()
    part = output_dir / PARTS_DIR / f"rank{dist.process_index}.jsonl"
    with part.open("a") as out:
        if out.tell() and not part.read_bytes().endswith(b"\n"):
            out.write("\n")  # end a line cut short by a crash, so the next record starts on its own line
        for split in splits:
            n = len(split.data) if limit is None else min(limit, len(split.data))
            mine = range(dist.process_index, n, dist.num_processes)
            # Fixed batches, re-run whole when any item is missing: a resumed run sees the very same batches
            # (padding, hence floating-point rounding) as an uninterrupted one.
            batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
            todo = [b for b in batches if any(f"{split.label}/{i}" not in done for i in b)]
            logger.info(
                "evaluating %s: %d of %d batches on this process", split.label, len(todo), len(batches)
            )
            for batch in todo:
                rows = [row for i in batch for row in split.data.rows(i)]
                scored = _score(model, rows, split, dist) if rows else []
                for record, pred in scored if save_predictions else []:
                    path = prediction_path(output_dir, record)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    picture = Image.fromarray(pred.astype(np.uint8) * 255)
                    atomic_write(
                        path, lambda tmp, p=picture: p.save(tmp, format="PNG")
                    )  # a crash leaves none
                out.write("".join(json.dumps(record) + "\n" for record, _ in scored))  # one batch at once
                out.flush()
    model.train(was_training)
    dist.wait_for_everyone()
    if dist.is_main_process:
        _write_results(output_dir, splits, limit, method)
    dist.wait_for_everyone()
    return json.loads((output_dir / RESULTS_JSON).read_text())


def _claim(
    output_dir: Path,
    model: LensModel,
    splits: Sequence[EvalSplit],
    limit: int | None,
    batch_size: int,
    replace: bool,
) -> None:
    """Refuse (or clear) records in ``output_dir`` that another model or setting wrote; record ours."""
    identity = model_identity(model.trainable_state_dict(), model.config.to_dict())
    wanted = {s.label: {"limit": limit, "batch_size": batch_size, "items": len(s.data)} for s in splits}
    path = output_dir / IDENTITY_NAME
    saved = json.loads(path.read_text()) if path.is_file() else None
    problem = None
    if saved is None and read_records(output_dir):
        problem = "holds evaluation records of an unknown checkpoint"
    elif saved is not None and saved["model"] != identity:
        problem = f"holds records of another checkpoint (model {saved['model']}, this one {identity})"
    elif saved is not None:
        for label, setting in wanted.items():
            before = saved["splits"].get(label)
            if before is not None and before != setting:
                problem = f"holds {label} records made with {before}, this run has {setting}"
    if problem and not replace:
        raise InvalidInput(f"{output_dir} {problem}; evaluate into a new --output-dir or remove it")
    if problem:
        for stale in [output_dir / n for n in (PER_SAMPLE_NAME, RESULTS_JSON, RESULTS_MD, MANIFEST)]:
            stale.unlink(missing_ok=True)
        for stale in (output_dir / PARTS_DIR).glob("*.jsonl"):
            stale.unlink()
        shutil.rmtree(output_dir / PREDICTIONS_DIR, ignore_errors=True)
        saved = None
    merged = {"model": identity, "splits": {**(saved or {"splits": {}})["splits"], **wanted}}
    atomic_write_text(path, json.dumps(merged, indent=1))


def _write_results(output_dir: Path, splits: Sequence[EvalSplit], limit: int | None, method: str) -> None:
    records = read_records(output_dir)
    ordered = sorted(records.values(), key=lambda r: (r["dataset"], r["split"], r["index"], r["part"]))
    atomic_write_text(output_dir / PER_SAMPLE_NAME, "".join(json.dumps(r) + "\n" for r in ordered))
    for part in (output_dir / PARTS_DIR).glob("*.jsonl"):  # merged: the parts are no longer needed
        part.unlink()
    wanted = {s.label: len(s.data) if limit is None else min(limit, len(s.data)) for s in splits}
    chosen = [r for r in ordered if r["index"] < wanted.get(f"{r['dataset']}/{r['split']}", 0)]
    summary = summarize(chosen)
    results = {"splits": summary, "table2": table2(summary), "table3": table3(summary)}
    atomic_write_text(output_dir / RESULTS_JSON, json.dumps(results, indent=1))
    atomic_write_text(output_dir / RESULTS_MD, markdown(results, method))
    outputs = (PER_SAMPLE_NAME, RESULTS_JSON, RESULTS_MD, IDENTITY_NAME)
    write_manifest(output_dir, [output_dir / name for name in outputs if (output_dir / name).is_file()])
