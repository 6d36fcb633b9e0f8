"""Systems LENS is compared with, each behind the same evaluation entry point as LENS (``lens.evaluation``)."""

from lens.baselines.training_free import TrainingFreeModel, TrainingFreeSettings

__all__ = ["TrainingFreeModel", "TrainingFreeSettings"]
