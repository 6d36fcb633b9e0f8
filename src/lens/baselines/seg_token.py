"""The MLLM fine-tuned the way LISA fine-tunes it: a new segmentation token it learns to answer with.

LISA (Lai et al. 2024) adds ``[SEG]`` to the vocabulary, trains LoRA adapters on the language model's attention
projections together with the whole input embedding and LM head, and teaches the model to reply "Sure, it is
[SEG]." to a segmentation request (next-token cross-entropy on the answer). The last layer's hidden state at
the ``[SEG]`` position is then the query a mask is decoded from. READ and SELF1E fine-tune the same way and
differ only in how that state becomes a mask, so the three share this module.

Unlike LENS, this changes the MLLM itself: ``generate`` answers with the fine-tuned weights (what the general-
ability rows of docs/results.md measure), and ``merged`` gives a plain transformers model with the adapters
folded in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from lens.config import BaselineConfig

IGNORE = -100  # label of a position the language-model loss skips


@dataclass
class Conversation:
    """Prompts with the answer appended, tokenized: what the fine-tuned MLLM reads in one forward."""

    inputs: dict[str, Tensor]  # the processor's outputs with the answer appended: input_ids (B, L), ...
    labels: Tensor  # (B, L) the answer's ids (and EOS), IGNORE elsewhere
    seg_index: Tensor  # (B,) position of each row's first segmentation token
    image_positions: Tensor  # (B, N) positions of the image tokens (row-major grid cells)

    def to(self, device: torch.device) -> Conversation:
        return Conversation(
            {k: v.to(device) for k, v in self.inputs.items()},
            self.labels.to(device),
            self.seg_index.to(device),
            self.image_positions.to(device),
        )


@dataclass
class SegTokenOutput:
    ce_loss: Tensor  # () mean next-token cross-entropy over the answer tokens
    seg_hidden: Tensor  # (B, d) last-layer hidden state at the segmentation token
    hidden_states: Tensor  # (B, L, d) last-layer hidden states (after the final norm)


class SegTokenMLLM(nn.Module):
    """A LLaVA-family MLLM (``backbone.model``) with LISA's segmentation token and trainable parts.

    Arguments:
        backbone: a loaded ``lens.backbone`` adapter over a transformers ``*ForConditionalGeneration``; its model
            is changed in place (new tokens, LoRA adapters) and no longer frozen.
        settings: ``config.baseline`` (LoRA rank / alpha / dropout / targets, token, answer).
    """

    def __init__(self, backbone: nn.Module, settings: BaselineConfig):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.backbone, self.settings = backbone, settings
        model, tokenizer = backbone.model, backbone.processor.tokenizer
        if settings.seg_token not in settings.answer:
            raise ValueError(
                f"baseline.answer {settings.answer!r} must contain baseline.seg_token {settings.seg_token!r}"
            )
        tokenizer.add_tokens([settings.seg_token], special_tokens=True)
        # Pieces of the answer the vocabulary lacks (a small world's word-level tokenizer) become tokens too.
        text = settings.answer.replace(settings.seg_token, " ")
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        unknown = [
            text[a:b]
            for token, (a, b) in zip(encoded.input_ids, encoded.offset_mapping, strict=True)
            if token == tokenizer.unk_token_id
        ]
        if unknown:
            tokenizer.add_tokens(sorted(set(unknown)))
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        self.seg_token_id = tokenizer.convert_tokens_to_ids(settings.seg_token)
        self.answer_ids = tokenizer(settings.answer, add_special_tokens=False).input_ids + [
            tokenizer.eos_token_id
        ]
        lora = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=list(settings.lora_targets),
        )
        language_model = model.model.language_model
        model.requires_grad_(False)
        inject_adapter_in_model(lora, language_model)  # lora_A / lora_B beside each target, names kept
        for name, parameter in language_model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        model.get_input_embeddings().requires_grad_(True)  # LISA trains the whole embedding and LM head
        model.get_output_embeddings().requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return self.backbone.model.lm_head.weight.device

    @property
    def hidden_size(self) -> int:
        return self.backbone.model.config.get_text_config().hidden_size

    def conversation(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> Conversation:
        """Each instruction's prompt (the model's own chat template, image first) followed by the answer."""
        inputs = self.backbone._inputs(images, instructions)  # right-padded, answer start last
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        lengths = mask.sum(1).tolist()
        answer = torch.tensor(self.answer_ids, device=ids.device)
        total = max(lengths) + len(answer)
        pad = self.backbone.processor.tokenizer.pad_token_id or 0
        new_ids = ids.new_full((len(ids), total), pad)
        new_mask = mask.new_zeros((len(ids), total))
        labels = ids.new_full((len(ids), total), IGNORE)
        for b, n in enumerate(lengths):
            new_ids[b, :n], new_ids[b, n : n + len(answer)] = ids[b, :n], answer
            new_mask[b, : n + len(answer)] = 1
            labels[b, n : n + len(answer)] = answer
        seg_index = (new_ids == self.seg_token_id).int().argmax(1)  # (B,) the first one
        image_token = self.backbone.model.config.image_token_id
        image_positions = torch.stack([torch.nonzero(row == image_token).flatten() for row in ids])
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        return Conversation(
            {"input_ids": new_ids, "attention_mask": new_mask, **rest}, labels, seg_index, image_positions
        )

    def forward(self, conversation: Conversation) -> SegTokenOutput:
        """Teacher-forced forward over prompt + answer: the answer's CE and the segmentation token's state."""
        out = self.backbone.model(**conversation.inputs, output_hidden_states=True, use_cache=False)
        logits = out.logits[:, :-1].float()  # (B, L-1, V) predicting positions 1..L-1
        targets = conversation.labels[:, 1:]
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        hidden = out.hidden_states[-1]  # (B, L, d) after the final norm, as LISA reads it
        rows = torch.arange(len(hidden), device=hidden.device)
        return SegTokenOutput(ce, hidden[rows, conversation.seg_index], hidden)

    @torch.inference_mode()
    def generate(
        self, images: Sequence[Image.Image], instructions: Sequence[str], max_new_tokens: int = 32
    ) -> list[str]:
        """Free answers of the fine-tuned model (greedy), the segmentation token kept in the text."""
        answers = []
        tokenizer = self.backbone.processor.tokenizer
        for image, text in zip(images, instructions, strict=True):
            inputs = self.backbone._inputs([image], [text])
            out = self.backbone.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1] :].tolist()
            keep = [t for t in new if t == self.seg_token_id or t not in tokenizer.all_special_ids]
            answers.append(tokenizer.decode(keep).strip())
        return answers

    def merged(self) -> nn.Module:
        """A copy of the transformers model with every LoRA adapter folded into its weights (no peft layers):
        what a user of the fine-tuned MLLM would deploy, and what VQA scoring runs."""
        import copy

        from peft.tuners.lora import LoraLayer

        model = copy.deepcopy(self.backbone.model)
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
        return model.requires_grad_(False).eval()


class SegPromptProjection(nn.Module):
    """LISA's ``text_hidden_fcs``: the segmentation token's state (d) → one prompt embedding (d_s)."""

    def __init__(self, hidden_size: int, prompt_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True), nn.Linear(hidden_size, prompt_dim)
        )

    def forward(self, seg_hidden: Tensor) -> Tensor:  # (B, d) -> (B, d_s)
        return self.layers(seg_hidden)
