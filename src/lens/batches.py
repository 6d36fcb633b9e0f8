"""Rows → the model's inputs: the one place a training or evaluation batch is built.

A batch is a list of rows of one kind: ``ImageRow`` (read from a dataset; the frozen MLLM and SAM's image encoder
run now, ``LensModel.prepare``) or ``CachedRow`` (read from ``lens cache`` output; ``stack_cached`` pads the stored
features exactly as the backbone would have).
"""

from __future__ import annotations

from lens.cache import CachedRow, stack_cached
from lens.data.loader import ImageRow, Row
from lens.model import LensInputs, LensModel


def lens_inputs(model: LensModel, rows: list[Row]) -> LensInputs:
    """The model's inputs for ``rows``, all ``ImageRow`` or all ``CachedRow``.

    SAM embeddings are cast to the mask decoder's dtype (DeepSpeed bf16 casts the modules, not the inputs).
    """
    if all(isinstance(r, CachedRow) for r in rows):
        inputs = stack_cached(rows)  # type: ignore[arg-type]
    elif all(isinstance(r, ImageRow) for r in rows):
        images, texts = [r.image for r in rows], [r.instruction for r in rows]  # type: ignore[attr-defined]
        inputs = model.prepare(images, texts, [r.mask for r in rows])
    else:
        raise TypeError(f"a batch mixes row types: {sorted({type(r).__name__ for r in rows})}")
    inputs.sam_embeddings = inputs.sam_embeddings.to(next(model.bridge.sam.mask_decoder.parameters()).dtype)
    return inputs
