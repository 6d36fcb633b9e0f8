"""Every common mistake at the command line: one line naming the problem, a non-zero exit, no traceback."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lens import cli
from lens.assets import SYNTHETIC_LENS, resolve_model_id
from lens.cli import app

runner = CliRunner()
CONFIG = Path(__file__).parents[1] / "configs" / "synthetic.yaml"


def _fails(args: list[str], message: str, code: int = 2) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and message in result.output, result.output
    return result.output


def _one_line(args: list[str], message: str, code: int = 2) -> None:
    lines = _fails(args, message, code).replace("\r", "\n").strip().splitlines()
    # the message is the last line, alone (transformers' own loading bars may come before it)
    assert message in lines[-1] and sum("error" in line for line in lines) <= 1, lines


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(path)
    return path


def _checkpoint(tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(resolve_model_id(SYNTHETIC_LENS), copy)
    return copy


def test_bad_images(tmp_path: Path) -> None:
    _one_line(["predict", str(tmp_path / "nope.png"), "the ring"], "no image at")
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    _one_line(["predict", str(garbage), "the ring"], "garbage.png: not a readable image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (4000, 4000)).save(bomb)
    _one_line(["predict", str(bomb), "x", "--max-pixels", "1000000"], "exceeds the pixel limit of 1,000,000")
    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (3, 2000)).save(sliver)
    _one_line(["predict", str(sliver), "the ring"], "sliver.png: 3x2000 is too small")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "query is empty"),
        ("  ", "only whitespace"),
        ("an <image> here", "'<image>'"),
        ("caf\udce9", "UTF-8"),
    ],
)
def test_bad_queries(picture: Path, query: str, message: str) -> None:
    _one_line(["predict", str(picture), query], message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "CUDA is not available on this machine"),
        ("cuda:1", "CUDA is not available"),
        ("mps", "MPS is not available"),
        ("cdua", "unknown device 'cdua'"),
        ("meta", "is not supported"),
    ],
)
def test_bad_devices(picture: Path, device: str, message: str) -> None:
    _one_line(["predict", str(picture), "the ring", "--device", device], message)
    _one_line(["demo", "--device", device, "--queries", "1"], message)


def test_bad_checkpoints(tmp_path: Path, picture: Path) -> None:
    checkpoint = _checkpoint(tmp_path)
    config = checkpoint / "lens_config.yaml"
    good = config.read_text()
    config.write_text("backbone: {layer: 3\n")
    _one_line(
        ["predict", str(picture), "x", "--checkpoint", str(checkpoint)], "lens_config.yaml: not valid YAML"
    )
    config.write_text("")
    _one_line(["predict", str(picture), "x", "--checkpoint", str(checkpoint)], "lens_config.yaml is empty")
    config.write_text(good.replace("layer: ", "layer: five #"))
    _one_line(
        ["predict", str(picture), "x", "--checkpoint", str(checkpoint)], "backbone.layer: expected an integer"
    )
    config.write_text(good)
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _one_line(
        ["predict", str(picture), "x", "--checkpoint", str(checkpoint)], "model.safetensors is not a readable"
    )
    weights.write_bytes(b"PK\x03\x04 a zip, not safetensors")
    _one_line(
        ["predict", str(picture), "x", "--checkpoint", str(checkpoint)], "model.safetensors is not a readable"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["eval", SYNTHETIC_LENS, "--batch-size", "0"],
        ["eval", SYNTHETIC_LENS, "--limit", "0"],
        ["eval", SYNTHETIC_LENS, "--limit", "-5"],
        ["demo", "--queries", "0"],
        ["demo", "--queries", "-3"],
        ["demo", "--questions", "-1"],
        ["cache", str(CONFIG), "--cache-root", "{tmp}/c", "--shard-size", "0"],
        ["cache", str(CONFIG), "--cache-root", "{tmp}/c", "--batch-size", "0"],
        ["export-world", "{tmp}/w", "--scenes", "0"],
        ["predict", "x.png", "q", "--max-pixels", "0"],
    ],
)
def test_out_of_range_numbers_are_refused(args: list[str], tmp_path: Path) -> None:
    _fails([a.replace("{tmp}", str(tmp_path)) for a in args], "Invalid value")
    assert not any(tmp_path.iterdir())


def test_bad_config_values_stop_before_training(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.read_text().replace("max_steps: 32000", "max_steps: 4.5"))
    out = tmp_path / "run"
    _one_line(
        ["train", str(config), "--output-dir", str(out)],
        "c.yaml: config.train.max_steps: expected an integer, got 4.5",
    )
    assert not out.exists()


def test_ctrl_c_is_one_line(monkeypatch: pytest.MonkeyPatch, picture: Path) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lens.weights.load_lens", interrupted)
    _one_line(["predict", str(picture), "the ring"], cli.INTERRUPTED, code=130)
