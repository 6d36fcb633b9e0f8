from pathlib import Path

import pytest
from typer.testing import CliRunner

from lens.cli import app
from lens.data.reason_seg import ReasonSegDataset

runner = CliRunner()
CONFIG = Path(__file__).parents[1] / "configs" / "synthetic.yaml"


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "predict", "export-world", "train", "eval", "cache"):
        assert command in result.output


def test_predict_missing_image_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path / "nope.png"), "the ring"])
    assert result.exit_code == 2
    assert "no image at" in result.output and "Traceback" not in result.output


def test_predict_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = runner.invoke(app, ["predict", str(bad), "the ring", "--checkpoint", str(tmp_path)])
    assert result.exit_code == 2 and "error" in result.output


def test_export_world_is_readable_as_reason_seg(tmp_path):
    result = runner.invoke(app, ["export-world", str(tmp_path), "--split", "val", "--scenes", "3"])
    assert result.exit_code == 0, result.output
    dataset = ReasonSegDataset(tmp_path, "val")
    assert len(dataset) >= 3
    sample = dataset[0]
    assert sample.image.shape[:2] == sample.mask.shape


def test_train_rejects_bad_loop_options_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    for flags, named in (
        (["--set", "train.eval_every=-1"], "train.eval_every must be >= 0"),
        (["--set", "train.save_every=0"], "train.save_every must be >= 1"),
        (["--set", "train.lr_schedule=cosin"], "train.lr_schedule must be one of linear, cosine"),
        (["--set", "train.lr_shedule=cosine"], "unknown key(s) ['lr_shedule']"),
        (["--set", "train.lr"], "--set expects section.key=value"),
        (["--stop-at-step", "0"], "stop_at_step must be >= 1"),
    ):
        result = runner.invoke(app, ["train", str(CONFIG), "--output-dir", str(out), *flags])
        assert result.exit_code == 2, result.output
        assert named in result.output and "Traceback" not in result.output
        assert not out.exists()


def test_eval_takes_the_shipped_asset_and_names_a_bad_checkpoint(tmp_path):
    out = tmp_path / "eval"
    args = ["--splits", "synthetic/test", "--limit", "2", "--output-dir", str(out)]
    result = runner.invoke(app, ["eval", "lens:synthetic/lens", *args])
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file()
    result = runner.invoke(app, ["eval", str(tmp_path / "nothing"), *args])
    assert result.exit_code == 2 and "not a LENS checkpoint" in result.output
    assert "Traceback" not in result.output


def test_version_is_the_package_version():
    import lens

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lens {lens.__version__}"


@pytest.mark.slow
def test_the_shipped_head_loads_from_python_by_its_lens_id():
    import torch

    from lens import load_lens
    from lens.weights import build_lens, load_lens_weights

    model = load_lens("lens:synthetic/lens")
    fresh = load_lens_weights(build_lens(model.config), "lens:synthetic/lens")
    shipped, loaded = model.trainable_state_dict(), fresh.trainable_state_dict()
    assert shipped.keys() == loaded.keys() and all(torch.equal(shipped[k], loaded[k]) for k in shipped)
