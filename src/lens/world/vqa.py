"""Questions and answers for the small MLLM: prompts cut around a shared image prefix, batches, loss, scoring.

Every scene comes with dozens of questions whose prompts share one prefix (``<s> user: <image>\\n``, 148
tokens of which 144 are image tokens). Causal attention makes that prefix's keys and values independent of what
follows, so ``batch_loss`` runs each image's prefix once and shares its cache with all its questions: the same
loss as running every prompt in full, at a fraction of the cost. ``evaluate_vqa`` scores greedy answers by exact
match, by question kind.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LlavaForConditionalGeneration, LlavaProcessor

from lens.data.synthetic import QA, Scene, tokenize_words
from lens.data.synthetic.language import VQA_TEMPLATES

# transformers 5.24 renamed the key/value cache argument and output field `past_key_values` to `cache` (the old
# name is deprecated, to go in 5.40); use whichever the installed version has.
CACHE_NAME = (
    "cache"
    if "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters
    else "past_key_values"
)

CAPTION_KIND = "caption"
VQA_KINDS = frozenset(VQA_TEMPLATES)
IGNORE_LABEL = -100  # positions the loss skips (prompt and padding)
MAX_ANSWER_TOKENS = 48  # longer than any caption (six objects, three words each, plus the background)


@dataclass
class PromptParts:
    """The chat template cut around the question: ``{before}{question}{after}{answer}</s>``."""

    before: str  # "user: <image>\n", identical for every question about an image
    after: list[int]  # token ids of " assistant:"
    eos: int

    @classmethod
    def of(cls, processor: LlavaProcessor) -> PromptParts:
        marker = "questionmarker"
        text = processor.apply_chat_template(_conversation(marker), add_generation_prompt=True)
        before, after = text.split(marker)
        after_ids = processor.tokenizer(after, add_special_tokens=False).input_ids
        return cls(before, after_ids, processor.tokenizer.eos_token_id)

    def suffix(self, processor: LlavaProcessor, qa: QA) -> tuple[list[int], list[int]]:
        """(ids, labels) of everything after the shared prefix; labels are IGNORE_LABEL except answer + eos."""
        tokenizer = processor.tokenizer
        prompt = tokenizer(qa.question, add_special_tokens=False).input_ids + self.after
        answer = tokenizer(qa.answer, add_special_tokens=False).input_ids + [self.eos]
        return prompt + answer, [IGNORE_LABEL] * len(prompt) + answer


def _conversation(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@dataclass
class QuestionGroup:
    """Suffixes of similar length run together after the prefixes of their images."""

    rows: torch.Tensor  # (R,) index of each row's image in the batch
    input_ids: torch.Tensor  # (R, L) right-padded
    attention_mask: torch.Tensor  # (R, L)
    labels: torch.Tensor  # (R, L)
    kinds: list[str]


@dataclass
class Batch:
    prefix: dict[str, torch.Tensor]  # processor output: input_ids (B, P), attention_mask, pixel_values
    groups: list[QuestionGroup]  # short answers, then captions

    def to(self, device: torch.device) -> Batch:
        moved = [
            dataclasses.replace(g, **{k: getattr(g, k).to(device) for k in _TENSORS}) for g in self.groups
        ]
        return Batch({k: v.to(device) for k, v in self.prefix.items()}, moved)


_TENSORS = ("rows", "input_ids", "attention_mask", "labels")


def _group(processor: LlavaProcessor, parts: PromptParts, items: list[tuple[int, QA]]) -> QuestionGroup:
    encoded = [parts.suffix(processor, qa) for _, qa in items]
    length = max(len(ids) for ids, _ in encoded)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([lab + [IGNORE_LABEL] * (length - len(lab)) for _, lab in encoded])
    mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in encoded])
    rows = torch.tensor([row for row, _ in items])
    return QuestionGroup(rows, input_ids, mask, labels, [qa.kind for _, qa in items])


def make_batch(
    scenes: Sequence[Scene],
    processor: LlavaProcessor,
    parts: PromptParts,
    questions_per_scene: int,
    rng: np.random.Generator,
    skip_kinds: Collection[str] = (),
    kind_weights: Mapping[str, float] | None = None,
    skills: Sequence[str] = (),
    router_budget: int = 0,
) -> Batch:
    """Up to ``questions_per_scene`` random short-answer questions and the caption of every scene, leaving out
    ``skip_kinds``. ``kind_weights`` makes a question of a kind that many times as likely to be drawn as one of
    an unlisted kind (weight 1); without it every question is equally likely.

    ``skills`` (``lens.world.skills.SKILLS``) add their items to each scene's pool of questions, drawn with the
    same weights (a skill's name is its kind); ``router_budget`` is the router's text budget for intent turns.
    A follow-up's side-by-side image is its own prefix row, after the scenes' rows.
    """
    short: list[tuple[int, QA]] = []
    captions: list[tuple[int, QA]] = []
    images = [scene.image for scene in scenes]
    by_skill: dict[str, list[tuple[int, QA]]] = defaultdict(list)
    for row, scene in enumerate(scenes):
        qas = scene.vqa()
        questions = [qa for qa in qas if qa.kind != CAPTION_KIND and qa.kind not in skip_kinds]
        if skills:
            _draw_with_skills(
                scene,
                row,
                questions,
                images,
                short,
                by_skill,
                questions_per_scene,
                rng,
                kind_weights or {},
                skills,
                router_budget,
            )
        else:
            size = min(questions_per_scene, len(questions))
            if kind_weights:
                weights = np.array([kind_weights.get(qa.kind, 1.0) for qa in questions])
                chosen = rng.choice(len(questions), size=size, replace=False, p=weights / weights.sum())
            else:  # the draws of every run before kind_weights existed
                chosen = rng.choice(len(questions), size=size, replace=False)
            short += [(row, questions[i]) for i in sorted(chosen)]
        if CAPTION_KIND not in skip_kinds:
            captions += [(row, qa) for qa in qas if qa.kind == CAPTION_KIND]
    prefix = processor(images=images, text=[parts.before] * len(images), return_tensors="pt")
    lists = [short, captions, *(by_skill[s] for s in skills)]
    groups = [_group(processor, parts, items) for items in lists if items]
    return Batch(dict(prefix), groups)


def _draw_with_skills(
    scene: Scene,
    row: int,
    questions: list[QA],
    images: list[np.ndarray],
    short: list[tuple[int, QA]],
    by_skill: dict[str, list[tuple[int, QA]]],
    questions_per_scene: int,
    rng: np.random.Generator,
    kind_weights: Mapping[str, float],
    skills: Sequence[str],
    router_budget: int,
) -> None:
    """One scene's draw from its VQA questions and skill items together; follow-ups get their image's row."""
    from lens.world.skills import skill_items

    items = skill_items(scene, skills, rng, router_budget)
    pool = [(None, qa) for qa in questions] + [(item.image, item.qa) for item in items]
    weights = np.array([kind_weights.get(qa.kind, 1.0) for _, qa in pool])
    size = min(questions_per_scene, len(pool))
    chosen = sorted(rng.choice(len(pool), size=size, replace=False, p=weights / weights.sum()))
    rows: dict[int, int] = {}  # id of an item's own image -> its prefix row
    for i in chosen:
        image, qa = pool[i]
        if image is None:
            target = row
        else:
            if id(image) not in rows:
                rows[id(image)] = len(images)
                images.append(image)
            target = rows[id(image)]
        (short if qa.kind in VQA_KINDS else by_skill[qa.kind]).append((target, qa))


def batch_loss(
    model: LlavaForConditionalGeneration, batch: Batch
) -> tuple[torch.Tensor, list[tuple[str, bool]]]:
    """Mean cross-entropy over answer tokens, and (kind, all answer tokens right) per question (teacher forced)."""
    prefix = getattr(model(**batch.prefix, use_cache=True, logits_to_keep=1), CACHE_NAME)
    prefix_mask = batch.prefix["attention_mask"]  # (B, P)
    total, count, results = 0.0, 0, []
    for group in batch.groups:
        cache = DynamicCache(config=model.config.text_config)
        for index, layer in enumerate(prefix.layers):  # each question gets its own image's keys and values
            cache.update(layer.keys[group.rows], layer.values[group.rows], index)
        mask = torch.cat([prefix_mask[group.rows], group.attention_mask], dim=1)  # (R, P + L)
        logits = model(input_ids=group.input_ids, attention_mask=mask, **{CACHE_NAME: cache}).logits
        logits, targets = logits[:, :-1].float(), group.labels[:, 1:]  # (R, L - 1, V): token t predicts t + 1
        total = total + torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_LABEL, reduction="sum"
        )
        count += int((targets != IGNORE_LABEL).sum())
        right = (logits.argmax(-1) == targets) | (targets == IGNORE_LABEL)
        results += list(zip(group.kinds, right.all(dim=1).tolist(), strict=True))
    return total / max(count, 1), results


def accuracy_by_kind(results: Sequence[tuple[str, bool]]) -> dict[str, float]:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for kind, right in results:
        by_kind[kind].append(right)
    return {kind: float(np.mean(v)) for kind, v in sorted(by_kind.items())}


@torch.no_grad()
def answer_questions(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    pairs: Sequence[tuple[np.ndarray, str]],
    batch_size: int = 64,
    max_new_tokens: int = MAX_ANSWER_TOKENS,
) -> list[str]:
    """Greedy ``generate`` answers to (image (H, W, 3) uint8, question) pairs, prompted as LLaVA-1.5 is."""
    model.eval()
    answers: list[str] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="vqa", disable=None, leave=False):
        chunk = pairs[start : start + batch_size]
        prompts = [
            processor.apply_chat_template(_conversation(q), add_generation_prompt=True) for _, q in chunk
        ]
        inputs = processor(
            images=[image for image, _ in chunk],
            text=prompts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(model.device)
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        answers += processor.batch_decode(
            generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return answers


def exact_match(prediction: str, answer: str) -> bool:
    """Same words in the same order (``tokenize_words``): the decoder's spacing around punctuation is ignored."""
    return tokenize_words(prediction) == tokenize_words(answer)


def evaluate_vqa(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    scenes: Sequence[Scene],
    batch_size: int = 64,
    max_new_tokens: int = MAX_ANSWER_TOKENS,
    kinds: Collection[str] | None = None,
    phrasing: str | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers to the questions of ``scenes`` (of ``kinds``; all by default),
    worded in ``phrasing`` (``lens.data.synthetic.PHRASINGS``; None: the world's own).

    Questions are batched by kind, so that one-word answers do not wait for captions.
    """
    items = [
        (scene, qa) for scene in scenes for qa in scene.vqa(phrasing) if kinds is None or qa.kind in kinds
    ]
    items.sort(key=lambda item: item[1].kind)
    pairs = [(scene.image, qa.question) for scene, qa in items]
    answers = answer_questions(model, processor, pairs, batch_size, max_new_tokens)
    results = [(qa.kind, exact_match(a, qa.answer)) for (_, qa), a in zip(items, answers, strict=True)]
    by_kind = accuracy_by_kind(results)
    short = [right for kind, right in results if kind != CAPTION_KIND]
    return {
        "overall": float(np.mean([right for _, right in results])),
        "overall_without_captions": float(np.mean(short)) if short else float("nan"),
        "by_kind": by_kind,
        "num_questions": len(results),
        "questions_by_kind": {kind: sum(k == kind for k, _ in results) for kind in by_kind},
        "num_scenes": len(scenes),
    }


def step_loader(dataset: torch.utils.data.Dataset, num_workers: int) -> torch.utils.data.DataLoader:
    """A training run's batches in step order (item ``s`` is step ``s``'s whole batch); with ``num_workers`` > 0,
    worker processes build the next batches while the model trains."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_unbatched,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


def _unbatched(item: Any) -> Any:
    return item
