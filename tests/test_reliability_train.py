"""lens train: no code from a checkpoint file, corrupted checkpoints named, runs never mixed, and a run killed
with SIGKILL resumes to exactly the state of an uninterrupted one."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens.checkpoints import PROGRESS_NAME, latest_checkpoint
from lens.errors import InvalidCheckpoint, InvalidInput
from lens.integrity import MANIFEST, write_manifest
from lens.training import FINAL, LOG_NAME, train
from lens.weights import WEIGHTS_NAME
from test_training import _config, _data, _fresh_lens

ROOT = Path(__file__).parents[1]


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cut_run(tmp_path: Path) -> Path:
    config = _config()
    train(config, tmp_path / "cut", model=_fresh_lens(), data=_data(config), stop_at_step=2)
    return latest_checkpoint(tmp_path / "cut")


def _resume(tmp_path: Path) -> list[dict]:
    config = _config()
    return train(config, tmp_path / "cut", resume=True, model=_fresh_lens(), data=_data(config))


@pytest.mark.slow
def test_resume_unpickles_nothing(tmp_path: Path) -> None:
    checkpoint = _cut_run(tmp_path)
    assert (checkpoint / PROGRESS_NAME).is_file() and not list(checkpoint.glob("custom_checkpoint_*"))
    json.loads((checkpoint / PROGRESS_NAME).read_text())  # plain JSON
    marker = tmp_path / "pwned"
    # the file Accelerate would load with weights_only=False (listed in the manifest too): refused, never read
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(checkpoint)
    with pytest.raises(InvalidCheckpoint, match="custom_checkpoint_0.pkl: LENS never writes pickles"):
        _resume(tmp_path)
    assert not marker.exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    # a crafted optimizer state, with a manifest rewritten to match: torch.load(weights_only=True) refuses it
    good = (checkpoint / "optimizer.bin").read_bytes()
    (checkpoint / "optimizer.bin").write_bytes(pickle.dumps({"state": _Payload(marker)}))
    write_manifest(checkpoint)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _resume(tmp_path)
    assert not marker.exists()
    (checkpoint / "optimizer.bin").write_bytes(good)
    write_manifest(checkpoint)
    assert [r["step"] for r in _resume(tmp_path)] == [3, 4]
    assert not marker.exists()


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_named(tmp_path: Path) -> None:
    checkpoint = _cut_run(tmp_path)
    data = bytearray((checkpoint / "optimizer.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (checkpoint / "optimizer.bin").write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpoint, match="optimizer.bin is corrupted"):
        _resume(tmp_path)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(InvalidCheckpoint, match="model.safetensors is missing"):
        _resume(tmp_path)
    (checkpoint / MANIFEST).unlink()
    with pytest.raises(InvalidCheckpoint, match="has no manifest.json"):
        _resume(tmp_path)


@pytest.mark.slow
def test_runs_are_never_mixed(tmp_path: Path) -> None:
    config = _config()
    out = tmp_path / "run"
    first = train(config, out, model=_fresh_lens(), data=_data(config))
    log = (out / LOG_NAME).read_text()
    import shutil

    shutil.rmtree(out / "checkpoints")  # a finished run whose checkpoints were cleaned up
    with pytest.raises(InvalidInput, match=r"already holds a run \(model, train_log.jsonl, val.*--overwrite"):
        train(config, out, model=_fresh_lens(), data=_data(config))
    with pytest.raises(InvalidInput, match="no checkpoint to resume"):
        train(config, out, resume=True, model=_fresh_lens(), data=_data(config))
    assert (out / LOG_NAME).read_text() == log  # untouched
    again = train(config, out, model=_fresh_lens(), data=_data(config), overwrite=True)
    assert again == first and (out / LOG_NAME).read_text() == log

    cut = tmp_path / "cut"
    train(config, cut, model=_fresh_lens(), data=_data(config), stop_at_step=2)
    other = _config()
    other.train.lr = 2 * other.train.lr
    with pytest.raises(InvalidInput, match=r"started with another config \(train.lr differ"):
        train(other, cut, resume=True, model=_fresh_lens(), data=_data(other))


KILL_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {src!r}]
import dataclasses
from test_training import _config, _data, _fresh_lens
from lens.training import train
config = _config()
config.train = dataclasses.replace(config.train, max_steps=6, save_every=1, eval_every=0)
train(config, sys.argv[1], resume=sys.argv[2] == "resume", model=_fresh_lens(), data=_data(config))
"""


def _launch(script: Path, out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), mode],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_sigkill_at_a_random_step_resumes_to_the_uninterrupted_state(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests"), src=str(ROOT / "src")))
    full = _launch(script, tmp_path / "full", "new")
    assert full.wait(timeout=600) == 0, full.stderr.read().decode()[-2000:]

    kill_at = random.Random(os.getpid()).randint(1, 5)  # after checkpoint kill_at exists, mid-way to the next
    cut = _launch(script, tmp_path / "cut", "new")
    deadline = time.monotonic() + 600
    while (
        latest_checkpoint(tmp_path / "cut") is None
        or latest_checkpoint(tmp_path / "cut").name < f"step_{kill_at:07d}"
    ):
        assert cut.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)
    cut.wait(timeout=60)
    assert not (tmp_path / "cut" / FINAL).exists()
    resumed = _launch(script, tmp_path / "cut", "resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]

    a = load_file(tmp_path / "full" / FINAL / WEIGHTS_NAME)
    b = load_file(tmp_path / "cut" / FINAL / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed after step {kill_at}"
    assert (tmp_path / "cut" / LOG_NAME).read_text() == (tmp_path / "full" / LOG_NAME).read_text()
