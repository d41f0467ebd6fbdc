"""What the engine needs to know about the machine it runs on: devices, running out of
memory, and the versions that produced a result.

One home for each rule, used by classification, training, batch runs, the CLI and
both dock widgets (they used to keep copies, which drifted: one device list lacked
``cuda:0``, the trainer's out-of-memory test missed the CPU allocator's message).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .._version import __version__
from ..errors import ClassificationError
from ..models.device import select_device

__all__ = [
    "DEVICE_FIX",
    "CpuLoad",
    "available_devices",
    "choose_threads",
    "is_oom",
    "keep_freed_memory",
    "parse_threads",
    "resolve_device",
    "select_device",
    "torch_threads",
    "usable_cpus",
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


def _cpu_set() -> set[int] | None:
    """The CPUs this process may run on, where the OS says (Linux)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    cpus = _cpu_set()
    return len(cpus) if cpus else (os.cpu_count() or 1)


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) time since boot of ``cpus``, summed, from Linux's ``/proc/stat``;
    None elsewhere.  Per CPU, so a container sees its own CPUs, not the host's."""
    busy = total = 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                    continue
                values = [int(v) for v in fields]
                idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + I/O wait
                busy += sum(values[:8]) - idle  # user … steal; guest time is in user already
                total += sum(values[:8])
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def _own_jiffies() -> int | None:
    """This process's CPU time, all its threads, user + system, in the clock ticks of
    ``/proc/stat``, from Linux's ``/proc/self/stat``; None elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command's name
        return int(fields[11]) + int(fields[12])  # utime and stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


class CpuLoad:
    """How many CPUs other work keeps busy, measured from construction to :meth:`busy`.

    This process's own CPU time over that span is subtracted, so the span need not be
    spent asleep: a classification starts measuring, detects tissue meanwhile, and
    chooses its threads after (issue 22: the 50 ms sleep was time the user waited).
    """

    def __init__(self) -> None:
        self.cpus = _cpu_set()
        self._start = time.monotonic()
        self._first = self._sample()

    def _sample(self) -> tuple[int, int, int] | None:
        jiffies = _cpu_jiffies(self.cpus) if self.cpus else None
        if jiffies is None:
            return None
        own = _own_jiffies()
        return (*jiffies, 0 if own is None else own)

    def busy(self, interval: float = 0.05) -> tuple[float, int] | None:
        """``(busy, cpus)``: of the CPUs this process may use, how many other work kept
        busy since construction, over at least ``interval`` seconds (sleeping the rest);
        from the 1-minute load average where ``/proc/stat`` is missing; None where the
        OS says neither (Windows)."""
        if self._first is not None:  # None without /proc/stat or a CPU set
            rest = interval - (time.monotonic() - self._start)
            if rest > 0:
                time.sleep(rest)
            second = self._sample()
            if second is not None and second[1] > self._first[1]:
                other = (second[0] - self._first[0]) - (second[2] - self._first[2])
                share = max(0, other) / (second[1] - self._first[1])
                return share * len(self.cpus), len(self.cpus)
        try:
            return float(os.getloadavg()[0]), usable_cpus()
        except (AttributeError, OSError):
            return None


def parse_threads(requested: int | str | None) -> int | str | None:
    """A thread request checked: None, a whole number of at least 1, or ``"auto"``."""
    if requested is None:
        return None
    if isinstance(requested, str):
        if requested.strip().lower() == "auto":
            return "auto"
        try:
            requested = int(requested)
        except ValueError:
            raise ValueError(
                f"threads must be 'auto' or a whole number, got {requested!r}"
            ) from None
    if int(requested) < 1:
        raise ValueError(f"threads must be at least 1, got {requested}")
    return int(requested)


def choose_threads(
    requested: int | str | None, ceiling: int | None = None, load: CpuLoad | None = None
) -> int | None:
    """Torch CPU threads for one classification: ``requested`` when it is a number,
    None (leave torch's setting) for None, and for ``"auto"`` the CPUs other work leaves
    idle, between 1 and ``ceiling`` (torch's own setting: what the user or
    ``OMP_NUM_THREADS`` allows), measured by ``load`` (started earlier), else over the
    next 50 ms.

    Why: torch uses every core.  On a machine whose other core is busy (a laptop, a
    batch of several workers) two threads took 2.0-2.6x as long as one, because
    each convolution waits for its slowest thread (issue 22; docs/benchmarks.md).
    The count can change float rounding, so a result records it (``Result.threads``):
    pass that number to reproduce a result to the last digit.
    """
    requested = parse_threads(requested)
    if requested != "auto":
        return requested  # type: ignore[return-value]
    ceiling = max(1, int(ceiling if ceiling is not None else torch.get_num_threads()))
    measured = (load if load is not None else CpuLoad()).busy()
    if measured is None:
        return ceiling
    busy, cpus = measured
    return max(1, min(ceiling, int(cpus - busy + 0.5)))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch's CPU work in ``n`` threads (None: as set), restoring the setting after."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap and are reused there once freed
KEPT_BLOCK_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees for its next allocations; True
    where it applied (Linux with glibc).  For a process that exists to classify, such as
    the ``zoomin classify`` command, not for a host like napari.

    By default glibc gives every freed block larger than 128 kB to 32 MB back to the
    kernel, so the next such block is new memory, and the kernel maps and zeroes it one page
    fault at a time.  A classification allocates and frees hundreds of MB: the
    stage-1 view, the networks' activations, each stage's batch of regions.  With
    blocks up to 1 GB taken from the heap and the heap never trimmed, the system time of
    classifying the 100,000² slide on the project's 2-core VM went from 1.05 to 0.71 s,
    and the process took 0.95x as long (docs/benchmarks.md, issue 22).  The price: the
    process keeps its peak memory until it exits (peak RSS 887-898 MB against 770-797).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # musl has a mallopt that does nothing and says so (0)
    return bool(mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


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
