"""InternVL 3 adapter on a tiny random model (lens.tiny_families): 32-px tiles of 4 x 4 cells + thumbnail."""

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
    patch_colours,
    random_image,
)
from lens.backbone import BACKBONES
from lens.backbone.internvl import InternVLBackbone, tiled_cell_order
from lens.tiny_families import build_internvl

# (width, height): one tile (no thumbnail), 2 x 1, 3 x 2, tall 1 x 2, extreme 6 x 1, odd sizes
SIZES = [(32, 32), (64, 32), (40, 24), (24, 56), (200, 30), (33, 47)]


@pytest.fixture
def backbone() -> InternVLBackbone:
    model, processor = build_internvl()
    return InternVLBackbone(model, processor, layer=2)


def test_registered():
    assert BACKBONES["internvl"] is InternVLBackbone


def test_default_layer_is_the_fraction_of_depth(backbone):
    assert InternVLBackbone(backbone.model, backbone.processor).layer == 2  # round(14 / 32 * 4)


def test_early_exit_equals_full_model_on_a_batch_mixing_grid_sizes(backbone):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[1:4])]
    check_early_exit(backbone, images, PROMPTS)
    features = backbone.encode(images, PROMPTS)
    assert features.grid_sizes.tolist() == [[4, 8], [8, 12], [8, 4]]  # (rows, cols) x 4 cells per tile


def test_image_positions_hold_the_vision_features_not_the_thumbnail(backbone):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:3])]
    check_scattered_features(backbone, images, PROMPTS)
    features = backbone.encode(images, PROMPTS)
    ids = backbone._inputs(images, PROMPTS)["input_ids"]
    for b, n_tiles in enumerate([1, 2 + 1, 6 + 1]):
        tokens = backbone.image_tokens(ids[b])[0] if ids.dim() == 1 else backbone.image_tokens(ids)[b]
        assert len(tokens) == 16 * n_tiles
        gh, gw = features.grid_sizes[b].tolist()
        cells = set(features.image_positions[b, : gh * gw].tolist())
        assert cells == set(tokens[: gh * gw].tolist())  # the thumbnail's 16 tokens come last, not cells


def test_tiled_cell_order_by_hand():
    # 1 row x 2 columns of 2 x 2-cell tiles: grid row 0 = tile 0 row 0, tile 1 row 0
    assert tiled_cell_order(1, 2, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


def _colour_tower(backbone: InternVLBackbone) -> Callable[[], None]:
    """Swap the vision tower and projector for ones that give each patch's (then cell's) mean colour."""
    model = backbone.model.model
    tower, projector = model.vision_tower, model.multi_modal_projector
    ip = backbone.processor.image_processor
    patch = backbone.model.config.vision_config.patch_size[0]
    width = backbone.text_config(backbone.model).hidden_size

    class Tower(nn.Module):
        def forward(self, pixel_values: Tensor, **_: object) -> BaseModelOutputWithPooling:
            n, c, h, w = pixel_values.shape
            h, w = h // patch * patch, w // patch * patch  # a strided patch conv never sees the remainder
            pixel_values = pixel_values[..., :h, :w]
            tiles = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
            colour = patch_colours(tiles, ip.image_mean, ip.image_std).flatten(1, 2)  # (n, patches, 3)
            colour = torch.cat([colour[:, :1], colour], 1)  # a CLS token, dropped by the "default" strategy
            return BaseModelOutputWithPooling(last_hidden_state=colour, hidden_states=(colour,) * 3)

    class Projector(nn.Module):
        def forward(self, features: Tensor) -> Tensor:  # (n, cells, 4 * 3): the 2 x 2 shuffled patches
            return embed_colour(features.unflatten(-1, (4, 3)).mean(-2), width)

    model.vision_tower, model.multi_modal_projector = Tower(), Projector()

    def undo() -> None:
        model.vision_tower, model.multi_modal_projector = tower, projector

    return undo


def test_each_cell_token_sees_the_pixels_its_frame_names(backbone):
    check_cells_see_their_pixels(backbone, _colour_tower, SIZES, tolerance=0.3)


def test_frames_round_trip_and_cover_the_image(backbone):
    check_round_trip(lambda w, h: backbone.grid_frame(w, h), SIZES + [(1000, 300), (300, 1000)])


def test_layer_spec_and_state(backbone):
    spec = backbone.layer_spec()
    assert spec.rope.kind == "default"
    assert (spec.q_bias, spec.k_bias, spec.v_bias, spec.o_bias) == (True, True, True, False)  # Qwen2 LM
    state = backbone.decoder_layer_state(2)
    assert "self_attn.q_proj.bias" in state and "self_attn.o_proj.bias" not in state


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


def test_prompts_on_one_image_share_its_prefix_where_the_family_allows(backbone):
    check_prefix_sharing(backbone)
