from typer.testing import CliRunner

from lens.cli import app
from lens.data.reason_seg import ReasonSegDataset

runner = CliRunner()


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
