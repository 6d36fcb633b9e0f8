"""Ctrl-C (SIGINT) during lens eval / cache / train: one line saying how to resume, exit 130, and the same
command run again finishes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lens.cli import INTERRUPTED, INTERRUPTED_TRAIN

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "synthetic.yaml"


def _lens(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # Ctrl-C in a terminal: SIGINT as the shell leaves it for a foreground job. A job launched in the
    # background (`cmd &` from a script, as CI may be) inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler, so the child restores the default first.
    return subprocess.Popen(
        [sys.executable, "-m", "lens.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _interrupt_when(
    command: list[str], ready: Callable[[], bool], message: str = INTERRUPTED, rerun: list[str] | None = None
) -> None:
    process = _lens(*command)
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.decode().replace("\r", "\n").splitlines() if line.strip()]
    assert process.returncode == 130, lines[-20:]
    assert lines[-1] == message and "Traceback" not in err.decode(), lines[-20:]
    again = _lens(*(rerun or command))
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()[-2000:]


def _nonempty(path: Path) -> Callable[[], bool]:
    return lambda: path.is_file() and path.stat().st_size > 0


@pytest.mark.slow
def test_sigint_during_eval(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    command = [
        "eval",
        "lens:synthetic/lens",
        "--splits",
        "synthetic/val",
        "--limit",
        "24",
        "--batch-size",
        "1",
    ]
    _interrupt_when([*command, "--output-dir", str(out)], _nonempty(out / "parts" / "rank0.jsonl"))
    assert (out / "results.json").is_file()


@pytest.mark.slow
def test_sigint_during_cache(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.read_text().replace("      seed: 0\n", "      seed: 0\n      eval_scenes: 4\n"))
    command = ["cache", str(config), "--cache-root", str(root), "--splits", "val", "--shard-size", "1"]
    _interrupt_when([*command, "--batch-size", "1"], lambda: any(root.rglob("shard_00000.safetensors")))
    assert any(root.rglob("manifest.json"))


@pytest.mark.slow
def test_sigint_during_train(tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = ["train.max_steps=4", "train.save_every=1", "train.batch_size=1", "train.eval_limit=2"]
    command = ["train", str(CONFIG), "--output-dir", str(out), *(x for s in settings for x in ("--set", s))]
    rerun = [*command, "--resume"]
    _interrupt_when(command, (out / "checkpoints" / "latest").is_file, INTERRUPTED_TRAIN, rerun)
    assert (out / "model" / "model.safetensors").is_file()
