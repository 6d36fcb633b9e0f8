"""Qwen2.5-VL and Qwen3-VL adapters on tiny random models (lens.tiny_families)."""

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
    random_image,
)
from lens.backbone import BACKBONES
from lens.backbone.qwen_vl import Qwen2_5_VLBackbone, Qwen3VLBackbone
from lens.tiny_families import build_qwen2_5_vl, build_qwen3_vl

FAMILIES = {
    "qwen2_5_vl": (Qwen2_5_VLBackbone, build_qwen2_5_vl),
    "qwen3_vl": (Qwen3VLBackbone, build_qwen3_vl),
}
# (width, height): square, wide, tall, sizes that smart_resize rounds, and one it scales up (min pixels)
SIZES = [(32, 32), (40, 24), (24, 56), (33, 47), (64, 16), (10, 12)]


@pytest.fixture(params=sorted(FAMILIES))
def backbone(request) -> Qwen2_5_VLBackbone:
    cls, build = FAMILIES[request.param]
    model, processor = build()
    return cls(model, processor, layer=2)


def test_registered():
    assert BACKBONES["qwen2_5_vl"] is Qwen2_5_VLBackbone
    assert BACKBONES["qwen3_vl"] is Qwen3VLBackbone


def test_default_layer_is_the_fraction_of_depth(backbone):
    model, processor = backbone.model, backbone.processor
    assert type(backbone)(model, processor).layer == 2  # round(14 / 32 * 4)


def test_early_exit_equals_full_model_on_a_batch_mixing_grid_sizes(backbone):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:3])]
    check_early_exit(backbone, images, PROMPTS)
    features = backbone.encode(images, PROMPTS)
    assert features.position_ids.shape == (3, 3, features.hidden_states.shape[1])  # (3, B, L) mrope ids
    assert features.grid_sizes.tolist() == [[4, 4], [3, 5], [7, 3]]
    assert features.shared_length == 0


def test_deepstack_is_in_the_tapped_states():
    """Qwen3-VL adds deepstack features to the visual tokens after its layers 1 and 2 (tiny config): at k = 2
    the tapped states are layer 2's output plus them (= layer 3's input), and differ from a run without them;
    at k = 3, past the deepstack layers, they are plain hidden_states[3]."""
    model, processor = build_qwen3_vl()
    backbone = Qwen3VLBackbone(model, processor, layer=2)
    images, texts = [random_image(40, 24)], PROMPTS[:1]
    with_deepstack = backbone.encode(images, texts).hidden_states
    full = full_forward(backbone, images, texts)
    torch.testing.assert_close(with_deepstack, full["layer_inputs"][2])
    visual = full["inputs"]["input_ids"] == backbone.image_token_id  # (1, L)
    assert not torch.allclose(with_deepstack[visual], full["hidden_states"][2][visual])
    torch.testing.assert_close(with_deepstack[~visual], full["hidden_states"][2][~visual])
    later = Qwen3VLBackbone(model, processor, layer=3).encode(images, texts).hidden_states
    torch.testing.assert_close(later, full["hidden_states"][3])
    lm = model.model.language_model

    def drop(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
        return args, {**kwargs, "deepstack_visual_embeds": None}

    handle = lm.register_forward_pre_hook(drop, with_kwargs=True)
    try:
        without = backbone.encode(images, texts).hidden_states
    finally:
        handle.remove()
    assert not torch.allclose(with_deepstack, without)


def test_image_positions_hold_the_scattered_vision_features(backbone):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:3])]
    check_scattered_features(backbone, images, PROMPTS)


def _colour_visual(backbone: Qwen2_5_VLBackbone) -> Callable[[], None]:
    """Swap the vision tower for one whose merged token n is the mean colour of its 2x2 patches."""
    model = backbone.model.model
    original = model.visual
    ip = backbone.processor.image_processor
    width = backbone.text_config(backbone.model).hidden_size
    merge = original.spatial_merge_size

    class Colour(nn.Module):
        spatial_merge_size = merge
        dtype = torch.float32

        def forward(self, pixel_values: Tensor, grid_thw: Tensor, **_: object) -> BaseModelOutputWithPooling:
            patches = pixel_values.view(len(pixel_values), 3, -1)  # (n, C, T * p * p)
            mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
            colour = (patches.mean(-1) * std + mean) * 255  # (n, 3)
            merged = colour.view(-1, merge * merge, 3).mean(1)  # consecutive m*m patches form a token
            out = BaseModelOutputWithPooling(pooler_output=embed_colour(merged, width))
            out.deepstack_features = []
            return out

    model.visual = Colour()

    def undo() -> None:
        model.visual = original

    return undo


def test_each_cell_token_sees_the_pixels_its_frame_names(backbone):
    # a mark at every cell: the resized image's (x, y) ramp, read back through the model's own token scatter
    check_cells_see_their_pixels(backbone, _colour_visual, SIZES[:5], tolerance=0.3)


def test_frames_round_trip_and_match_the_processor(backbone):
    def frame_of(w: int, h: int):  # noqa: ANN202
        return backbone.encode([random_image(w, h)], PROMPTS[:1]).geometries[0].grid

    check_round_trip(frame_of, SIZES)


def test_position_ids_are_the_models_on_a_wide_image(backbone):
    """Text after a 3x5-cell image resumes at 1 + max(grid) in all three axes, as Qwen's get_rope_index."""
    features = backbone.encode([random_image(40, 24)], PROMPTS[:1])
    full = full_forward(backbone, [random_image(40, 24)], PROMPTS[:1])
    cells = features.image_positions[0]
    start = int(cells[0])
    t, h, w = (features.position_ids[i, 0, cells] - start for i in range(3))
    assert t.unique().tolist() == [0]
    assert h.view(3, 5)[:, 0].tolist() == [0, 1, 2] and w.view(3, 5)[0].tolist() == [0, 1, 2, 3, 4]
    after = int(features.text_span[0, 0])
    assert features.position_ids[:, 0, after].tolist() == [start + 5] * 3
    assert torch.equal(features.position_ids[:, 0], full["position_ids"][:, 0])


def test_layer_spec_mirrors_the_decoder_layer(backbone):
    spec = backbone.layer_spec()
    qwen3 = isinstance(backbone, Qwen3VLBackbone)
    assert spec.rope.kind == ("mrope_interleaved" if qwen3 else "mrope")
    assert spec.rope.sections == (2, 3, 3)
    assert (spec.q_bias, spec.k_bias, spec.v_bias, spec.o_bias) == (
        (False,) * 4 if qwen3 else (True,) * 3 + (False,)
    )
    assert spec.qk_norm is qwen3
    state = backbone.decoder_layer_state(3)
    assert ("self_attn.q_norm.weight" in state) is qwen3
    assert ("self_attn.q_proj.bias" in state) is not qwen3
    assert "self_attn.o_proj.bias" not in state
    torch.testing.assert_close(state["mlp.down_proj.weight"], backbone.decoder_layers[2].mlp.down_proj.weight)


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
