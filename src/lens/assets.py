"""Models shipped inside the package, addressed as ``lens:<path>`` wherever a hub id or directory is accepted."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

PREFIX = "lens:"
SYNTHETIC_LENS = "lens:synthetic/lens"  # the LENS head trained on the synthetic world (what `lens demo` runs)


def asset_root() -> Path:
    return Path(str(files("lens"))) / "assets"


def resolve_model_id(model_id: str) -> str:
    """``lens:synthetic/mllm`` → the installed directory; anything else (hub id, path) is returned unchanged."""
    if not model_id.startswith(PREFIX):
        return model_id
    path = asset_root() / model_id[len(PREFIX) :]
    if not path.is_dir():
        raise FileNotFoundError(
            f"shipped model {model_id!r} is not installed at {path}; regenerate it with the commands in "
            "docs/pretraining.md"
        )
    return str(path)


def checkpoint_dir(model_id: str) -> Path:
    """The local checkpoint a training run continues: a ``lens:`` id or a directory holding ``config.json``.

    Checked before any work starts, so a mistyped ``--init-from`` is a one-line error, not a traceback
    after minutes of rendering scenes.
    """
    path = Path(resolve_model_id(model_id))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_id!r} is not a saved checkpoint: no config.json in {path}")
    return path


METRICS_FILE = "metrics.json"  # what a finished training run writes beside its checkpoint
PROGRESS_FILE = "snapshot.json"  # what a snapshot of a run still going has instead (``lens.world.snapshots``)


def checkpoint_metrics(model_id: str) -> dict | None:
    """The ``metrics.json`` a training run wrote beside its checkpoint (a continued run keeps it), if there is one.

    A snapshot of a run still going (or stopped) has none; its ``snapshot.json`` (step, configuration, learning
    curve so far) stands in for it.
    """
    directory = checkpoint_dir(model_id)
    for name in (METRICS_FILE, PROGRESS_FILE):
        if (directory / name).is_file():
            return json.loads((directory / name).read_text())
    return None
