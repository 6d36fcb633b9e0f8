"""LensPipeline on the shipped synthetic models: cached == uncached, batched == single, presence, outputs."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lens.assets import resolve_model_id
from lens.data.synthetic import SyntheticWorld
from lens.errors import InvalidInput
from lens.pipeline import (
    PRESENCE_FEATURES,
    LensPipeline,
    PresenceCalibrator,
    Segmentation,
    instruction,
    presence_features,
    select_device,
)


@pytest.fixture(scope="module")
def pipe() -> LensPipeline:
    torch.manual_seed(0)
    return LensPipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def scene():
    return SyntheticWorld(seed=0).scene("test", 3)


def _queries(scene, n: int) -> list[str]:
    return [q.sample.query for q in scene.segmentation_queries()[:n]]


def test_set_image_equals_the_uncached_path(pipe, scene):
    queries = _queries(scene, 4)
    plain = pipe(scene.image, queries)
    pipe.set_image(scene.image)
    cached = pipe(queries)
    single = pipe(queries[1])
    for a, b in zip(plain, cached, strict=True):
        assert np.array_equal(a.mask, b.mask)
        assert a.presence == pytest.approx(b.presence, abs=1e-4)
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-3)
        np.testing.assert_allclose(a.attention_map, b.attention_map, atol=1e-5)
    assert np.array_equal(single.mask, plain[1].mask)
    pipe.reset_image()
    with pytest.raises(InvalidInput, match="set_image"):
        pipe("the red ring")


def test_batch_over_images_equals_one_image_at_a_time(pipe):
    world = SyntheticWorld(seed=0)
    scenes = [world.scene("test", i) for i in (0, 1, 2)]
    requests = [(s.image, _queries(s, 2)) for s in scenes]
    batched = LensPipeline(pipe.model, pipe.presence, batch_size=4).batch(requests)  # chunks cross images
    assert [len(r) for r in batched] == [2, 2, 2]
    for (image, queries), results in zip(requests, batched, strict=True):
        alone = pipe(image, queries)
        for a, b in zip(alone, results, strict=True):
            assert a.query == b.query
            assert (a.mask != b.mask).mean() < 1e-3  # float noise may flip a pixel on the threshold
            assert a.presence == pytest.approx(b.presence, abs=1e-3)


def test_presence_is_a_logistic_model_of_the_named_features(pipe, scene):
    prediction = pipe.model.predict(Image.fromarray(scene.image), instruction("the red ring"))
    features = presence_features(prediction)
    assert features["max_logit"] == pytest.approx(float(prediction.mask_logits.max()))
    assert features["iou_score"] == pytest.approx(prediction.score)
    calibrator = PresenceCalibrator(
        ["max_logit", "iou_score"], [0.5, -2.0], 0.25, mean=[1.0, 0.0], std=[2.0, 1.0]
    )
    z = 0.5 * (features["max_logit"] - 1.0) / 2.0 - 2.0 * features["iou_score"] + 0.25
    assert calibrator.probability(prediction) == pytest.approx(1 / (1 + math.exp(-z)))


def test_presence_fit_recovers_a_known_logistic_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2))
    p = 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0 * x[:, 1] + 0.3)))
    y = rng.random(4000) < p
    fitted = PresenceCalibrator.fit(x, y, ["max_logit", "iou_score"], l2=0.0)
    # Balanced weighting shifts only the bias; the slopes (per standardised unit) stay those of the truth.
    slopes = np.array(fitted.weights) / np.array(fitted.std)
    np.testing.assert_allclose(slopes, [2.0, -1.0], rtol=0.12)
    with pytest.raises(ValueError, match="both classes"):
        PresenceCalibrator.fit(x, np.ones(4000, bool), ["max_logit", "iou_score"])


def test_absent_target_gives_an_empty_mask(pipe, scene, tmp_path):
    never = PresenceCalibrator(["max_logit"], [0.0], -10.0, mean=[0.0], std=[1.0])
    result = LensPipeline(pipe.model, never)(scene.image, "the red ring")
    assert not result.present and result.presence < 0.5
    assert not result.mask.any() and result.box is None and not result.keypoints_inside.any()
    assert result.to_supervision().is_empty() if _has_supervision() else True
    calibrator_path = never.save(tmp_path / "p.json")
    assert PresenceCalibrator.load(calibrator_path) == never


def test_shipped_calibration_is_loaded_and_recorded():
    calibrator = PresenceCalibrator.load(resolve_model_id("lens:synthetic/lens") + "/presence.json")
    assert set(calibrator.feature_names) <= set(PRESENCE_FEATURES)
    assert calibrator.fitted_on["split"] == "synthetic/val"
    assert (
        calibrator.fitted_on["test"]["balanced_accuracy"]
        > calibrator.fitted_on["test"]["iou_score_only_balanced_accuracy"]
    )


def _mask_result(mask: np.ndarray) -> Segmentation:
    from lens.geometry import DecoderFrame, GridFrame, ImageGeometry

    h, w = mask.shape
    return Segmentation(
        query="q",
        mask=mask,
        present=bool(mask.any()),
        presence=0.9,
        score=0.5,
        keypoints=np.array([[2.5, 1.5], [0.5, 0.5]]),
        keypoints_inside=np.array([True, False]),
        attention_map=np.eye(4),
        geometry=ImageGeometry(GridFrame.pad_to_square(w, h, 4), DecoderFrame.longest_side(w, h, 16)),
        image=Image.new("RGB", (w, h), "white"),
    )


def test_box_rle_png_and_supervision_of_a_hand_made_mask(tmp_path):
    from pycocotools import mask as mask_utils

    mask = np.zeros((6, 9), bool)
    mask[1:4, 2:7] = True
    mask[5, 8] = True
    result = _mask_result(mask)
    assert result.box == (2, 1, 9, 6)
    rle = result.rle()
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask) and rle["size"] == [6, 9]
    png = np.asarray(Image.open(result.save_mask(tmp_path / "m.png")))
    assert np.array_equal(png == 255, mask) and set(np.unique(png)) == {0, 255}
    overlay = np.asarray(result.overlay(keypoints=False))
    assert (overlay[~mask] == 255).all() and (overlay[mask] != 255).any()
    assert result.to_dict()["keypoints"][1] == {"x": 0.5, "y": 0.5, "inside": False}
    if _has_supervision():
        detections = result.to_supervision()
        assert len(detections) == 1 and detections.xyxy.tolist() == [[2, 1, 9, 6]]
        assert np.array_equal(detections.mask[0], mask)


def _has_supervision() -> bool:
    try:
        import supervision  # noqa: F401
    except ImportError:
        return False
    return True


def test_instruction_uses_the_training_templates():
    assert (
        instruction("the red ring") == "What is the red ring in this image? Please output segmentation mask."
    )
    assert instruction("which one has a hole?") == "which one has a hole? Please output segmentation mask."
    assert instruction("  keep me  ", raw=True) == "keep me"
    with pytest.raises(InvalidInput, match="whitespace"):
        instruction("   ")


def test_devices_and_quantisation_are_refused_by_name():
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidInput, match="unknown device"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="no CUDA"):
            select_device("cuda")
        with pytest.raises(InvalidInput, match="4-bit loading needs a CUDA GPU"):
            LensPipeline.from_pretrained(device="cpu", load_in_4bit=True)


def test_from_a_local_directory_and_bad_paths(tmp_path, scene, monkeypatch):
    local = tmp_path / "ckpt"
    shutil.copytree(resolve_model_id("lens:synthetic/lens"), local)
    pipe = LensPipeline.from_pretrained(local, device="cpu", dtype="float32")
    assert pipe.presence is not None
    assert pipe(scene.image, "the red ring").mask.shape == scene.image.shape[:2]
    with pytest.raises(InvalidInput, match="no LENS checkpoint"):
        LensPipeline.from_pretrained(tmp_path / "missing")
    import huggingface_hub

    asked = []

    def offline(repo_id, **kwargs):  # the project's machines reach no hub: stand in for that answer
        asked.append((repo_id, kwargs["allow_patterns"]))
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(InvalidInput, match="neither a local directory nor a reachable hub"):
        LensPipeline.from_pretrained("no-such-owner-lens/no-such-checkpoint")
    assert asked == [
        ("no-such-owner-lens/no-such-checkpoint", ["lens_config.yaml", "model.safetensors", "presence.json"])
    ]
    with pytest.raises(InvalidInput, match="unknown dtype"):
        LensPipeline.from_pretrained(local, dtype="float13")
