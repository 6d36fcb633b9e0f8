"""LLaVA-NeXT and LLaVA-OneVision adapters on tiny random models (lens.tiny_families)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from backbone_checks import (
    PROMPTS,
    check_cells_see_their_pixels,
    check_early_exit,
    check_from_pretrained,
    check_grid_frame_matches_encode,
    check_head_mirrors_next_layer,
    check_prefix_sharing,
    check_repeated_images,
    check_round_trip,
    check_scattered_features,
    check_train_and_predict,
    embed_colour,
    full_forward,
    patch_colours,
    random_image,
)
from lens.backbone import BACKBONES
from lens.backbone.llava_next import LlavaNextBackbone, LlavaOnevisionBackbone, anyres_frame
from lens.tiny_families import TINY_PINPOINTS, build_llava_next, build_llava_onevision

FAMILIES = {
    "llava_next": (LlavaNextBackbone, build_llava_next),
    "llava_onevision": (LlavaOnevisionBackbone, build_llava_onevision),
}
# (width, height): square, wide, tall, extreme, odd sizes that unpadding rounds
SIZES = [(32, 32), (40, 24), (24, 56), (33, 47), (90, 20), (17, 61), (48, 32)]


@pytest.fixture(params=sorted(FAMILIES))
def backbone(request) -> LlavaNextBackbone:
    cls, build = FAMILIES[request.param]
    model, processor = build()
    return cls(model, processor, layer=2)


def test_registered():
    assert BACKBONES["llava_next"] is LlavaNextBackbone
    assert BACKBONES["llava_onevision"] is LlavaOnevisionBackbone


def test_default_layer_is_the_fraction_of_depth(backbone):
    assert type(backbone)(backbone.model, backbone.processor).layer == 2  # round(14 / 32 * 4)


def test_early_exit_equals_full_model_on_a_batch_mixing_grid_sizes(backbone):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[1:4])]
    check_early_exit(backbone, images, PROMPTS)
    features = backbone.encode(images, PROMPTS)
    assert len(set(map(tuple, features.grid_sizes.tolist()))) == 3
    assert features.position_ids.shape == features.attention_mask.shape


def test_image_positions_hold_the_vision_features_not_the_newlines(backbone):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[1:4])]
    check_scattered_features(backbone, images, PROMPTS)
    features = backbone.encode(images, PROMPTS)
    embeds = full_forward(backbone, images, PROMPTS)["inputs_embeds"]
    newline = backbone.model.model.image_newline
    for b in range(len(images)):
        gh, gw = features.grid_sizes[b].tolist()
        cells = features.image_positions[b, : gh * gw].view(gh, gw)
        # the token right after each row's last cell is that row's newline; none is a cell
        torch.testing.assert_close(embeds[b, cells[:, -1] + 1], newline.expand(gh, -1))
        assert not torch.isin(cells[:, -1] + 1, cells).any()


def _colour_tower(backbone: LlavaNextBackbone) -> Callable[[], None]:
    """Swap the vision tower and projector for ones that give each patch's mean colour."""
    model = backbone.model.model
    tower, projector = model.vision_tower, model.multi_modal_projector
    ip = backbone.processor.image_processor
    patch = backbone.model.config.vision_config.patch_size
    width = backbone.text_config(backbone.model).hidden_size
    cls_token = backbone.model.config.vision_feature_select_strategy == "default"

    class Tower(nn.Module):
        def forward(self, pixel_values: Tensor, **_: object) -> BaseModelOutputWithPooling:
            n, c, h, w = pixel_values.shape
            h, w = h // patch * patch, w // patch * patch  # a strided patch conv never sees the remainder
            pixel_values = pixel_values[..., :h, :w]
            tiles = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
            colour = patch_colours(tiles, ip.image_mean, ip.image_std).flatten(1, 2)  # (n, cells, 3)
            if cls_token:
                colour = torch.cat([colour[:, :1], colour], 1)
            return BaseModelOutputWithPooling(last_hidden_state=colour, hidden_states=(colour,) * 4)

    class Projector(nn.Module):
        def forward(self, features: Tensor) -> Tensor:
            return embed_colour(features, width)

    model.vision_tower, model.multi_modal_projector = Tower(), Projector()

    def undo() -> None:
        model.vision_tower, model.multi_modal_projector = tower, projector

    return undo


def test_each_cell_token_sees_the_pixels_its_frame_names(backbone):
    """Through tiling, centred padding, unpadding and (OneVision) nothing else: each grid cell's token holds
    the colour of the original pixels the frame maps that cell to."""
    check_cells_see_their_pixels(backbone, _colour_tower, SIZES, tolerance=0.2)


def test_onevision_shrunk_grids_follow_the_model():
    """anyres_max_1: grids above one tile's worth of cells are bilinearly shrunk; frames follow."""
    model, processor = build_llava_onevision(max_tiles=1)
    backbone = LlavaOnevisionBackbone(model, processor, layer=2)
    features = backbone.encode([random_image(48, 32)], PROMPTS[:1])
    gh, gw = features.grid_sizes[0].tolist()
    assert gh * gw < 8 * 12  # the canvas grid is 8 x 12 cells before shrinking
    check_cells_see_their_pixels(backbone, _colour_tower, [(48, 32), (40, 24), (90, 20)], tolerance=0.2)
    check_early_exit(backbone, [random_image(48, 32)], PROMPTS[:1])


def test_frames_round_trip_and_cover_the_image(backbone):
    vision = backbone.model.config.vision_config
    max_tiles = backbone.max_tiles()

    def frame_of(w: int, h: int):  # noqa: ANN202
        return anyres_frame(w, h, TINY_PINPOINTS, vision.image_size, vision.patch_size, max_tiles)

    check_round_trip(frame_of, SIZES)


def test_frame_of_a_wide_image_by_hand():
    """40 x 24 on the tiny pinpoints: canvas 32 x 48 (h x w) = 8 x 12 cells of 4 px; resized to 48 x 29
    (ceil(24 * 1.2)), pasted at y = 1; unpadding keeps round(24 * 12 / 40) = 7 -> (8 - 7) // 2 = 0 rows off."""
    frame = anyres_frame(40, 24, TINY_PINPOINTS, tile=16, patch=4)
    assert (frame.grid_h, frame.grid_w) == (8, 12)
    assert frame.cell_w == pytest.approx(4 * 40 / 48) and frame.cell_h == pytest.approx(4 * 24 / 29)
    assert frame.origin_x == 0 and frame.origin_y == pytest.approx(-1 * 24 / 29)


def test_layer_spec_and_state(backbone):
    spec = backbone.layer_spec()
    assert spec.rope.kind == "default"
    onevision = isinstance(backbone, LlavaOnevisionBackbone)  # Qwen2 LM: q/k/v bias, no o bias
    assert (spec.q_bias, spec.o_bias) == (onevision, False)
    state = backbone.decoder_layer_state(3)
    torch.testing.assert_close(
        state["self_attn.q_proj.weight"], backbone.decoder_layers[2].self_attn.q_proj.weight
    )


def test_generate_answers_in_text(backbone):
    answers = backbone.generate([random_image(40, 24)], PROMPTS[:1], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0]


def test_head_layer_from_the_backbone_reproduces_its_next_layer(backbone):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[1:4])]
    check_head_mirrors_next_layer(backbone, images, PROMPTS)


def test_training_step_and_predict_leave_the_mllm_untouched(backbone):
    check_train_and_predict(backbone)


def test_grid_frame_without_a_model_run_matches_encode(backbone):
    check_grid_frame_matches_encode(backbone, SIZES)


def test_prompts_repeating_an_image_match_the_full_model(backbone):
    check_repeated_images(backbone)


def test_from_pretrained_loads_a_saved_copy(backbone, tmp_path):
    check_from_pretrained(backbone, str(tmp_path))


def test_tiles_their_patches_do_not_cover():
    """18-px tiles of 4-px patches (as SigLIP's 14-px patches on 384-px tiles): 4 cells per tile side, the last
    2 px unseen. The grid matches the model's token count, and each cell's pixels lie within the affine fit's
    bound: at most (tile - side * patch) * (side - 0.5) / side canvas px from the cell's mapped centre."""
    model, processor = build_llava_onevision(tile=18)
    backbone = LlavaOnevisionBackbone(model, processor, layer=2)
    sizes = [(40, 24), (24, 56), (36, 36)]
    check_early_exit(backbone, [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)], PROMPTS)
    bound = (18 - 16) * 3.5 / 4  # 1.75 canvas px; the canvas is at least as large as these images
    check_cells_see_their_pixels(backbone, _colour_tower, sizes, tolerance=bound + 0.2)


def test_prompts_on_one_image_share_its_prefix_where_the_family_allows(backbone):
    check_prefix_sharing(backbone)
