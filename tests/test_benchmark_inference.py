"""benchmarks/inference.py runs end to end on tiny random models (its numbers come from running it, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_inference_benchmark_reports_every_pipeline(tmp_path):
    out = tmp_path / "result.json"
    args = ["--preset", "tiny", "--reps", "1", "--warmup", "0", "--batches", "1,2", "--queries", "1,2"]
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "inference.py"),
            *args,
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    names = {(r["name"], r["batch"]) for r in result["rows"]}
    assert names == {(n, b) for n in ("LENS", "LISA-style", "F-LMM-style") for b in (1, 2)}
    assert all(r["seconds"] > 0 for r in result["rows"])
    assert [q["queries"] for q in result["per_query"]] == [1, 2]
    # Every LENS stage was reached, and the floor is a positive amount of work below the measured time.
    stages = result["stages_ms"]
    assert set(stages) == {
        "vision tower",
        "preprocess + LLM layers 1..k",
        "SAM image encoder",
        "head (2 layers)",
        "keypoints (NMS + sub-pixel)",
        "descriptor",
        "SAM mask decoder",
        "rest (mask post-processing, glue)",
    }
    assert all(v > 0 for k, v in stages.items() if not k.startswith("rest"))
    assert 0 < result["floor_ms"]["1"] < result["lens_e2e_ms"]
    assert "F-LMM-style / LENS" in done.stdout


def test_floor_counts_a_vit_block_by_hand():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from inference import _vit_flops
    finally:
        sys.path.pop(0)
    # One block, 10 tokens, width 4, MLP 8, full attention: 2·10·(4·16 + 2·4·8) + 4·10·10·4 = 2880 + 1600.
    assert _vit_flops(10, 4, 8, 1, [10]) == 2 * 10 * (4 * 16 + 2 * 4 * 8) + 4 * 10 * 10 * 4
