"""The F-LMM baseline: per-head attention maps checked against Hugging Face's own ``output_attentions``, the
refiner against ``SamModel``'s own forward with ``SamProcessor``-scaled boxes, the mask prompt against F-LMM's
crop-and-resize recipe; trained by LENS's loop, scored by its evaluation, saved and loaded, built from a config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import box_mask, make_lens, random_image
from lens.backbone.llava_next import LlavaNextBackbone
from lens.baselines.flmm import FlmmModel, mask_box, refine, upsample_factor
from lens.config import LensConfig
from lens.data.loader import build_eval_dataset, build_train_datasets, train_ratios
from lens.data.synthetic.dataset import SYNTHETIC
from lens.evaluation import EvalSplit, evaluate
from lens.probe import text_image_maps
from lens.tiny import build_tiny_models
from lens.tiny_families import build_llava_next
from lens.training import FINAL, TrainData, train
from lens.weights import WEIGHTS_NAME, build_lens, load_lens_weights, save_lens_weights

TEXT = "segment the red ring in this image"


def _flmm(tiny_models, **overrides) -> FlmmModel:
    lens = make_lens(tiny_models, **overrides)
    torch.manual_seed(0)
    return FlmmModel(lens.config, lens.backbone, lens.decoder)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (90, 50), (40, 72)])
def test_per_head_maps_are_hfs_own_attention(tiny_models, width, height):
    llava = tiny_models[0]
    model = _flmm(tiny_models)
    image = random_image(height, width, seed=width)
    inputs = model.prepare([image], [TEXT])
    f = inputs.features
    layers, heads = llava.config.text_config.num_hidden_layers, llava.config.text_config.num_attention_heads
    gh, gw = (int(v) for v in f.grid_sizes[0])
    assert inputs.maps[0].shape == (layers * heads, gh, gw)

    # Reference: HF's own eager attention and hidden states, every layer and head, averaged over the text tokens.
    llava.set_attn_implementation("eager")
    with torch.no_grad():
        ref = llava(
            **model.backbone._inputs([image], [TEXT]), output_attentions=True, output_hidden_states=True
        )
    t0, t1 = (int(v) for v in f.text_span[0])
    cells = f.image_positions[0, : gh * gw]
    expected = torch.cat([a[0, :, t0:t1].mean(1)[:, cells].view(heads, gh, gw) for a in ref.attentions])
    torch.testing.assert_close(inputs.maps[0], expected, atol=1e-6, rtol=1e-5)
    # Averaged over heads, they are the probe's (and the training-free system's) maps.
    _, averaged = model.backbone.layer_attentions([image], [TEXT], decoder_frame=model.decoder.frame)
    probe = text_image_maps(f, averaged)[0]  # (layers, gh, gw)
    torch.testing.assert_close(
        inputs.maps[0].view(layers, heads, gh, gw).mean(1), probe, atol=1e-6, rtol=1e-5
    )

    # Text states: each layer's output at the text tokens; HF's last hidden state is the final norm of ours.
    states = inputs.text_states[0]  # (layers, L_t, d)
    torch.testing.assert_close(states[:-1], torch.stack([h[0, t0:t1] for h in ref.hidden_states[1:-1]]))
    norm = llava.model.language_model.norm
    torch.testing.assert_close(norm(states[-1]), ref.hidden_states[-1][0, t0:t1], atol=1e-5, rtol=1e-5)


def test_refiner_is_sams_own_forward_for_a_box_and_a_mask(tiny_models):
    _, _, sam, sam_processor = tiny_models
    model = _flmm(tiny_models)
    image = random_image(50, 90, seed=3)
    box = [12.0, 7.0, 61.0, 40.0]  # x0, y0, x1, y1 original pixels
    prompt = sam_processor(images=[image], input_boxes=[[box]], return_tensors="pt")
    geometry = model.prepare([image], [TEXT]).features.geometries[0]
    torch.manual_seed(1)
    mask = torch.randn(1, 1, model.mask_size, model.mask_size) * 3
    with torch.no_grad():
        embeddings = sam.get_image_embeddings(prompt["pixel_values"])
        ref = sam(
            image_embeddings=embeddings,
            input_boxes=prompt["input_boxes"],
            input_masks=mask,
            multimask_output=False,
        )
        low_res, iou = refine(
            sam, embeddings, geometry.image_to_decoder(torch.tensor(box).view(2, 2)).view(4), mask
        )
    torch.testing.assert_close(low_res, ref.pred_masks[0, 0, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(iou, ref.iou_scores[0, 0, 0])
    with torch.no_grad():  # text tokens are extra sparse prompts: they change the mask
        with_text = refine(
            sam, embeddings, prompt["input_boxes"][0, 0], mask, torch.randn(3, model.decoder.prompt_dim)
        )
    assert not torch.allclose(with_text[0], low_res)


def _centred(model: FlmmModel, inputs) -> None:
    """Shift the classifier's bias so that the coarse mask covers about half of the image (a real box)."""
    with torch.no_grad():
        median = model(inputs).coarse_mask_logits[0].median()
        model.unet.classifier.bias -= median


def test_sam_gets_the_coarse_masks_box_its_logits_and_the_text(tiny_models):
    _, _, sam, sam_processor = tiny_models
    model = _flmm(tiny_models).eval()
    image = random_image(88, 132, seed=4)  # LLaVA pads 22 rows top and bottom: 11 of the 66 upsampled rows
    inputs = model.prepare([image], [TEXT])
    _centred(model, inputs)
    with torch.no_grad():
        out = model(inputs)
    coarse, geometry = out.coarse_logits[0], inputs.features.geometries[0]
    s = upsample_factor(*geometry.grid_size)
    assert coarse.shape == (66, 66) and s == 11

    # F-LMM's own recipe: crop the image's rows of the coarse map, resize it to the image / SAM's resized image.
    crop = coarse[11:55][None, None]
    torch.testing.assert_close(
        out.coarse_mask_logits[0], F.interpolate(crop, (88, 132), mode="bilinear")[0, 0], atol=1e-5, rtol=1e-5
    )
    frame = geometry.decoder
    resized = F.interpolate(crop, (frame.resized_h, frame.resized_w), mode="bilinear")
    pad = min(-1.0, float(resized.min()))
    padded = F.pad(
        resized, (0, frame.input_size - frame.resized_w, 0, frame.input_size - frame.resized_h), value=pad
    )
    expected_prompt = F.interpolate(padded, (model.mask_size, model.mask_size), mode="bilinear")
    torch.testing.assert_close(out.mask_prompts[:1], expected_prompt, atol=1e-5, rtol=1e-5)

    # The box: F-LMM's mask2box of the coarse mask at image size, scaled by SamProcessor.
    ys, xs = np.where(out.coarse_mask_logits[0].numpy() > 0)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    assert out.boxes[0].tolist() == box and box != [0.0, 0.0, 132.0, 88.0]
    prompt = sam_processor(images=[image], input_boxes=[[box]], return_tensors="pt")
    with torch.no_grad():
        sparse, dense = sam.get_prompt_embeddings(
            input_boxes=prompt["input_boxes"], input_masks=out.mask_prompts
        )
        text = model.text(inputs.text_states[0])  # (L_t, d_s)
        ref, _ = sam.mask_decoder(
            image_embeddings=sam.get_image_embeddings(prompt["pixel_values"]),
            image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=torch.cat([sparse, text[None, None]], 2),
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )[:2]
    ref_logits = sam_processor.post_process_masks(
        ref, prompt["original_sizes"], prompt["reshaped_input_sizes"], binarize=False
    )[0][0, 0]
    scale = float(ref_logits.abs().max())
    torch.testing.assert_close(out.mask_logits[0], ref_logits, atol=1e-4 * scale, rtol=1e-4)


def test_attention_map_is_the_coarse_mask_per_cell_and_no_keypoints(tiny_models):
    model = _flmm(tiny_models).eval()
    images = [random_image(50, 90, 1), random_image(64, 64, 2)]
    with torch.no_grad():
        inputs = model.prepare(images, [TEXT, "the square"])
        out = model(inputs)
    gh, gw = inputs.features.max_grid
    assert out.attention_map.shape == (2, gh, gw) and out.keypoints.shape == (2, 0, 2)
    assert out.keypoints_valid.shape == (2, 0)
    for b, g in enumerate(inputs.features.geometries):
        s = upsample_factor(*g.grid_size)
        cells = out.coarse_logits[b].sigmoid().view(g.grid_size[0], s, g.grid_size[1], s).mean((1, 3))
        valid = g.valid_cells()
        torch.testing.assert_close(out.attention_map[b][valid], cells[valid])
        assert (out.attention_map[b][~valid] == 0).all()
    assert (~inputs.features.geometries[0].valid_cells()).any()  # the 90x50 image has padding rows


def test_box_of_an_empty_mask_is_the_whole_image():
    assert mask_box(torch.zeros(5, 7, dtype=torch.bool)).tolist() == [0.0, 0.0, 7.0, 5.0]
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[1:3, 2:6] = True
    assert mask_box(mask).tolist() == [2.0, 1.0, 6.0, 3.0]


def test_only_the_unet_text_prompts_and_sams_mask_decoder_train(tiny_models):
    model = _flmm(tiny_models)
    names = model.trainable_names()
    assert {n.split(".")[0] for n in names} == {"unet", "text", "decoder"}
    assert all(n.startswith("decoder.sam.mask_decoder.") for n in names if n.startswith("decoder"))
    assert "decoder.cls_position" not in names and "text.layer_weights" in names
    assert model.unet.encoder[0][0].in_channels == 16  # 4 layers x 4 heads of the tiny Llama
    assert model.unet.encoder[0][0].out_channels == model.config.baseline.flmm_width
    # A few steps on one batch lower the loss; SAM's loss alone reaches the U-Net through the mask prompt.
    image, mask = random_image(50, 90, 5), box_mask(50, 90, 10, 20, 35, 60)
    inputs = model.prepare([image, image], [TEXT, "the ring"], [mask, mask])
    model.train()
    out = model(inputs)
    out.losses["dice_loss"].backward()
    assert model.unet.encoder[0][0].weight.grad.abs().sum() > 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        out = model(inputs)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses


TINY_WORLD = {"seed": 0, "height": 64, "width": 80, "train_size": 4, "val_size": 1}


def _config() -> LensConfig:
    config = LensConfig()
    config.backbone.layer, config.backbone.dtype = 2, "float32"
    config.descriptor.num_heads = 4
    config.baseline.system, config.baseline.flmm_width = "flmm", 8
    config.data.datasets = {SYNTHETIC: dict(TINY_WORLD)}
    config.data.num_workers = 0
    config.train = dataclasses.replace(
        config.train,
        lr=1e-3,
        warmup_steps=1,
        max_steps=3,
        batch_size=1,
        save_every=100,
        eval_every=0,
        eval_limit=2,
    )
    return config


def _fresh(config: LensConfig) -> FlmmModel:
    lens = make_lens(build_tiny_models(seed=0), backbone__dtype="float32")
    torch.manual_seed(0)
    return FlmmModel(config, lens.backbone, lens.decoder)


@pytest.mark.slow
def test_trained_by_lens_loop_scored_saved_and_loaded(tmp_path):
    config = _config()
    val = EvalSplit(SYNTHETIC, "val", build_eval_dataset(config.data, SYNTHETIC, "val"))
    data = TrainData(
        dict(build_train_datasets(config.data, config.train.seed)), train_ratios(config.data), val
    )
    model = _fresh(config)
    initial = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    records = train(config, tmp_path / "run", model=model, data=data)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(FlmmModel.loss_names) <= set(records[0]) and "val_giou" in records[-1]
    saved = load_file(tmp_path / "run" / FINAL / WEIGHTS_NAME)
    assert saved.keys() == initial.keys()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # it trained

    fresh = load_lens_weights(_fresh(config), tmp_path / "run" / FINAL).eval()
    model.eval()
    results = evaluate(model, [val], tmp_path / "eval", batch_size=2, method="flmm")
    assert 0.0 <= results["splits"]["synthetic/val"]["overall"]["giou"] <= 1.0
    image = random_image(50, 90, 6)
    with torch.no_grad():
        a, b = model(model.prepare([image], [TEXT])), fresh(fresh.prepare([image], [TEXT]))
    torch.testing.assert_close(a.mask_logits[0], b.mask_logits[0])
    torch.testing.assert_close(a.attention_map, b.attention_map)


def test_save_load_round_trip(tiny_models, tmp_path):
    model = _flmm(tiny_models)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)  # unlike any fresh initialisation
    save_lens_weights(model, tmp_path / "ckpt")
    other = load_lens_weights(_flmm(build_tiny_models(seed=0)), tmp_path / "ckpt")
    a, b = model.trainable_state_dict(), other.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_built_from_a_config_through_build_lens(tiny_models, tmp_path):
    llava, llava_processor, sam, sam_processor = tiny_models
    llava.save_pretrained(tmp_path / "mllm")
    llava_processor.save_pretrained(tmp_path / "mllm")
    sam.save_pretrained(tmp_path / "sam")
    sam_processor.save_pretrained(tmp_path / "sam")
    config = LensConfig()
    config.backbone.model_id, config.backbone.layer, config.backbone.dtype = (
        str(tmp_path / "mllm"),
        2,
        "float32",
    )
    config.decoder.model_id = str(tmp_path / "sam")
    config.baseline.system = "flmm"
    model = build_lens(config)
    assert isinstance(model, FlmmModel) and model.unet.encoder[0][0].in_channels == 16
    assert not any(p.requires_grad for p in model.backbone.parameters())
    with torch.no_grad():
        out = model.eval()(model.prepare([random_image(40, 60, 2)], [TEXT]))
    assert out.mask_logits[0].shape == (40, 60)


def test_prompts_sharing_an_image_and_grids_of_other_sizes(tiny_models):
    """LLaVA-NeXT runs one image's prefix once for all its prompts (attention rows of the prompts' own tokens
    only) and gives images of other shapes grids of other sizes: every prompt still gets its own maps."""
    lens = make_lens(tiny_models)
    model, processor = build_llava_next()
    model = FlmmModel(lens.config, LlavaNextBackbone(model, processor, layer=2), lens.decoder)
    image, texts = random_image(24, 40, 7), [TEXT, "what is the square"]
    together = model.prepare([image, image], texts)
    assert together.features.shared_length > 0  # the prefix ran once
    for b, text in enumerate(texts):
        alone = model.prepare([image], [text])
        assert alone.features.shared_length == 0
        torch.testing.assert_close(together.maps[b], alone.maps[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together.text_states[b], alone.text_states[0], atol=1e-5, rtol=1e-4)
    mixed = model.prepare([image, random_image(56, 24, 8)], texts)
    assert mixed.maps[0].shape[-2:] != mixed.maps[1].shape[-2:]
    with torch.no_grad():
        out = model(mixed)
    assert [m.shape for m in out.mask_logits] == [(24, 40), (56, 24)]
    assert out.attention_map.shape == (2, *mixed.features.max_grid)
