"""Minimal stand-in (branch `interfaces`) for branch `reliability`'s lens.errors; replaced at merge."""

from __future__ import annotations


class InvalidInput(ValueError):
    """An image, query or other argument handed to LENS that it cannot use as given."""
