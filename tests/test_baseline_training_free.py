"""The training-free baseline: the MLLM's own attention peak clicked into the pretrained SAM, checked against
Hugging Face's own attention output and SAM's own processor and forward; scored by LENS's evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from helpers import TINY_LAYER, make_lens, random_image
from lens.baselines import training_free
from lens.baselines.training_free import TrainingFreeModel, TrainingFreeSettings
from lens.data.loader import QueryDataset
from lens.data.synthetic import SyntheticWorld
from lens.data.synthetic.dataset import SyntheticQueries
from lens.evaluation import PER_SAMPLE_NAME, EvalSplit, evaluate


def _baseline(tiny_models, layer: int = 1, points: int = 1) -> TrainingFreeModel:
    lens = make_lens(tiny_models)
    return TrainingFreeModel(lens.config, lens.backbone, lens.decoder, TrainingFreeSettings(layer, points))


@pytest.mark.parametrize(("width", "height", "layer"), [(64, 64, 1), (90, 50, 3), (40, 72, 4)])
def test_mask_is_sams_own_for_the_attention_peak(tiny_models, width, height, layer):
    llava, llava_processor, sam, sam_processor = tiny_models
    model = _baseline(tiny_models, layer=layer)
    image, text = random_image(height, width, seed=width), "what is the red ring in this image?"
    inputs = model.prepare([image], [text])
    out = model(inputs)

    # Reference: HF's own eager attention at that layer, averaged over heads and the text tokens, over the
    # image tokens (row-major cells); the peak cell's centre in the original image; SamProcessor rescales it.
    backbone = model.backbone
    enc = backbone._inputs([image], [text])
    llava.set_attn_implementation("eager")
    with torch.no_grad():
        att = llava(**enc, output_attentions=True).attentions[layer - 1][0].mean(0)  # (L, L)
    f = inputs.features
    t0, t1 = (int(v) for v in f.text_span[0])
    gh, gw = (int(v) for v in f.grid_sizes[0])
    cells = f.image_positions[0, : gh * gw]
    row_map = att[t0:t1].mean(0)[cells].view(gh, gw)
    valid = f.geometries[0].valid_cells().bool()
    peak = int(torch.where(valid, row_map, torch.zeros_like(row_map)).flatten().argmax())
    centre = f.geometries[0].grid_to_image(torch.tensor([[peak % gw, peak // gw]], dtype=torch.float32))[0]
    prompt = sam_processor(
        images=[image],
        input_points=[[[[float(centre[0]) - 0.5, float(centre[1]) - 0.5]]]],
        return_tensors="pt",
    )
    with torch.no_grad():
        ref = sam(
            image_embeddings=sam.get_image_embeddings(prompt["pixel_values"]),
            input_points=prompt["input_points"],
            input_labels=torch.ones(1, 1, 1, dtype=torch.long),
            multimask_output=False,
        )
    ref_logits = sam_processor.post_process_masks(
        ref.pred_masks, prompt["original_sizes"], prompt["reshaped_input_sizes"], binarize=False
    )[0][0, 0]
    assert out.keypoints[0, 0].tolist() == [peak % gw, peak // gw]
    # A random tiny SAM's logits are ~1e-5, and a click 2 px away moves them by several times that: compare on
    # their own scale.
    scale = float(ref_logits.abs().max())
    torch.testing.assert_close(out.mask_logits[0], ref_logits, atol=1e-3 * scale, rtol=1e-3)


def test_more_points_are_the_next_nms_peaks(tiny_models):
    model = _baseline(tiny_models, layer=2, points=3)
    inputs = model.prepare([random_image(64, 64)], ["the blue star"])
    out = model(inputs)
    assert out.keypoints.shape == (1, 3, 2) and out.keypoints_valid.all()
    heat = out.attention_map[0]
    values = [float(heat[int(y), int(x)]) for x, y in out.keypoints[0].tolist()]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(1.0)


def test_bad_settings_are_refused(tiny_models):
    with pytest.raises(ValueError, match="1-based"):
        TrainingFreeSettings(0)
    with pytest.raises(ValueError, match="num_points"):
        TrainingFreeSettings(1, num_points=0)
    with pytest.raises(ValueError, match="decoder layers 1..4"):
        _baseline(tiny_models, layer=5)


def test_scored_by_lens_evaluation_with_nothing_trained(tiny_models, tmp_path):
    model = _baseline(tiny_models, layer=TINY_LAYER)
    assert model.trainable_names() == [] and not any(p.requires_grad for p in model.parameters())
    reader = SyntheticQueries(SyntheticWorld(seed=0, height=64, width=80), "test", num_scenes=2)
    split = EvalSplit("synthetic", "test", QueryDataset(reader, "synthetic"))
    results = evaluate(model, [split], tmp_path, batch_size=4, method="training-free")
    records = [json.loads(line) for line in (tmp_path / PER_SAMPLE_NAME).read_text().splitlines()]
    assert len(records) == len(reader)
    assert 0.0 <= results["splits"]["synthetic/test"]["overall"]["giou"] <= 1.0
    # Other settings are another model: their records are never mixed with these.
    other = _baseline(tiny_models, layer=TINY_LAYER, points=2)
    with pytest.raises(Exception, match="another checkpoint"):
        evaluate(other, [split], tmp_path, batch_size=4)


def test_cli_refuses_a_bad_layer_in_one_line(tmp_path):
    result = CliRunner().invoke(training_free.app, ["configs/synthetic.yaml", "--layer", "0"])
    assert result.exit_code == 2 and "1-based" in result.output
