"""Process-level measurements shared by the benchmarks: peak memory, machine, child runs.

Every benchmark reads its peak memory here (``VmHWM``, ``ru_maxrss`` where /proc is
missing); the per-phase measurements of the MNIST runner also reset the high-water
mark (Linux ``/proc/self/clear_refs``), so a peak is that of the phase measured and
not of the set-up before it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

__all__ = [
    "STEADY_MALLOC",
    "code_version",
    "current_rss_mb",
    "machine",
    "peak_rss_mb",
    "reset_peak_rss",
    "run_child",
]


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """Resident memory now (``VmRSS``; the peak where /proc is missing)."""
    rss = _status_mb("VmRSS")
    return rss if rss is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory since the process started or :func:`reset_peak_rss`."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes vs KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux ≥ 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def code_version(root: Path | None = None) -> str:
    """The code a number was measured with: the git trees of ``src/`` and
    ``benchmarks/`` (they change only when that code does, not with the docs), and
    ``+changes`` when either has uncommitted edits; ``"unknown"`` outside a checkout.

    A result reused from an earlier run is today's number only if this matches
    (issue 18: every number in docs/benchmarks.md must be what its committed command
    gives on today's code).
    """
    root = root or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        )
        return done.stdout.strip()

    try:
        trees = [git("rev-parse", f"HEAD:{part}")[:12] for part in ("src", "benchmarks")]
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"src {trees[0]}, benchmarks {trees[1]}" + (" +changes" if dirty else "")


def machine() -> str:
    """One line naming the CPU, core count and OS (for benchmark tables)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


# glibc: a fixed mmap threshold (no dynamic growth) returns freed buffers above 64 KiB to
# the system at once, so resident memory follows live memory and peaks are comparable.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_child(args: list[str], log: Path | None = None, env: dict | None = None) -> dict:
    """Run ``python -m <args>`` in a fresh process; return the JSON its last line prints.

    A fresh process per measured run keeps peak-memory figures from mixing.  The
    child's stderr goes to ``log`` (appended) when given; ``env`` adds variables.
    """
    cmd = [sys.executable, "-m", *args]
    err = open(log, "a") if log is not None else subprocess.PIPE  # noqa: SIM115
    try:
        done = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
    finally:
        if log is not None:
            err.close()
    if done.returncode:
        tail = "" if log is not None else done.stderr[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}). {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])
