"""Builds an ``ImageGeometry`` under either geometry API: main's (eb8b5c5: ``ImageGeometry(width, height,
grid_h=, grid_w=, sam_size=)``) and `contracts`' v2 (``ImageGeometry(GridFrame, DecoderFrame)``), so the
reliability tests keep running across that merge. Delete the main branch of each function once merged."""

from __future__ import annotations

from torch import Tensor

import lens.geometry as geometry


def make_geometry(width: int, height: int, grid_h: int, grid_w: int, decoder_size: int = 1024):
    """LLaVA-1.5's pad-to-square grid and SAM's longest-side decoder frame for a ``width`` x ``height`` image."""
    if hasattr(geometry, "GridFrame"):
        return geometry.ImageGeometry(
            geometry.GridFrame.pad_to_square(width, height, grid_h, grid_w),
            geometry.DecoderFrame.longest_side(width, height, decoder_size),
        )
    return geometry.ImageGeometry(width, height, grid_h=grid_h, grid_w=grid_w, sam_size=decoder_size)


def grid_to_decoder(g, points: Tensor) -> Tensor:
    return g.grid_to_decoder(points) if hasattr(g, "grid_to_decoder") else g.grid_to_sam(points)


def decoder_shape(height: int, width: int, decoder_size: int) -> tuple[int, int]:
    """(new_h, new_w) of the image inside the decoder's square input."""
    shape = getattr(geometry, "longest_side_shape", None) or geometry.sam_preprocess_shape
    return shape(height, width, decoder_size)
