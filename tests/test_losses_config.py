import math
from pathlib import Path

import pytest
import torch

from lens.config import LensConfig, LossConfig
from lens.losses import attention_loss, batched_mask_losses, dice_loss, lens_loss, mask_bce_loss


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


def test_total_by_hand():
    """Two masks of different sizes, one with an ignored pixel; every term written out from eq. 5-7."""
    logits = [torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0, 9.0]])]  # p = (.5, .5) and (.75, .5, -)
    targets = [torch.tensor([[1, 0]], dtype=torch.uint8), torch.tensor([[1, 1, 255]], dtype=torch.uint8)]
    a, m = torch.full((2, 1, 2), 0.5), torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    out = lens_loss(logits, targets, a, m, LossConfig(dice_weight=2, bce_weight=4, attention_weight=1))
    k, eps = 1000, 1e-6  # LISA's scale and smoothing
    dice = [
        1 - (2 * 0.5 / k + eps) / ((0.5 + 0.5) / k + 1 / k + eps),
        1 - (2 * 1.25 / k + eps) / (1.25 / k + 2 / k + eps),
    ]
    bce = [math.log(2), -(math.log(0.75) + math.log(0.5)) / 2]
    attention = math.log(2)  # every cell: A_c = 0.5, BCE = ln 2 whatever the target
    expected = {
        "dice_loss": sum(dice) / 2,
        "bce_loss": sum(bce) / 2,
        "attention_loss": attention,
        "loss": 2 * sum(dice) / 2 + 4 * sum(bce) / 2 + attention,
    }
    assert {k: float(v) for k, v in out.items()} == pytest.approx(expected, rel=1e-6)


def test_batched_mask_losses_equal_the_per_mask_loop():
    torch.manual_seed(0)
    sizes = [(5, 7), (12, 3), (1, 1), (8, 8)]
    logits = [torch.randn(h, w, requires_grad=True) for h, w in sizes]
    targets = [torch.randint(0, 2, (h, w), dtype=torch.uint8) for h, w in sizes]
    targets[0][0, :3] = 255
    targets[2][0, 0] = 255  # a mask with no valid pixel at all
    dice, bce = batched_mask_losses(logits, targets)
    loop_dice = torch.stack([dice_loss(x, t) for x, t in zip(logits, targets, strict=True)]).mean()
    loop_bce = torch.stack([mask_bce_loss(x, t) for x, t in zip(logits, targets, strict=True)]).mean()
    torch.testing.assert_close(dice, loop_dice, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bce, loop_bce, rtol=1e-6, atol=1e-7)
    batched = torch.autograd.grad(2 * dice + 4 * bce, logits)
    looped = torch.autograd.grad(2 * loop_dice + 4 * loop_bce, logits)
    for g, h in zip(batched, looped, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)


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
    expected = {
        "synthetic.yaml": {"synthetic": {"seed": 0}},
        "synthetic-whole-splits.yaml": {"synthetic": {"seed": 0, "eval_scenes": None}},
        "train_llava7b.yaml": {},
    }
    assert config.data.datasets == expected[name]


def test_configs_written_before_the_datasets_section_still_load():
    old = {"data": {"synthetic_seed": 3, "synthetic_eval_scenes": None, "num_workers": 0}}
    assert LensConfig.from_dict(old).data.datasets == {"synthetic": {"seed": 3, "eval_scenes": None}}
    assert LensConfig.from_dict({"data": {"synthetic_seed": None}}).data.datasets == {}


def test_the_synthetic_recipe_records_the_shipped_schedule():
    """configs/synthetic.yaml is the whole recipe of the shipped head: no command-line flag is needed."""
    train = LensConfig.from_yaml(Path(__file__).parents[1] / "configs" / "synthetic.yaml").train
    assert (train.lr_schedule, train.max_steps, train.warmup_steps, train.lr) == ("cosine", 32000, 50, 4e-4)
    assert (train.eval_every, train.eval_limit, train.save_every, train.batch_size) == (0, 200, 500, 8)


def test_override_sets_one_value_and_names_a_bad_one():
    config = LensConfig().override(
        ["train.lr_schedule=cosine", "data.datasets.synthetic.seed=2", "train.lr=1e-3"]
    )
    assert (config.train.lr_schedule, config.train.lr, config.data.datasets) == (
        "cosine",
        1e-3,
        {"synthetic": {"seed": 2}},
    )
    with pytest.raises(ValueError, match=r"config.train: unknown key\(s\) \['lr_shedule'\]"):
        LensConfig().override(["train.lr_shedule=cosine"])
    with pytest.raises(ValueError, match="train.save_every must be >= 1"):
        LensConfig().override(["train.save_every=0"])
