"""Trainable parameters and peak training memory of LENS at paper size: LLaVA-1.5-7B (k = 14) + SAM ViT-H.

Everything is built from configs with random weights, so nothing is downloaded. Parameter counts use the meta
device (no memory at all). On a CUDA device the script also times nothing but measures the peak memory of
training steps on *cached* features (the MLLM and SAM's image encoder are not in memory, as with ``lens train
--cache-root``): bf16 autocast, AdamW, batch 2.

    python benchmarks/train_memory.py                    # parameter counts (any machine)
    python benchmarks/train_memory.py --device cuda      # + peak memory of a training step
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
)
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from lens.backbone import BackboneFeatures, LlavaBackbone
from lens.config import LensConfig
from lens.decoders import SamDecoder
from lens.geometry import GridFrame, ImageGeometry
from lens.model import LensInputs, LensModel
from lens.tiny import TEST_WORDS, build_llava
from lens.weights import SpecBackbone, strip_frozen_encoders

logger = logging.getLogger("train_memory")

LAYER = 14  # k of the paper for LLaVA-1.5-7B
GIB = 2**30
LLAVA_IMAGE_TOKEN = 32000  # llava-hf/llava-1.5-7b-hf
LLAVA_VOCAB = 32064
PROMPT_PREFIX = 5  # tokens before the image in "USER: <image>\n..." (BOS, "USER", ":", ...)


def llava_7b_config() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px + Vicuna-7B (Llama-2-7B shape)."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=LLAVA_VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(336 // 14) ** 2,
    )  # fmt: skip


def sam_vit_h_config() -> SamConfig:
    """facebook/sam-vit-huge (``SamConfig()`` defaults to ViT-B, so the encoder is spelled out)."""
    vision = SamVisionConfig(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]
    )
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=SamPromptEncoderConfig(),
        mask_decoder_config=SamMaskDecoderConfig(),
    )


def build(device: torch.device) -> tuple[LensModel, dict[str, int]]:
    """LENS at paper size with random weights; the MLLM itself only ever exists on the meta device."""
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_7b_config())
    _, processor = build_llava(TEST_WORDS)  # a processor is needed to wrap the model; its size is irrelevant
    spec = LlavaBackbone(llava, processor, layer=LAYER).layer_spec()
    config = LensConfig()
    with torch.device(device):
        sam = SamModel(sam_vit_h_config())
        decoder = SamDecoder(sam, SamProcessor(image_processor=SamImageProcessorPil()))
        model = LensModel(config, SpecBackbone(spec, LAYER), decoder)
    counts = {
        "mllm (frozen)": sum(p.numel() for p in llava.parameters()),
        "sam (all)": sum(p.numel() for p in sam.parameters()),
    }
    trainable = model.trainable_state_dict()
    for part in ("head", "descriptor", "decoder"):
        counts[f"trainable {part}"] = sum(v.numel() for k, v in trainable.items() if k.startswith(f"{part}."))
    counts["trainable total"] = sum(v.numel() for v in trainable.values())
    return model, counts


def random_inputs(model: LensModel, batch: int, text_tokens: int, height: int, width: int) -> LensInputs:
    """Cached-feature inputs of LLaVA-1.5-7B's shape: 576 image tokens + ``text_tokens`` prompt tokens."""
    spec, device = model.backbone.layer_spec(), model.device
    grid = 336 // 14
    length = PROMPT_PREFIX + grid * grid + text_tokens
    image_positions = PROMPT_PREFIX + torch.arange(grid * grid, device=device).expand(batch, -1)
    text_span = torch.tensor([[PROMPT_PREFIX + grid * grid, length]] * batch, device=device)
    features = BackboneFeatures(
        hidden_states=torch.randn(batch, length, spec.hidden_size, device=device, dtype=torch.bfloat16),
        attention_mask=torch.ones(batch, length, dtype=torch.bool, device=device),
        position_ids=torch.arange(length, device=device).expand(batch, -1),
        image_positions=image_positions,
        grid_sizes=torch.tensor([[grid, grid]] * batch, device=device),
        text_span=text_span,
        answer_index=text_span[:, 1] - 1,
        geometries=[
            ImageGeometry(GridFrame.pad_to_square(width, height, grid), model.decoder.frame(width, height))
        ]
        * batch,
    )
    side = model.decoder.image_size // 16  # SAM's embedding grid (64 for 1024 px input)
    sam = torch.randn(batch, model.decoder.prompt_dim, side, side, device=device)
    masks = [torch.zeros(height, width, dtype=torch.uint8, device=device) for _ in range(batch)]
    for m in masks:
        m[height // 4 : height // 2, width // 4 : width // 2] = 1
    return LensInputs(features, sam, masks)


def peak_training_memory(model: LensModel, inputs: LensInputs, steps: int) -> float:
    """Peak GiB allocated over ``steps`` AdamW steps (the first one allocates the optimizer state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.95))
    model.train()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="meta", help="meta (count only) or cuda (count + memory)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=48, help="prompt tokens after the image")
    parser.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(args.device)
    model, counts = build(device)
    for name, count in counts.items():
        logger.info("%-34s %15s  (%.1f M)", name, f"{count:,}", count / 1e6)
    if device.type != "cuda":
        logger.info("peak training memory: needs a CUDA device (run with --device cuda)")
        return
    strip_frozen_encoders(model)
    torch.cuda.empty_cache()
    inputs = random_inputs(model, args.batch_size, args.text_tokens, *args.image_size)
    peak = peak_training_memory(model, inputs, args.steps)
    logger.info(
        "peak training memory (cached features, bf16 autocast, AdamW, batch %d): %.2f GiB",
        args.batch_size,
        peak,
    )


if __name__ == "__main__":
    main()
