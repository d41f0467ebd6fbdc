"""A training run's stage-1 views on disk: each slide's pyramid is decoded for them once.

Every training step and every validation reads each slide's whole view at the
model's ``view_scale`` (stage 1); on a user's slide that is thousands of JPEG tiles
decoded again every epoch.  :class:`ViewCache` keeps, per slide, the 8-bit pixels the
view is made of, exactly as :meth:`Slide.read` gives them (the window of the view's
pyramid level covering the slide): :class:`~.slide_source.SlideSource` then converts
them exactly as it converts freshly decoded ones, so a cached view is bit-identical to
an uncached one (``read`` and ``read_bytes`` alike, whether or not the view is
resampled).  Any other read (tiles, sub-tiles, another scale) goes to the pyramid.

The files, ``.npy`` in ``<checkpoint stem>.views/`` beside the model checkpoint
(:func:`view_cache_folder`), are written atomically (:mod:`~napari_zoomin.atomic`) and
memory-mapped copy-on-write (``np.load(mmap_mode="c")``: the file is never written
through the map, and torch gets the writable array it wants).  An entry's name holds a
hash of the slide's path, its size, modification time and inode (for a DICOM folder:
its files'), the scale, the model's pixel size, the level and the window, and the
stat is taken at every read: a changed slide is never served a stale view, and its
old entry is deleted when the new one is written.  A view larger than ``max_bytes``
(:data:`MAX_VIEW_BYTES`, 512 MB: a 100,000² slide's view at 1/16 is 117 MB) or one that
would leave less than :data:`MIN_FREE_BYTES` on the disk is not cached (said once per
slide in the log), and a folder that cannot be written turns caching off for the run
(said once): the cache never stops a training run.  The folder is kept after the run
(a resumed or repeated run starts warm); deleting it at any time is safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_open

__all__ = ["MAX_VIEW_BYTES", "MIN_FREE_BYTES", "ViewCache", "ViewCacheStats", "view_cache_folder"]

#: the largest view (its 8-bit level window) that is cached
MAX_VIEW_BYTES = 512 * 2**20
#: a view is not written when the disk would keep less free space than this
MIN_FREE_BYTES = 2**30
#: bump when what an entry holds changes: older entries are then never read
_FORMAT = "1"

log = logging.getLogger(__name__)


def view_cache_folder(out_path: str | os.PathLike) -> Path:
    """``<checkpoint stem>.views/`` beside the model checkpoint ``out_path``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.views")


def _slide_stamp(path: Path) -> str:
    """What changes when the slide's file changes: size, mtime (ns) and inode, or those
    of every file of a DICOM folder."""
    st = path.stat()
    if not path.is_dir():
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    parts = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            s = entry.stat()
            parts.append(f"{entry.name}:{s.st_size}:{s.st_mtime_ns}:{s.st_ino}")
    return "|".join(parts)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 // 10 else f"{n:,} bytes"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass
class ViewCacheStats:
    """What the cache did so far (bytes are the 8-bit view windows)."""

    hits: int = 0  # views served from the cache
    written: int = 0  # views decoded once and written
    skipped: int = 0  # view reads not cached (too large, disk full, no file, cache off)
    bytes_written: int = 0
    bytes_served: int = 0


class ViewCache:
    """The stage-1 views of a run's slides at ``scale``, in ``folder`` (module docstring).

    Args:
        folder: where the ``.npy`` files go (created when the first view is written).
        scale: the model's ``view_scale``: only reads of a whole slide at this scale
            are cached.
        max_bytes: the largest view cached (8-bit bytes).
    """

    def __init__(self, folder: str | os.PathLike, scale: float, max_bytes: int = MAX_VIEW_BYTES):
        self.folder = Path(folder)
        self.scale = float(scale)
        self.max_bytes = int(max_bytes)
        self.stats = ViewCacheStats()
        self._told: set[str] = set()  # slides whose skip was said (once each)
        self._broken = False  # the folder cannot be written: cache off for the run

    def __repr__(self) -> str:
        return f"ViewCache({str(self.folder)!r}, scale={self.scale!r})"

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            log.warning(message)

    def block(
        self,
        slide_path: Path | None,
        scale: float,
        model_mpp: float | None,
        level: int,
        window: tuple[int, int, int, int],
        read: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """The level pixels ``window`` = ``(y0, x0, h, w)`` of a whole-slide read at
        ``scale``: from the cache, else ``read()`` (and cached when it is the view).

        ``read`` decodes them from the pyramid ((h, w, 3) uint8, ``Slide.read``).
        """
        if slide_path is None or float(scale) != self.scale or self._broken:
            return read()
        path = Path(slide_path)
        try:
            stamp = _slide_stamp(path)
        except OSError:  # the slide went away: the pyramid read says so, if it fails
            self.stats.skipped += 1
            return read()
        mpp = None if model_mpp is None else float(model_mpp)
        owner = _digest(str(path.absolute()))
        key = _digest(
            f"{_FORMAT}|{path.absolute()}|{stamp}|{self.scale!r}|{mpp!r}|{level}|{window}"
        )
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.name.split(".")[0])[:40] or "slide"
        target = self.folder / f"{stem}.{owner}.{key}.npy"
        h, w = int(window[2]), int(window[3])
        if target.is_file():
            try:
                cached = np.load(target, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError):  # damaged: decoded and written again below
                cached = None
            if (
                cached is not None
                and cached.dtype == np.uint8
                and cached.ndim == 3
                and cached.shape[:2] == (h, w)
            ):
                self.stats.hits += 1
                self.stats.bytes_served += int(cached.nbytes)
                return cached
        pixels = read()
        self._write(path, target, owner, pixels)
        return pixels

    def _write(self, path: Path, target: Path, owner: str, pixels: np.ndarray) -> None:
        size = int(pixels.nbytes)
        if size > self.max_bytes:
            self.stats.skipped += 1
            self._say_once(
                str(path),
                f"{path}: its stage-1 view is {_size(size)}, more than the "
                f"{_size(self.max_bytes)} the view cache holds per slide; it is decoded "
                "from the pyramid every epoch.",
            )
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
            if free - size < MIN_FREE_BYTES:
                self.stats.skipped += 1
                self._say_once(
                    str(path),
                    f"{path}: its stage-1 view ({_size(size)}) is not cached: "
                    f"{self.folder} would keep less than {MIN_FREE_BYTES / 2**30:g} GB free.",
                )
                return
            with atomic_open(target, "wb") as fh:
                np.save(fh, np.ascontiguousarray(pixels), allow_pickle=False)
        except OSError as exc:
            self.stats.skipped += 1
            self._broken = True
            self._say_once(
                "",
                f"{self.folder}: the stage-1 view cache cannot be written ({exc.strerror or exc}); "
                "this run decodes every view from the pyramid. Free the disk or make the "
                "folder writable, or set cache_views to false.",
            )
            return
        self.stats.written += 1
        self.stats.bytes_written += size
        for old in self.folder.glob(f"*.{owner}.*.npy"):  # the slide's stale views
            if old != target:
                with contextlib.suppress(OSError):  # mapped elsewhere (Windows): next time
                    old.unlink(missing_ok=True)

    def bytes_on_disk(self) -> int:
        """Bytes of every view file in the folder (this run's and earlier ones')."""
        if not self.folder.is_dir():
            return 0
        return sum(f.stat().st_size for f in self.folder.glob("*.npy") if f.is_file())
