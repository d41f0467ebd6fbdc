"""Open any common slide or image format, choosing the backend automatically."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .backends.array_backend import IMAGE_EXTENSIONS, ArrayBackend
from .backends.openslide_backend import OPENSLIDE_EXTENSIONS, OpenSlideBackend
from .backends.tiff_backend import TIFF_EXTENSIONS, TiffBackend
from .dicom import DICOM_EXTENSIONS, has_dicom_marker, is_dicom_folder, is_dicom_path, open_dicom
from .slide import DEFAULT_CACHE_BYTES, Slide, parse_mpp
from .tiff_structure import check_tiff

BACKENDS = {"openslide": OpenSlideBackend, "tifffile": TiffBackend, "array": ArrayBackend}

#: every extension napari-zoomin opens
SLIDE_EXTENSIONS = tuple(
    sorted(set(OPENSLIDE_EXTENSIONS + TIFF_EXTENSIONS + IMAGE_EXTENSIONS + DICOM_EXTENSIONS))
)


def slide_of(path: str | os.PathLike) -> Path | None:
    """The slide a file or folder met in a listing belongs to, or None if it is no slide.

    The one rule for every front end that finds slides by listing folders (``zoomin
    batch``, a labels CSV, the napari reader): a file with a slide extension is a
    slide, except a DICOM instance, which is one file of the slide that is its folder
    (so a series of four ``.dcm`` files counts once); a folder holding DICOM files is
    that slide.
    """
    path = Path(path)
    if path.is_dir():
        return path if is_dicom_folder(path) else None
    if not path.is_file():
        return None
    ext = _extension(path)
    if ext in DICOM_EXTENSIONS or (ext == "" and has_dicom_marker(path)):
        return path.parent
    return path if path.name.lower().endswith(SLIDE_EXTENSIONS) else None


def _extension(path: Path) -> str:
    return path.suffix.lower()


def _is_ome(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff", ".ome.btf"))


#: plain TIFF containers where tifffile reads the tiles themselves: exact at every
#: level, and 1.2-6x faster than OpenSlide on the benchmark (docs/benchmarks.md)
TIFFFILE_FIRST = (".svs", ".tif", ".tiff", ".btf", ".tf8", ".tf2")


def _backend_order(path: Path) -> list[str]:
    """Backends to try, best first, by extension; the others are fallbacks."""
    ext = _extension(path)
    if ext in IMAGE_EXTENSIONS:
        return ["array"]
    if _is_ome(path):
        # OpenSlide reads only the first plane of an OME-TIFF and misses sub-IFD pyramids.
        return ["tifffile"]
    if ext in TIFFFILE_FIRST:
        return ["tifffile", "openslide"]
    if ext in TIFF_EXTENSIONS:  # vendor TIFFs (NDPI, SCN, BIF): OpenSlide knows their quirks
        return ["openslide", "tifffile"]
    return ["openslide"]


def _check_path(path: Path) -> None:
    """Refuse a path the file system cannot look up (a NUL byte, a name or path too long)
    and special files (reading a pipe would block for ever), in words, not a traceback."""
    fix = "Check the path, or move the slide to a shorter one."
    if "\0" in str(path):
        raise SlideError(path, "the path holds a NUL byte (U+0000), which no file name can.", fix)
    try:
        st = path.stat()
    except FileNotFoundError:
        return  # reported as "no such file"
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise SlideError(
                path,
                f"the path is too long for the file system ({len(str(path)):,} characters).",
                fix,
            ) from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return
        raise SlideError(path, f"cannot be read ({exc.strerror or exc}).", fix) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise SlideError(
            path, "is not a regular file (a pipe, device or socket).", "Open the slide file itself."
        )


def open_slide(
    source: str | os.PathLike | np.ndarray,
    backend: str | None = None,
    *,
    mpp: float | tuple[float, float] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Slide:
    """Open a whole-slide image, a pyramidal/OME TIFF, a plain image, or an array.

    ``backend`` forces "openslide", "tifffile" or "array"; by default it is chosen
    from the extension: tifffile for SVS, OME and generic TIFF (raw tiles, exact at
    every level), OpenSlide for the other scanner formats (MIRAX, NDPI, SCN, ...),
    each falling back to the other when it refuses a file; Pillow for PNG/JPEG.  A DICOM
    slide is given as its folder or any of its ``.dcm`` files and read by OpenSlide from
    the series' VOLUME instance (:mod:`napari_zoomin.slide.dicom`).  ``mpp``
    (µm per level-0 pixel, or (y, x)) overrides or supplies the physical scale (outside
    0.02–50 µm it is a :class:`SlideError`; an implausible value in the file is not used,
    see :attr:`Slide.mpp_warning`);
    ``cache_bytes`` bounds the decoded tiles kept in memory (0 turns the cache off).
    Raises :class:`SlideError` naming the file, the problem and the fix.
    """
    if isinstance(source, np.ndarray):
        override = parse_mpp(mpp)
        try:
            return Slide(ArrayBackend(source), mpp=override, cache_bytes=cache_bytes)
        except ValueError as exc:
            raise SlideError(None, f"cannot use the array as an image: {exc}") from exc

    path = Path(source).expanduser()
    override = parse_mpp(mpp, path)
    if backend is not None and backend not in BACKENDS:
        raise SlideError(
            path, f"unknown backend {backend!r}.", f"Choose one of {sorted(BACKENDS)}."
        )
    _check_path(path)
    if not path.exists():
        raise SlideError(path, "no such file.", "Check the path.")
    if is_dicom_path(path):  # a folder of DICOM instances, or one of them
        return open_dicom(path, backend, mpp=override, cache_bytes=cache_bytes)
    if path.is_dir():
        raise SlideError(
            path,
            "is a directory, not a slide file, nor a folder of DICOM (.dcm) files.",
            "Open the slide file itself (for MIRAX, the .mrxs file beside the folder).",
        )
    ext = _extension(path)
    if backend is None and ext not in SLIDE_EXTENSIONS:
        raise SlideError(
            path,
            f"unsupported file type {ext or '(no extension)'!r}.",
            f"napari-zoomin opens {', '.join(SLIDE_EXTENSIONS)}.",
        )
    if path.stat().st_size == 0:
        raise SlideError(path, "the file is empty (0 bytes).", "Copy or download it again.")
    check_tiff(path)  # a TIFF whose structure cannot be a sound slide is refused here

    order = [backend] if backend else _backend_order(path)
    problems = []
    for name in order:
        try:
            be = ArrayBackend.from_file(path) if name == "array" else BACKENDS[name](path)
        except SlideError:
            raise  # the backend's own verdict on the file: no other backend reads it better
        except Exception as exc:  # each library has its own error types
            problems.append(f"{name}: {type(exc).__name__}: {exc}".strip())
            continue
        try:
            return Slide(be, path, mpp=override, cache_bytes=cache_bytes)
        except SlideError:
            be.close()
            raise
    raise SlideError(
        path,
        "is not a readable slide or image (" + "; ".join(problems) + ").",
        "Check that the file is complete and in a supported format, or convert it to a "
        "pyramidal TIFF.",
    )
