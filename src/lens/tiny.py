"""Small LLaVA and SAM models built entirely from configs: no hub, no download.

Tests build randomly initialised *tiny* ones; the synthetic world's pretrained models use the same builders
at a larger size. Both go through the same Hugging Face classes (``LlavaForConditionalGeneration``,
``SamModel``) and the same ``save_pretrained``/``from_pretrained`` path as LLaVA-1.5-7B and SAM ViT-H.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
IMAGE_TOKEN = "<image>"
# Words of the LLaVA-1.5 conversation format, always in the vocabulary.
CHAT_WORDS = ["user", "assistant", ":", "\n"]
# LLaVA-1.5's conversation format ("USER: <image>\n{question} ASSISTANT:"), lower-cased for a word vocabulary.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}"
    "{% endif %}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
# A word is a run of letters/digits; every other non-space character (and newline) is its own token.
_WORD_PATTERN = r"<image>|[a-z0-9]+|\n|[^\sa-z0-9]"


def word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``words`` with LLaVA's special tokens and chat template."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *CHAT_WORDS, *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # spaces separate, newlines count
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    # WordLevel has no decoder that restores spaces; words are joined by spaces when decoding.
    fast.backend_tokenizer.decoder = None
    return fast


def split_words(text: str) -> list[str]:
    """The tokenizer's own word split (lower-cased), for building vocabularies."""
    return re.findall(_WORD_PATTERN, text.lower())


@dataclass
class TinyLlavaSpec:
    """Sizes of a small LLaVA. Defaults are the unit-test size (runs in milliseconds on CPU)."""

    image_size: int = 48
    patch_size: int = 8  # grid = image_size / patch_size cells per side
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    max_positions: int = 512


def build_llava(
    words: Iterable[str], spec: TinyLlavaSpec | None = None, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` from a word list."""
    spec = spec or TinyLlavaSpec()
    tokenizer = word_tokenizer(words)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_pad=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    return model, processor


@dataclass
class TinySamSpec:
    image_size: int = 64
    patch_size: int = 8  # image embedding grid = image_size / patch_size
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    prompt_hidden: int = 32  # SAM's prompt width (256 for real SAM)
    decoder_layers: int = 2
    decoder_heads: int = 2
    decoder_mlp: int = 64


def sam_config_kwargs(spec: TinySamSpec) -> tuple[dict, dict, dict]:
    """Keyword arguments of the vision, prompt-encoder and mask-decoder configs of a small SAM-shaped model:
    SAM's and SAM-HQ's config classes take the same fields."""
    grid = spec.image_size // spec.patch_size
    vision = dict(
        hidden_size=spec.vision_hidden,
        output_channels=spec.prompt_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        window_size=max(grid // 2, 1),
        global_attn_indexes=[spec.vision_layers - 1],
        num_pos_feats=spec.prompt_hidden // 2,
        mlp_dim=spec.vision_hidden * 4,
    )
    prompt = dict(
        hidden_size=spec.prompt_hidden,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        mask_input_channels=max(spec.prompt_hidden // 4, 4),
    )
    decoder = dict(
        hidden_size=spec.prompt_hidden,
        num_hidden_layers=spec.decoder_layers,
        num_attention_heads=spec.decoder_heads,
        mlp_dim=spec.decoder_mlp,
        iou_head_hidden_dim=spec.prompt_hidden,
    )
    return vision, prompt, decoder


def sam_image_processor(spec: TinySamSpec) -> SamImageProcessorPil:
    """SAM's pre-processing at ``spec``'s input size: resize the longest side, pad bottom-right."""
    grid = spec.image_size // spec.patch_size
    return SamImageProcessorPil(
        size={"longest_edge": spec.image_size},
        pad_size={"height": spec.image_size, "width": spec.image_size},
        mask_size={"longest_edge": grid * 4},
        mask_pad_size={"height": grid * 4, "width": grid * 4},
    )


def build_sam(spec: TinySamSpec | None = None, seed: int = 0) -> tuple[SamModel, SamProcessor]:
    """A randomly initialised ``SamModel`` + ``SamProcessor``, shaped like SAM at a fraction of the size."""
    spec = spec or TinySamSpec()
    vision, prompt, decoder = sam_config_kwargs(spec)
    config = SamConfig(
        vision_config=SamVisionConfig(**vision),
        prompt_encoder_config=SamPromptEncoderConfig(**prompt),
        mask_decoder_config=SamMaskDecoderConfig(**decoder),
    )
    torch.manual_seed(seed)
    model = SamModel(config).eval()
    return model, SamProcessor(image_processor=sam_image_processor(spec))


TEST_WORDS = [
    "a",
    "the",
    "of",
    "in",
    "is",
    "what",
    "where",
    "colour",
    "shape",
    "segment",
    "please",
    "can",
    "you",
    "this",
    "image",
    "red",
    "ring",
    "square",
    "?",
]


def build_tiny_models(
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, SamModel, SamProcessor]:
    """(llava, llava_processor, sam, sam_processor) at unit-test size."""
    llava, llava_processor = build_llava(TEST_WORDS, seed=seed)
    sam, sam_processor = build_sam(seed=seed)
    return llava, llava_processor, sam, sam_processor
