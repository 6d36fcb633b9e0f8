"""Stage 1 of the small MLLM's pretraining: the vision tower alone learns what captions name.

Also the vision tower's starting point: 2-D sine-cosine position codes (``init_vision_positions``). Stage 2, the
whole model on questions, is ``lens.world.mllm``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from lens.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, SyntheticWorld, tokenize_words
from lens.world.vqa import CAPTION_KIND, step_loader

if TYPE_CHECKING:
    from lens.world.mllm import MllmTrainConfig

logger = logging.getLogger(__name__)

# What an image-level classifier learns from a caption: each object's "size colour shape" and each attribute word.
CAPTION_LABELS: tuple[str, ...] = (
    *(f"{size} {colour} {shape}" for size in SIZES for colour in COLOURS for shape in SHAPES),
    *SIZES,
    *COLOURS,
    *SHAPES,
    *BACKGROUNDS,
)


def caption_labels(caption: str) -> list[str]:
    """The ``CAPTION_LABELS`` a caption states ("a large red ring, ... on a graded background.")."""
    words = tokenize_words(caption)
    objects = [" ".join(words[i - 2 : i + 1]) for i, word in enumerate(words) if word in SHAPES]
    return sorted({*objects, *(w for w in words if w in CAPTION_LABELS)})


def pretrain_vision(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, cfg: MllmTrainConfig
) -> None:
    """Stage 1: teach the vision tower what captions name, through a throw-away linear probe on every patch.

    Trained end to end from scratch, the LLM learns the language prior (~0.7 loss, chance accuracy) long before
    it learns to look at 144 image tokens; in our runs it had not started after 500 steps. Patches whose features
    already say "red", "star", "large red star" give its attention something to find. The probe scores every
    patch and an image has a label when some patch is sure of it (logsumexp over patches, multiple-instance
    learning), so the features become local. Only caption text is used, never a mask.
    """
    device = next(model.parameters()).device
    tower = model.model.vision_tower
    train = SyntheticWorld(seed=cfg.world_seed).split("train")

    captions = _CaptionBatches(train, processor, cfg)
    head = torch.nn.Linear(cfg.spec.vision_hidden, len(CAPTION_LABELS)).to(device)
    num_patches = (cfg.spec.image_size // cfg.spec.patch_size) ** 2
    with torch.no_grad():  # start from the label frequencies of one batch, not from a coin flip per label
        prior = captions[cfg.vision_steps][1].mean(dim=0)  # a batch of its own, after the run's steps
        prior = prior.clamp(0.5 / cfg.vision_batch, 1 - 0.5 / cfg.vision_batch)
        head.weight.zero_()
        head.bias.copy_(torch.logit(prior) - math.log(num_patches))  # logsumexp of N equal logits adds log N
    params = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    warmup = max(cfg.vision_steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / cfg.vision_steps)))
    )
    for step, (pixels, targets) in enumerate(
        tqdm(step_loader(captions, cfg.num_workers), desc="vision", disable=None)
    ):
        pixels, targets = pixels.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            hidden = tower(pixels, output_hidden_states=True).hidden_states
            features = hidden[model.config.vision_feature_layer][:, 1:]  # (B, N, C): what the projector gets
            logits = torch.logsumexp(head(features).float(), dim=1)  # (B, labels)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        if (step + 1) % cfg.log_every == 0:
            hits = ((logits > 0) & (targets > 0)).sum()
            f1 = 2 * hits / ((logits > 0).sum() + targets.sum())
            logger.info("vision step %d loss %.4f label F1 %.3f", step + 1, loss.item(), f1.item())


class _CaptionBatches(torch.utils.data.Dataset):
    """Stage-1 batch of each step: random train images, their pixels and the ``CAPTION_LABELS`` their captions state.

    Step ``s`` draws from its own generator seeded with ``(seed, s)``, so batches do not depend on which worker
    process builds them.
    """

    def __init__(self, train: Sequence[Scene], processor: LlavaProcessor, cfg: MllmTrainConfig) -> None:
        self.train, self.processor, self.cfg = train, processor, cfg
        self.index = {label: i for i, label in enumerate(CAPTION_LABELS)}

    def __len__(self) -> int:
        return self.cfg.vision_steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, 1, step])
        scenes = [self.train[int(i)] for i in rng.integers(len(self.train), size=self.cfg.vision_batch)]
        pixels = self.processor.image_processor([s.image for s in scenes], return_tensors="pt")[
            "pixel_values"
        ]
        targets = torch.zeros(len(scenes), len(CAPTION_LABELS))  # (B, labels)
        for row, scene in enumerate(scenes):
            caption = next(qa.answer for qa in scene.vqa() if qa.kind == CAPTION_KIND)
            targets[row, [self.index[label] for label in caption_labels(caption)]] = 1.0
        return pixels, targets


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sine-cosine position codes (MAE): half the channels for y, half for x."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    codes = []
    for coordinate in (ys, xs):
        angles = coordinate.flatten()[:, None].double() * omega[None]  # (N, D/4)
        codes += [angles.sin(), angles.cos()]
    return torch.cat(codes, dim=1).float()


def init_vision_positions(model: LlavaForConditionalGeneration) -> None:
    """Start CLIP's learned position embeddings from 2-D sine-cosine codes as strong as the patch embeddings.

    Drawn with std 0.02 they are ~14x weaker than the patch content, so image tokens would carry almost no
    place at first; positions, relations and the left-to-right order of captions all need it.
    """
    embeddings = model.model.vision_tower.embeddings
    conv = embeddings.patch_embedding
    grid = int(math.isqrt(embeddings.num_patches))
    patch_rms = conv.weight.std() * math.sqrt(conv.weight[0].numel())  # channel std for unit-variance pixels
    codes = sincos_positions(grid, conv.out_channels)  # (N, C)
    with torch.no_grad():
        embeddings.position_embedding.weight[0].zero_()  # the class token has no place
        embeddings.position_embedding.weight[1:] = codes * patch_rms / codes.std()
