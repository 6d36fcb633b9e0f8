"""The layer probe: every layer's own text->image attention, checked against HF's output_attentions and by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import TINY_LAYER, random_image
from lens.backbone import LlavaBackbone
from lens.backbone.base import Backbone, BackboneFeatures
from lens.cli import app
from lens.data.loader import ImageRow
from lens.geometry import DecoderFrame, GridFrame, ImageGeometry
from lens.probe import LayerScore, cell_centres_on, probe, recommend, score_query, text_image_maps
from lens.tiny import build_tiny_models

TEXTS = ["please segment the red ring", "what is the square ?", "can you segment this image ?"]


def tiny_backbone() -> LlavaBackbone:
    llava, processor, _, _ = build_tiny_models(seed=0)
    return LlavaBackbone(llava, processor, layer=TINY_LAYER)


def reference_maps(backbone: LlavaBackbone, images, texts) -> list[torch.Tensor]:
    """Eq. 1 per layer straight from HF's ``output_attentions`` (eager), with the image and text tokens found
    from the input ids: (num_layers, gh, gw) per prompt."""
    model = backbone.model
    inputs = backbone.processor(
        images=[im.convert("RGB") for im in images],
        text=backbone._prompts(texts),
        padding=True,
        return_tensors="pt",
    )
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions  # per layer (B, heads, L, L)
    model.set_attn_implementation("sdpa")
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    maps = []
    for b in range(len(images)):
        ids = inputs["input_ids"][b]
        image_cols = (ids == model.config.image_token_id).nonzero()[:, 0]  # (gh*gw,)
        text_rows = torch.arange(int(image_cols[-1]) + 1, int(inputs["attention_mask"][b].sum()))
        maps.append(
            torch.stack([a[b].mean(0)[text_rows][:, image_cols].mean(0).view(side, side) for a in attentions])
        )
    return maps


def test_layer_maps_equal_hf_output_attentions():
    """Three prompts, two on the same image: the shared-prefix path (rows after the cached prefix) included."""
    backbone = tiny_backbone()
    images = [random_image(40, 60, seed=1), random_image(40, 60, seed=1), random_image(70, 30, seed=2)]
    features, attentions = backbone.layer_attentions(images, TEXTS)
    assert (
        features.shared_length > 0 and len(attentions) == backbone.model.config.text_config.num_hidden_layers
    )
    assert backbone.layer == TINY_LAYER  # restored
    for ours, theirs in zip(
        text_image_maps(features, attentions), reference_maps(backbone, images, TEXTS), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        assert (ours[0] - ours[-1]).abs().max() > 1e-4  # layers differ: the comparison is per layer


def test_layer_attentions_leave_the_backbone_as_it_was():
    backbone = tiny_backbone()
    images, texts = [random_image(40, 60, seed=1)], TEXTS[:1]
    before = backbone.encode(images, texts).hidden_states
    backbone.layer_attentions(images, texts)
    assert backbone.model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(backbone.encode(images, texts).hidden_states, before)


def geometry(width: int, height: int, grid: int) -> ImageGeometry:
    return ImageGeometry(GridFrame.pad_to_square(width, height, grid), DecoderFrame.identity(width, height))


def test_scores_of_hand_made_maps():
    """A 2 x 2 grid over a 20 x 20 image whose target is the top-left 10 x 5 pixels (half of cell (0, 0))."""
    g = geometry(20, 20, 2)
    target = torch.zeros(20, 20, dtype=torch.bool)
    target[:5, :10] = True
    cover = g.mask_to_grid(target.float())  # [[0.5, 0], [0, 0]]
    on_target = cell_centres_on(g, target)  # centre of cell (0, 0) is pixel (5, 5): row 5 is not target
    maps = torch.tensor(
        [
            [[0.1, 0.1], [0.1, 0.1]],  # uniform, image share 0.4
            [[0.6, 0.1], [0.1, 0.0]],  # peaks on the half-covered cell
            [[0.0, 0.5], [0.0, 0.0]],  # peaks off the target
        ]
    )
    scores = score_query(maps, cover, on_target, torch.ones(2, 2, dtype=torch.bool))
    torch.testing.assert_close(cover, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(scores.mass, torch.tensor([0.125, 0.375, 0.0]))  # 0.05/0.4, 0.3/0.8, 0
    torch.testing.assert_close(scores.image_share, torch.tensor([0.4, 0.8, 0.5]))
    assert scores.hits.tolist() == [0.0, 0.0, 0.0]  # the centre (5, 5) lies below the target rows
    target[:6] = True  # now the centre of cell (0, 0) is on it (and cell (0, 1)'s centre too)
    hit = score_query(
        maps, g.mask_to_grid(target.float()), cell_centres_on(g, target), torch.ones(2, 2, dtype=torch.bool)
    )
    assert hit.hits.tolist()[1:] == [1.0, 1.0] and hit.chance_pointing == 0.5


def test_padding_cells_never_win():
    """A 20 x 10 image padded to a 20 x 20 square on a 2 x 2 grid: the top row is pure padding (LLaVA centres
    the image: rows 5..15 of the square), the highest value there must be ignored."""
    g = geometry(20, 10, 4)
    valid = g.valid_cells()
    assert valid[0].tolist() == [False] * 4 and valid[1].all()
    target = torch.ones(10, 20, dtype=torch.bool)
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 1.0  # padding cell: strongest
    maps[0, 1, 2] = 0.5
    scores = score_query(maps, g.mask_to_grid(target.float()), cell_centres_on(g, target), valid)
    assert scores.hits.tolist() == [1.0]
    torch.testing.assert_close(scores.image_share, torch.tensor([0.5]))


def test_layers_within_one_standard_error_of_the_best():
    from lens.probe import ProbeResult

    layers = [LayerScore(1, 0.10, 0.1, 0.9), LayerScore(2, 0.50, 0.2, 0.8), LayerScore(3, 0.46, 0.3, 0.4)]
    # 100 queries: standard error of 0.5 is 0.05, so layer 3 (0.46) is within it, layer 1 is not
    assert ProbeResult("m", "d", 100, layers, 0.0, 0.0).within_error == [2, 3]
    assert ProbeResult("m", "d", 10_000, layers, 0.0, 0.0).within_error == [2]  # error 0.005


def test_recommend_takes_pointing_then_mass():
    layers = [LayerScore(1, 0.5, 0.1, 0.9), LayerScore(2, 0.7, 0.2, 0.8), LayerScore(3, 0.7, 0.3, 0.4)]
    assert recommend(layers) == 3
    assert recommend(layers[:2]) == 2
    with pytest.raises(ValueError):
        recommend([])


class OneLayerPoints(Backbone):
    """A stand-in backbone whose layer ``good`` attends from the text to the target cell and whose other layers
    attend to a background cell: the probe must recommend ``good``."""

    def __init__(self, layers: int, good: int):
        super().__init__()
        self.layers, self.good, self.layer = layers, good, 1

    def layer_attentions(self, images, instructions, **_):
        B, side, L = len(images), 4, 1 + 16 + 3  # BOS, 4 x 4 grid, 3 text tokens
        attentions = []
        for layer in range(1, self.layers + 1):
            probs = torch.zeros(B, L, L)
            for b, image in enumerate(images):
                row, col = image.info["target_cell"]
                cell = row * side + col if layer == self.good else (row * side + col + 5) % 16
                probs[b, 17:, 1 + cell] = 0.8
                probs[b, 17:, 0] = 0.2  # the rest on the BOS "sink"
            attentions.append(probs)
        features = BackboneFeatures(
            hidden_states=torch.zeros(B, L, 8),
            attention_mask=torch.ones(B, L, dtype=torch.bool),
            position_ids=torch.arange(L).expand(B, L),
            image_positions=(1 + torch.arange(16)).expand(B, 16),
            grid_sizes=torch.tensor([[side, side]] * B),
            text_span=torch.tensor([[17, 20]] * B),
            answer_index=torch.full((B,), 19),
            geometries=[geometry(32, 32, side) for _ in images],
        )
        return features, attentions


def _row(image, instruction: str, mask: np.ndarray) -> ImageRow:
    return ImageRow(instruction, mask, instruction, "probe", "test", False, "", False, 0, 0, image)


def test_probe_recommends_the_layer_that_points():
    rows = []
    rng = np.random.default_rng(0)
    for i in range(6):
        row, col = (int(v) for v in rng.integers(0, 4, 2))
        image = random_image(32, 32, seed=i)
        image.info["target_cell"] = (row, col)
        mask = np.zeros((32, 32), np.uint8)
        mask[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 1  # exactly the target cell
        rows.append(_row(image, "the thing", mask))
    rows.insert(2, _row(random_image(32, 32), "nothing", np.zeros((32, 32), np.uint8)))
    result = probe(OneLayerPoints(layers=5, good=3), rows, batch_size=4)
    assert result.queries == 6 and result.recommended == 3 and result.within_error == [3]
    by_layer = {s.layer: s for s in result.layers}
    assert by_layer[3].pointing == 1.0 and by_layer[3].mass == pytest.approx(1.0)
    assert all(by_layer[k].pointing == 0.0 and by_layer[k].mass == pytest.approx(0.0) for k in (1, 2, 4, 5))
    assert by_layer[3].image_share == pytest.approx(0.8)
    assert result.chance_pointing == pytest.approx(1 / 16) and result.chance_mass == pytest.approx(1 / 16)


def test_cli_probes_a_saved_model_and_names_bad_data(tmp_path):
    llava, processor, _, _ = build_tiny_models(seed=0)
    llava.save_pretrained(tmp_path / "mllm")
    processor.save_pretrained(tmp_path / "mllm")
    runner = CliRunner()
    args = ["probe", str(tmp_path / "mllm"), "--data", "synthetic/val", "--limit", "3", "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output[result.output.index("{") :])
    assert parsed["queries"] == 3 and len(parsed["layers"]) == llava.config.text_config.num_hidden_layers
    assert 1 <= parsed["recommended"] <= len(parsed["layers"])
    result = runner.invoke(app, ["probe", str(tmp_path / "mllm"), "--data", "synthetic"])
    assert result.exit_code == 2 and "dataset/split" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_every_family_s_layer_maps_equal_its_output_attentions():
    """Every backbone family (``lens.tiny_families``): the probe's per-layer maps of three prompts with different
    image sizes equal eq. 1 from the model's own ``output_attentions``."""
    from lens import tiny_families as families
    from lens.backbone import BACKBONES

    images = [random_image(40, 60, seed=1), random_image(40, 60, seed=1), random_image(70, 30, seed=2)]
    for name in families.TINY_FAMILIES:
        model, processor = families.build_family(name)
        backbone = BACKBONES[name](model, processor, layer=1)
        features, attentions = backbone.layer_attentions(images, TEXTS)
        inputs = backbone._inputs(images, TEXTS)
        model.set_attn_implementation("eager")
        with torch.no_grad():
            reference = model(**inputs, output_attentions=True).attentions  # per layer (B, heads, L, L)
        for b, ours in enumerate(text_image_maps(features, attentions)):
            gh, gw = features.grid_sizes[b].tolist()
            cells = features.image_positions[b, : gh * gw]
            t0, t1 = features.text_span[b].tolist()
            theirs = torch.stack([a[b].float().mean(0)[t0:t1].mean(0)[cells].view(gh, gw) for a in reference])
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)
