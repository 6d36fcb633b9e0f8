"""Rendering of the synthetic world: flat-coloured shapes painted in depth order over a textured background.

Everything is exact by construction: no anti-aliasing, so an object's mask is precisely the set of pixels that
show its colour, and a dropped (mostly hidden) object is never painted at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

# Saturated, well separated colours; backgrounds stay desaturated so neither can be mistaken for the other.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
# Radius ranges as fractions of the image side; the gap between them keeps "small" and "large" unambiguous.
SIZES: dict[str, tuple[float, float]] = {"small": (0.06, 0.08), "large": (0.12, 0.16)}
BACKGROUNDS: tuple[str, ...] = ("graded", "striped", "checkered", "speckled")
DEFAULT_IMAGE_SIZE = 128

MIN_VISIBLE_FRACTION = 0.4  # objects less visible than this are dropped, so every query stays answerable
MAX_ROTATION_DEG = 15.0  # small jitter: a square never turns into a diamond
EXTENT = 1.2  # every shape fits in a disc of EXTENT * radius around its centre
PLACEMENT_ATTEMPTS = 20  # tries per object before a scene settles for fewer objects
SAME_COLOUR_GAP_PX = 2.0  # same-coloured objects never touch, so their boundary is always visible

RING_HOLE = 0.5  # inner radius of a ring, relative to its outer radius
CROSS_ARM = 0.35  # half-width of a cross's arms
DIAMOND_WIDTH = 0.65  # half-width of a diamond (its half-height is 1)
SQUARE_HALF_SIDE = 0.8
STAR_INNER = 0.45  # radius of a star's inner corners
TRIANGLE_SCALE = 1.15  # a triangle of circumradius 1 looks small next to the other shapes

BACKGROUND_LEVEL = (70, 200)  # grey level range of background tones
BACKGROUND_TINT = 8  # per-channel tint added to a grey tone
BACKGROUND_CONTRAST = (25, 50)  # grey-level difference between a background's two tones
TEXTURE_PERIOD = (6, 16)  # stripe / checker period in pixels
SPECKLE_AMPLITUDE = 12


@dataclass(frozen=True)
class Placement:
    """What to draw: one shape, before occlusion.

    Attributes:
        centre: (x, y) in pixels, pixel (i, j) covering [j, j + 1) x [i, i + 1).
        radius: half the shape's nominal size, in pixels.
        angle: rotation in degrees (positive turns clockwise on screen).
    """

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float
    angle: float = 0.0


@dataclass(frozen=True)
class SceneObject(Placement):
    """A placed shape together with what remained visible of it (equality compares the placement only).

    Attributes:
        mask: (H, W) bool, exactly the visible pixels (all of them show ``COLOURS[colour]``).
    """

    mask: np.ndarray = field(kw_only=True, compare=False, repr=False)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the visible pixels, end-exclusive."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            raise ValueError(f"the {self.colour} {self.shape} has no visible pixels, hence no box")
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def _convex(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Points (u, v) inside the convex polygon ``vertices`` (K, 2), whatever its orientation."""
    edges = np.roll(vertices, -1, axis=0) - vertices  # (K, 2)
    signed_area = np.sum(
        vertices[:, 0] * np.roll(vertices[:, 1], -1) - np.roll(vertices[:, 0], -1) * vertices[:, 1]
    )
    sign = 1.0 if signed_area >= 0 else -1.0
    inside = np.ones(u.shape, bool)
    for (x0, y0), (ex, ey) in zip(vertices, edges, strict=True):
        inside &= sign * (ex * (v - y0) - ey * (u - x0)) >= 0
    return inside


def _regular(n: int, start: float, radius: float = 1.0) -> np.ndarray:
    """(n, 2) vertices of a regular polygon; ``start`` is the first vertex's angle (v points down)."""
    angles = start + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    outer = _regular(5, -np.pi / 2)
    inner = _regular(5, -np.pi / 2 + np.pi / 5, STAR_INNER)
    inside = _convex(u, v, inner)
    for k in range(5):  # one triangular point per outer corner
        inside |= _convex(u, v, np.stack([inner[k - 1], outer[k], inner[k]]))
    return inside


_SHAPE_TESTS = {
    "circle": lambda u, v: u**2 + v**2 <= 1.0,
    "ring": lambda u, v: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= RING_HOLE**2),
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= SQUARE_HALF_SIDE,
    "triangle": lambda u, v: _convex(u, v, _regular(3, -np.pi / 2, TRIANGLE_SCALE)),
    "star": _star,
    "cross": lambda u, v: (
        (np.minimum(np.abs(u), np.abs(v)) <= CROSS_ARM) & (np.maximum(np.abs(u), np.abs(v)) <= 1)
    ),
    "diamond": lambda u, v: np.abs(u) / DIAMOND_WIDTH + np.abs(v) <= 1.0,
    "hexagon": lambda u, v: _convex(u, v, _regular(6, 0.0)),
}
assert set(_SHAPE_TESTS) == set(SHAPES)


def rasterize(placement: Placement, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the pixels whose centres fall inside the (unoccluded) shape."""
    mask = np.zeros((height, width), bool)
    cx, cy = placement.centre
    reach = EXTENT * placement.radius
    x0, x1 = max(int(cx - reach), 0), min(int(np.ceil(cx + reach)) + 1, width)
    y0, y1 = max(int(cy - reach), 0), min(int(np.ceil(cy + reach)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return mask
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5  # pixel centres of the window around the shape
    theta = np.deg2rad(placement.angle)
    dx, dy = xs - cx, ys - cy
    # Rotate the sample points by -angle, i.e. the shape by +angle; normalise by the radius.
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / placement.radius
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / placement.radius
    mask[y0:y1, x0:x1] = _SHAPE_TESTS[placement.shape](u, v)
    return mask


def compose(placements: Sequence[Placement], background: np.ndarray) -> tuple[np.ndarray, list[SceneObject]]:
    """Paint ``placements`` bottom first onto ``background`` (H, W, 3) uint8.

    Returns the image and one ``SceneObject`` per placement, in the same order, whose mask is what stayed visible.
    """
    height, width = background.shape[:2]
    image = background.copy()
    full = [rasterize(p, height, width) for p in placements]
    covered = np.zeros((height, width), bool)
    visible: list[np.ndarray] = []
    for mask in reversed(full):  # top first: each object is hidden by everything painted after it
        visible.append(mask & ~covered)
        covered |= mask
    for p, mask in zip(placements, full, strict=True):
        image[mask] = COLOURS[p.colour]
    objects = [
        SceneObject(**{f.name: getattr(p, f.name) for f in fields(Placement)}, mask=m)
        for p, m in zip(placements, reversed(visible), strict=True)
    ]
    return image, objects


def _tone(rng: np.random.Generator, level: float) -> np.ndarray:
    """(3,) a grey of the given level with a faint random tint."""
    return np.clip(level + rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3), 0, 255)


def render_background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 desaturated background of one of ``BACKGROUNDS``."""
    level = rng.uniform(*BACKGROUND_LEVEL)
    contrast = rng.uniform(*BACKGROUND_CONTRAST) * rng.choice([-1, 1])
    tone_a, tone_b = _tone(rng, level), _tone(rng, np.clip(level + contrast, 0, 255))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = rng.uniform(0, np.pi)
    along = xs * np.cos(theta) + ys * np.sin(theta)  # (H, W) coordinate along a random direction
    period = rng.uniform(*TEXTURE_PERIOD)
    if kind == "graded":
        weight = (along - along.min()) / max(along.max() - along.min(), 1e-9)
    elif kind == "striped":
        weight = (np.floor(along / period) % 2).astype(np.float64)
    elif kind == "checkered":
        weight = ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float64)
    elif kind == "speckled":
        weight = np.zeros((height, width))
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    image = tone_a + weight[..., None] * (tone_b - tone_a)  # (H, W, 3)
    if kind == "speckled":
        image = image + rng.uniform(-SPECKLE_AMPLITUDE, SPECKLE_AMPLITUDE, size=(height, width, 1))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def sample_placements(rng: np.random.Generator, height: int, width: int, num_objects: int) -> list[Placement]:
    """Up to ``num_objects`` random placements, bottom first, each at least ``MIN_VISIBLE_FRACTION`` visible.

    Objects are drawn top first, each new one going underneath the ones already kept, so a candidate's
    visibility is final when it is accepted and nothing is painted that is later dropped.
    """
    kept: list[Placement] = []  # top first
    covered = np.zeros((height, width), bool)
    for _ in range(num_objects):
        for _ in range(PLACEMENT_ATTEMPTS):
            size = str(rng.choice(list(SIZES)))
            radius = rng.uniform(*SIZES[size]) * min(height, width)
            margin = EXTENT * radius
            placement = Placement(
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                size=size,
                centre=(
                    float(rng.uniform(margin, width - margin)),
                    float(rng.uniform(margin, height - margin)),
                ),
                radius=float(radius),
                angle=float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)),
            )
            if any(_touch_same_colour(placement, other) for other in kept):
                continue
            mask = rasterize(placement, height, width)
            if (mask & ~covered).sum() >= MIN_VISIBLE_FRACTION * mask.sum():
                kept.append(placement)
                covered |= mask
                break
    return kept[::-1]


def _touch_same_colour(a: Placement, b: Placement) -> bool:
    """Whether two same-coloured shapes could touch (they would merge into one blob on screen)."""
    distance = np.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1])
    return a.colour == b.colour and distance <= EXTENT * (a.radius + b.radius) + SAME_COLOUR_GAP_PX
