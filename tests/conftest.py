"""Shared fixtures: tiny randomly initialised LLaVA + SAM built from configs (no download)."""

from __future__ import annotations

import pytest

from helpers import make_lens
from lens.model import LensModel
from lens.tiny import build_tiny_models


@pytest.fixture
def tiny_models():
    """(llava, llava_processor, sam, sam_processor), fresh per test so no test sees another's changes."""
    return build_tiny_models(seed=0)


@pytest.fixture
def tiny_lens(tiny_models) -> LensModel:
    return make_lens(tiny_models)
