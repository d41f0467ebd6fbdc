"""Where the models run: CUDA when available (with mixed precision), CPU otherwise.

Nothing in the models assumes a GPU; this module is the single place that decides.
Mixed precision (autocast + gradient scaling) is used on CUDA only: CPU autocast to
bfloat16 is slower than float32 for these small networks on most CPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["autocast", "grad_scaler", "mixed_precision", "select_device"]

#: mixed precision on CUDA: on unless a :func:`mixed_precision` block turns it off
_MIXED_PRECISION = [True]


def select_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device to run on.

    Args:
        preferred: ``None`` or ``"auto"`` for CUDA if available else CPU; otherwise a
            device string such as ``"cpu"`` or ``"cuda:1"``.  Asking for CUDA when it is
            not available raises ``RuntimeError`` (rather than silently running on CPU).
    """
    if preferred is None or preferred == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preferred)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    return device


@contextlib.contextmanager
def mixed_precision(enabled: bool) -> Iterator[None]:
    """Turn CUDA mixed precision on or off inside the block (e.g. to time both, or to
    rule it out when a run on a GPU diverges); CPU runs are float32 either way."""
    previous = _MIXED_PRECISION[0]
    _MIXED_PRECISION[0] = bool(enabled)
    try:
        yield
    finally:
        _MIXED_PRECISION[0] = previous


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Mixed-precision context: float16 autocast on CUDA, a no-op elsewhere.

    Attention distributions and estimators cast to float32 themselves, so sampling
    probabilities are never half precision.
    """
    if enabled and _MIXED_PRECISION[0] and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            yield
    else:
        yield


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A gradient scaler that is active on CUDA only (a pass-through on CPU)."""
    on = enabled and _MIXED_PRECISION[0] and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=on)
