"""Checks every backbone adapter must pass, run by tests/test_backbone_<family>.py on tiny random models.

References are the transformers model itself (its ``hidden_states[k]``, the inputs it feeds its decoder, the
position ids its rotary embedding receives) and pixel content: ``paint_ramp`` colours each original pixel by
its own (x, y), and ``colour_vision`` swaps the vision tower for one that emits each patch's mean colour, so
the feature the model scatters into a grid cell's token says where on the original image that cell is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lens.backbone.hf import HFBackbone

PROMPTS = ["segment the red ring", "what colour is the square ?", "where is the ring"]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def paint_ramp(width: int, height: int) -> Image.Image:
    """R = 255 * (x + 0.5) / W and G = 255 * (y + 0.5) / H at pixel centre (x + 0.5, y + 0.5); B = 255."""
    x = (np.arange(width) + 0.5) / width * 255
    y = (np.arange(height) + 0.5) / height * 255
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.full((1, 1), 255.0)), -1)
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def decode_ramp(rgb: Tensor, width: int, height: int) -> Tensor:
    """(..., >=2) de-normalised colour in [0, 255] -> (..., 2) original-pixel (x, y) the ramp put there."""
    return torch.stack([rgb[..., 0] / 255 * width, rgb[..., 1] / 255 * height], -1)


def full_forward(backbone: HFBackbone, images: Sequence[Image.Image], texts: Sequence[str]) -> dict:
    """The untouched model on the adapter's inputs: all hidden states, the embeddings its decoder got and
    the position ids its rotary embedding got (nothing passed but the processor's outputs)."""
    inputs = backbone._inputs(images, texts)
    seen: dict = {}
    lm = backbone.model.model.language_model

    def grab_embeds(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    def grab_positions(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["position_ids"] = (args[1] if len(args) > 1 else kwargs["position_ids"]).detach().clone()

    layer_inputs: list[Tensor] = []

    def grab_layer_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        layer_inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [
        lm.register_forward_pre_hook(grab_embeds, with_kwargs=True),
        lm.rotary_emb.register_forward_pre_hook(grab_positions, with_kwargs=True),
        *(layer.register_forward_pre_hook(grab_layer_input, with_kwargs=True) for layer in lm.layers),
    ]
    try:
        with torch.inference_mode():
            out = backbone.model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {
        **seen,
        "hidden_states": out.hidden_states,  # [k]: output of decoder layer k
        "layer_inputs": layer_inputs,  # [k]: input of decoder layer k + 1 (0-based k)
        "logits": out.logits,
        "inputs": inputs,
    }


def residual_after(backbone: HFBackbone, full: dict, k: int) -> Tensor:
    """The full model's residual stream after layer k: layer k + 1's input where the family taps that."""
    if backbone.tap_next_input and k < len(full["layer_inputs"]):
        return full["layer_inputs"][k]
    return full["hidden_states"][k]


def check_early_exit(backbone: HFBackbone, images: Sequence[Image.Image], texts: Sequence[str]) -> None:
    """Early-exit states equal the full model's hidden_states[k] (or layer k + 1's input, where the family
    taps that) on every real token; positions are the model's own."""
    features = backbone.encode(images, texts)
    full = full_forward(backbone, images, texts)
    mask = features.attention_mask
    reference = residual_after(backbone, full, backbone.layer)  # (B, L, d)
    torch.testing.assert_close(features.hidden_states[mask], reference[mask], rtol=1e-5, atol=1e-5)
    positions = full["position_ids"]
    if positions.dim() == 3 and features.position_ids.dim() == 2:
        positions = positions[0]
    expected = positions.expand_as(features.position_ids)
    # padding positions are arbitrary; real tokens must agree exactly
    real = mask if expected.dim() == 2 else mask.expand(expected.shape[0], -1, -1)
    assert torch.equal(features.position_ids[real], expected[real])


def check_scattered_features(
    backbone: HFBackbone, images: Sequence[Image.Image], texts: Sequence[str]
) -> None:
    """image_positions are image-placeholder tokens holding vision features; text tokens hold none; the
    prompts' other image tokens (base view, newlines, thumbnail) are outside both."""
    features = backbone.encode(images, texts)
    full = full_forward(backbone, images, texts)
    input_ids = full["inputs"]["input_ids"]
    embeds = full["inputs_embeds"]  # (B, L, d) what the decoder got
    plain = backbone.model.get_input_embeddings()(input_ids)  # token embeddings, no vision features
    for b in range(len(images)):
        gh, gw = features.grid_sizes[b].tolist()
        cells = features.image_positions[b, : gh * gw]
        assert (features.image_positions[b, gh * gw :] == -1).all()
        assert len(set(cells.tolist())) == gh * gw
        assert (input_ids[b, cells] == backbone.image_token_id).all()
        assert not torch.allclose(embeds[b, cells], plain[b, cells])  # vision features were scattered there
        start, end = features.text_span[b].tolist()
        assert cells.max() < start and end == int(features.attention_mask[b].sum())
        assert (input_ids[b, start:end] != backbone.image_token_id).all()
        assert features.answer_index[b] == end - 1


@contextmanager
def colour_vision(
    backbone: HFBackbone, install: Callable[[HFBackbone], Callable[[], None]]
) -> Iterator[None]:
    """Run ``install`` (which swaps the family's vision modules for colour-emitting ones and returns an undo)."""
    undo = install(backbone)
    try:
        yield
    finally:
        undo()


def patch_colours(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(..., 3, h, w) normalised pixels -> (..., 3) mean colour in [0, 255]."""
    m = torch.tensor(mean, dtype=pixels.dtype)
    s = torch.tensor(std, dtype=pixels.dtype)
    return (pixels.mean((-1, -2)) * s + m) * 255


def embed_colour(colour: Tensor, width: int) -> Tensor:
    """(..., 3) -> (..., width): the colour in the first three channels (what the stub projector emits)."""
    return F.pad(colour, (0, width - colour.shape[-1]))


def check_cells_see_their_pixels(
    backbone: HFBackbone,
    install: Callable[[HFBackbone], Callable[[], None]],
    sizes: Sequence[tuple[int, int]],
    tolerance: float,
) -> None:
    """With a colour-emitting vision tower, the feature in grid cell n's token decodes (through the ramp) to
    the original pixel the frame puts cell n's centre at, for every cell that lies inside the image."""
    images = [paint_ramp(w, h) for w, h in sizes]
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    features = backbone.encode(images, texts)
    with colour_vision(backbone, install):
        embeds = full_forward(backbone, images, texts)["inputs_embeds"]
    for b, (w, h) in enumerate(sizes):
        frame = features.geometries[b].grid
        gh, gw = frame.grid_h, frame.grid_w
        assert features.grid_sizes[b].tolist() == [gh, gw]
        cells = features.image_positions[b, : gh * gw]
        seen = decode_ramp(embeds[b, cells, :3].float(), w, h).view(gh, gw, 2)
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        centres = frame.grid_to_image(torch.stack([xs, ys], -1).float())  # (gh, gw, 2)
        # cells whose footprint is on the image (the others hold padding colour)
        half = torch.tensor([frame.cell_w, frame.cell_h]) / 2
        inside = ((centres - half >= -1e-3) & (centres + half <= torch.tensor([w, h]) + 1e-3)).all(-1)
        assert inside.sum() >= max(1, gh * gw // 3), f"too few cells on the {w}x{h} image"
        error = (seen - centres).abs()[inside].max()
        print(f"{w}x{h} grid {gh}x{gw}: max error {error:.3f} px")
        assert error <= tolerance, f"{w}x{h}: a cell's pixels are {error:.2f} px from where its frame puts it"


def check_round_trip(frame_of: Callable[[int, int], object], sizes: Sequence[tuple[int, int]]) -> None:
    """original -> grid -> original is the identity, and the grid covers the whole image."""
    for w, h in sizes:
        frame = frame_of(w, h)
        points = torch.rand(64, 2, generator=torch.Generator().manual_seed(w * h)) * torch.tensor([w, h])
        torch.testing.assert_close(frame.grid_to_image(frame.image_to_grid(points)), points)
        # the grid's extent covers the image to within one cell (unpadding rounds to whole cells)
        x0, y0 = frame.origin_x, frame.origin_y
        x1, y1 = x0 + frame.grid_w * frame.cell_w, y0 + frame.grid_h * frame.cell_h
        assert x0 <= frame.cell_w and y0 <= frame.cell_h
        assert x1 >= w - frame.cell_w and y1 >= h - frame.cell_h
        assert frame.valid_cells().all() or x0 < 0 or y0 < 0 or x1 > w or y1 > h


def box_mask(width: int, height: int, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def check_train_and_predict(backbone: HFBackbone) -> None:
    """One training step and ``predict`` through the shared head / keypoints / descriptor / SAM code, on a
    batch whose two images have different grids; the frozen MLLM's logits are bit-identical afterwards."""
    from lens.config import LensConfig
    from lens.decoders import SamDecoder
    from lens.model import LensModel
    from lens.tiny import build_sam

    images = [random_image(40, 24, seed=0), random_image(24, 56, seed=1)]
    masks = [box_mask(40, 24, 5, 4, 30, 20), box_mask(24, 56, 0, 10, 24, 40)]
    probe = [random_image(33, 47, seed=2)], PROMPTS[:1]
    logits_before = full_forward(backbone, *probe)["logits"]
    state_before = {k: v.clone() for k, v in backbone.model.state_dict().items()}

    config = LensConfig()
    config.backbone.layer = backbone.layer
    config.descriptor.num_heads = 4
    sam, sam_processor = build_sam()
    torch.manual_seed(0)
    lens = LensModel(config, backbone, SamDecoder(sam, sam_processor))
    optimizer = torch.optim.AdamW([p for p in lens.parameters() if p.requires_grad], lr=1e-2)
    lens.train()
    out = lens(lens.prepare(images, PROMPTS[:2], masks))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    features = backbone.encode(images, PROMPTS[:2])
    gh, gw = features.max_grid
    assert out.attention_map.shape == (2, gh, gw)
    assert [tuple(m.shape) for m in out.mask_logits] == [(24, 40), (56, 24)]

    prediction = lens.predict(images[1], PROMPTS[0])
    assert prediction.mask.shape == (56, 24) and prediction.mask.dtype == bool
    points = torch.as_tensor(prediction.keypoints)
    assert len(points) >= 1
    assert (points >= 0).all() and (points[:, 0] <= 24).all() and (points[:, 1] <= 56).all()
    again = lens.predict(lens.embed_image(images[1]), PROMPTS[0])  # embed once, query many
    np.testing.assert_array_equal(again.mask, prediction.mask)
    np.testing.assert_allclose(again.attention_map, prediction.attention_map, atol=1e-6)

    assert not backbone.model.training
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    assert torch.equal(full_forward(backbone, *probe)["logits"], logits_before)


def check_head_mirrors_next_layer(
    backbone: HFBackbone, images: Sequence[Image.Image], texts: Sequence[str]
) -> None:
    """A head layer built from ``layer_spec`` and loaded with ``decoder_layer_state(k + 1)``, run on the
    tapped states with the tapped position ids, reproduces the model's own layer k + 1: the head mirrors
    the family's RoPE kind, biases and q/k norm exactly."""
    from lens.head import HeadLayer, causal_mask, rotary

    features = backbone.encode(images, texts)
    full = full_forward(backbone, images, texts)
    spec = backbone.layer_spec()
    layer = HeadLayer(spec)
    layer.load_state_dict(backbone.decoder_layer_state(backbone.layer + 1))
    x = features.hidden_states
    rope = rotary(features.position_ids, spec.head_dim, spec.rope, x.dtype)
    with torch.no_grad():
        out, _, _ = layer(x, rope, causal_mask(features.attention_mask, x.dtype))
    mask = features.attention_mask
    reference = full["hidden_states"][backbone.layer + 1]
    torch.testing.assert_close(out[mask], reference[mask], rtol=1e-4, atol=1e-4)


def check_grid_frame_matches_encode(backbone: HFBackbone, sizes: Sequence[tuple[int, int]]) -> None:
    """``grid_frame`` (no model run, what ``embed_image`` uses) is the frame ``encode`` reports, for every size."""
    for w, h in sizes:
        encoded = backbone.encode([random_image(w, h)], PROMPTS[:1]).geometries[0].grid
        assert backbone.grid_frame(w, h) == encoded, f"{w}x{h}"


def check_repeated_images(backbone: HFBackbone) -> None:
    """Prompts that repeat an image (the vision tower then runs once per distinct image) give what the full
    model gives on the same prompts."""
    a, b = random_image(40, 24, seed=0), random_image(24, 56, seed=1)
    check_early_exit(backbone, [a, b, a], PROMPTS)
    features = backbone.encode([a, b, a], PROMPTS)
    assert features.image_index.tolist() == [0, 1, 0]


def check_from_pretrained(backbone: HFBackbone, directory: str) -> None:
    """``from_pretrained`` on a saved copy (the hub path, offline) gives the same features."""
    backbone.model.save_pretrained(directory)
    backbone.processor.save_pretrained(directory)
    loaded = type(backbone).from_pretrained(directory, layer=backbone.layer, dtype=torch.float32)
    images = [random_image(40, 24, seed=0), random_image(24, 56, seed=1)]
    ours, theirs = backbone.encode(images, PROMPTS[:2]), loaded.encode(images, PROMPTS[:2])
    assert torch.equal(ours.hidden_states, theirs.hidden_states)
    assert torch.equal(ours.image_positions, theirs.image_positions)
    assert ours.geometries == theirs.geometries


def check_prefix_sharing(backbone: HFBackbone) -> None:
    """Prompts on one image: with the template + image run once (computed in ``encode`` or from
    ``encode_prefix``) the states equal the full model's on every prompt; a prefix of another image is refused."""
    a, b = random_image(40, 24, seed=0), random_image(24, 56, seed=1)
    check_early_exit(backbone, [a, a, a], PROMPTS)  # one image, three prompts: shared inside encode
    plain = backbone.encode([a, a, a], PROMPTS)
    prefix = backbone.encode_prefix(a)
    if not backbone.shares_prefix:
        assert prefix is None and plain.shared_length == 0
        return
    assert 0 < plain.shared_length <= int(plain.text_span[:, 0].min())
    shared = backbone.encode([a, a, a], PROMPTS, prefix=prefix)
    assert shared.shared_length == plain.shared_length == len(prefix.input_ids)
    mask = plain.attention_mask
    torch.testing.assert_close(shared.hidden_states[mask], plain.hidden_states[mask], rtol=1e-5, atol=1e-5)
    for name in ("position_ids", "image_positions", "grid_sizes", "text_span"):
        assert torch.equal(getattr(shared, name), getattr(plain, name)), name
    # a prefix whose tokens the prompts do not start with (a tokenizer merging across the boundary) is skipped
    other = dataclasses.replace(prefix, input_ids=prefix.input_ids.flip(0))
    whole = backbone.encode([a, a, a], PROMPTS, prefix=other)
    assert whole.shared_length == 0
    torch.testing.assert_close(whole.hidden_states[mask], plain.hidden_states[mask], rtol=1e-5, atol=1e-5)
    try:
        backbone.encode([b], PROMPTS[:1], prefix=prefix)
    except ValueError as error:
        assert "prefix" in str(error)
    else:
        raise AssertionError("a prefix of another image was accepted")
