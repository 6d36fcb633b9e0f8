"""``lens info``: every registered backbone and decoder, with the default tap layer of each hub model."""

from __future__ import annotations

from typer.testing import CliRunner

from lens.backbone import BACKBONES
from lens.cli import app


def test_info_lists_every_backbone_with_its_default_layer():
    result = CliRunner().invoke(app, ["info"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in BACKBONES:
        assert name in result.output
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in result.output
    assert "12 / 28" in result.output  # round(14 / 32 * 28)
    assert "16 / 36" in result.output  # Qwen3-VL-8B
    assert "14 / 32" in result.output  # LLaVA-NeXT (Mistral-7B)
    assert "sam" in result.output


def test_every_backbone_states_its_default_layer_fraction():
    for cls in BACKBONES.values():
        assert 0 < cls.DEFAULT_LAYER_FRACTION <= 1
