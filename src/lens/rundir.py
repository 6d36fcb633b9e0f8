"""What a training output directory may already hold before ``lens train`` writes into it.

A directory with any run output is refused unless the run is resumed (with the config it was started with)
or explicitly overwritten: training into a finished run used to replace ``model/``, truncate
``train_log.jsonl`` and report the old run's validation scores as the new run's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from lens.config import LensConfig
from lens.errors import InvalidInput

RUN_CONFIG = "train_config.yaml"  # the config a run was started with, compared on --resume


def run_output(output_dir: Path, names: tuple[str, ...]) -> list[str]:
    """The entries among ``names`` that exist in ``output_dir``."""
    return [n for n in names if (output_dir / n).exists()]


def check_output_dir(
    output_dir: Path,
    config: LensConfig,
    resume: bool,
    overwrite: bool,
    has_checkpoint: bool,
    names: tuple[str, ...],
) -> list[str]:
    """Refuse to mix runs; returns the entries ``overwrite`` must remove (the caller's main process does)."""
    existing = run_output(output_dir, (*names, RUN_CONFIG))
    if resume and overwrite:
        raise InvalidInput("--resume and --overwrite contradict each other; choose one")
    if overwrite:
        return existing
    if resume and has_checkpoint:
        saved = output_dir / RUN_CONFIG
        if saved.is_file():
            differ = _differences(yaml.safe_load(saved.read_text()), config.to_dict())
            if differ:
                raise InvalidInput(
                    f"{output_dir} was started with another config ({', '.join(differ[:6])} differ); "
                    "resume with the same config, or train into a new --output-dir"
                )
        return []
    if existing:
        hint = "it has no checkpoint to resume; " if resume else "--resume to continue it, "
        raise InvalidInput(
            f"{output_dir} already holds a run ({', '.join(existing)}): {hint}--overwrite to replace it, "
            "or train into a new --output-dir"
        )
    return []


def clear(output_dir: Path, entries: list[str]) -> None:
    for name in entries:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_run_config(output_dir: Path, config: LensConfig) -> None:
    from lens.io import atomic_write_text

    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / RUN_CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted names whose values differ between two config dicts (tuples and lists compare equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{where}{k}.")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        a, b = list(a), list(b)
    return [] if a == b else [where.rstrip(".")]
