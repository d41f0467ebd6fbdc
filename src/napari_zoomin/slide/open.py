"""Open any common slide or image format, choosing the backend automatically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .backends.array_backend import IMAGE_EXTENSIONS, ArrayBackend
from .backends.openslide_backend import OPENSLIDE_EXTENSIONS, OpenSlideBackend
from .backends.tiff_backend import TIFF_EXTENSIONS, TiffBackend
from .slide import DEFAULT_CACHE_BYTES, Slide, parse_mpp

BACKENDS = {"openslide": OpenSlideBackend, "tifffile": TiffBackend, "array": ArrayBackend}

#: every extension napari-zoomin opens
SLIDE_EXTENSIONS = tuple(sorted(set(OPENSLIDE_EXTENSIONS + TIFF_EXTENSIONS + IMAGE_EXTENSIONS)))

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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


def _check_tiff_structure(path: Path) -> None:
    """Refuse early a TIFF with a zero-sized image or pointers past its end (truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.read(16)
    if header[:4] not in _TIFF_MAGIC:
        return
    order = "<" if header[:2] == b"II" else ">"
    big = header[2:4] in (b"+\x00", b"\x00+")
    first_ifd = int.from_bytes(header[8:16] if big else header[4:8], _BYTEORDER[order])
    if first_ifd >= size:
        _truncated(path, first_ifd, size, "its first image directory")
    import logging

    import tifffile

    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)  # tifffile logs what we report below as an error
    try:
        with tifffile.TiffFile(str(path)) as tif:
            for page in tif.pages:
                if page.imagelength == 0 or page.imagewidth == 0:
                    raise SlideError(
                        path,
                        f"image {page.index} has zero size "
                        f"({page.imagelength} x {page.imagewidth} pixels).",
                        "The file is damaged or was written wrongly; re-export it.",
                    )
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    end = int((offsets + counts).max())
                    _truncated(path, end, size, f"the image data of page {page.index}")
    except SlideError:
        raise
    except Exception:
        return  # not ours to judge here: the backend reports its own error
    finally:
        log.setLevel(level)


_BYTEORDER = {"<": "little", ">": "big"}


def _truncated(path: Path, end: int, size: int, what: str) -> None:
    raise SlideError(
        path,
        f"the file is truncated or damaged: {what} needs byte {end:,} "
        f"but the file has {size:,} bytes.",
        "Copy or download the slide again.",
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
    each falling back to the other when it refuses a file; Pillow for PNG/JPEG.  ``mpp``
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
    if not path.exists():
        raise SlideError(path, "no such file.", "Check the path.")
    if path.is_dir():
        raise SlideError(
            path,
            "is a directory, not a slide file.",
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
    _check_tiff_structure(path)

    order = [backend] if backend else _backend_order(path)
    problems = []
    for name in order:
        try:
            be = ArrayBackend.from_file(path) if name == "array" else BACKENDS[name](path)
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
