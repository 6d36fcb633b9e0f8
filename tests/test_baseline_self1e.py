"""The SELF1E baseline: masks from the fine-tuned MLLM's own states, checked against Hugging Face's own forward
(``output_hidden_states``, its own loss) and a by-hand mask rule; mapped back to non-square images; trained,
scored, saved and loaded through LENS's own calls."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_LAYER, box_mask, random_image
from lens.backbone import LlavaBackbone
from lens.baselines.self1e import (
    UPSCALE,
    NoMaskDecoder,
    Self1eModel,
    grid_map_to_image,
    self1e_attention_mask,
)
from lens.config import LensConfig
from lens.data.synthetic.dataset import SYNTHETIC
from lens.evaluation import PER_SAMPLE_NAME, EvalSplit, evaluate
from lens.geometry import GridFrame
from lens.tiny import build_tiny_models
from lens.training import FINAL, LOG_NAME, TrainData, train
from lens.weights import build_lens, load_lens, load_lens_weights, save_lens_weights

TEXTS = ["what is the red ring?", "segment the square please"]


def _config() -> LensConfig:
    config = LensConfig()
    config.backbone.layer = TINY_LAYER
    config.backbone.dtype = "float32"
    config.baseline.system = "self1e"
    return config


def _model(seed: int = 0, config: LensConfig | None = None) -> Self1eModel:
    llava, processor, _, _ = build_tiny_models(seed=0)
    torch.manual_seed(seed)
    return Self1eModel(config or _config(), LlavaBackbone(llava, processor, layer=TINY_LAYER))


def _perturb(model: Self1eModel, seed: int = 1) -> None:
    """LoRA B starts at zero: give every trained tensor random values so the adapters change the forward."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _reference_mask(ids: torch.Tensor, real: torch.Tensor, image_token: int, seg_token: int) -> torch.Tensor:
    """SELF1E's rule, one query / key pair at a time: (B, 1, L, L) additive."""
    B, L = ids.shape
    out = torch.full((B, 1, L, L), torch.finfo(torch.float32).min)
    for b in range(B):
        has_seg = bool((ids[b] == seg_token).any())
        for q in range(L):
            for k in range(L):
                image_q = bool(ids[b, q] == image_token) and has_seg
                opened = image_q and (ids[b, k] == image_token or ids[b, k] == seg_token)
                if q == k or (real[b, k] and (k <= q or opened)):
                    out[b, 0, q, k] = 0.0
    return out


def _crop_resize(frame: GridFrame, logits: torch.Tensor) -> torch.Tensor:
    """The map resized onto LLaVA's padded square, then the padding cut off (what its processor added)."""
    side = round(frame.grid_w * frame.cell_w)
    x0, y0 = round(-frame.origin_x), round(-frame.origin_y)
    big = F.interpolate(logits[None, None], (side, side), mode="bilinear", align_corners=False)[0, 0]
    return big[y0 : y0 + frame.height, x0 : x0 + frame.width]


def test_attention_mask_is_selfs_rule():
    model = _model()
    images = [random_image(40, 72, 1), random_image(64, 64, 2)]
    conversation = model.mllm.conversation(images, TEXTS)
    ids, real = conversation.inputs["input_ids"], conversation.inputs["attention_mask"]
    mask = self1e_attention_mask(
        real, conversation.image_positions, ids == model.mllm.seg_token_id, torch.float32
    )
    image_token = model.backbone.model.config.image_token_id
    assert torch.equal(mask, _reference_mask(ids, real, image_token, model.mllm.seg_token_id))


@pytest.mark.parametrize(("width", "height"), [(72, 40), (40, 72), (64, 64)])
def test_mask_logits_are_hf_hidden_states_through_the_head(width, height):
    model = _model()
    _perturb(model)
    model.eval()
    images = [random_image(height, width, seed=width), random_image(64, 64, seed=3)]
    masks = [box_mask(height, width, 2, 3, height // 2, width // 2), box_mask(64, 64, 0, 0, 10, 10)]
    inputs = model.prepare(images, TEXTS, masks)
    with torch.no_grad():
        out = model(inputs)

    # Reference: HF's own forward with SELF1E's mask (built pair by pair) and its own next-token loss.
    c = inputs.conversation
    ids, real = c.inputs["input_ids"], c.inputs["attention_mask"]
    llava = model.backbone.model
    mask = _reference_mask(ids, real, llava.config.image_token_id, model.mllm.seg_token_id)
    with torch.no_grad():
        hf = llava(**{**c.inputs, "attention_mask": mask}, labels=c.labels, output_hidden_states=True)
    torch.testing.assert_close(out.losses["ce_loss"], hf.loss)
    head, (gh, gw), s = model.head, model.backbone.grid_size, UPSCALE
    d = model.mllm.hidden_size
    for b, geometry in enumerate(inputs.geometries):
        cells = c.image_positions[b]
        vision = hf.hidden_states[0][
            b, cells
        ]  # (N, d): the input embeddings there are the projector's output
        llm = hf.hidden_states[-1][b, cells]  # (N, d)
        seg = hf.hidden_states[-1][b, int(c.seg_index[b])]
        with torch.no_grad():

            def finer(
                wide: torch.Tensor,
            ) -> torch.Tensor:  # (N, d s s) -> (s gh, s gw, d), piece (i, j) at (r s + i, q s + j)
                return wide.view(gh, gw, d, s, s).permute(0, 3, 1, 4, 2).reshape(gh * s, gw * s, d)

            llm_map = finer(head.expand_llm(llm))
            features = head.fuse(llm_map + finer(head.expand_vision(vision)))
            query = head.fuse(head.expand_llm(seg).view(d, s * s).mean(1))
            logits = features @ query / d**0.5  # (s gh, s gw)
        torch.testing.assert_close(out.low_res_logits[b], logits, atol=1e-5, rtol=1e-4)
        expected = _crop_resize(geometry.grid, logits)
        assert out.mask_logits[b].shape == (images[b].height, images[b].width)
        torch.testing.assert_close(out.mask_logits[b], expected, atol=1e-5, rtol=1e-4)
    assert out.attention_map.shape == (2, gh, gw)
    assert ((out.attention_map >= 0) & (out.attention_map <= 1)).all()
    assert out.keypoints.shape == (2, 0, 2) and out.keypoints_valid.shape == (2, 0)


def test_image_tokens_see_the_segmentation_token_and_nothing_after_it():
    model = _model()
    model.eval()
    c = model.mllm.conversation([random_image(48, 48)], TEXTS[:1])
    ids, real = c.inputs["input_ids"], c.inputs["attention_mask"]
    seg = int(c.seg_index[0])
    mask = self1e_attention_mask(real, c.image_positions, ids == model.mllm.seg_token_id, torch.float32)
    llava, other = model.backbone.model, int(ids[0, 1])  # a prompt token's id, in place of another token

    def image_states(changed: int | None, attention: torch.Tensor) -> torch.Tensor:
        new = ids.clone()
        if changed is not None:
            new[0, changed] = other
        with torch.no_grad():
            hidden = llava(
                **{**c.inputs, "input_ids": new, "attention_mask": attention}, output_hidden_states=True
            )
        return hidden.hidden_states[-1][0, c.image_positions[0]]

    base = image_states(None, mask)
    assert not torch.allclose(image_states(seg, mask), base)  # the image-to-segmentation pathway
    torch.testing.assert_close(image_states(seg + 1, mask), base)  # the answer's "." is not seen
    causal = real.clone()
    torch.testing.assert_close(image_states(seg, causal), image_states(None, causal))  # plain LLaVA: causal


@pytest.mark.parametrize(("width", "height"), [(38, 23), (26, 44), (30, 30)])
def test_one_cell_of_the_map_lands_on_that_cells_pixels(width, height):
    grid = 6
    frame = GridFrame.pad_to_square(width, height, grid)
    valid = frame.valid_cells()
    for r, q in [(r, q) for r in range(grid) for q in range(grid) if valid[r, q]][::5]:
        logits = torch.full((grid * UPSCALE, grid * UPSCALE), -10.0)
        logits[r * UPSCALE : (r + 1) * UPSCALE, q * UPSCALE : (q + 1) * UPSCALE] = 10.0
        mask = grid_map_to_image(frame, logits) > 0
        xs, ys = torch.arange(width) + 0.5, torch.arange(height) + 0.5  # pixel centres
        x0, y0 = frame.origin_x + q * frame.cell_w, frame.origin_y + r * frame.cell_h
        inside_x = (xs > x0) & (xs < x0 + frame.cell_w)
        inside_y = (ys > y0) & (ys < y0 + frame.cell_h)
        # Off the cell on either axis: background. Where the other axis is a map pixel's half clear of the
        # corners, the edge is exactly the cell's (bilinear rounds the corners themselves).
        assert not mask[~inside_y].any() and not mask[:, ~inside_x].any(), (r, q)
        half = frame.cell_w / UPSCALE / 2
        deep_x = (xs > x0 + half) & (xs < x0 + frame.cell_w - half)
        deep_y = (ys > y0 + half) & (ys < y0 + frame.cell_h - half)
        assert deep_x.any() and deep_y.any()
        assert torch.equal(mask[deep_y], inside_x.expand(int(deep_y.sum()), -1)), (r, q)
        assert torch.equal(mask[:, deep_x], inside_y[:, None].expand(-1, int(deep_x.sum()))), (r, q)
        torch.testing.assert_close(
            grid_map_to_image(frame, logits), _crop_resize(frame, logits), atol=1e-4, rtol=0
        )


def test_no_sam_and_exactly_these_parts_train():
    model = _model()
    names = set(model.trainable_names())
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert isinstance(model.decoder, NoMaskDecoder) and not list(model.decoder.parameters())
    assert all(n.startswith(("head.", "mllm.backbone.model.")) for n in names)
    assert any("lora_A" in n for n in names) and "head.fuse.2.weight" in names
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names)
    inputs = model.prepare([random_image(50, 30)], ["the ring"])
    assert inputs.decoder_embeddings.shape == (1, 0) and inputs.features is None


def _synthetic_config() -> LensConfig:
    config = _config()
    config.data.datasets = {
        "synthetic": {"seed": 0, "height": 64, "width": 64, "train_size": 6, "val_size": 1}
    }
    config.data.num_workers = 0
    config.data.num_classes_per_sample = 2
    config.train = dataclasses.replace(
        config.train, lr=1e-3, warmup_steps=1, max_steps=3, batch_size=2, grad_accum_steps=1, save_every=100,
        eval_every=0, eval_limit=2, keep_checkpoints=1,
    )  # fmt: skip
    return config


def test_trains_through_the_loop_is_scored_and_round_trips(tmp_path):
    from lens.data.loader import build_eval_dataset, build_train_datasets, train_ratios

    config = _synthetic_config()
    model = _model(config=config)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    val = EvalSplit(SYNTHETIC, "val", build_eval_dataset(config.data, SYNTHETIC, "val"))
    data = TrainData(dict(build_train_datasets(config.data, 0)), train_ratios(config.data), val)
    records = train(config, tmp_path / "run", model=model, data=data)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(set(model.loss_names) <= set(r) for r in records) and "val_giou" in records[-1]
    logged = [json.loads(line) for line in (tmp_path / "run" / LOG_NAME).read_text().splitlines()]
    assert logged[-1]["ce_loss"] == pytest.approx(records[-1]["ce_loss"])
    after = model.trainable_state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_B" in k for k in moved) and any(k.startswith("head.") for k in moved)

    test = EvalSplit(SYNTHETIC, "val", build_eval_dataset(config.data, SYNTHETIC, "val"))
    results = evaluate(model, [test], tmp_path / "eval", batch_size=2, method="SELF1E")
    assert 0.0 <= results["splits"]["synthetic/val"]["overall"]["giou"] <= 1.0
    assert (tmp_path / "eval" / PER_SAMPLE_NAME).is_file()

    # The final checkpoint into a fresh build (new random head, new token rows): the same masks.
    fresh = load_lens_weights(_model(seed=7, config=config), tmp_path / "run" / FINAL)
    model.eval(), fresh.eval()
    inputs = model.prepare([random_image(40, 56)], ["segment the square"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs).mask_logits[0], model(inputs).mask_logits[0])


def test_built_saved_and_loaded_through_lens_weights(tmp_path):
    config = LensConfig()
    config.backbone.model_id, config.backbone.layer, config.backbone.dtype = (
        "lens:synthetic/mllm",
        5,
        "float32",
    )
    config.baseline.system = "self1e"
    model = build_lens(config)
    assert isinstance(model, Self1eModel) and model.backbone.grid_size == (12, 12)
    _perturb(model)
    model.eval()
    inputs = model.prepare([random_image(60, 90)], ["the red ring"])
    with torch.no_grad():
        expected = model(inputs).mask_logits[0]
    assert expected.shape == (60, 90)
    save_lens_weights(model, tmp_path / "ckpt")
    torch.manual_seed(5)  # another draw for the fresh head and token rows
    loaded = load_lens(tmp_path / "ckpt").eval()
    shapes = {k: v.shape for k, v in loaded.trainable_state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.trainable_state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(loaded.prepare([random_image(60, 90)], ["the red ring"])).mask_logits[0], expected
        )
