import dataclasses

import numpy as np
import pytest
import torch

from conftest import box_mask, make_lens, random_image
from lens.geometry import GridFrame
from lens.model import LensInputs
from lens.weights import load_lens_weights, save_lens_weights

IMAGES = [random_image(40, 60, 0), random_image(50, 30, 1)]
TEXTS = ["segment the red ring", "where is the square ?"]
MASKS = [box_mask(40, 60, 10, 5, 20, 30), box_mask(50, 30, 0, 0, 50, 30)]


def _greedy(model, processor, image, text, steps=5):
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return logits, tokens


def test_one_step_changes_exactly_the_saved_tensors(tiny_lens):
    """Independent of how the trainable set is defined: after one optimizer step over every parameter that
    asks for a gradient, the tensors whose values changed are exactly those a checkpoint saves, and every
    other parameter got no (or an all-zero) gradient."""
    tiny_lens.train()
    tiny_lens.descriptor.global_only_prob = 0.0  # keypoint descriptions must be used in this step
    before = {n: p.detach().clone() for n, p in tiny_lens.named_parameters()}
    # Adam's first step moves each element by lr * sign(grad) when eps is negligible: even the ~1e-15 gradients
    # of a tiny random SAM's near-uniform attention move their tensor, and a zero gradient moves nothing.
    params = [p for p in tiny_lens.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2, eps=1e-30)
    out = tiny_lens(tiny_lens.prepare(IMAGES, TEXTS, MASKS))
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in tiny_lens.named_parameters() if not torch.equal(p, before[n])}
    saved = set(tiny_lens.trainable_state_dict())
    assert changed == saved
    for name, param in tiny_lens.named_parameters():
        if name not in saved:
            assert param.grad is None or not param.grad.any(), name
    # What cannot reach LENS's single mask is not saved: SAM's IoU head, the multimask hypernetworks.
    assert not any("iou_prediction_head" in n for n in saved)
    assert not any(f"output_hypernetworks_mlps.{i}." in n for n in saved for i in (1, 2, 3))
    for part in ("head.", "descriptor.", "decoder.cls_position", "decoder.sam.mask_decoder."):
        assert any(n.startswith(part) for n in saved), part


def test_frozen_means_frozen(tiny_models):
    llava, processor, _, _ = tiny_models
    text = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "what colour is the ring ?"}],
            }
        ],
        add_generation_prompt=True,
    )
    image = random_image(40, 60, 3)
    logits_before, tokens_before = _greedy(llava, processor, image, text)
    state_before = {k: v.clone() for k, v in llava.state_dict().items()}

    lens = make_lens(tiny_models)
    optimizer = torch.optim.AdamW([p for p in lens.parameters() if p.requires_grad], lr=1e-2)
    lens.train()
    for _ in range(3):
        out = lens(lens.prepare(IMAGES, TEXTS, MASKS))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    assert not llava.training
    for k, v in llava.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    logits_after, tokens_after = _greedy(llava, processor, image, text)
    assert torch.equal(tokens_before, tokens_after)
    assert torch.equal(logits_before, logits_after)


def test_training_step_and_predict(tiny_lens):
    tiny_lens.train()
    inputs = tiny_lens.prepare(IMAGES, TEXTS, MASKS)
    out = tiny_lens(inputs)
    assert torch.isfinite(out.loss)
    assert set(out.losses) == {"dice_loss", "bce_loss", "attention_loss"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert [tuple(x.shape) for x in out.mask_logits] == [(40, 60), (50, 30)]
    assert out.attention_map.shape == (2, 6, 6)
    assert out.keypoints.shape == (2, 16, 2) and out.keypoints_valid.shape == (2, 16)
    # Keypoints stay on the image: within half a cell of the grid.
    assert (out.keypoints >= -0.5).all() and (out.keypoints <= 5.5).all()

    prediction = tiny_lens.predict(IMAGES[0], "segment the red ring")
    assert prediction.mask.shape == (40, 60) and prediction.mask.dtype == bool
    assert prediction.attention_map.shape == (6, 6)
    n = prediction.keypoints.shape[0]
    assert 1 <= n <= 16 and prediction.keypoints_inside.shape == (n,)
    assert (prediction.keypoints[:, 0] >= 0).all() and (prediction.keypoints[:, 0] <= 60).all()
    assert tiny_lens.training  # predict restores the mode it found


def test_predict_many_texts_shares_the_image(tiny_lens):
    many = tiny_lens.predict(IMAGES[1], ["segment the ring", "segment the square"])
    single = tiny_lens.predict(IMAGES[1], "segment the square")
    assert len(many) == 2
    np.testing.assert_array_equal(many[1].mask, single.mask)
    np.testing.assert_allclose(many[1].attention_map, single.attention_map, atol=1e-6)


def test_global_only_dropout(tiny_lens):
    tiny_lens.train()
    tiny_lens.descriptor.global_only_prob = 1.0
    out = tiny_lens(tiny_lens.prepare(IMAGES, TEXTS, MASKS))
    assert not out.keypoints_valid.any()
    tiny_lens.eval()  # inference always uses both descriptions
    out = tiny_lens(tiny_lens.prepare(IMAGES, TEXTS))
    assert out.keypoints_valid.any(1).all()
    assert out.loss is None


def test_save_load_round_trip(tiny_models, tmp_path):
    trained = make_lens(tiny_models)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_lens_weights(trained, tmp_path / "ckpt")
    assert sorted(f.name for f in (tmp_path / "ckpt").iterdir()) == ["lens_config.yaml", "model.safetensors"]
    fresh = make_lens(tiny_models)
    load_lens_weights(fresh, tmp_path / "ckpt")
    for k, v in trained.trainable_state_dict().items():
        assert torch.equal(v, fresh.trainable_state_dict()[k]), k
    inputs = trained.prepare(IMAGES, TEXTS)
    trained.eval(), fresh.eval()
    torch.testing.assert_close(trained(inputs).low_res_logits, fresh(inputs).low_res_logits)


def test_load_rejects_wrong_checkpoint(tiny_models, tmp_path):
    from safetensors.torch import save_file

    save_file({"head.nope": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_lens_weights(make_lens(tiny_models), tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="no LENS weights"):
        load_lens_weights(make_lens(tiny_models), tmp_path / "missing")


def test_init_head_from_backbone(tiny_models):
    lens = make_lens(tiny_models, head__init_from_backbone=True)
    layers = lens.backbone.decoder_layers
    for i, layer in enumerate(lens.head.layers):
        source = layers[lens.backbone.layer + i].state_dict()  # 0-based index of layer k+1+i
        for k, v in layer.state_dict().items():
            assert torch.equal(v, source[k]), k


def test_prepare_embeds_each_distinct_image_once(tiny_lens):
    seen = []
    hook = tiny_lens.decoder.sam.vision_encoder.register_forward_hook(lambda m, a, o: seen.append(len(a[0])))
    inputs = tiny_lens.prepare([IMAGES[0], IMAGES[1], IMAGES[0].copy()], [*TEXTS, "segment the square"])
    hook.remove()
    assert seen == [2]
    alone = tiny_lens.decoder.embed_images([IMAGES[0]])[0]
    torch.testing.assert_close(inputs.decoder_embeddings[2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.decoder_embeddings[0], inputs.decoder_embeddings[2], rtol=0, atol=0)
    assert inputs.features.image_index.tolist() == [0, 1, 0] and inputs.features.shared_length > 0
    tiny_lens.eval()
    with torch.no_grad():  # the head's shared-prefix path against its plain one
        shared = tiny_lens(inputs)
        inputs.features.image_index = None
        plain = tiny_lens(inputs)
    torch.testing.assert_close(shared.low_res_logits, plain.low_res_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared.attention_map, plain.attention_map, rtol=1e-4, atol=1e-6)


def test_inputs_from_cache_shape(tiny_lens):
    inputs = tiny_lens.prepare(IMAGES, TEXTS, MASKS)
    again = LensInputs(
        inputs.features.to("cpu", torch.float32), inputs.decoder_embeddings.clone(), inputs.masks
    )
    tiny_lens.eval()
    torch.testing.assert_close(tiny_lens(inputs).low_res_logits, tiny_lens(again).low_res_logits)


def test_build_and_load_through_local_directories(tiny_models, tmp_path):
    """The same from_pretrained path as llava-hf/llava-1.5-7b-hf and facebook/sam-vit-huge, offline."""
    from lens.config import LensConfig
    from lens.weights import build_lens, load_lens

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
    config.descriptor.num_heads = 4
    model = build_lens(config).eval()
    save_lens_weights(model, tmp_path / "ckpt")
    loaded = load_lens(tmp_path / "ckpt").eval()
    image = random_image(40, 60, 5)
    a, b = model.predict(image, "segment the ring"), loaded.predict(image, "segment the ring")
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.attention_map, b.attention_map, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.backbone.parameters())


@pytest.mark.parametrize(("width", "height"), [(1000, 300), (300, 1000), (1000, 60), (40, 900)])
def test_keypoints_never_fall_in_the_mllm_padding(tiny_models, width, height):
    """Extreme aspect ratios, random head: LLaVA pads most of the grid; every keypoint still lies on the image,
    on a cell that overlaps it, and the decoder's prompts are inside the image's part of its frame."""
    lens = make_lens(tiny_models).eval()
    for seed in range(3):
        image = random_image(height, width, seed)
        prediction = lens.predict(image, "segment the red ring")
        points = prediction.keypoints  # (n, 2) original pixels
        assert len(points) > 0
        assert (points[:, 0] >= 0).all() and (points[:, 0] <= width).all(), points
        assert (points[:, 1] >= 0).all() and (points[:, 1] <= height).all(), points
        cells = prediction.geometry.image_to_grid(torch.from_numpy(points)).round().long()
        assert prediction.geometry.valid_cells()[cells[:, 1], cells[:, 0]].all()


def test_forward_on_cached_features_of_mixed_grid_sizes(tiny_lens):
    """A batch whose prompts have different grids (as Qwen's dynamic resolution gives): the small image's part of
    the padded A_c is zero outside its grid, its keypoints stay on it, and its mask equals the one it gets alone."""
    tiny_lens.eval()
    inputs = tiny_lens.prepare(IMAGES, TEXTS)
    f = inputs.features
    # Pretend prompt 1 only had a 4 x 5 grid: its first 20 image tokens are its cells, the rest not cells.
    f.grid_sizes = torch.tensor([[6, 6], [4, 5]])
    f.image_positions = f.image_positions.clone()
    f.image_positions[1, 20:] = -1
    g = f.geometries[1]
    f.geometries[1] = type(g)(GridFrame.resize(g.width, g.height, 4, 5), g.decoder)
    with torch.no_grad():
        out = tiny_lens(inputs)
        alone = tiny_lens(
            LensInputs(
                dataclasses.replace(
                    f,
                    hidden_states=f.hidden_states[1:],
                    attention_mask=f.attention_mask[1:],
                    position_ids=f.position_ids[1:],
                    image_positions=f.image_positions[1:, :20],
                    grid_sizes=f.grid_sizes[1:],
                    text_span=f.text_span[1:],
                    answer_index=f.answer_index[1:],
                    geometries=f.geometries[1:],
                    image_index=None,
                    shared_length=0,
                ),
                inputs.decoder_embeddings[1:],
            )
        )
    assert out.attention_map.shape == (2, 6, 6)
    assert (out.attention_map[1, 4:] == 0).all() and (out.attention_map[1, :, 5:] == 0).all()
    valid = out.keypoints_valid[1]
    assert (out.keypoints[1][valid] <= torch.tensor([4.5, 3.5])).all()
    torch.testing.assert_close(out.attention_map[1, :4, :5], alone.attention_map[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mask_logits[1], alone.mask_logits[0], rtol=1e-4, atol=1e-4)


def test_embed_once_query_many_equals_the_plain_path(tiny_lens):
    tiny_lens.eval()
    texts = ["segment the ring", "where is the red square in this image ?", "the square"]
    embedded = tiny_lens.embed_image(IMAGES[0])
    assert embedded.prefix is not None
    seen = []
    hooks = [
        tiny_lens.decoder.sam.vision_encoder.register_forward_hook(lambda m, a, o: seen.append("sam")),
        tiny_lens.backbone.model.model.vision_tower.register_forward_hook(
            lambda m, a, o: seen.append("clip")
        ),
    ]
    cached = tiny_lens.predict(embedded, texts)
    one = tiny_lens.predict(embedded, texts[1])
    for hook in hooks:
        hook.remove()
    assert seen == []  # neither image encoder ran again
    plain = tiny_lens.predict(IMAGES[0], texts)
    for a, b in zip([*cached, one], [*plain, plain[1]], strict=True):
        np.testing.assert_allclose(a.attention_map, b.attention_map, atol=1e-6)
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-4)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.geometry == b.geometry == embedded.geometry
    with pytest.raises(ValueError, match="do not start with this prefix"):
        tiny_lens.backbone.encode([IMAGES[1]], ["x"], prefix=embedded.prefix)  # another image size


def test_predict_leaves_an_eval_model_alone(tiny_lens, monkeypatch):
    tiny_lens.eval()
    calls = []
    monkeypatch.setattr(type(tiny_lens), "train", lambda self, mode=True: calls.append(mode) or self)
    tiny_lens.predict(IMAGES[0], "segment the ring")
    assert calls == []


def test_load_refuses_another_decoders_checkpoint(tiny_models, tmp_path):
    model = make_lens(tiny_models)
    save_lens_weights(model, tmp_path / "ckpt")
    config = (tmp_path / "ckpt" / "lens_config.yaml").read_text()
    (tmp_path / "ckpt" / "lens_config.yaml").write_text(config.replace("name: sam", "name: sam2"))
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "ckpt" / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"decoder": "sam2"})
    with pytest.raises(ValueError, match="holds weights for the 'sam2' decoder, not this model's 'sam'"):
        load_lens_weights(make_lens(tiny_models), tmp_path / "ckpt")
