"""LENS's ablation switches (docs/training.md) on tiny models: each removes what it names and nothing else, the
paper's defaults leave the shipped checkpoint's tensors as they were, and scripts/ablations.py counts and trains."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from helpers import box_mask, make_lens, random_image
from lens.assets import resolve_model_id
from lens.backbone import LlavaBackbone
from lens.config import LensConfig
from lens.decoders import SamDecoder
from lens.errors import InvalidConfig
from lens.geometry import to_padded_grid, valid_cell_mask
from lens.head import HeadOutput
from lens.keypoints import nms, sample_neighbourhood
from lens.model import LensModel, _clamp_to_images
from lens.tiny import build_tiny_models
from lens.weights import WEIGHTS_NAME, checkpoint_config, load_lens_weights, save_lens_weights

SCRIPT = Path(__file__).parents[1] / "scripts" / "ablations.py"
IMAGES = [random_image(40, 60, 0), random_image(50, 30, 1)]
TEXTS = ["segment the red ring", "where is the square ?"]
MASKS = [box_mask(40, 60, 10, 5, 20, 30), box_mask(50, 30, 0, 0, 50, 30)]


def _script():
    spec = importlib.util.spec_from_file_location("ablations_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablations_script"] = module
    spec.loader.exec_module(module)
    return module


def _head_parts(model: LensModel, inputs) -> tuple[HeadOutput, torch.Tensor, torch.Tensor]:
    """The head's output, the cells (B, gh, gw) a keypoint may use and f_s (B, d), as forward makes them."""
    f = inputs.features
    head = model.head(
        f.hidden_states, f.attention_mask, f.position_ids, f.image_positions, f.grid_sizes, f.text_span,
        f.image_index, f.shared_length,
    )  # fmt: skip
    cells = valid_cell_mask(f.geometries, *f.max_grid, model.device)
    f_s = head.hidden_states[torch.arange(len(f.geometries)), f.answer_index]
    return head, cells, f_s


def _sam_decoder(model: LensModel, inputs, sparse: torch.Tensor) -> torch.Tensor:
    """HF's SAM mask decoder on ``sparse`` (B, 1, n, d_s) prompts, no mask prompt: low-res logits (B, h, w)."""
    sam = model.decoder.sam
    embeddings = inputs.decoder_embeddings
    B, _, h, w = embeddings.shape
    masks, _ = sam.mask_decoder(
        image_embeddings=embeddings,
        image_positional_embeddings=sam.get_image_wide_positional_embeddings().expand(B, -1, -1, -1),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            B, -1, h, w
        ),
        multimask_output=False,
    )
    return masks[:, 0, 0]


# ----- defaults: the paper's method, the shipped checkpoint's tensors --------------------------------------------


def test_the_default_switches_are_the_papers_method():
    config = LensConfig()
    assert config.keypoints.subpixel and config.descriptor.keypoint_descriptions
    assert config.descriptor.global_description and config.descriptor.width is None


def test_the_shipped_checkpoint_has_exactly_the_tensors_a_default_model_builds():
    directory, config = checkpoint_config("lens:synthetic/lens")
    assert (config.keypoints.subpixel, config.descriptor.keypoint_descriptions) == (True, True)
    assert (config.descriptor.global_description, config.descriptor.width) == (True, None)
    script = _script()
    spec, sam = script.scales(config)["synthetic"]
    with torch.device("meta"):
        decoder = SamDecoder(script.SamModel(sam), processor=None)
        model = LensModel(config, script.SpecBackbone(spec, config.backbone.layer), decoder)
    expected = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        shipped = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    assert shipped == expected


def test_a_default_descriptor_keeps_its_parameter_names(tiny_lens):
    names = {n.split(".")[0] for n, _ in tiny_lens.descriptor.named_parameters()}
    assert names == {"cross", "mix", "proj"}


@pytest.mark.slow
def test_the_shipped_checkpoint_loads_and_predicts():
    from lens.weights import load_lens

    prediction = load_lens("lens:synthetic/lens").predict(random_image(48, 64), "the red circle")
    assert prediction.mask.shape == (48, 64) and len(prediction.keypoints) > 0


# ----- each switch -------------------------------------------------------------------------------------------


def test_without_subpixel_the_keypoints_are_the_nms_cells(tiny_models):
    model = make_lens(tiny_models, keypoints__subpixel=False).eval()
    inputs = model.prepare(IMAGES, TEXTS)
    with torch.no_grad():
        out = model(inputs)
        head, cells, _ = _head_parts(model, inputs)
        scores = head.attention_scores.float()
    kp = model.config.keypoints
    points, valid = nms(scores, kp.nms_radius, kp.max_points, cells)
    # NMS's cells, with the clamp every keypoint gets: a partly covered edge cell's centre lies in the MLLM's
    # padding and is moved onto the image's edge; every other keypoint is its cell's centre, an integer
    on_image = _clamp_to_images(points, inputs.features.geometries)
    torch.testing.assert_close(out.keypoints, on_image, rtol=0, atol=0)
    assert torch.equal(out.keypoints_valid, valid) and valid.any()
    inside = (on_image == points).all(-1) & valid
    assert inside.sum() > valid.sum() / 2 and torch.equal(
        out.keypoints[inside], out.keypoints[inside].round()
    )
    refined = make_lens(tiny_models).eval()  # same weights (seeded), with the Newton step
    with torch.no_grad():
        moved = refined(inputs).keypoints
    assert not torch.equal(moved[valid], points[valid])  # the switch removes a step that moves them


def test_without_keypoint_descriptions_only_f_s_prompts_the_decoder(tiny_models):
    model = make_lens(tiny_models, descriptor__keypoint_descriptions=False)
    assert model.descriptor.cross is None
    assert not any(n.startswith("descriptor.cross") for n in model.trainable_names())
    inputs = model.prepare(IMAGES, TEXTS, MASKS)
    model.train()  # in training too: S1.4's dropout has nothing to drop
    with torch.no_grad():
        out = model(inputs)
        head, cells, f_s = _head_parts(model, inputs)
        scores = head.attention_scores.float()
        d = model.descriptor
        global_description = d.proj(d.mix(f_s[:, None]))  # (B, 1, d_s)
        sparse = (global_description + model.decoder.cls_position)[:, None]  # (B, 1, 1, d_s)
        reference = _sam_decoder(model, inputs, sparse)
    torch.testing.assert_close(out.low_res_logits, reference)
    kp = model.config.keypoints
    default = make_lens(tiny_models).eval()  # keypoints are still found and reported
    with torch.no_grad():
        found = default(default.prepare(IMAGES, TEXTS))
    torch.testing.assert_close(out.keypoints, found.keypoints)
    assert torch.equal(out.keypoints_valid, nms(scores, kp.nms_radius, kp.max_points, cells)[1])
    assert out.loss is not None and torch.isfinite(out.loss)


def test_without_the_global_description_only_keypoints_prompt_the_decoder(tiny_models):
    model = make_lens(tiny_models, descriptor__global_description=False)
    assert "decoder.cls_position" not in model.trainable_names()
    assert model.descriptor.global_only_prob == 0  # no global-only path to drop to
    inputs = model.prepare(IMAGES, TEXTS, MASKS)
    model.train()
    with torch.no_grad():
        out = model(inputs)
        f = inputs.features
        head, _, f_s = _head_parts(model, inputs)
        gh, gw = f.max_grid
        rows = torch.arange(len(f.geometries))
        grid = to_padded_grid(
            head.hidden_states[rows[:, None], f.image_positions.clamp(min=0)], f.grid_sizes, gh, gw
        )
        hoods = sample_neighbourhood(grid.permute(0, 3, 1, 2), out.keypoints, 3, f.grid_sizes)
        descriptions, used = model.descriptor(f_s, hoods, out.keypoints_valid)  # f_s still self-attends
        points = torch.stack([g.grid_to_decoder(p) for g, p in zip(f.geometries, out.keypoints, strict=True)])
        sam = model.decoder.sam
        prompts = descriptions[:, 1:] + sam.shared_image_embedding(points / model.decoder.image_size)
        prompts = torch.where(used[..., None], prompts, sam.prompt_encoder.not_a_point_embed.weight)
        reference = _sam_decoder(model, inputs, prompts[:, None])  # (B, 1, m, d_s): no global token
    assert torch.equal(used, out.keypoints_valid) and used.any(1).all()  # no dropout in training
    torch.testing.assert_close(out.low_res_logits, reference)


def test_a_narrow_descriptor_attends_at_its_width_and_prompts_at_sams(tiny_models):
    default = make_lens(tiny_models)
    d, d_s = default.backbone.layer_spec().hidden_size, default.decoder.prompt_dim
    model = make_lens(tiny_models, descriptor__width=8)
    p = dict(model.descriptor.named_parameters())
    assert p["narrow.weight"].shape == (8, d)
    assert p["cross.attn.in_proj_weight"].shape == (24, 8) and p["mix.mlp.0.weight"].shape == (8, 8)
    assert p["proj.1.weight"].shape == (d_s, 8)
    changed = {k for k, v in p.items() if k.startswith(("cross", "mix", "proj"))}
    assert changed == {k for k, _ in default.descriptor.named_parameters()}  # same modules, narrower
    head = {k: v.shape for k, v in model.trainable_state_dict().items() if not k.startswith("descriptor.")}
    assert head == {
        k: v.shape for k, v in default.trainable_state_dict().items() if not k.startswith("descriptor.")
    }
    model.eval()
    with torch.no_grad():
        inputs = model.prepare(IMAGES, TEXTS)
        out = model(inputs)
        _, _, f_s = _head_parts(model, inputs)
        hoods = torch.zeros(len(IMAGES), 2, 9, d)
        descriptions, _ = model.descriptor(f_s, hoods, torch.ones(len(IMAGES), 2, dtype=torch.bool))
    assert descriptions.shape == (len(IMAGES), 3, d_s)
    assert out.low_res_logits.shape == default.eval()(inputs).low_res_logits.shape
    with pytest.raises(ValueError, match="not divisible"):
        make_lens(tiny_models, descriptor__width=6)  # 4 heads


def test_narrow_and_ablated_models_round_trip_their_checkpoints(tiny_models, tmp_path):
    for overrides in ({"descriptor__width": 8}, {"descriptor__keypoint_descriptions": False},
                      {"descriptor__global_description": False}, {"keypoints__subpixel": False}):  # fmt: skip
        trained = make_lens(tiny_models, **overrides)
        save_lens_weights(trained, tmp_path / "ckpt")
        saved = LensConfig.from_yaml(tmp_path / "ckpt" / "lens_config.yaml")
        assert saved == trained.config  # the switches travel with the weights
        load_lens_weights(make_lens(tiny_models, **overrides), tmp_path / "ckpt")
        if "descriptor__width" in overrides or "descriptor__keypoint_descriptions" in overrides:
            with pytest.raises(ValueError, match="does not fit this model"):
                load_lens_weights(make_lens(tiny_models), tmp_path / "ckpt")


def test_the_switches_are_checked_when_a_config_is_read():
    base = LensConfig()
    assert base.override(["descriptor.width=256"]).descriptor.width == 256
    for bad, message in (
        ("descriptor.width=0", ">= 1"),
        ("descriptor.width=2.5", "expected int"),
        ("keypoints.subpixel=maybe", "true or false"),
        ("descriptor.keypoint_descriptions=1", "true or false"),
    ):
        with pytest.raises(InvalidConfig, match=message):
            base.override([bad])
    with pytest.raises(InvalidConfig, match="cannot both be false"):
        base.override(["descriptor.keypoint_descriptions=false", "descriptor.global_description=false"])


def test_without_the_attention_loss_it_is_reported_but_not_added(tiny_models):
    model = make_lens(tiny_models, loss__attention_weight=0.0)
    out = model(model.prepare(IMAGES, TEXTS, MASKS))
    loss = model.config.loss
    expected = loss.dice_weight * out.losses["dice_loss"] + loss.bce_weight * out.losses["bce_loss"]
    torch.testing.assert_close(out.loss, expected)
    assert out.losses["attention_loss"] > 0


def test_a_head_from_backbone_layers_needs_two_layers_above_k():
    llava, llava_processor, sam, sam_processor = build_tiny_models(seed=0)
    depth = llava.config.text_config.num_hidden_layers
    for k in (depth - 1, depth):  # k + 2 (or k + 1) is past the stack
        config = LensConfig().override(
            [f"backbone.layer={k}", "descriptor.num_heads=4", "head.init_from_backbone=true"]
        )
        backbone = LlavaBackbone(llava, llava_processor, layer=k)
        with pytest.raises(InvalidConfig, match=f"backbone.layer is k = {k}.*cannot copy layer {depth + 1}"):
            LensModel(config, backbone, SamDecoder(sam, sam_processor))
    k = depth - 2
    config = LensConfig().override(
        [f"backbone.layer={k}", "descriptor.num_heads=4", "head.init_from_backbone=true"]
    )
    model = LensModel(config, LlavaBackbone(llava, llava_processor, layer=k), SamDecoder(sam, sam_processor))
    for i, layer in enumerate(model.head.layers):
        source = llava.model.language_model.layers[k + i].state_dict()
        assert all(torch.equal(v, source[n]) for n, v in layer.state_dict().items())


def test_the_head_reads_the_last_layer(tiny_models):
    llava, llava_processor, sam, sam_processor = tiny_models
    depth = llava.config.text_config.num_hidden_layers
    config = LensConfig().override([f"backbone.layer={depth}", "descriptor.num_heads=4"])
    model = LensModel(
        config, LlavaBackbone(llava, llava_processor, layer=depth), SamDecoder(sam, sam_processor)
    )
    out = model(model.prepare(IMAGES, TEXTS, MASKS))
    assert torch.isfinite(out.loss) and out.keypoints_valid.any()


@pytest.mark.parametrize("m", [4, 8, 16])
def test_max_points_sets_the_keypoint_slots(tiny_models, m):
    model = make_lens(tiny_models, keypoints__max_points=m).eval()
    with torch.no_grad():
        out = model(model.prepare(IMAGES, TEXTS))
    assert out.keypoints.shape == (len(IMAGES), m, 2)


# ----- scripts/ablations.py -----------------------------------------------------------------------------------


def _hand_count(
    d: int, heads: int, kv_heads: int, head_dim: int, mlp: int, d_s: int, width: int | None
) -> tuple[int, int]:
    """Head and descriptor parameters written out from their definitions (no biases in the Llama head)."""
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    head = 2 * (2 * d + attention + 3 * d * mlp)
    w = d if width is None else width

    def block(cross: bool) -> int:
        norms = (3 if cross else 2) * 2 * w
        return norms + (3 * w * w + 3 * w) + (w * w + w) + 2 * (w * w + w)

    narrow = 0 if width is None else d * w + w
    return head, narrow + block(True) + block(False) + 2 * w + w * d_s + d_s


def test_params_counts_equal_a_hand_count_on_the_tiny_sizes(tiny_models):
    script = _script()
    llava, _, sam, _ = tiny_models
    t = llava.config.text_config
    head_dim = t.hidden_size // t.num_attention_heads
    d_s = sam.config.prompt_encoder_config.hidden_size
    decoder = sam.mask_decoder
    trained = sum(p.numel() for p in decoder.parameters()) - sum(
        p.numel()
        for m in (decoder.iou_prediction_head, *decoder.output_hypernetworks_mlps[1:])
        for p in m.parameters()
    )
    for width in (None, 8):
        config = LensConfig().override(
            ["descriptor.num_heads=4", f"descriptor.width={'null' if width is None else width}"]
        )
        counts = script.count_trainable(config, script.llava_spec(llava.config), sam.config)
        head, descriptor = _hand_count(
            t.hidden_size,
            t.num_attention_heads,
            t.num_key_value_heads,
            head_dim,
            t.intermediate_size,
            d_s,
            width,
        )
        assert (counts.head, counts.descriptor, counts.decoder) == (head, descriptor, trained + d_s)
        model = make_lens(tiny_models, descriptor__width=width)  # and what a real model trains
        assert counts.total == sum(v.numel() for v in model.trainable_state_dict().values())


def test_every_row_is_a_valid_config_of_the_recipe():
    script = _script()
    assert {"layer_early", "layer_middle", "layer_last", "m4", "m8", "m16", "nms_r1", "nms_r4", "no_kp_desc",
            "no_global", "no_attn_loss", "no_subpixel", "init_backbone_k4", "random_init_k4", "narrow256",
            "narrow64"} <= set(script.ROWS)  # fmt: skip
    configs = {row: script.row_config(row) for row in script.ROWS}
    assert [configs[r].backbone.layer for r in ("layer_early", "layer_middle", "layer_last")] == [2, 3, 6]
    assert (
        configs["init_backbone_k4"].head.init_from_backbone
        and configs["init_backbone_k4"].backbone.layer == 4
    )
    assert configs["no_kp_desc"].descriptor.keypoint_descriptions is False
    assert configs["lens"] == LensConfig.from_yaml(script.RECIPE)
    depth = yaml.safe_load(Path(resolve_model_id("lens:synthetic/mllm"), "config.json").read_text())
    assert configs["layer_last"].backbone.layer == depth["text_config"]["num_hidden_layers"]


@pytest.mark.slow
def test_train_runs_each_row_through_lens_train_and_skips_finished_ones(tmp_path):
    script = _script()
    world = {"seed": 0, "height": 64, "width": 64, "train_size": 2, "val_size": 1}
    small = [
        f"data.datasets={{synthetic: {world}}}".replace("'", ""), "data.num_workers=0", "train.batch_size=1",
        "train.warmup_steps=1", "train.eval_limit=1", "train.eval_batch_size=1", "train.save_every=100",
    ]  # fmt: skip
    args = ["train", "--runs", str(tmp_path), "--rows", "no_subpixel,narrow64", "--steps", "2"]
    args += [arg for s in small for arg in ("--set", s)]
    result = CliRunner().invoke(script.app, args)
    assert result.exit_code == 0, result.output
    for row, check in (
        ("no_subpixel", lambda c: not c.keypoints.subpixel),
        ("narrow64", lambda c: c.descriptor.width == 64),
    ):
        config = LensConfig.from_yaml(tmp_path / row / "model" / "lens_config.yaml")
        assert check(config) and config.train.max_steps == 2
    again = CliRunner().invoke(script.app, args)
    assert again.exit_code == 0 and again.output.count("skipped") == 2
