"""Data: the common sample type, dataset readers, the synthetic world and prompt templates."""

from lens.data.types import IGNORE_INDEX, Sample

__all__ = ["IGNORE_INDEX", "Sample"]
