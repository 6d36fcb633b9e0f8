"""The benchmark scripts still run end to end (their numbers are measured by running them, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["on_the_fly", "cached"])
def test_train_step_runs_on_the_shipped_world(cached):
    config = str(REPO / "configs" / "synthetic.yaml")
    out = _run(
        "train_step.py",
        "--config",
        config,
        "--steps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        *(["--cached"] * cached),
    )
    assert ("from a feature cache" in out) == cached
    for phase in ("inputs", "forward", "backward", "optimizer", "step"):
        assert f"  {phase}" in out


@pytest.mark.slow
def test_train_memory_counts_parameters_without_a_gpu():
    out = _run("train_memory.py")
    assert "trainable total" in out and "mllm (frozen)" in out


@pytest.mark.slow
def test_train_loop_runs_from_the_cache_with_a_worker():
    config = str(REPO / "configs" / "synthetic.yaml")
    out = _run(
        "train_loop.py",
        "--config",
        config,
        "--steps",
        "2",
        "--warmup",
        "1",
        "--modes",
        "cached",
        "--workers",
        "1",
    )
    assert "cached     1 worker(s):" in out and "a step" in out
