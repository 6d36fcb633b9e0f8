import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamModel, SamProcessor
from typer.testing import CliRunner

from lens.data.synthetic import Placement, Scene, SyntheticWorld
from lens.data.synthetic.scene import RING_HOLE
from lens.tiny import TinySamSpec, build_sam
from lens.world.sam import (
    SamTrainConfig,
    app,
    build_world_sam,
    embed_images,
    evaluate_point_miou,
    load_world_sam,
    pixel_values,
    point_ious,
    predict_masks,
    sam_loss,
    train_sam,
    upscale_masks,
)
from lens.world.sam_prompts import NEGATIVE, POSITIVE, SceneTensors, centre_point, mask_boxes, sample_prompts

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "lens" / "assets" / "synthetic" / "sam"
SHIPPED_FLOOR = 0.89  # just below the shipped model's 0.915 on these 125 objects (test split: 0.898 overall)
FLOOR_SCENES = 30  # first test scenes: 100+ objects
# Small enough to train a few steps in a second, at the world's image size.
TINY_SPEC = TinySamSpec(image_size=128, patch_size=16, vision_hidden=16, vision_layers=1, vision_heads=1)


def _rect(height: int, width: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def test_pixel_values_equal_the_processor():
    _, processor = build_sam(TinySamSpec(image_size=64))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    expected = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values(torch.from_numpy(images), processor), expected)
    with pytest.raises(ValueError, match="needs"):
        pixel_values(torch.zeros(1, 32, 64, 3, dtype=torch.uint8), processor)


def test_upscale_equals_post_process_masks():
    _, processor = build_sam(TinySamSpec(image_size=64))
    low_res = torch.randn(3, 32, 32)
    expected = processor.post_process_masks([low_res[:, None]], [(64, 64)], [(64, 64)], binarize=False)[0]
    torch.testing.assert_close(upscale_masks(low_res, processor), expected[:, 0])


def test_centre_point_inside_or_nearest_visible_pixel():
    centre, radius = (40.3, 50.7), 12.0
    ring = Placement("ring", "red", "large", centre, radius)
    circle = Placement("circle", "blue", "small", (90.0, 30.0), 8.0)
    scene = Scene.from_placements([ring, circle])
    ring_obj, circle_obj = scene.objects
    assert centre_point(circle_obj) == (90, 30)  # the pixel holding (90.0, 30.0)
    x, y = centre_point(ring_obj)
    assert ring_obj.mask[y, x] and not ring_obj.mask[int(centre[1]), int(centre[0])]
    # The nearest ring pixel lies just beyond the hole's radius (pixel centres are sampled).
    distance = math.hypot(x + 0.5 - centre[0], y + 0.5 - centre[1])
    assert RING_HOLE * radius <= distance < RING_HOLE * radius + 1
    ys, xs = np.nonzero(ring_obj.mask)
    assert distance == pytest.approx(np.hypot(xs + 0.5 - centre[0], ys + 0.5 - centre[1]).min())


def test_mask_boxes_and_prompts_respect_masks():
    masks = torch.stack([_rect(32, 32, 2, 3, 10, 20), _rect(32, 32, 15, 15, 16, 16)])
    torch.testing.assert_close(mask_boxes(masks), torch.tensor([[3.0, 2, 19, 9], [15, 15, 15, 15]]))
    generator = torch.Generator().manual_seed(0)
    exact_boxes = SamTrainConfig(box_prob=1.0, box_noise=0.0)
    torch.testing.assert_close(sample_prompts(masks, exact_boxes, generator)["boxes"], mask_boxes(masks))
    with_negatives = SamTrainConfig(box_prob=0.0, negative_prob=1.0)
    for _ in range(20):
        prompts = sample_prompts(masks, with_negatives, generator)
        x, y = prompts["points"].long().unbind(-1)  # (M, K)
        inside = masks[torch.arange(2)[:, None], y, x]
        assert torch.equal(inside, prompts["labels"] == POSITIVE)
        assert (prompts["labels"][:, -1] == NEGATIVE).all() and 2 <= prompts["labels"].shape[1] <= 4


def test_sam_loss_hand_computed():
    target = _rect(8, 8, 0, 0, 4, 4)[None]  # 16 of 64 pixels
    terms = sam_loss(torch.zeros(1, 8, 8), torch.tensor([0.25]), target, SamTrainConfig())
    assert terms["bce"].item() == pytest.approx(math.log(2))
    assert terms["dice"].item() == pytest.approx(1 - (2 * 8 + 1) / (32 + 16 + 1))
    assert terms["iou_mse"].item() == pytest.approx(0.25**2)  # logits 0 predict nothing: IoU 0
    perfect = sam_loss(torch.where(target, 20.0, -20.0), torch.tensor([1.0]), target, SamTrainConfig())
    assert perfect["loss"].item() < 1e-6


def test_predict_masks_equals_the_full_forward():
    model, processor = build_sam(TINY_SPEC, seed=1)
    scenes = SyntheticWorld(seed=0).split("val")[:2]
    pixels = processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    points = torch.tensor([[[10.0, 20.0]], [[70.0, 5.0]], [[64.0, 64.0]]])  # (M, 1, 2)
    labels = torch.ones(3, 1, dtype=torch.long)
    with torch.no_grad():
        low_res, iou = predict_masks(
            model, embed_images(model, pixels), torch.tensor([1, 0, 1]), points, labels
        )
        for m, image in enumerate([1, 0, 1]):
            out = model(pixel_values=pixels[image : image + 1], input_points=points[None, m : m + 1],
                        input_labels=labels[None, m : m + 1], multimask_output=False)  # fmt: skip
            torch.testing.assert_close(low_res[m], out.pred_masks[0, 0, 0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou[m], out.iou_scores[0, 0, 0], atol=1e-5, rtol=1e-4)


def _click_loss(model: SamModel, processor: SamProcessor, scenes) -> float:
    """Training loss of one centre click per object of ``scenes``."""
    data = SceneTensors.from_scenes(scenes)
    clicks = torch.tensor([centre_point(o) for s in scenes for o in s.objects], dtype=torch.float32)[:, None]
    with torch.no_grad():
        embeddings = embed_images(model, pixel_values(data.images, processor))
        labels = torch.full(clicks.shape[:2], POSITIVE)
        low_res, iou = predict_masks(model, embeddings, data.object_image, clicks, labels)
    return sam_loss(upscale_masks(low_res, processor), iou, data.masks(), SamTrainConfig())["loss"].item()


def test_build_world_sam_uses_sams_positional_scale():
    model, _ = build_world_sam(SamTrainConfig(spec=TINY_SPEC, positional_scale=1.0))
    frequencies = model.shared_image_embedding.positional_embedding  # (2, F)
    assert not frequencies.requires_grad and 0.7 < frequencies.std().item() < 1.3  # N(0, 1), not N(0, 8²)
    assert model.prompt_encoder.shared_embedding.positional_embedding is frequencies


@pytest.mark.slow  # two short training runs: ~3-5 s on a shared CPU
def test_short_training_lowers_loss_and_round_trips(tmp_path):
    cfg = SamTrainConfig(
        spec=TINY_SPEC, train_scenes=8, eval_scenes=2, steps=40, batch_images=2, lr=3e-3, warmup_steps=5,
        log_every=10,
    )  # fmt: skip
    metrics = train_sam(cfg, tmp_path)
    assert metrics["final_loss"] < 0.8 * metrics["first_loss"]
    assert json.loads((tmp_path / "metrics.json").read_text())["final_loss"] == metrics["final_loss"]
    model = SamModel.from_pretrained(tmp_path, local_files_only=True)
    processor = SamProcessor.from_pretrained(tmp_path, local_files_only=True)
    fresh, _ = build_world_sam(cfg)
    train_scenes = SyntheticWorld(seed=0).split("train")[: cfg.train_scenes]
    assert _click_loss(model, processor, train_scenes) < _click_loss(fresh, processor, train_scenes)
    torch.testing.assert_close(  # frozen, so saved as built
        model.shared_image_embedding.positional_embedding, fresh.shared_image_embedding.positional_embedding
    )
    test_scenes = SyntheticWorld(seed=0).split("test")[: cfg.eval_scenes]
    assert evaluate_point_miou(model, processor, test_scenes) == pytest.approx(metrics["test"]["point_miou"])
    again = train_sam(cfg, tmp_path / "again")
    assert again["final_loss"] == metrics["final_loss"]  # seeded: the same run twice
    continued = train_sam(replace(cfg, init_from=str(tmp_path), steps=1, lr=1e-9), tmp_path / "continued")
    assert continued["first_loss"] < 0.8 * metrics["first_loss"]  # starts where the first run ended
    assert continued["init_from_metrics"]["final_loss"] == metrics["final_loss"]
    resumed, _ = load_world_sam(str(tmp_path / "continued"))
    assert not resumed.shared_image_embedding.positional_embedding.requires_grad
    torch.testing.assert_close(
        resumed.shared_image_embedding.positional_embedding, fresh.shared_image_embedding.positional_embedding
    )


def test_missing_init_from_is_a_usage_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SamTrainConfig(init_from=str(tmp_path))
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "out"), "--init-from", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope" in result.output
    assert not (tmp_path / "out").exists()


def test_shipped_checkpoint_segments_from_one_click():
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip(
            f"no shipped small SAM at {SHIPPED}; train it with `python -m lens.world.sam --out {SHIPPED}`"
        )
    model = SamModel.from_pretrained(SHIPPED, local_files_only=True).eval()
    processor = SamProcessor.from_pretrained(SHIPPED, local_files_only=True)
    ious, _ = point_ious(model, processor, SyntheticWorld(seed=0).split("test")[:FLOOR_SCENES])
    assert len(ious) >= 100
    assert ious.mean() > SHIPPED_FLOOR
