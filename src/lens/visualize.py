"""Pictures of what LENS did: mask overlay, attention map A_c, keypoints (as in the paper's Fig. 3)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from lens.model import Prediction

MASK_COLOUR = (30, 144, 255)  # overlay colour of the predicted mask
TRUTH_COLOUR = (50, 205, 50)  # overlay colour of the ground truth
INSIDE_COLOUR = (255, 255, 255)  # keypoint inside the predicted mask (white in Fig. 3)
OUTSIDE_COLOUR = (230, 30, 30)  # keypoint outside it (red in Fig. 3)


def overlay_mask(
    image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = MASK_COLOUR, alpha: float = 0.5
) -> Image.Image:
    """Blend ``colour`` into ``image`` where ``mask`` (H, W) is true."""
    base = np.asarray(image.convert("RGB")).astype(np.float32)
    region = np.asarray(mask, dtype=bool)
    base[region] = (1 - alpha) * base[region] + alpha * np.asarray(colour, np.float32)
    return Image.fromarray(base.round().astype(np.uint8))


def attention_image(attention_map: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A_c (gh, gw) as a heat map of ``size`` (width, height) covering the MLLM's padded square.

    A_c is an attention mass (its cells sum to at most 1), so it is shown relative to its largest cell.
    """
    a = np.clip(np.asarray(attention_map, np.float32), 0, None)
    a = a / a.max() if a.max() > 0 else a
    # Black → red → yellow → white: readable without a colour-map dependency.
    rgb = np.stack([np.clip(3 * a, 0, 1), np.clip(3 * a - 1, 0, 1), np.clip(3 * a - 2, 0, 1)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)


def draw_keypoints(
    image: Image.Image, points: np.ndarray, inside: np.ndarray, radius: int = 3
) -> Image.Image:
    """Dots at ``points`` (n, 2) x, y in ``image`` pixels; white if ``inside`` else red."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for (x, y), ok in zip(np.asarray(points), np.asarray(inside), strict=True):
        colour = INSIDE_COLOUR if ok else OUTSIDE_COLOUR
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))
    return out


def panel(images: list[Image.Image], titles: list[str], height: int = 256) -> Image.Image:
    """Images side by side, scaled to a common height, each with a one-line title above it."""
    title_h = 16
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    out = Image.new(
        "RGB", (sum(im.width for im in scaled) + 4 * (len(scaled) - 1), height + title_h), "white"
    )
    draw = ImageDraw.Draw(out)
    x = 0
    for im, title in zip(scaled, titles, strict=True):
        out.paste(im, (x, title_h))
        draw.text((x + 2, 2), title, fill=(0, 0, 0))
        x += im.width + 4
    return out


def display_size(width: int, height: int, target_height: int) -> tuple[int, int]:
    """(width, height) of an image scaled to ``target_height`` rows, never enlarged."""
    scale = min(1.0, target_height / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def lens_figure(
    image: Image.Image,
    prediction: Prediction,
    query: str,
    truth: np.ndarray | None = None,
    height: int = 256,
) -> Image.Image:
    """Query | attention map A_c with keypoints | predicted mask (| ground truth), like the paper's Fig. 3.

    Everything is drawn at display size (``height`` rows): an 8000 x 8000 photo costs a 256 x 256 figure,
    not a full-resolution lookup of every pixel's grid cell.
    """
    w, h = display_size(image.width, image.height, height)
    sx, sy = w / image.width, h / image.height
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    small = rgb if (w, h) == rgb.size else rgb.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    rows = np.minimum(((np.arange(h) + 0.5) / sy).astype(int), image.height - 1)  # nearest source row
    cols = np.minimum(((np.arange(w) + 0.5) / sx).astype(int), image.width - 1)

    def shrink(mask: np.ndarray) -> np.ndarray:  # (H, W) -> (h, w), nearest original pixel
        return np.asarray(mask)[rows[:, None], cols[None, :]]

    # A_c over the image frame: look up each display pixel centre's grid cell, in original-pixel coordinates.
    ys, xs = np.mgrid[0:h, 0:w]
    centres = torch.tensor(np.stack([(xs + 0.5) / sx, (ys + 0.5) / sy], -1), dtype=torch.float32)  # (h, w, 2)
    cells = prediction.geometry.image_to_grid(centres)
    gh, gw = prediction.attention_map.shape
    col = np.clip(np.round(cells[..., 0].numpy()).astype(int), 0, gw - 1)
    row = np.clip(np.round(cells[..., 1].numpy()).astype(int), 0, gh - 1)
    heat = attention_image(prediction.attention_map[row, col], (w, h))
    blended = Image.blend(small, heat, 0.6)
    points = np.asarray(prediction.keypoints, np.float64).reshape(-1, 2) * np.array([sx, sy])
    attention = draw_keypoints(blended, points, prediction.keypoints_inside)
    images = [small, attention, overlay_mask(small, shrink(prediction.mask) > 0)]
    titles = ["image", "A_c + keypoints", f"mask (score {prediction.score:.2f})"]
    if truth is not None:
        images.append(overlay_mask(small, shrink(np.asarray(truth) == 1) > 0, TRUTH_COLOUR))
        titles.append("ground truth")
    figure = panel(images, titles, height)
    caption = Image.new("RGB", (figure.width, 18), "white")
    ImageDraw.Draw(caption).text((2, 3), query[:160], fill=(0, 0, 0))
    out = Image.new("RGB", (figure.width, figure.height + caption.height), "white")
    out.paste(caption, (0, 0))
    out.paste(figure, (0, caption.height))
    return out
