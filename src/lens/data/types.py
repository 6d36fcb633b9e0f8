"""The one sample type every data source produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255  # mask value for pixels excluded from losses and metrics (LISA's convention)


@dataclass
class Sample:
    """One (image, query, mask) triple, whatever dataset it came from.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        query: the referring expression / question / class phrase, without any prompt template.
        mask: (H, W) uint8: 1 target, 0 background, ``IGNORE_INDEX`` ignored. All zeros = no target.
        is_sentence: ReasonSeg's long-query flag (False for short phrases).
        source: dataset name, e.g. ``"reason_seg"``, ``"refcoco"``, ``"ade20k"``, ``"synthetic"``.
        name: an identifier unique within the source (file stem, ref id, ...), for per-sample results.
        kind, held_out: optional per-query labels that evaluation reports as subsets.
    """

    image: np.ndarray
    query: str
    mask: np.ndarray
    is_sentence: bool = False
    source: str = ""
    name: str = ""
    kind: str = ""  # a dataset's own query category, reported as a subset ("kind:<kind>"); "" for none
    held_out: bool = False  # the target is of a kind held out of training (reported as the held_out subset)

    @property
    def ignore_mask(self) -> np.ndarray:
        """(H, W) bool: pixels to leave out of losses and metrics."""
        return self.mask == IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"Sample {self.name!r}: image must be (H, W, 3), got {self.image.shape}")
        if self.mask.shape != self.image.shape[:2]:
            raise ValueError(
                f"Sample {self.name!r}: mask shape {self.mask.shape} != image shape {self.image.shape[:2]}"
            )
