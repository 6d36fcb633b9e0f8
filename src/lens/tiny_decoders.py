"""Small SAM-HQ and SAM 2 models built entirely from configs: no hub, no download.

They go through the same Hugging Face classes (``SamHQModel``, ``Sam2Model``) and processors as SAM-HQ ViT-H and
SAM 2.1 Hiera-L, at a size that runs in milliseconds on CPU (the SAM builder is ``lens.tiny.build_sam``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2Model,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
    SamHQConfig,
    SamHQMaskDecoderConfig,
    SamHQModel,
    SamHQProcessor,
    SamHQPromptEncoderConfig,
    SamHQVisionConfig,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from lens.decoders.sam2 import sam2_image_processor
from lens.tiny import TinySamSpec, sam_config_kwargs, sam_image_processor

TinySamHQSpec = (
    TinySamSpec  # SAM-HQ's sizes are SAM's; vision_hidden is also its vit_dim (fused early features)
)


def build_sam_hq(spec: TinySamHQSpec | None = None, seed: int = 0) -> tuple[SamHQModel, SamHQProcessor]:
    """A randomly initialised ``SamHQModel`` + ``SamHQProcessor`` (resize longest side + pad, like SAM)."""
    spec = spec or TinySamHQSpec()
    vision, prompt, decoder = sam_config_kwargs(spec)
    vision["global_attn_indexes"] = [
        0,
        spec.vision_layers - 1,
    ]  # SAM-HQ fuses the first global block's output
    config = SamHQConfig(
        vision_config=SamHQVisionConfig(**vision),
        prompt_encoder_config=SamHQPromptEncoderConfig(**prompt),
        mask_decoder_config=SamHQMaskDecoderConfig(**decoder, vit_dim=spec.vision_hidden),
    )
    torch.manual_seed(seed)
    model = SamHQModel(config).eval()
    return model, SamHQProcessor(image_processor=sam_image_processor(spec))


@dataclass
class TinySam2Spec:
    image_size: int = 64  # Hiera: patch stride 4, then three 2x query-pooling stages (strides 4, 8, 16, 32)
    stage_dims: tuple[int, int, int, int] = (8, 16, 32, 64)
    stage_heads: tuple[int, int, int, int] = (1, 1, 2, 2)
    hidden: int = 32  # FPN width = prompt width = mask decoder width (256 for real SAM 2)
    decoder_layers: int = 2
    decoder_heads: int = 2
    decoder_mlp: int = 64


def build_sam2(spec: TinySam2Spec | None = None, seed: int = 0) -> tuple[Sam2Model, ViTImageProcessorPil]:
    """A randomly initialised ``Sam2Model`` + its pre-processing (stretch to the square input, like SAM 2)."""
    spec = spec or TinySam2Spec()
    s = spec.image_size
    backbone = Sam2HieraDetConfig(
        hidden_size=spec.stage_dims[0],
        num_attention_heads=spec.stage_heads[0],
        image_size=[s, s],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=list(spec.stage_dims),
        num_attention_heads_per_stage=list(spec.stage_heads),
        window_size_per_stage=[4, 4, 2, 2],
        global_attention_blocks=[3],  # not a stage's first block (that one pools its queries)
        window_positional_embedding_background_size=[2, 2],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=list(reversed(spec.stage_dims)),
        backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
        fpn_hidden_size=spec.hidden,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=spec.hidden, image_size=s, patch_size=16)
    decoder = Sam2MaskDecoderConfig(
        hidden_size=spec.hidden,
        num_hidden_layers=spec.decoder_layers,
        num_attention_heads=spec.decoder_heads,
        mlp_dim=spec.decoder_mlp,
        iou_head_hidden_dim=spec.hidden,
    )
    config = Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    torch.manual_seed(seed)
    model = Sam2Model(config).eval()
    return model, sam2_image_processor(s)
