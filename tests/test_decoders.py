"""The mask decoders behind the contract (SAM, SAM-HQ, SAM 2), checked against the Hugging Face models themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.sam2.processing_sam2 import Sam2Processor

from helpers import TINY_LAYER, random_image
from lens.backbone import LlavaBackbone
from lens.config import DecoderConfig, LensConfig
from lens.decoders import DECODERS, MaskDecoderBridge, load_decoder
from lens.decoders.sam import SamDecoder
from lens.decoders.sam2 import Sam2Decoder
from lens.decoders.sam_hq import SamHQDecoder
from lens.geometry import DecoderFrame
from lens.model import LensModel
from lens.tiny import TEST_WORDS, build_llava, build_sam
from lens.tiny_decoders import build_sam2, build_sam_hq
from lens.weights import load_lens_weights, save_lens_weights

# ----- SamDecoder (from branch contracts) ------------------------------------------------------------


@pytest.fixture
def decoder() -> SamDecoder:
    sam, processor = build_sam(seed=0)
    return SamDecoder(sam, processor).eval()


def _prompts(decoder: SamDecoder, B: int = 2, m: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(B, m, 2, generator=gen) * (decoder.image_size - 1)  # SAM input pixels (integer grid)
    labels = torch.randint(0, 2, (B, m), generator=gen)
    embeddings = decoder.embed_images([random_image(40, 60, 0), random_image(50, 30, 1)][:B])
    return embeddings, points, labels


def _as_descriptions(decoder: SamDecoder, labels: torch.Tensor) -> torch.Tensor:
    """Descriptions that make LENS's prompts SAM's own: keypoint i described by SAM's label embedding, and the
    global slot (plus its [CLS] position) equal to the padding point SAM appends when no box is given."""
    encoder = decoder.sam.prompt_encoder
    label_embeddings = torch.stack([encoder.point_embed[0].weight[0], encoder.point_embed[1].weight[0]])
    keypoints = label_embeddings[labels]  # (B, m, d_s)
    padding = encoder.not_a_point_embed.weight - decoder.cls_position  # (1, d_s)
    return torch.cat([padding.expand(labels.shape[0], 1, -1), keypoints], 1)


@torch.no_grad()
def test_equals_sams_own_forward_on_the_same_prompts(decoder):
    embeddings, points, labels = _prompts(decoder)
    descriptions = _as_descriptions(decoder, labels)
    valid = torch.ones_like(labels, dtype=torch.bool)
    # LENS points are continuous (pixel centres at +0.5); SAM shifts its integer pixel indices by 0.5 itself.
    low_res, iou = decoder(embeddings, descriptions, points + 0.5, valid)
    expected = decoder.sam(
        image_embeddings=embeddings,
        input_points=points[:, None],
        input_labels=labels[:, None],
        multimask_output=False,
    )
    torch.testing.assert_close(low_res, expected.pred_masks[:, 0, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou, expected.iou_scores[:, 0, 0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_invalid_keypoints_are_sams_padding_points_whatever_they_hold(decoder):
    """An invalid slot is SAM's "not a point" (label -1): its description and position have no effect."""
    embeddings, points, labels = _prompts(decoder, seed=1)
    descriptions = _as_descriptions(decoder, labels)
    valid = torch.tensor([[True, False, True], [False, False, True]])
    low_res, iou = decoder(embeddings, descriptions, points + 0.5, valid)
    garbage = descriptions.clone()
    garbage[:, 1:][~valid] = 1e3 * torch.randn(int((~valid).sum()), descriptions.shape[-1])
    moved = points.clone()
    moved[~valid] = 0.0
    again, iou_again = decoder(embeddings, garbage, moved + 0.5, valid)
    torch.testing.assert_close(again, low_res, rtol=0, atol=0)
    torch.testing.assert_close(iou_again, iou, rtol=0, atol=0)
    expected = decoder.sam(
        image_embeddings=embeddings,
        input_points=points[:, None],
        input_labels=torch.where(valid, labels, -1)[:, None],
        multimask_output=False,
    )
    torch.testing.assert_close(low_res, expected.pred_masks[:, 0, 0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_keypoint_order_does_not_matter(decoder):
    embeddings, points, labels = _prompts(decoder, m=4, seed=2)
    descriptions = torch.randn(2, 5, decoder.prompt_dim, generator=torch.Generator().manual_seed(3))
    valid = torch.tensor([[True, True, False, True], [True, False, True, True]])
    low_res, iou = decoder(embeddings, descriptions, points, valid)
    order = torch.tensor([2, 0, 3, 1])
    permuted = torch.cat([descriptions[:, :1], descriptions[:, 1:][:, order]], 1)
    again, iou_again = decoder(embeddings, permuted, points[:, order], valid[:, order])
    torch.testing.assert_close(again, low_res, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou_again, iou, rtol=1e-5, atol=1e-5)


def test_contract_members(decoder, tmp_path):
    assert DECODERS["sam"] is SamDecoder and issubclass(SamDecoder, MaskDecoderBridge)
    assert decoder.frame(200, 100) == DecoderFrame.longest_side(200, 100, decoder.image_size)
    embeddings = decoder.embed_images([random_image(40, 60, 0), random_image(50, 30, 1)])
    assert torch.equal(decoder.select(embeddings, torch.tensor([1, 1, 0]))[2], embeddings[0])
    names = decoder.trainable_names()
    assert "cls_position" in names and not any("iou_prediction_head" in n for n in names)
    assert not any(n.startswith(("sam.vision_encoder.", "sam.prompt_encoder.")) for n in names)
    frozen = SamDecoder(*build_sam(seed=0), train_mask_decoder=False)
    assert frozen.trainable_names() == ["cls_position"]
    sam, processor = build_sam(seed=0)
    sam.save_pretrained(tmp_path / "sam")
    processor.save_pretrained(tmp_path / "sam")
    loaded = load_decoder(DecoderConfig(model_id=str(tmp_path / "sam")))
    assert isinstance(loaded, SamDecoder)
    with pytest.raises(ValueError, match="unknown decoder 'nope'"):
        load_decoder(DecoderConfig(name="nope"))


# ----- every decoder: SAM, SAM-HQ, SAM 2 ------------------------------------------------------------

BUILDERS = {
    "sam": (SamDecoder, build_sam),
    "sam_hq": (SamHQDecoder, build_sam_hq),
    "sam2": (Sam2Decoder, build_sam2),
}
NAMES = list(BUILDERS)
SIZES = [(60, 40), (40, 60), (64, 64), (1000, 300), (300, 1000), (17, 93)]  # (width, height)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to float32 precision relative to the values' scale (a random tiny model's logits are ~1e-5)."""
    scale = theirs.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours / scale, theirs / scale, atol=1e-5, rtol=0)


def make(name: str, seed: int = 0, train_mask_decoder: bool = True):
    cls, build = BUILDERS[name]
    model, processor = build(seed=seed)
    torch.manual_seed(seed)
    return cls(model, processor, train_mask_decoder=train_mask_decoder).eval()


def label_embedding(decoder, labels: torch.Tensor) -> torch.Tensor:
    """(B, m, d): the model's own embedding of point labels 0 / 1, which LENS's descriptions replace."""
    point_embed = decoder.sam.prompt_encoder.point_embed
    if isinstance(point_embed, torch.nn.Embedding):  # SAM 2: one table
        return point_embed.weight[labels]
    return torch.stack([point_embed[0].weight[0], point_embed[1].weight[0]])[labels]  # SAM, SAM-HQ


def hf_forward(
    decoder, embeddings, points: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face model's own forward on point prompts (pixel coordinates of its input, labels -1/0/1)."""
    kwargs = {"image_embeddings": embeddings}
    if decoder.name == "sam_hq":
        kwargs = {"image_embeddings": embeddings[0], "intermediate_embeddings": [embeddings[1]]}
    elif decoder.name == "sam2":
        kwargs = {"image_embeddings": list(embeddings)}
    # HF shifts its integer pixel coordinates by +0.5 to the pixel centre; ours are continuous already.
    out = decoder.sam(
        input_points=(points - 0.5)[:, None], input_labels=labels[:, None], multimask_output=False, **kwargs
    )
    return out.pred_masks[:, 0, 0], out.iou_scores[:, 0, 0]


def prompts_like_hf(decoder, labels: torch.Tensor) -> torch.Tensor:
    """Descriptions that make LENS's prompt set equal the model's own: keypoints described by their label
    embedding, and the global token turned into the padding point HF appends (token order does not matter to
    the two-way transformer)."""
    pad = decoder.sam.prompt_encoder.not_a_point_embed.weight - decoder.cls_position  # (1, d)
    return torch.cat(
        [pad.expand(labels.shape[0], 1, -1)[:, :, None].squeeze(2), label_embedding(decoder, labels)], 1
    )


@pytest.mark.parametrize("name", NAMES)
def test_registry_names_each_decoder(name):
    assert DECODERS[name] is BUILDERS[name][0] and DECODERS[name].name == name


@pytest.mark.parametrize("name", NAMES)
def test_bridge_equals_the_models_own_forward_on_point_prompts(name):
    decoder = make(name)
    images = [random_image(40, 60, seed=1), random_image(50, 30, seed=2)]
    embeddings = decoder.embed_images(images)
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2, 5, 2, generator=g) * decoder.image_size  # (B, m, 2)
    labels = torch.randint(0, 2, (2, 5), generator=g)
    with torch.no_grad():
        ours, our_iou = decoder(
            embeddings, prompts_like_hf(decoder, labels), points, torch.ones(2, 5, dtype=torch.bool)
        )
        theirs, their_iou = hf_forward(decoder, embeddings, points, labels)
    assert ours.shape == theirs.shape and ours.shape[0] == 2
    assert_same(ours, theirs)
    assert_same(our_iou, their_iou)
    assert ours.std() > 1e-3 * ours.abs().max()  # a constant map would make the comparison vacuous


@pytest.mark.parametrize("name", NAMES)
def test_invalid_keypoints_are_the_models_padding_points(name):
    decoder = make(name)
    embeddings = decoder.embed_images([random_image(40, 60, seed=3)])
    g = torch.Generator().manual_seed(1)
    points = torch.rand(1, 4, 2, generator=g) * decoder.image_size
    labels = torch.tensor([[1, 0, 1, 1]])
    valid = torch.tensor([[True, False, True, False]])
    with torch.no_grad():
        ours, _ = decoder(embeddings, prompts_like_hf(decoder, labels), points, valid)
        theirs, _ = hf_forward(decoder, embeddings, points, torch.where(valid, labels, -1))
        moved = points.clone()
        moved[~valid] = 7.0  # where an invalid keypoint lies must not matter
        again, _ = decoder(embeddings, prompts_like_hf(decoder, labels), moved, valid)
        all_valid, _ = decoder(embeddings, prompts_like_hf(decoder, labels), points, torch.ones_like(valid))
    assert_same(ours, theirs)
    torch.testing.assert_close(ours, again)
    assert (ours - all_valid).abs().max() > 0.01 * ours.abs().max()  # masking changes the output


def test_sam_hq_embedding_is_the_first_global_blocks_output():
    decoder = make("sam_hq")
    pixels = decoder.processor(images=[random_image(40, 60)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = decoder.sam.vision_encoder(pixels)
    embedding, vit = decoder.embed_images([random_image(40, 60)])
    torch.testing.assert_close(embedding, out.last_hidden_state)
    torch.testing.assert_close(vit, out.intermediate_embeddings[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES)
def test_frame_matches_the_models_own_preprocessing(name, size):
    decoder = make(name)
    width, height = size
    frame = decoder.frame(width, height)
    g = torch.Generator().manual_seed(width * 1000 + height)
    points = torch.rand(6, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [width, height], dtype=torch.float64
    )
    if name == "sam2":  # Sam2Processor needs torchvision to be built; its coordinate map does not use self
        reference = Sam2Processor._normalize_coordinates(
            None, decoder.image_size, points.clone(), (height, width)
        )
    else:
        image = random_image(height, width)
        enc = decoder.processor(images=image, input_points=[[points.tolist()]], return_tensors="pt")
        reference = enc["input_points"][0, 0].double()
        assert (frame.resized_h, frame.resized_w) == tuple(enc["reshaped_input_sizes"][0].tolist())
    torch.testing.assert_close(frame.image_to_decoder(points), reference.to(points.dtype))
    torch.testing.assert_close(frame.decoder_to_image(frame.image_to_decoder(points)), points)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES[:4])
def test_masks_return_to_the_original_frame_as_the_processor_does(name, size):
    decoder = make(name)
    width, height = size
    low = torch.randn(1, 1, 1, decoder.image_size // 4, decoder.image_size // 4)  # (B, prompts, masks, h, w)
    frame = decoder.frame(width, height)
    if name == "sam2":  # Sam2ImageProcessor.post_process_masks (torchvision-only here): one bilinear resize
        reference = [F.interpolate(low[0], (height, width), mode="bilinear", align_corners=False)]
    else:
        reference = decoder.processor.post_process_masks(
            low, [(height, width)], [(frame.resized_h, frame.resized_w)], binarize=False
        )
    torch.testing.assert_close(frame.postprocess_masks(low[0, 0, 0]), reference[0][0, 0])


@pytest.mark.parametrize("name", NAMES)
def test_sam2_pixels_are_the_image_stretched_to_the_square(name):
    decoder = make(name)
    pixels = decoder.processor(images=[random_image(30, 50)], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, decoder.image_size, decoder.image_size)
    if name == "sam2":  # no padding: the bottom rows hold the image, not zeros
        assert pixels[0, :, -1].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_trainable_names_are_exactly_what_one_optimizer_step_changes(name):
    """Let every mask-decoder tensor train, take one step on the mask loss: the tensors that moved are exactly
    ``trainable_names()`` — the rest cannot reach LENS's single mask."""
    decoder = make(name)
    listed = set(decoder.trainable_names())
    candidates = {f"sam.mask_decoder.{n}" for n, _ in decoder.sam.mask_decoder.named_parameters()} | {
        "cls_position"
    }
    assert listed <= candidates and "cls_position" in listed
    decoder.sam.mask_decoder.requires_grad_(True)
    decoder.train()
    params = dict(decoder.named_parameters())
    before = {n: params[n].detach().clone() for n in candidates}
    embeddings = decoder.embed_images([random_image(40, 60, seed=4), random_image(60, 40, seed=5)])
    g = torch.Generator().manual_seed(2)
    descriptions = torch.randn(2, 4, decoder.prompt_dim, generator=g)
    points = torch.rand(2, 3, 2, generator=g) * decoder.image_size
    low, _ = decoder(
        embeddings, descriptions, points, torch.tensor([[True, True, False], [True, True, True]])
    )
    target = (torch.rand(low.shape, generator=g) > 0.5).float()
    # Adam with a negligible eps moves every tensor whose gradient is non-zero by ~lr, however small the gradient
    # of a random tiny model is; a tensor that cannot reach the mask has no gradient (or exactly 0) and stays.
    optimizer = torch.optim.Adam([params[n] for n in candidates], lr=1e-2, eps=1e-30)
    F.binary_cross_entropy_with_logits(low, target).backward()
    optimizer.step()
    changed = {n for n in candidates if not torch.equal(before[n], params[n].detach())}
    assert changed == listed


@pytest.mark.parametrize("name", NAMES)
def test_frozen_mask_decoder_leaves_only_the_cls_position(name):
    assert make(name, train_mask_decoder=False).trainable_names() == ["cls_position"]


@pytest.mark.parametrize("name", NAMES)
def test_select_gathers_rows_of_the_opaque_embedding(name):
    decoder = make(name)
    embeddings = decoder.embed_images([random_image(40, 60, seed=6), random_image(60, 40, seed=7)])
    picked = decoder.select(embeddings, torch.tensor([1, 1, 0]))
    for got, full in zip(
        picked if isinstance(picked, tuple) else (picked,),
        embeddings if isinstance(embeddings, tuple) else (embeddings,),
        strict=True,
    ):
        torch.testing.assert_close(got, full[[1, 1, 0]])
    assert np.isfinite(float(sum(e.sum() for e in (picked if isinstance(picked, tuple) else (picked,)))))


# ----- through LENS: one training step, predict, and checkpoints that know their decoder ---------------------


def make_lens_with(name: str):
    config = LensConfig()
    config.backbone.layer, config.backbone.dtype = TINY_LAYER, "float32"
    config.descriptor.num_heads = 4
    config.decoder.name = name
    llava, processor = build_llava(TEST_WORDS, seed=0)
    decoder = make(name)
    torch.manual_seed(0)
    return LensModel(config, LlavaBackbone(llava, processor, layer=TINY_LAYER), decoder)


LENS_IMAGES = [random_image(40, 60, 0), random_image(50, 30, 1)]
LENS_TEXTS = ["segment the red ring", "where is the square ?"]


def lens_masks() -> list[np.ndarray]:
    first, second = np.zeros((40, 60), np.uint8), np.zeros((50, 30), np.uint8)
    first[10:20, 5:30] = 1
    second[:, :] = 1
    return [first, second]


@pytest.mark.parametrize("name", NAMES)
def test_one_lens_step_trains_exactly_the_saved_tensors_and_predicts(name):
    model = make_lens_with(name)
    model.train()
    model.descriptor.global_only_prob = 0.0  # keypoint descriptions must take part in this step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-30)
    out = model(model.prepare(LENS_IMAGES, LENS_TEXTS, lens_masks()))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    saved = set(model.trainable_state_dict())
    assert changed == saved
    assert {n[len("decoder.") :] for n in saved if n.startswith("decoder.")} == set(
        model.decoder.trainable_names()
    )
    assert [tuple(m.shape) for m in out.mask_logits] == [(40, 60), (50, 30)]

    model.eval()
    prediction = model.predict(LENS_IMAGES[1], "segment the red ring")
    assert prediction.mask.shape == (50, 30) and prediction.mask.dtype == bool
    embedded = model.embed_image(LENS_IMAGES[1])
    again = model.predict(embedded, "segment the red ring")
    np.testing.assert_array_equal(again.mask, prediction.mask)


@pytest.mark.parametrize(("trained", "other"), [("sam", "sam2"), ("sam2", "sam_hq"), ("sam_hq", "sam")])
def test_a_checkpoint_refuses_another_decoder(trained, other, tmp_path):
    save_lens_weights(make_lens_with(trained), tmp_path / "ckpt")
    with pytest.raises(ValueError) as error:
        load_lens_weights(make_lens_with(other), tmp_path / "ckpt")
    message = str(error.value)
    assert "\n" not in message and repr(trained) in message and repr(other) in message
    load_lens_weights(make_lens_with(trained), tmp_path / "ckpt")  # its own decoder loads it


@pytest.mark.parametrize("name", NAMES)
def test_from_pretrained_reloads_a_saved_model(name, tmp_path):
    decoder = make(name)
    decoder.sam.save_pretrained(tmp_path / name)
    decoder.processor.save_pretrained(tmp_path / name)
    loaded = DECODERS[name].from_pretrained(str(tmp_path / name)).eval()
    loaded.cls_position.data.copy_(decoder.cls_position.data)
    image = random_image(30, 50, seed=8)
    g = torch.Generator().manual_seed(3)
    descriptions = torch.randn(1, 3, decoder.prompt_dim, generator=g)
    points = torch.rand(1, 2, 2, generator=g) * decoder.image_size
    valid = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        ours = decoder(decoder.embed_images([image]), descriptions, points, valid)[0]
        again = loaded(loaded.embed_images([image]), descriptions, points, valid)[0]
    torch.testing.assert_close(again, ours)
    assert loaded.frame(50, 30) == decoder.frame(50, 30)


@pytest.mark.parametrize("name", ["sam_hq", "sam2"])
def test_build_and_load_lens_through_local_directories(name, tmp_path):
    """``DecoderConfig.name`` picks the decoder class that ``build_lens`` / ``load_lens`` load, offline."""
    from lens.weights import build_lens, load_lens

    llava, processor = build_llava(TEST_WORDS, seed=0)
    llava.save_pretrained(tmp_path / "mllm")
    processor.save_pretrained(tmp_path / "mllm")
    decoder = make(name)
    decoder.sam.save_pretrained(tmp_path / name)
    decoder.processor.save_pretrained(tmp_path / name)
    config = LensConfig()
    config.backbone.model_id, config.backbone.layer, config.backbone.dtype = (
        str(tmp_path / "mllm"),
        2,
        "float32",
    )
    config.decoder.name, config.decoder.model_id = name, str(tmp_path / name)
    config.descriptor.num_heads = 4
    model = build_lens(config).eval()
    assert type(model.decoder) is DECODERS[name]
    save_lens_weights(model, tmp_path / "ckpt")
    loaded = load_lens(tmp_path / "ckpt").eval()
    image = random_image(40, 60, 5)
    a, b = model.predict(image, "segment the ring"), loaded.predict(image, "segment the ring")
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.mask.shape == (40, 60)


@pytest.mark.parametrize("name", ["sam_hq", "sam2"])
def test_cached_tuple_embeddings_give_the_same_outputs(name, tmp_path):
    from lens.batches import lens_inputs
    from lens.cache import CachedDataset, CacheKey, build_cache, stack_cached
    from lens.data.loader import QueryDataset
    from lens.data.types import Sample

    model = make_lens_with(name).eval()
    masks = lens_masks()
    items = [
        [Sample(np.asarray(im), text, mask, source="toy", name=f"s{i}")]
        for i, (im, text, mask) in enumerate(zip(LENS_IMAGES, LENS_TEXTS, masks, strict=True))
    ]
    dataset = QueryDataset(items, "toy", train=True, seed=3)
    key = CacheKey.from_config(model.config, "toy", "train", train=True, seed=3)
    build_cache(model, dataset, tmp_path, key, shard_size=1, batch_size=2)
    rows = [row for i in range(2) for row in CachedDataset(tmp_path, key).rows(i)]
    cached = stack_cached(rows)
    direct = lens_inputs(model, [row for i in range(2) for row in dataset.rows(i)])
    assert isinstance(cached.decoder_embeddings, tuple)
    for got, want in zip(cached.decoder_embeddings, direct.decoder_embeddings, strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        for x, y in zip(model(cached).mask_logits, model(direct).mask_logits, strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
