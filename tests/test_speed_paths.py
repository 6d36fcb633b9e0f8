"""The speed paths (docs/performance.md): each must give the eager / float32 / serial path's numbers."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from lens.decoders import SamDecoder, load_decoder
from lens.decoders.base import set_image_encoder_attention
from lens.tiny import build_sam
from lens.tiny_decoders import build_sam_hq


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """HF initialises SAM's relative-position tables to zero, which would hide the attention bias: fill them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def _attention_classes(decoder: SamDecoder) -> set[str]:
    return {type(layer.attn).__name__ for layer in decoder.sam.vision_encoder.layers}


@pytest.mark.parametrize("build", [build_sam, build_sam_hq], ids=["sam", "sam_hq"])
def test_sdpa_image_encoder_equals_eager(build):
    model, processor = build()
    decoder = SamDecoder(_randomised(model), processor) if build is build_sam else None
    if decoder is None:
        from lens.decoders import SamHQDecoder

        decoder = SamHQDecoder(_randomised(model), processor)
    images = [_image(0), _image(1)]
    set_image_encoder_attention(decoder.sam, "eager")
    assert all(name.endswith("VisionAttention") for name in _attention_classes(decoder))
    eager = decoder.embed_images(images)
    decoder.configure_image_encoder(attention="sdpa")
    assert all("Sdpa" in name for name in _attention_classes(decoder))
    sdpa = decoder.embed_images(images)
    for a, b in zip(eager if isinstance(eager, tuple) else (eager,), sdpa if isinstance(sdpa, tuple) else (sdpa,)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_bfloat16_image_encoder_within_bfloat16_tolerance():
    model, processor = build_sam()
    decoder = SamDecoder(_randomised(model), processor)
    images = [_image(2)]
    reference = decoder.embed_images(images)  # float32, SDPA
    decoder.configure_image_encoder(attention="sdpa", dtype=torch.bfloat16)
    assert decoder.sam.vision_encoder.patch_embed.projection.weight.dtype == torch.bfloat16
    assert decoder.dtype == torch.float32  # the mask decoder stays as it was
    fast = decoder.embed_images(images)
    assert fast.dtype == torch.float32  # embeddings enter the decoder in its own dtype
    scale = reference.abs().max()
    # bf16 keeps 8 mantissa bits (relative step 2^-8); a few roundings per block over 2 blocks.
    assert float((fast - reference).abs().max() / scale) < 0.05
    assert not torch.equal(fast, reference)  # it did run in bf16


def test_sam2_refuses_a_separate_encoder_dtype():
    from lens.decoders import Sam2Decoder
    from lens.tiny_decoders import build_sam2

    decoder = Sam2Decoder(*build_sam2())
    with pytest.raises(ValueError, match="sam2"):
        decoder.configure_image_encoder(dtype=torch.bfloat16)


def test_unknown_attention_is_refused():
    decoder = SamDecoder(*build_sam())
    with pytest.raises(ValueError, match="'eager' or 'sdpa'"):
        decoder.configure_image_encoder(attention="flash")


def test_load_decoder_applies_the_config(tmp_path):
    from lens.config import DecoderConfig

    model, processor = build_sam()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = DecoderConfig(model_id=str(tmp_path), attn_implementation="eager", image_encoder_dtype="bfloat16")
    decoder = load_decoder(config)
    assert _attention_classes(decoder) == {"SamVisionAttention"}
    assert decoder.sam.vision_encoder.patch_embed.projection.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_image_encoder_equals_eager():
    model, processor = build_sam()
    decoder = SamDecoder(_randomised(model), processor)
    images = [_image(3)]
    reference = decoder.embed_images(images)
    decoder.configure_image_encoder(compile=True)
    try:
        compiled = decoder.embed_images(images)
    except Exception as error:  # no C compiler / inductor backend on this machine
        pytest.skip(f"torch.compile unavailable here: {type(error).__name__}: {str(error)[:120]}")
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5)
