"""What the engine needs to know about the machine it runs on: devices, running out of
memory, and the versions that produced a result.

One home for each rule, used by classification, training, batch runs, the CLI and
both dock widgets (they used to keep copies, which drifted: one device list lacked
``cuda:0``, the trainer's out-of-memory test missed the CPU allocator's message).
"""

from __future__ import annotations

import platform

import numpy as np
import torch

from .._version import __version__
from ..errors import ClassificationError
from ..models.device import select_device

__all__ = [
    "DEVICE_FIX",
    "available_devices",
    "is_oom",
    "resolve_device",
    "select_device",
    "versions",
]

#: what a command-line user can do about a device that cannot be used
DEVICE_FIX = "Use --device cpu or auto."


def available_devices() -> list[str]:
    """``auto`` and ``cpu``, then every accelerator torch reports here (nothing that fails).

    With CUDA: ``cuda`` (the current device) and ``cuda:0`` … ``cuda:n-1``.
    """
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | torch.device | None, fix: str = DEVICE_FIX) -> torch.device:
    """:func:`select_device`, with a device that cannot be used as the project's clear error.

    ``"auto"`` (or ``None``) is CUDA when available, else the CPU.  An unknown name
    (``"gpu"``) or an accelerator this machine lacks (``"cuda"`` without CUDA) raises
    :class:`~napari_zoomin.errors.ClassificationError` "cannot use device …" with
    ``fix`` (the widget says "Choose cpu or auto.").
    """
    try:
        chosen = select_device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ClassificationError(None, f"cannot use device {device!r}: {exc}.", fix) from None
    problem = None
    if chosen.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: no place to compute
        problem = f"{chosen.type!r} is not a device napari-zoomin runs on"
    elif chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        problem = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif chosen.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        problem = "MPS (Apple GPU) is not available on this machine"
    if problem:
        choices = ", ".join(available_devices())
        raise ClassificationError(
            None, f"cannot use device {device!r}: {problem} (here: {choices}).", fix
        )
    return chosen


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means "out of memory", on any device (CUDA, MPS or the CPU allocator)."""
    if isinstance(exc, MemoryError):
        return True
    for home in (torch, torch.cuda):  # torch.OutOfMemoryError (CUDA, MPS) where it exists
        oom = getattr(home, "OutOfMemoryError", None)
        if isinstance(oom, type) and isinstance(exc, oom):
            return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def versions() -> dict[str, str]:
    """Versions of what produced a result or a checkpoint (provenance)."""
    import tifffile

    out = {
        "napari_zoomin": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tifffile": tifffile.__version__,
    }
    try:
        import openslide

        out["openslide_python"] = openslide.__version__
        out["openslide"] = openslide.__library_version__
    except Exception:  # OpenSlide is optional at run time
        pass
    return out
