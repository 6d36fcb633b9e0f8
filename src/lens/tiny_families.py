"""Tiny random Qwen-VL, LLaVA-NeXT / OneVision and InternVL models built from configs: no hub, no download.

The same Hugging Face classes the real checkpoints load into (``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``, ``InternVLForConditionalGeneration``) with their own processors,
at unit-test size, and a word-level tokenizer holding each family's special tokens and a chat template of
the family's shape. Tests of the backbone adapters run on these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lens.backbone.hf import images_only
from lens.tiny import TEST_WORDS

CHAT_WORDS = ["user", "assistant", ":", "\n"]


def family_tokenizer(
    words: Iterable[str],
    specials: Sequence[str],
    chat_template: str,
    padding_side: str = "right",
    **special_attrs: str,
) -> PreTrainedTokenizerFast:
    """A lower-casing word tokenizer over ``words`` plus ``specials`` (each one token, never split).

    ``special_attrs`` become the tokenizer's named special tokens (``image_token="<image>"`` ...), which the
    family processors read.
    """
    vocab: dict[str, int] = {}
    for token in [*specials, *CHAT_WORDS, *words]:
        vocab.setdefault(token, len(vocab))
    pattern = "|".join([*(re.escape(s) for s in specials), r"[a-z0-9]+", r"\n", r"[^\sa-z0-9]"])
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        ]
    )
    named = {"bos_token", "eos_token", "unk_token", "pad_token"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        **{k: v for k, v in special_attrs.items() if k in named},
        extra_special_tokens={k: v for k, v in special_attrs.items() if k not in named},
        padding_side=padding_side,
    )
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in ("<unk>",)]})
    fast.chat_template = chat_template
    fast.backend_tokenizer.decoder = None
    return fast


def _template(image: str) -> str:
    """A chat template of the families' shape: image placeholder, then the text, then the assistant marker."""
    return (
        "{% for message in messages %}{{ message['role'] + ':\n' }}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '" + image + "' }}"
        "{% endif %}{% endfor %}"
        "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] + '\n' }}"
        "{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
    )


def _ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


# ----- Qwen2.5-VL / Qwen3-VL ---------------------------------------------------------------------------------
QWEN_SPECIALS = [
    "<pad>",
    "<unk>",
    "</s>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _qwen_parts(
    words: Iterable[str], patch_size: int
) -> tuple[PreTrainedTokenizerFast, Qwen2VLImageProcessorPil]:
    tokenizer = family_tokenizer(
        words,
        QWEN_SPECIALS,
        _template("<|vision_start|><|image_pad|><|vision_end|>"),
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    factor = patch_size * 2
    # min / max pixels keep tiny grids: 2x2 .. 8x8 merged cells
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (8 * factor) ** 2},
    )
    return tokenizer, image_processor


def _qwen_text(tokenizer: PreTrainedTokenizerFast, sections: list[int], **extra: object) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    image, video, start, end = _ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    return dict(
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end
    )


def build_qwen2_5_vl(
    words: Iterable[str] = TEST_WORDS, seed: int = 0
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A random ``Qwen2_5_VLForConditionalGeneration`` (patch 4, 2x2 merge, window attention) + processor."""
    tokenizer, image_processor = _qwen_parts(words, patch_size=4)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(tokenizer, [2, 3, 3]),  # head_dim 16: 8 rotary pairs split (t, h, w)
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,  # 2x2 merged cells per window
            fullatt_block_indexes=[1],
        ),
        **_special_ids(tokenizer),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    processor = images_only(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return model, processor


def build_qwen3_vl(
    words: Iterable[str] = TEST_WORDS, seed: int = 0
) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """A random ``Qwen3VLForConditionalGeneration`` (q/k norm, interleaved mrope, deepstack) + processor."""
    tokenizer, image_processor = _qwen_parts(words, patch_size=4)
    config = Qwen3VLConfig(
        text_config=_qwen_text(tokenizer, [2, 3, 3], head_dim=16),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],  # injected into decoder layers 1 and 2
        ),
        **_special_ids(tokenizer),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    processor = images_only(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return model, processor


# ----- LLaVA-NeXT / LLaVA-OneVision --------------------------------------------------------------------------
LLAVA_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]
# any-resolution canvases (height, width) of the tiny models: multiples of the 16-px tile
TINY_PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16], [32, 48], [48, 32]]


def _llava_text(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_llava_next(
    words: Iterable[str] = TEST_WORDS, seed: int = 0
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random ``LlavaNextForConditionalGeneration`` (CLIP 16-px tiles of 4x4 cells, Mistral LM) + processor."""
    tokenizer = family_tokenizer(
        words, LLAVA_SPECIALS, _template("<image>\n"), image_token="<image>", bos_token="<s>"
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            projection_dim=32,
        ),
        text_config=MistralConfig(**_llava_text(tokenizer)).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.text_config = MistralConfig(**_llava_text(tokenizer))
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=TINY_PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1,
    )
    return model, processor


def build_llava_onevision(
    words: Iterable[str] = TEST_WORDS, seed: int = 0, max_tiles: int = 9, tile: int = 16
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A random ``LlavaOnevisionForConditionalGeneration`` (SigLIP 16-px tiles, Qwen2 LM) + processor.

    ``max_tiles`` is the ``anyres_max_N`` budget: unpadded grids above ~N tiles' worth of cells are
    bilinearly downsampled by the model, which the adapter's frame must follow. ``tile`` = 18 makes the 4-px
    patches leave each tile's last 2 px unseen, as SigLIP's 14-px patches do on 384-px tiles.
    """
    pinpoints = [[h * tile // 16, w * tile // 16] for h, w in TINY_PINPOINTS]
    tokenizer = family_tokenizer(
        words,
        LLAVA_SPECIALS,
        _template("<image>\n"),
        image_token="<image>",
        video_token="<video>",
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=tile,
            patch_size=4,
        ),
        text_config=Qwen2Config(**_llava_text(tokenizer)).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        tie_word_embeddings=False,
    )
    config.text_config = Qwen2Config(**_llava_text(tokenizer))
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    processor = images_only(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        chat_template=tokenizer.chat_template,
    )
    return model, processor


# ----- InternVL 3 --------------------------------------------------------------------------------------------
INTERNVL_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def build_internvl(
    words: Iterable[str] = TEST_WORDS, seed: int = 0, max_tiles: int = 6
) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """A random ``InternVLForConditionalGeneration`` (32-px tiles, patch 4, pixel shuffle 0.5: 4x4 cells per
    tile, Qwen2 LM) + processor with up to ``max_tiles`` tiles and a thumbnail."""
    tokenizer = family_tokenizer(
        words,
        INTERNVL_SPECIALS,
        _template("<IMG_CONTEXT>\n"),
        padding_side="left",  # as InternVL's processor defaults to; the adapter asks for right padding
        context_image_token="<IMG_CONTEXT>",
        start_image_token="<img>",
        end_image_token="</img>",
        video_token="<video>",
    )
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[32, 32],
            patch_size=[4, 4],
        ),
        text_config=Qwen2Config(**_llava_text(tokenizer)).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=16,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.text_config = Qwen2Config(**_llava_text(tokenizer))
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(
        # crop_to_patches stays False here: InternVLProcessor turns it on, as for the hub checkpoints
        size={"height": 32, "width": 32},
        min_patches=1,
        max_patches=max_tiles,
    )
    processor = images_only(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=16,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


TINY_FAMILIES: dict[str, object] = {
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "internvl": build_internvl,
}


def build_family(name: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """(model, processor) of the tiny random model of family ``name`` (a key of ``TINY_FAMILIES``)."""
    if name not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {name!r}; available: {sorted(TINY_FAMILIES)}")
    return TINY_FAMILIES[name](seed=seed)  # type: ignore[operator]
