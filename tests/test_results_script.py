"""scripts/results.py end to end on tiny models: every system trains a few steps through `lens train`, is scored by
LENS's evaluation, answers the world's questions, and lands in results.json and the generated docs tables."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from lens.config import LensConfig
from lens.tiny import build_tiny_models
from lens.weights import CONFIG_NAME

SCRIPT = Path(__file__).parents[1] / "scripts" / "results.py"
TINY_WORLD = {"seed": 0, "height": 64, "width": 64, "train_size": 6, "val_size": 2, "test_size": 2}


def _script():
    spec = importlib.util.spec_from_file_location("results_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_script"] = module
    spec.loader.exec_module(module)
    return module


def _tiny_config(tmp_path: Path) -> Path:
    llava, llava_processor, sam, sam_processor = build_tiny_models(seed=0)
    for model, processor, name in ((llava, llava_processor, "llava"), (sam, sam_processor, "sam")):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    config = {
        "backbone": {"model_id": str(tmp_path / "llava"), "layer": 2, "dtype": "float32"},
        "descriptor": {"num_heads": 4},
        "decoder": {"model_id": str(tmp_path / "sam")},
        "train": {
            "lr": 1e-3, "warmup_steps": 1, "batch_size": 1, "grad_accum_steps": 1, "mixed_precision": "no",
            "save_every": 100, "eval_every": 0, "eval_limit": 2,
        },
        "data": {"datasets": {"synthetic": TINY_WORLD}, "num_workers": 0, "num_classes_per_sample": 2},
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_every_system_trains_scores_and_reaches_the_tables(tmp_path):
    script = _script()
    config = _tiny_config(tmp_path)
    docs = tmp_path / "results.md"
    docs.write_text(
        "# Results\n"
        + "".join(
            f"<!-- results:{n} -->\nold\n<!-- /results:{n} -->\n"
            for n in ("table1", "table2", "evidence", "sensitivity", "ablations")
        )
    )
    runs = tmp_path / "runs"
    args = ["run", "--runs", str(runs), "--config", str(config), "--steps", "2", "--vqa-scenes", "1"]
    args += ["--pointing-queries", "4", "--layer", "1", "--eval-limit", "4", "--docs", str(docs)]
    result = CliRunner().invoke(script.app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads((runs / "results.json").read_text())
    assert sorted(results) == sorted(f"{s}/s0" for s in script.SYSTEMS)
    for key, entry in results.items():
        test = entry["scores"]["synthetic/test"]["overall"]
        assert 0.0 <= test["giou"] <= 1.0 and test["count"] == 4, key
        ability = entry["ability"]
        assert ability["questions"] > 0 and 0.0 <= ability["seg_style_replies"] <= 1.0
        if entry["system"] in script.FROZEN:
            assert ability["same_as_base"] == 1.0, key  # the frozen MLLM answers exactly as before
        if entry["system"] in script.TRAINED:
            assert entry["train"]["peak_rss_mb"] > 0 and entry["train"]["steps"] == 2
            assert entry["trainable_parameters"] > 0
    assert "alignment" in results["lens/s0"]
    text = docs.read_text()
    assert text.count("old") == 1  # every block but the sensitivity one, written below
    assert "| lisa | 1 |" in text and "| training_free |" in text

    # the same trained LENS, scored with another NMS radius at inference: the weights are the run's own
    args = ["sensitivity", "--runs", str(runs), "--checkpoint", str(runs / "lens-s0" / "model")]
    args += [
        "--settings",
        "keypoints.nms_radius=1;keypoints.max_points=4",
        "--limit",
        "4",
        "--docs",
        str(docs),
    ]
    result = CliRunner().invoke(script.app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads((runs / "sensitivity.json").read_text())
    assert list(rows) == ["as trained", "keypoints.nms_radius=1", "keypoints.max_points=4"]
    trained = results["lens/s0"]["scores"]["synthetic/test"]["overall"]
    assert rows["as trained"]["giou"] == pytest.approx(trained["giou"])  # the same weights, the same queries
    assert "| keypoints.max_points=4 |" in docs.read_text() and "old" not in docs.read_text()

    # an ablation row: LENS with one override, on the same budget, in its own table
    args = [
        "ablations",
        "--runs",
        str(runs),
        "--config",
        str(config),
        "--rows",
        "no_attn_loss",
        "--steps",
        "2",
    ]
    args += ["--eval-limit", "4", "--pointing-queries", "4", "--docs", str(docs)]
    result = CliRunner().invoke(script.app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    entry = json.loads((runs / "results.json").read_text())["ablation:no_attn_loss/s0"]
    saved = LensConfig.from_yaml(runs / "ablation-no_attn_loss-s0" / "model" / CONFIG_NAME)
    assert saved.loss.attention_weight == 0.0 and entry["train"]["steps"] == 2
    assert "| no_attn_loss | loss.attention_weight=0 |" in docs.read_text()


def _entry(system: str, giou: float, **extra) -> dict:
    scores = {
        split: {"overall": {"giou": giou, "ciou": giou / 2, "count": 3}}
        for split in ("synthetic/val", "synthetic/test", "synthetic/test_heldout_phrasing")
    }
    ability = {"vqa": 0.5, "caption": 0.25, "seg_style_replies": 0.0, "same_as_base": 1.0, "questions": 4}
    return {"system": system, "seed": 0, "steps": 2, "eval_limit": None, "trainable_parameters": 7,
            "scores": scores, "ability": ability, "pointing": 0.75, **extra}  # fmt: skip


def test_the_record_keeps_every_writers_entries_and_marks_carried_over_rows(tmp_path):
    script = _script()
    record = tmp_path / "results.json"
    script.update_record(record, "lens/s0", _entry("lens", 0.625))
    # each write re-reads the file, so a second writer (another scoring run) keeps the first's entry
    script.update_record(record, "flmm/s0", _entry("flmm", 0.5, source="carried over from somewhere"))
    assert sorted(json.loads(record.read_text())) == ["flmm/s0", "lens/s0"]
    docs = tmp_path / "results.md"
    docs.write_text("".join(f"<!-- results:{n} -->\nold\n<!-- /results:{n} -->\n" for n in script.tables({})))
    result = CliRunner().invoke(script.app, ["tables", "--record", str(record), "--docs", str(docs)])
    assert result.exit_code == 0, result.output
    text = docs.read_text()
    assert "| lens | 1 | 7 |" in text and "| flmm † | 1 | 7 |" in text
    assert "0.625 / 0.312" in text and "† carried over from somewhere" in text and "old" not in text


def test_a_damaged_record_is_refused_and_left_as_it_was(tmp_path):
    script = _script()
    record = tmp_path / "results.json"
    record.write_text('{"lens/s0": ')
    with pytest.raises(typer.BadParameter, match="not a results file"):
        script.update_record(record, "lisa/s0", _entry("lisa", 0.1))
    assert record.read_text() == '{"lens/s0": '
