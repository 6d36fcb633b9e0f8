"""Checksums: every directory the project writes for later reuse (training checkpoints, cache shards) carries
a ``manifest.json`` of SHA-256 sums, so a truncated or altered file is named instead of loaded; and the
identity of a model (content hash of its trainable weights + config), which keys resumable evaluation
records.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lens.errors import InvalidCheckpoint
from lens.io import atomic_write_text

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, files: Iterable[str | Path] | None = None) -> Path:
    """``directory/manifest.json``: size and SHA-256 of ``files`` (default: every file below it)."""
    directory = Path(directory)
    chosen = sorted(
        Path(f).relative_to(directory) if Path(f).is_absolute() else Path(f)
        for f in (files if files is not None else (p for p in directory.rglob("*") if p.is_file()))
    )
    entries = {
        str(rel): {"bytes": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
        for rel in chosen
        if str(rel) != MANIFEST
    }
    return atomic_write_text(directory / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify_manifest(directory: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Check every file ``directory/manifest.json`` lists; ``InvalidCheckpoint`` naming the first bad one."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise InvalidCheckpoint(
            f"{what} {directory} has no {MANIFEST}: incomplete, or written by an older LENS"
        )
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidCheckpoint(f"{manifest} is not a valid manifest ({err})") from None
    for rel, entry in entries.items():
        path = directory / rel
        if not path.is_file():
            raise InvalidCheckpoint(f"{path} is missing from {what} {directory}")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise InvalidCheckpoint(f"{path} is corrupted: its checksum differs from {manifest}")
    return entries


def verify_listed(directory: str | Path, name: str) -> None:
    """Check one file against ``directory/manifest.json`` when both exist; ``InvalidCheckpoint`` if it differs.

    For outputs that are read back later (evaluation's per-sample records): a file the manifest does not list,
    or a directory without a manifest, is left to the reader.
    """
    directory = Path(directory)
    manifest, path = directory / MANIFEST, directory / name
    if not (manifest.is_file() and path.is_file()):
        return
    try:
        entry = json.loads(manifest.read_text())["files"].get(name)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InvalidCheckpoint(f"{manifest} is not a valid manifest ({err})") from None
    if entry is not None and (path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]):
        raise InvalidCheckpoint(f"{path} is corrupted: its checksum differs from {manifest}")


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of tensors by name, dtype, shape and bytes: equal exactly when the weights are."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(trainable: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """Content hash of a model's trainable weights and its config: which checkpoint produced a record."""
    digest = hashlib.sha256(state_hash(trainable).encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # every class or function lookup: refused
        raise InvalidCheckpoint(f"refusing to unpickle {module}.{name}: only plain data is accepted")


def load_plain_pickle(path: str | Path) -> Any:
    """A pickle of plain data only (dicts, lists, str, numbers, as REFER's ``refs(*).p``): any class, function
    or ``__reduce__`` payload is refused before it runs, naming the file."""
    try:
        with open(path, "rb") as handle:
            return _PlainUnpickler(handle, encoding="latin1").load()
    except InvalidCheckpoint as err:
        raise InvalidCheckpoint(f"{path}: {err}") from None
