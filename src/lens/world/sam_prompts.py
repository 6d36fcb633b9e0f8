"""The data side of training the world's small SAM: scenes rendered to tensors and the prompts drawn on them.

Point coordinates follow Hugging Face SAM: ``(x, y)`` in SAM input pixels, where integer ``(j, i)`` names pixel
column ``j``, row ``i`` (the model adds the half-pixel shift itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lens.data.synthetic import Scene, SceneObject

if TYPE_CHECKING:
    from lens.world.sam import SamTrainConfig

POSITIVE, NEGATIVE = 1, 0  # SAM's point labels


@dataclass
class SceneTensors:
    """Rendered scenes as tensors. Visible masks never overlap, so one label map per image holds them all.

    Attributes:
        images: (N, H, W, 3) uint8.
        labels: (N, H, W) uint8; pixel value k + 1 belongs to object k of its scene, 0 to the background.
        object_image: (M,) long, the image of each object.
        object_label: (M,) uint8, its value in ``labels``.
    """

    images: Tensor
    labels: Tensor
    object_image: Tensor
    object_label: Tensor

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene]) -> SceneTensors:
        labels = np.zeros((len(scenes), *scenes[0].image.shape[:2]), np.uint8)
        object_image, object_label = [], []
        for i, scene in enumerate(scenes):
            for k, obj in enumerate(scene.objects):
                labels[i][obj.mask] = k + 1
                object_image.append(i)
                object_label.append(k + 1)
        return cls(
            torch.from_numpy(np.stack([s.image for s in scenes])),
            torch.from_numpy(labels),
            torch.tensor(object_image),
            torch.tensor(object_label, dtype=torch.uint8),
        )

    @classmethod
    def render(cls, scenes: Sequence[Scene], workers: int = 0, chunk: int = 500) -> SceneTensors:
        """``from_scenes`` over chunks rendered by ``workers`` processes (scenes are generated lazily)."""
        if workers <= 0:
            return cls.from_scenes(scenes)
        chunks = [scenes[i : i + chunk] for i in range(0, len(scenes), chunk)]
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(cls.from_scenes, chunks))
        offsets = torch.tensor([0] + [len(p.images) for p in parts[:-1]]).cumsum(0)
        return cls(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.object_image + offset for p, offset in zip(parts, offsets, strict=True)]),
            torch.cat([p.object_label for p in parts]),
        )

    def masks(self) -> Tensor:
        """(M, H, W) bool visible masks of all objects."""
        return self.labels[self.object_image] == self.object_label[:, None, None]

    def batch(self, images: Tensor, flip: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images (B,) flipped left-right where ``flip`` (B,) is set: their (B, H, W, 3) pixels, the (M, H, W)
        masks of all their objects, and each object's position (M,) in the batch."""
        first = torch.searchsorted(self.object_image, torch.arange(len(self.images) + 1))  # (N + 1,)
        counts = first[images + 1] - first[images]  # (B,)
        objects = torch.cat(
            [torch.arange(first[i], first[i] + n) for i, n in zip(images, counts, strict=True)]
        )
        pixels = torch.where(flip[:, None, None, None], self.images[images].flip(2), self.images[images])
        labels = torch.where(flip[:, None, None], self.labels[images].flip(2), self.labels[images])
        local = torch.repeat_interleave(torch.arange(len(images)), counts)  # (M,)
        return pixels, labels[local] == self.object_label[objects, None, None], local


def centre_point(obj: SceneObject) -> tuple[int, int]:
    """The one-click prompt for ``obj``: the pixel (x, y) holding its centre, or else the visible pixel nearest it.

    The centre of a ring, or of a partly hidden object, may not be on the object; a click there would ask for
    something else, so the click moves to the closest visible pixel (distances between pixel centres, ties to the
    first in row-major order).
    """
    cx, cy = obj.centre
    row, col = int(cy), int(cx)
    height, width = obj.mask.shape
    if 0 <= row < height and 0 <= col < width and obj.mask[row, col]:
        return col, row
    ys, xs = np.nonzero(obj.mask)
    nearest = np.argmin((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2)
    return int(xs[nearest]), int(ys[nearest])


def mask_boxes(masks: Tensor) -> Tensor:
    """(M, H, W) bool → (M, 4) float boxes (x0, y0, x1, y1) through the centres of the extreme pixels."""
    cols, rows = masks.any(1), masks.any(2)  # (M, W), (M, H)
    first = [a.float().argmax(1) for a in (cols, rows)]
    last = [a.shape[1] - 1 - a.flip(1).float().argmax(1) for a in (cols, rows)]
    return torch.stack([*first, *last], 1).float()


def sample_points(weights: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """(M, count, 2) x, y of pixels drawn from each (H, W) map of ``weights`` (M, H, W)."""
    flat = torch.multinomial(weights.flatten(1).float(), count, replacement=True, generator=generator)
    width = weights.shape[-1]
    return torch.stack([flat % width, flat // width], -1).float()


def sample_prompts(masks: Tensor, cfg: SamTrainConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """One random prompt per mask (M, H, W), all of the same kind: ``predict_masks`` keyword arguments."""
    M, H, W = masks.shape
    boxes = mask_boxes(masks)  # (M, 4)
    side = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)  # (M, 4) box width, height, width, height
    if torch.rand((), generator=generator) < cfg.box_prob:
        jitter = torch.randn(boxes.shape, generator=generator) * cfg.box_noise * side
        jittered = (boxes + jitter).clamp(min=0).minimum(torch.tensor([W - 1.0, H - 1.0] * 2))
        corners = torch.stack(
            [jittered[:, :2].minimum(jittered[:, 2:]), jittered[:, :2].maximum(jittered[:, 2:])]
        )
        return {"boxes": torch.cat([corners[0], corners[1]], 1)}
    count = 1 + int(torch.multinomial(torch.tensor(cfg.point_count_probs), 1, generator=generator))
    points = sample_points(masks, count, generator)  # (M, count, 2)
    labels = torch.full((M, count), POSITIVE)
    if torch.rand((), generator=generator) < cfg.negative_prob:
        ys, xs = torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
        grown = boxes + cfg.negative_margin * side * torch.tensor([-1.0, -1.0, 1.0, 1.0])
        near = (xs >= grown[:, 0, None, None]) & (xs <= grown[:, 2, None, None])  # (M, 1, W)
        near = near & (ys >= grown[:, 1, None, None]) & (ys <= grown[:, 3, None, None])  # (M, H, W)
        outside = ~masks & near
        outside |= ~masks & ~outside.flatten(1).any(1)[:, None, None]  # nothing near: anywhere outside
        points = torch.cat([points, sample_points(outside, 1, generator)], 1)
        labels = torch.cat([labels, torch.full((M, 1), NEGATIVE)], 1)
    return {"points": points, "labels": labels}
