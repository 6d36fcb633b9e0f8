import pytest
import torch

from conftest import TINY_LAYER, random_image
from lens.backbone import LlavaBackbone, unique_images
from lens.tiny import TEST_WORDS, build_llava


@pytest.fixture
def backbone(tiny_models):
    llava, processor, _, _ = tiny_models
    return LlavaBackbone(llava, processor, layer=TINY_LAYER)


def test_runs_exactly_k_layers_and_matches_full_model(backbone):
    calls = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
        for i, layer in enumerate(backbone.decoder_layers)
    ]
    images = [random_image(40, 60, 0), random_image(30, 30, 1)]
    texts = ["segment the red ring", "what colour is the square in this image ?"]
    features = backbone.encode(images, texts)
    for h in hooks:
        h.remove()
    assert calls == list(range(TINY_LAYER))  # layers k+1.. never ran
    inputs = backbone._inputs(images, texts)
    with torch.no_grad():
        full = backbone.model(**inputs, output_hidden_states=True)
    mask = features.attention_mask
    torch.testing.assert_close(
        features.hidden_states[mask], full.hidden_states[TINY_LAYER][mask], rtol=0, atol=0
    )


def test_unique_images_compares_content():
    a, b = random_image(20, 30, 0), random_image(20, 30, 1)
    unique, index = unique_images([a, b, a.copy(), b, a.convert("L")])
    assert index.tolist() == [0, 1, 0, 1, 2] and unique[:2] == [a, b] and unique[2].mode == "L"


def test_image_and_prompt_start_run_once_per_distinct_image(backbone):
    seen, rows = [], []
    hooks = [
        backbone.model.model.vision_tower.register_forward_hook(lambda m, a, o: seen.append(len(a[0]))),
        backbone.decoder_layers[0].register_forward_hook(lambda m, a, o: rows.append(a[0].shape[:2])),
    ]
    images = [random_image(40, 60, 0), random_image(30, 30, 1)]
    images.append(images[0].copy())  # a second query on the first image, as in a training batch
    texts = ["segment the red ring", "what colour is the square ?", "segment the square"]
    features = backbone.encode(images, texts)
    for hook in hooks:
        hook.remove()
    assert seen == [2]
    # The shared prompt start (template + image) ran once per image, the rest once per prompt.
    (images_run, shared), (prompts_run, rest) = rows
    assert (images_run, prompts_run) == (2, 3) and shared >= backbone.grid_size[0] * backbone.grid_size[1]
    assert shared + rest == features.hidden_states.shape[1]
    with torch.no_grad():  # reference: Hugging Face's own forward, vision tower on all three images
        full = backbone.model(**backbone._inputs(images, texts), output_hidden_states=True)
    mask = features.attention_mask
    torch.testing.assert_close(
        features.hidden_states[mask], full.hidden_states[TINY_LAYER][mask], rtol=1e-6, atol=1e-6
    )


def test_spans_and_answer_index(backbone):
    tok = backbone.processor.tokenizer
    texts = ["segment the ring", "what is the colour of the red square in this image ?"]
    f = backbone.encode([random_image(20, 40), random_image(40, 20)], texts)
    assert f.grid_sizes.tolist() == [[6, 6], [6, 6]]
    image_token = backbone.model.config.image_token_id
    ids = backbone._inputs([random_image(20, 40), random_image(40, 20)], texts)["input_ids"]
    for b in range(2):  # every image token is a grid cell, row-major, and the text starts after the last one
        assert torch.equal(f.image_positions[b], (ids[b] == image_token).nonzero()[:, 0])
    assert (f.text_span[:, 0] == f.image_positions[:, -1] + 1).all()
    for b, text in enumerate(texts):
        n_real = int(f.attention_mask[b].sum())
        assert int(f.answer_index[b]) == n_real - 1
        # The prompt ends with the assistant marker of the model's own chat template.
        prompt = backbone._prompts([text])[0]
        assert prompt.endswith("assistant:")
        last_tokens = tok(prompt)["input_ids"][-2:]
        assert tok.convert_ids_to_tokens(last_tokens) == ["assistant", ":"]
    # The shorter prompt is right-padded.
    assert not f.attention_mask[0, -1] and f.attention_mask[1, -1]
    # Geometry of each image is recorded.
    assert (f.geometries[0].width, f.geometries[0].height) == (40, 20)


def test_pads_instead_of_cropping():
    import numpy as np
    from PIL import Image

    llava, processor = build_llava(TEST_WORDS)
    processor.image_processor.do_pad = False
    processor.image_processor.do_center_crop = True
    backbone = LlavaBackbone(llava, processor, layer=1)
    # A wide image whose left and right thirds are white: a centre crop would show none of it.
    array = np.zeros((16, 48, 3), np.uint8)
    array[:, :16] = 255
    array[:, 32:] = 255
    pixels = backbone._inputs([Image.fromarray(array)], ["x"])["pixel_values"][0]
    side = pixels.shape[-1]
    column_means = pixels.float().mean(dim=(0, 1))
    assert column_means[: side // 6].mean() > column_means[side // 2]  # white edges survived


def test_frozen_and_eval(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.model.training


def test_layer_out_of_range(tiny_models):
    llava, processor, _, _ = tiny_models
    with pytest.raises(ValueError, match="layer must be in"):
        LlavaBackbone(llava, processor, layer=99)


def test_mismatched_batch(backbone):
    with pytest.raises(ValueError, match="1 images but 2 instructions"):
        backbone.encode([random_image(8, 8)], ["a", "b"])
