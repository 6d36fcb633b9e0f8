"""LENS: pixel-level segmentation as a plug-in for a frozen multimodal LLM."""

from typing import TYPE_CHECKING

from lens.config import LensConfig

__version__ = "0.1.0"
__all__ = ["LensConfig", "LensModel", "LensOutput", "Prediction", "__version__", "load_lens"]

if TYPE_CHECKING:
    from lens.model import LensModel, LensOutput, Prediction
    from lens.weights import load_lens


def __getattr__(name: str):
    # The model pulls in torch + transformers; keep `import lens` (and `lens --help`) light.
    if name in {"LensModel", "LensOutput", "Prediction"}:
        from lens import model

        return getattr(model, name)
    if name == "load_lens":
        from lens.weights import load_lens

        return load_lens
    raise AttributeError(f"module 'lens' has no attribute {name!r}")
