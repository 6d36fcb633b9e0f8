"""Crash-safe weight snapshots for long pretraining runs (a CPU run is often cut by its session's end).

A snapshot is a complete Hugging Face checkpoint in ``<out>/snapshot`` plus ``snapshot.json`` (the run's step,
configuration and learning curve so far), so ``--init-from <out>/snapshot`` continues it like any checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, ProcessorMixin

from lens.assets import PROGRESS_FILE

SNAPSHOT_DIR = "snapshot"  # under the output directory, while a run with snapshots is going


def save_snapshot(
    model: PreTrainedModel, processor: ProcessorMixin, out_dir: Path, progress: dict[str, Any]
) -> Path:
    """Write ``model``, ``processor`` and ``progress`` to ``out_dir/snapshot``, replacing the previous snapshot.

    The new one is written beside the old and swapped in by renames, so a run killed at any moment leaves a
    complete snapshot.
    """
    final, staging, old = (out_dir / f"{SNAPSHOT_DIR}{suffix}" for suffix in ("", ".tmp", ".old"))
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    processor.save_pretrained(staging)
    (staging / PROGRESS_FILE).write_text(json.dumps(progress, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_snapshot(out_dir: Path) -> None:
    """Drop the snapshot of a finished run: its final weights supersede it."""
    shutil.rmtree(out_dir / SNAPSHOT_DIR, ignore_errors=True)
