"""Security properties of the source tree and its loaders (see SECURITY.md)."""

from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path

import pytest

from lens.errors import InvalidCheckpoint
from lens.integrity import load_plain_pickle
from lens.io import atomic_write_text

SRC = Path(__file__).parents[1] / "src" / "lens"
SOURCES = {p: p.read_text() for p in SRC.rglob("*.py")}


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_no_code_runs_from_a_refer_refs_pickle(tmp_path: Path) -> None:
    plain = tmp_path / "refs(unc).p"
    refs = [{"ref_id": 1, "split": "val", "sentences": [{"sent": "the man"}], "bbox": (1.0, 2.0)}]
    plain.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_plain_pickle(plain) == refs
    marker = tmp_path / "pwned"
    evil = tmp_path / "refs(umd).p"
    evil.write_bytes(pickle.dumps([{"ref_id": _Payload(marker)}]))
    with pytest.raises(InvalidCheckpoint, match=r"refs\(umd\).p: refusing to unpickle pathlib"):
        load_plain_pickle(evil)
    assert not marker.exists()


def test_nothing_in_the_source_unpickles_or_trusts_remote_code() -> None:
    for path, text in SOURCES.items():
        assert not re.search(r"pickle\.loads?\(|Unpickler\(", text) or path.name == "integrity.py", path
        for call in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            assert "weights_only=True" in call.group(0), f"{path}: {call.group(0)}"
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert "register_for_checkpointing" not in text, path  # Accelerate pickles registered state


def test_services_bind_to_localhost_by_default() -> None:
    for path, text in SOURCES.items():
        for match in re.finditer(r"(host|server_name)\s*[:=]\s*(?:str\s*=\s*)?[\"']([^\"']+)[\"']", text):
            assert match.group(2) in ("127.0.0.1", "localhost"), f"{path}: {match.group(0)}"


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone gives 0600
