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
    eager, sdpa = (x if isinstance(x, tuple) else (x,) for x in (eager, sdpa))
    for a, b in zip(eager, sdpa, strict=True):
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
    config = DecoderConfig(
        model_id=str(tmp_path), attn_implementation="eager", image_encoder_dtype="bfloat16"
    )
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


class _FakeStream:
    """Stands in for a CUDA stream on a CPU machine: records the synchronisation calls."""

    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait_stream(self, other: _FakeStream) -> None:
        self.log.append(f"{self.name} waits {other.name}")


def _fake_cuda(monkeypatch) -> list[str]:
    import contextlib

    import lens.model as lens_model

    log: list[str] = []
    current = _FakeStream(log, "current")

    @contextlib.contextmanager
    def on(stream):
        log.append(f"enter {stream.name}")
        yield
        log.append(f"leave {stream.name}")

    monkeypatch.setattr(lens_model, "_use_streams", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream(log, "side"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(f"record {s.name}"))
    return log


def test_alongside_orders_the_streams(monkeypatch):
    from lens.model import _alongside

    log = _fake_cuda(monkeypatch)
    calls = []
    side = lambda: calls.append("side") or (torch.zeros(1), torch.ones(1))  # noqa: E731
    main = lambda: calls.append("main") or "features"  # noqa: E731
    first, second = _alongside(side, main, torch.device("cuda"))
    assert calls == ["side", "main"] and second == "features" and len(first) == 2
    assert log == [
        "side waits current",  # inputs queued before are visible to the side stream
        "enter side",
        "leave side",
        "current waits side",  # nothing reads the embeddings before the side stream is done
        "record current",
        "record current",
    ]


def test_alongside_on_cpu_is_serial():
    from lens.model import _alongside

    calls = []
    out = _alongside(
        lambda: calls.append("side") or 1, lambda: calls.append("main") or 2, torch.device("cpu")
    )
    assert out == (1, 2) and calls == ["side", "main"]


def test_stream_path_gives_the_serial_numbers(tiny_lens, monkeypatch):
    """prepare / predict / embed_image through the two-stream branch (fake streams on CPU) equal the plain path."""
    tiny_lens.eval()
    images = [_image(4), _image(5), _image(4)]
    texts = ["the red ring", "a square", "the blue thing"]
    with torch.inference_mode():
        serial_inputs = tiny_lens.prepare(images, texts)
        serial = tiny_lens(serial_inputs)
    serial_pred = tiny_lens.predict(images[0], texts[0])
    serial_embedded = tiny_lens.predict(tiny_lens.embed_image(images[0]), texts[1])
    log = _fake_cuda(monkeypatch)
    with torch.inference_mode():
        inputs = tiny_lens.prepare(images, texts)
        out = tiny_lens(inputs)
    assert "enter side" in log
    torch.testing.assert_close(inputs.decoder_embeddings, serial_inputs.decoder_embeddings, rtol=0, atol=0)
    for a, b in zip(out.mask_logits, serial.mask_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    log.clear()
    pred = tiny_lens.predict(images[0], texts[0])
    embedded = tiny_lens.predict(tiny_lens.embed_image(images[0]), texts[1])
    assert log.count("enter side") == 2
    np.testing.assert_array_equal(pred.mask_logits, serial_pred.mask_logits)
    np.testing.assert_array_equal(embedded.mask_logits, serial_embedded.mask_logits)


# ----- 4-bit / 8-bit MLLM (bitsandbytes, CUDA only) -------------------------------------------------------------
def test_quantization_is_refused_off_cuda():
    from lens.backbone.base import quantized_loading

    assert quantized_loading(None, torch.bfloat16, "cpu") == {}
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        quantized_loading("4bit", torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="'4bit', '8bit'"):
        quantized_loading("3bit", torch.bfloat16, "cuda")


def test_quantization_without_bitsandbytes_names_the_extra(monkeypatch):
    from lens.backbone.base import quantized_loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"lens-seg\[quant\]"):
        quantized_loading("8bit", torch.bfloat16, "cuda")


class _Loaded:
    """What a mocked ``from_pretrained`` returns: remembers its kwargs and whether it was moved."""

    moved = False

    def to(self, *args, **kwargs):
        self.moved = True
        return self


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize(
    "family", ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "internvl"]
)
def test_quantization_reaches_from_pretrained(monkeypatch, family, quantization):
    from transformers import BitsAndBytesConfig

    import lens.backbone.hf as hf
    import lens.backbone.llava as llava
    from lens.backbone import BACKBONES, load_backbone
    from lens.config import BackboneConfig

    calls: dict = {}

    def load(model_id, **kwargs):
        calls.update(kwargs, model_id=model_id)
        return _Loaded()

    fake_loader = types.SimpleNamespace(from_pretrained=load)
    fake_processor = types.SimpleNamespace(from_pretrained=lambda *a, **k: "processor")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    cls = BACKBONES[family]
    if family == "llava":
        monkeypatch.setattr(llava, "LlavaForConditionalGeneration", fake_loader)
        monkeypatch.setattr(llava, "AutoProcessor", fake_processor)
    else:
        monkeypatch.setattr(cls, "model_class", fake_loader)
        monkeypatch.setattr(hf, "images_only", lambda processor_class: fake_processor)
    built = {}
    monkeypatch.setattr(cls, "__init__", lambda self, model, processor, layer=None: built.update(model=model))
    load_backbone(
        BackboneConfig(name=family, model_id="some/mllm", quantization=quantization), device="cuda:0"
    )
    config = calls["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_4bit == (quantization == "4bit") and config.load_in_8bit == (quantization == "8bit")
    if quantization == "4bit":
        assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert calls["device_map"] == {"": "cuda:0"} and calls["dtype"] == torch.bfloat16
    assert not built["model"].moved  # quantized weights are placed at load time, never moved
