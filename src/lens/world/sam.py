"""Pretraining the synthetic world's small SAM, the way SAM is trained: random prompts → the prompted object's mask.

Each step encodes a few images once, then prompts every object on them ``prompts_per_mask`` times; within a
round all prompts are of one kind (1–3 positive points drawn from the mask, sometimes plus one negative point from
just outside it, or the jittered box), so each has the exact token layout SAM sees at inference and no padding is
ever needed. The loss is BCE + Dice on the mask upsampled to image size against the exact visible mask, plus MSE on
SAM's predicted IoU. Everything runs through ``SamModel.forward`` (with precomputed image embeddings).

Point coordinates follow Hugging Face SAM: ``(x, y)`` in SAM input pixels, where integer ``(j, i)`` names pixel
column ``j``, row ``i`` (the model adds the half-pixel shift itself).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import Tensor
from tqdm import tqdm
from transformers import SamModel, SamProcessor

from lens.assets import METRICS_FILE, checkpoint_dir, checkpoint_metrics
from lens.data.synthetic import Scene, SceneObject, SyntheticWorld
from lens.tiny import TinySamSpec, build_sam
from lens.world.sam_prompts import POSITIVE, SceneTensors, centre_point, sample_prompts

logger = logging.getLogger(__name__)

# The shipped model's size: 16 x 16 image embeddings, 64 x 64 low-resolution masks.
WORLD_SAM_SPEC = TinySamSpec(
    image_size=128,
    patch_size=8,
    vision_hidden=96,
    vision_layers=4,
    vision_heads=4,
    prompt_hidden=64,
    decoder_layers=2,
    decoder_heads=4,
    decoder_mlp=256,
)
DICE_EPS = 1.0  # smoothing of the soft Dice, in pixels


@dataclass
class SamTrainConfig:
    spec: TinySamSpec = field(default_factory=lambda: WORLD_SAM_SPEC)
    seed: int = 0  # model init, scene order, prompts
    world_seed: int = 0
    train_scenes: int = 20000  # first scenes of the train split (all of it), rendered once into tensors
    eval_scenes: int = 1000  # first scenes of the val and test splits scored at the end (0: skip)
    steps: int = 1500
    batch_images: int = 48  # every object of each image is prompted: ~4 prompts per image
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200  # then cosine decay to 0
    grad_clip: float = 1.0
    positional_scale: float = 1.0  # std of SAM's random Fourier frequencies (see ``build_world_sam``)
    point_count_probs: tuple[float, ...] = (0.5, 0.25, 0.25)  # P(k positive points), k = 1, 2, ...
    box_prob: float = 0.15  # fraction of steps prompting with boxes instead of points
    negative_prob: float = 0.2  # fraction of point steps that add one negative point near the object
    negative_margin: float = 0.5  # negatives come from the box grown by this fraction of its side
    box_noise: float = 0.1  # std of each box coordinate's jitter, as a fraction of the box side
    flip_prob: float = 0.5  # horizontal flips of whole images
    prompts_per_mask: int = 2  # prompt rounds per step, all decoded from one image encoding
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    num_threads: int = 1  # CPU threads (another training job uses the other core)
    render_workers: int = 0  # processes rendering the train scenes (0: in the training process)
    device: str | None = None  # None: CUDA if available, else CPU
    log_every: int = 250
    init_from: str | None = None  # continue this checkpoint (a path or ``lens:`` id) instead of a new model

    def __post_init__(self) -> None:
        if self.init_from is not None:
            checkpoint_dir(self.init_from)


def build_world_sam(cfg: SamTrainConfig) -> tuple[SamModel, SamProcessor]:
    """``build_sam`` with SAM's own positional encoding: fixed random Fourier features of N(0, scale²) frequencies.

    Hugging Face initialises them with std ``hidden_size // 2`` (harmless when a checkpoint overwrites them): on
    a 16 x 16 grid such frequencies alias, a click's encoding no longer resembles the image encoding under it, and
    training stalls (one-click mIoU stayed near 0.2). SAM keeps the matrix as a frozen buffer, so do we.
    """
    model, processor = build_sam(cfg.spec, seed=cfg.seed)
    model.config.vision_config.scale = cfg.positional_scale
    frequencies = model.shared_image_embedding.positional_embedding  # (2, F), shared with the prompt encoder
    with torch.no_grad():
        frequencies.normal_(0.0, cfg.positional_scale, generator=torch.Generator().manual_seed(cfg.seed))
    frequencies.requires_grad_(False)
    return model, processor


def load_world_sam(model_id: str) -> tuple[SamModel, SamProcessor]:
    """A saved checkpoint to continue training, its positional frequencies frozen as ``build_world_sam`` does."""
    source = checkpoint_dir(model_id)
    model = SamModel.from_pretrained(source, local_files_only=True)
    model.shared_image_embedding.positional_embedding.requires_grad_(False)
    return model, SamProcessor.from_pretrained(source, local_files_only=True)


def pixel_values(images: Tensor, processor: SamProcessor) -> Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float, as ``processor(images=...)`` makes them for images already at
    SAM's input size (no resize, no padding), without the per-image PIL round trip."""
    ip = processor.image_processor
    side = (ip.pad_size["height"], ip.pad_size["width"])
    if tuple(images.shape[1:3]) != side:
        raise ValueError(f"the tensor path needs {side} images, got {tuple(images.shape[1:3])}")
    mean = torch.tensor(ip.image_mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() * ip.rescale_factor - mean) / std


def upscale_masks(low_res: Tensor, processor: SamProcessor) -> Tensor:
    """(M, h, w) low-resolution logits → (M, H, W) logits at SAM's input size, as ``post_process_masks`` does
    for images that needed no resize."""
    ip = processor.image_processor
    side = (ip.pad_size["height"], ip.pad_size["width"])
    return F.interpolate(low_res[:, None], side, mode="bilinear", align_corners=False)[:, 0]


def embed_images(model: SamModel, pixels: Tensor) -> Tensor:
    """(B, 3, H, W) → (B, C, h, w) image embeddings, with gradients (``get_image_embeddings`` has none)."""
    return model.vision_encoder(pixels).last_hidden_state


def predict_masks(
    model: SamModel,
    embeddings: Tensor,  # (B, C, h, w) from ``embed_images``, shared by all prompts on an image
    object_image: Tensor,  # (M,) which image each prompt is on
    points: Tensor | None = None,  # (M, K, 2) x, y in SAM input pixels
    labels: Tensor | None = None,  # (M, K) POSITIVE / NEGATIVE
    boxes: Tensor | None = None,  # (M, 4) x0, y0, x1, y1 in SAM input pixels
) -> tuple[Tensor, Tensor]:
    """Low-resolution mask logits (M, h', w') and predicted IoU (M,) for one prompt per object."""
    out = model(
        image_embeddings=embeddings[object_image],
        input_points=None if points is None else points[:, None],
        input_labels=None if labels is None else labels[:, None],
        input_boxes=None if boxes is None else boxes[:, None],
        multimask_output=False,
    )
    return out.pred_masks[:, 0, 0], out.iou_scores[:, 0, 0]


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """(M,) IoU of bool masks (M, H, W)."""
    inter = (pred & target).flatten(1).sum(1)
    union = (pred | target).flatten(1).sum(1)
    return inter / union.clamp(min=1)


def sam_loss(logits: Tensor, iou_pred: Tensor, target: Tensor, cfg: SamTrainConfig) -> dict[str, Tensor]:
    """BCE + Dice of mask logits (M, H, W) against bool targets (M, H, W), and MSE of the predicted IoU (M,)."""
    truth = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, truth)
    probs = logits.sigmoid().flatten(1)
    inter = (probs * truth.flatten(1)).sum(1)
    dice = 1 - (2 * inter + DICE_EPS) / (probs.sum(1) + truth.flatten(1).sum(1) + DICE_EPS)
    iou = F.mse_loss(iou_pred, mask_iou(logits.detach() > 0, target))
    total = cfg.bce_weight * bce + cfg.dice_weight * dice.mean() + cfg.iou_weight * iou
    return {"loss": total, "bce": bce, "dice": dice.mean(), "iou_mse": iou}


@torch.inference_mode()
def point_ious(
    model: SamModel, processor: SamProcessor, scenes: Sequence[Scene], batch_images: int = 32
) -> tuple[np.ndarray, list[SceneObject]]:
    """IoU (M,) of every object's mask predicted from one positive click at ``centre_point``; the objects."""
    device = model.device
    ious, objects = [], []
    for start in range(0, len(scenes), batch_images):
        chunk = scenes[start : start + batch_images]
        data = SceneTensors.from_scenes(chunk)
        clicks = [centre_point(obj) for scene in chunk for obj in scene.objects]
        points = torch.tensor(clicks, dtype=torch.float32, device=device)[:, None]  # (M, 1, 2)
        labels = torch.full(points.shape[:2], POSITIVE, device=device)
        pixels = pixel_values(data.images.to(device), processor)
        embeddings = embed_images(model, pixels)
        low_res, _ = predict_masks(model, embeddings, data.object_image.to(device), points, labels)
        pred = upscale_masks(low_res, processor) > 0
        target = data.masks().to(device)
        ious.append(mask_iou(pred, target).cpu().numpy())
        objects += [obj for scene in chunk for obj in scene.objects]
    return np.concatenate(ious), objects


def evaluate_point_miou(model: SamModel, processor: SamProcessor, scenes: Sequence[Scene]) -> float:
    """Mean over objects of the IoU from one positive click at the object's centre (see ``centre_point``)."""
    return float(point_ious(model, processor, scenes)[0].mean())


def _lr_factor(step: int, cfg: SamTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _batches(num_images: int, cfg: SamTrainConfig, generator: torch.Generator):
    """Image indices (B,) for ``cfg.steps`` steps, reshuffled every epoch."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_images:
            order = torch.cat([order, torch.randperm(num_images, generator=generator)])
        yield order[: cfg.batch_images]
        order = order[cfg.batch_images :]


def _split_metrics(model: SamModel, processor: SamProcessor, scenes: Sequence[Scene]) -> dict:
    ious, objects = point_ious(model, processor, scenes)
    metrics = {"point_miou": float(ious.mean()), "num_objects": len(ious)}
    for attribute in ("shape", "size"):
        groups = defaultdict(list)
        for iou, obj in zip(ious, objects, strict=True):
            groups[getattr(obj, attribute)].append(iou)
        metrics[f"per_{attribute}"] = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
    return metrics


def train_sam(cfg: SamTrainConfig, out_dir: str | Path, command: str | None = None) -> dict:
    """Train (from scratch, or on from ``cfg.init_from``), save into ``out_dir`` with ``metrics.json``; return metrics."""
    torch.set_num_threads(cfg.num_threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(cfg.seed)
    model, processor = build_world_sam(cfg) if cfg.init_from is None else load_world_sam(cfg.init_from)
    model.to(device).train()
    world = SyntheticWorld(seed=cfg.world_seed)
    data = SceneTensors.render(world.split("train")[: cfg.train_scenes], cfg.render_workers)
    logger.info("rendered %d train scenes, %d objects", len(data.images), len(data.object_image))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    start, losses = time.perf_counter(), []
    progress = tqdm(_batches(len(data.images), cfg, generator), total=cfg.steps, desc="sam", disable=None)
    for step, images in enumerate(progress):
        flip = torch.rand(len(images), generator=generator) < cfg.flip_prob  # (B,)
        image_batch, masks, local = data.batch(images, flip)
        embeddings = embed_images(model, pixel_values(image_batch.to(device), processor))
        rounds = []  # several prompts per mask share one image encoding, as in SAM's training
        for _ in range(cfg.prompts_per_mask):
            prompts = sample_prompts(masks, cfg, generator)
            low_res, iou_pred = predict_masks(
                model, embeddings, local.to(device), **{k: v.to(device) for k, v in prompts.items()}
            )
            rounds.append(sam_loss(upscale_masks(low_res, processor), iou_pred, masks.to(device), cfg))
        terms = {k: torch.stack([r[k] for r in rounds]).mean() for k in rounds[0]}
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(terms["loss"].item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.info("step %d %s", step + 1, " ".join(f"{k} {v.item():.4f}" for k, v in terms.items()))
    train_seconds = time.perf_counter() - start
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # safetensors, the only format of transformers 5
    processor.save_pretrained(out_dir)
    # Score what was shipped: the directory reloaded offline, exactly as users load it.
    model = SamModel.from_pretrained(out_dir, local_files_only=True).to(device).eval()
    processor = SamProcessor.from_pretrained(out_dir, local_files_only=True)
    metrics = {
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-cfg.log_every :])),
        "command": command,
        "config": asdict(cfg),
    }
    for split in ("val", "test") if cfg.eval_scenes else ():
        metrics[split] = _split_metrics(model, processor, world.split(split)[: cfg.eval_scenes])
        logger.info("%s: one centre click mIoU %.4f", split, metrics[split]["point_miou"])
    if cfg.init_from is not None:  # keep the history: the run this one continued
        metrics["init_from_metrics"] = checkpoint_metrics(cfg.init_from)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


app = typer.Typer(add_completion=False)


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="directory for the model, processor and metrics.json")],
    steps: int = SamTrainConfig.steps,
    batch_images: int = SamTrainConfig.batch_images,
    train_scenes: int = SamTrainConfig.train_scenes,
    eval_scenes: int = SamTrainConfig.eval_scenes,
    lr: float = SamTrainConfig.lr,
    warmup_steps: int = SamTrainConfig.warmup_steps,
    seed: int = SamTrainConfig.seed,
    render_workers: int = SamTrainConfig.render_workers,
    num_threads: int = SamTrainConfig.num_threads,
    init_from: Annotated[
        str | None, typer.Option(help="continue training this checkpoint (a directory or lens: id)")
    ] = None,
) -> None:
    """Pretrain the synthetic world's small SAM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = SamTrainConfig(
            steps=steps,
            batch_images=batch_images,
            train_scenes=train_scenes,
            eval_scenes=eval_scenes,
            lr=lr,
            warmup_steps=warmup_steps,
            seed=seed,
            render_workers=render_workers,
            num_threads=num_threads,
            init_from=init_from,
        )
    except FileNotFoundError as error:  # a bad --init-from: a usage error, not a traceback
        raise typer.BadParameter(str(error)) from None
    train_sam(cfg, out, command=shlex.join(["python", "-m", "lens.world.sam", *sys.argv[1:]]))


if __name__ == "__main__":
    app()
