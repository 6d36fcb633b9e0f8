import math
from pathlib import Path

import pytest
import torch

from lens.config import LensConfig, LossConfig
from lens.losses import attention_loss, dice_loss, lens_loss, mask_bce_loss


def test_dice_by_hand():
    logits = torch.tensor([[10.0, -10.0], [10.0, -10.0]])  # probabilities ~1, 0, 1, 0
    target = torch.tensor([[1, 1], [0, 0]], dtype=torch.uint8)
    p = torch.sigmoid(logits)
    expected = 1 - (2 * (p * target).sum() / 1000 + 1e-6) / ((p.sum() + target.sum()) / 1000 + 1e-6)
    torch.testing.assert_close(dice_loss(logits, target), expected)
    assert abs(float(dice_loss(logits, target)) - 0.5) < 1e-3  # overlap 1, |P| = 2, |T| = 2


def test_ignore_pixels_are_left_out():
    logits = torch.tensor([[3.0, -2.0, 50.0]])
    target = torch.tensor([[1, 0, 255]], dtype=torch.uint8)
    bce = -(math.log(torch.sigmoid(torch.tensor(3.0))) + math.log(1 - torch.sigmoid(torch.tensor(-2.0)))) / 2
    assert abs(float(mask_bce_loss(logits, target)) - bce) < 1e-6
    torch.testing.assert_close(dice_loss(logits, target), dice_loss(logits[:, :2], target[:, :2]))


def test_attention_loss_by_hand():
    a = torch.tensor([[[0.9, 0.2]]])
    m = torch.tensor([[[1.0, 0.0]]])
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert abs(float(attention_loss(a, m)) - expected) < 1e-6


def test_total_loss_by_hand():
    """Two samples of different sizes (one pixel ignored) and a padded A_c with one excluded cell, every term
    written out with math; weights (0.5, 3, 7) so each term's weight shows."""

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    def dice(probs: list[float], truth: list[int]) -> float:
        inter = sum(p * t for p, t in zip(probs, truth, strict=True))
        return 1 - (2 * inter / 1000 + 1e-6) / ((sum(probs) + sum(truth)) / 1000 + 1e-6)

    logits = [torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5], [3.0]])]
    targets = [torch.tensor([[1, 0]], dtype=torch.uint8), torch.tensor([[255], [1]], dtype=torch.uint8)]
    a = torch.tensor([[[0.6, 0.1]], [[0.3, 0.99]]])
    m = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    cells = torch.tensor([[[True, True]], [[True, False]]])  # sample 2's grid is one cell: 0.99 is padding
    out = lens_loss(
        logits, targets, a, m, LossConfig(dice_weight=0.5, bce_weight=3, attention_weight=7), cells
    )
    dice_terms = [dice([sig(2.0), sig(-1.0)], [1, 0]), dice([sig(3.0)], [1])]
    bce_terms = [-(math.log(sig(2.0)) + math.log(1 - sig(-1.0))) / 2, -math.log(sig(3.0))]
    attention = -(math.log(0.6) + math.log(0.9) + math.log(0.7)) / 3
    expected = {
        "dice_loss": sum(dice_terms) / 2,
        "bce_loss": sum(bce_terms) / 2,
        "attention_loss": attention,
        "loss": 0.5 * sum(dice_terms) / 2 + 3 * sum(bce_terms) / 2 + 7 * attention,
    }
    assert {k: float(v) for k, v in out.items()} == pytest.approx(expected, rel=1e-5)


def test_paper_defaults():
    c = LensConfig()
    assert (c.backbone.layer, c.keypoints.max_points, c.keypoints.nms_radius, c.keypoints.neighbourhood) == (
        14,
        16,
        4.0,
        3,
    )
    assert (c.keypoints.subpixel_eps, c.loss.dice_weight, c.loss.bce_weight, c.train.lr) == (
        1e-6,
        2.0,
        4.0,
        5e-5,
    )
    assert c.descriptor.global_only_prob == 0.5


def test_yaml_round_trip(tmp_path):
    c = LensConfig()
    c.backbone.layer = 7
    c.train.betas = (0.8, 0.9)
    c.to_yaml(tmp_path / "c.yaml")
    assert LensConfig.from_yaml(tmp_path / "c.yaml") == c


def test_yaml_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("keypoints:\n  max_point: 8\n")
    with pytest.raises(ValueError, match=r"config.keypoints: unknown key\(s\) \['max_point'\]"):
        LensConfig.from_yaml(tmp_path / "c.yaml")


@pytest.mark.parametrize("name", ["synthetic.yaml", "synthetic-whole-splits.yaml", "train_llava7b.yaml"])
def test_shipped_configs_load(name):
    config = LensConfig.from_yaml(Path(__file__).parents[1] / "configs" / name)
    assert config.data.synthetic_eval_scenes == (None if name == "synthetic-whole-splits.yaml" else 100)
