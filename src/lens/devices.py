"""``--device`` checked up front: a typo or a missing GPU is a one-line error, not a CUDA traceback later."""

from __future__ import annotations

import torch

from lens.errors import InvalidInput

KNOWN = ("cpu", "cuda", "cuda:N", "mps")


def validate_device(name: str | torch.device) -> torch.device:
    """``name`` as a ``torch.device`` this machine has; ``InvalidInput`` naming the problem otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidInput(f"unknown device {str(name)!r}; use one of {', '.join(KNOWN)}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(
                f"device {str(name)!r}: CUDA is not available on this machine; use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidInput(
                f"device {str(name)!r}: this machine has {count} CUDA device(s) (cuda:0..{count - 1})"
            )
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInput(
                f"device {str(name)!r}: Apple MPS is not available on this machine; use --device cpu"
            )
        return device
    raise InvalidInput(f"device {str(name)!r} is not supported; use one of {', '.join(KNOWN)}")
