"""The synthetic world: seeded train / val / test splits of scenes, each scene reproducible on its own.

Scene ``i`` of a split draws its randomness from ``SeedSequence(seed, spawn_key=(split, i))`` only, so any scene
can be regenerated without the ones before it, and the splits never share a random stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from lens.data.synthetic.phrasing import CANONICAL, WORLD_PHRASINGS, Phraser, check_phrasing
from lens.data.synthetic.queries import QA, SegQuery, scene_segmentation_queries, scene_vqa
from lens.data.synthetic.scene import (
    BACKGROUNDS,
    DEFAULT_IMAGE_SIZE,
    Placement,
    SceneObject,
    compose,
    render_background,
    sample_placements,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Colour x shape pairs that are never the target of a training query: the test split measures whether
# segmentation composes attributes it has only seen apart. They still appear in training images and VQA.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "star"), ("blue", "ring"), ("green", "triangle"), ("yellow", "cross")}
)
HELD_OUT_SPLITS: tuple[str, ...] = ("train",)
DEFAULT_NO_TARGET_FRACTION = 0.1
MAX_LAYOUT_TRIES = 100  # layouts re-drawn if too few objects fit (never needed at the default sizes)


@dataclass(eq=False)
class Scene:
    """One image and the objects visible in it.

    Attributes:
        image: (H, W, 3) uint8.
        objects: in paint order, bottom first; each mask is the object's visible pixels.
        background: one of ``BACKGROUNDS`` (named in captions).
        seed: drives the choice of templates in ``vqa`` and ``segmentation_queries``, which are deterministic.
        excluded_targets: (colour, shape) pairs no segmentation query may target.
        phrasing: how ``vqa`` and ``segmentation_queries`` word their text by default (``PHRASINGS``).
    """

    image: np.ndarray
    objects: list[SceneObject]
    background: str
    name: str = "scene"
    seed: int = 0
    excluded_targets: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    no_target_fraction: float = DEFAULT_NO_TARGET_FRACTION
    phrasing: str = CANONICAL

    def __post_init__(self) -> None:
        check_phrasing(self.phrasing)

    @classmethod
    def from_placements(
        cls,
        placements: Sequence[Placement],
        height: int = DEFAULT_IMAGE_SIZE,
        width: int = DEFAULT_IMAGE_SIZE,
        background: str = "graded",
        seed: int = 0,
        **kwargs: Any,
    ) -> Scene:
        """A hand-made scene; unlike generated ones, hardly visible objects are kept (the caller chose them)."""
        image, objects = compose(
            placements, render_background(background, height, width, np.random.default_rng(seed))
        )
        return cls(image, objects, background, seed=seed, **kwargs)

    def _phraser(self, phrasing: str | None, stream: int) -> Phraser | None:
        phrasing = check_phrasing(self.phrasing if phrasing is None else phrasing)
        return (
            None if phrasing == CANONICAL else Phraser(phrasing, np.random.default_rng([self.seed, stream]))
        )

    def vqa(self, phrasing: str | None = None) -> list[QA]:
        """(question, answer, kind) triples; kind is a key of ``VQA_TEMPLATES``.

        Every phrasing (default: the scene's) asks the same questions, with the same answers, in order.
        """
        height, width = self.image.shape[:2]
        rng = np.random.default_rng([self.seed, 0])
        return scene_vqa(self.objects, self.background, height, width, rng, self._phraser(phrasing, 2))

    def segmentation_queries(self, phrasing: str | None = None) -> list[SegQuery]:
        """The scene's queries; every phrasing (default: the scene's) has the same kinds, targets and masks."""
        return scene_segmentation_queries(
            self.image,
            self.objects,
            self.name,
            np.random.default_rng([self.seed, 1]),
            self.excluded_targets,
            self.no_target_fraction,
            self._phraser(phrasing, 3),
        )


@dataclass(frozen=True)
class SyntheticWorld:
    """All settings of the world; ``SyntheticWorld(seed=0).split("train")[i]`` is always the same scene."""

    seed: int = 0
    height: int = DEFAULT_IMAGE_SIZE
    width: int = DEFAULT_IMAGE_SIZE
    min_objects: int = 2
    max_objects: int = 6
    no_target_fraction: float = DEFAULT_NO_TARGET_FRACTION
    train_size: int = 20_000
    val_size: int = 500
    test_size: int = 1_000
    held_out_pairs: frozenset[tuple[str, str]] = HELD_OUT_PAIRS
    # "canonical" (the original text) or "varied" (seen pools); held-out pools are only ever asked for
    # explicitly (Scene.vqa(phrasing="held_out"), the *_heldout_phrasing evaluation splits).
    phrasing: str = CANONICAL

    def __post_init__(self) -> None:
        check_phrasing(self.phrasing, WORLD_PHRASINGS)
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 0.0 <= self.no_target_fraction < 1.0:
            raise ValueError(f"no_target_fraction must be in [0, 1), got {self.no_target_fraction}")

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}[_check_split(split)]

    def split(self, split: str) -> SceneSplit:
        return SceneSplit(self, _check_split(split))

    def scene(self, split: str, index: int) -> Scene:
        """Scene ``index`` of ``split``, generated from its own seed."""
        sequence = np.random.SeedSequence(self.seed, spawn_key=(SPLITS.index(_check_split(split)), index))
        layout_seed, text_seed = sequence.spawn(2)
        rng = np.random.default_rng(layout_seed)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        for _ in range(MAX_LAYOUT_TRIES):
            num_objects = int(rng.integers(self.min_objects, self.max_objects + 1))
            placements = sample_placements(rng, self.height, self.width, num_objects)
            if len(placements) >= self.min_objects:
                break
        else:
            raise RuntimeError(
                f"could not fit {self.min_objects} objects in {self.height}x{self.width} images"
            )
        image, objects = compose(placements, render_background(background, self.height, self.width, rng))
        return Scene(
            image,
            objects,
            background,
            name=f"{split}_{index:06d}",
            seed=int(text_seed.generate_state(1)[0]),
            excluded_targets=self.held_out_pairs if split in HELD_OUT_SPLITS else frozenset(),
            no_target_fraction=self.no_target_fraction,
            phrasing=self.phrasing,
        )


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


class SceneSplit(Sequence[Scene]):
    """A lazily generated, fixed-length sequence of scenes."""

    def __init__(self, world: SyntheticWorld, split: str) -> None:
        self.world, self.name = world, split

    def __len__(self) -> int:
        return self.world.split_size(self.name)

    @overload
    def __getitem__(self, index: int) -> Scene: ...
    @overload
    def __getitem__(self, index: slice) -> list[Scene]: ...
    def __getitem__(self, index: int | slice) -> Scene | list[Scene]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"scene {index} out of range for the {len(self)} scenes of {self.name!r}")
        return self.world.scene(self.name, index % len(self))

    def segmentation_queries(
        self, num_scenes: int | None = None, phrasing: str | None = None
    ) -> Iterator[SegQuery]:
        """Every segmentation query of the first ``num_scenes`` scenes (all by default)."""
        for i in range(len(self) if num_scenes is None else min(num_scenes, len(self))):
            yield from self[i].segmentation_queries(phrasing)
