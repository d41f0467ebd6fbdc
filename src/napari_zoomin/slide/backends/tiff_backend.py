"""Slides read by tifffile through zarr 3 (OME-TIFF sub-IFD pyramids, SVS, generic TIFF).

tifffile's ``aszarr`` exposes each pyramid level as a zarr array whose chunks
are the file's own tiles, so a region read decodes exactly the tiles it touches.
This backend returns raw tile pixels at every level and covers files OpenSlide
refuses (OME-TIFF, stripped or non-RGB TIFF).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import SlideError
from ..slide import SCREEN_DPI
from .base import SlideBackend

TIFF_EXTENSIONS = (".tif", ".tiff", ".btf", ".tf8", ".tf2", ".svs", ".ndpi", ".scn", ".bif")


def _rgb_layout(axes: str, shape: tuple[int, ...]) -> str:
    """How to turn one level's array into (rows, cols, 3): "YXS", "SYX" or "YX"."""
    squeezed = "".join(a for a, n in zip(axes, shape, strict=True) if n > 1 or a in "YX")
    if squeezed in ("YXS", "SYX", "CYX", "YX"):
        channels = dict(zip(axes, shape, strict=True)).get(
            squeezed.replace("Y", "").replace("X", "")[:1], 1
        )
        if channels not in (1, 3, 4):
            raise _ChannelsError(channels)
        return squeezed.replace("C", "S")
    raise ValueError(f"image axes {axes!r} with shape {shape} are not a 2-D RGB or grey image")


class _ChannelsError(ValueError):
    """An image of 2, 5, ... channels: neither grey, RGB nor RGBA."""

    def __init__(self, channels: int):
        self.channels = channels
        super().__init__(f"{channels} channels")


class _TifffileWarnings(logging.Handler):
    """Collects what tifffile logs while this thread opens a file (damage it worked around)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and len(self.messages) < 20:
            self.messages.append(record.getMessage())


class TiffBackend(SlideBackend):
    """tifffile + zarr 3 backend."""

    name = "tifffile"

    def __init__(self, path: Path):
        super().__init__(path)
        import tifffile

        log = logging.getLogger("tifffile")
        heard = _TifffileWarnings()
        log.addHandler(heard)
        try:
            self._tif = tifffile.TiffFile(str(path))
        except BaseException:
            log.removeHandler(heard)
            raise
        # threads read tiles' bytes from one file handle (_read_tile): seek + read must
        # not interleave (tifffile's zarr store would set this lock; zarr is lazy here)
        self._tif.filehandle.set_lock(True)
        self._fd = _pread_descriptor(self._tif.filehandle)
        try:
            series = self._pick_series(self._tif)
            self._series = series
            try:
                self._layout = _rgb_layout(series.axes, series.shape)
            except _ChannelsError as exc:
                raise SlideError(
                    path,
                    f"the image has {exc.channels} channels (axes {series.axes}, shape "
                    f"{series.shape}); napari-zoomin reads grey, RGB and RGBA slides.",
                    "Convert it to an RGB pyramidal TIFF, or export the channels you need as RGB.",
                ) from None
            # a tile the file does not hold (byte count 0: not scanned) reads as white
            # glass, as OpenSlide shows it, not as black that looks like dark stain
            dtype = np.dtype(series.dtype)
            white = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
            self._white = white
            self._direct = [_direct_page(level_series) for level_series in series.levels]
            # zarr arrays, opened when a level is first read through zarr: importing
            # zarr costs 0.2 s of every `zoomin classify`, and the usual slide's levels
            # are single tiled RGB pages, decoded tile by tile without it (_read_tile)
            self._levels: list[Any] = [None] * len(series.levels)
            self._squeeze = [
                a for a, n in zip(series.axes, series.shape, strict=True) if n > 1 or a in "YX"
            ]
            self._level_shapes = []
            self._tiles = []
            for i, level_series in enumerate(series.levels):
                shape = dict(zip(series.axes, level_series.shape, strict=True))
                self._level_shapes.append((int(shape["Y"]), int(shape["X"])))
                page = self._direct[i]
                if page is not None:  # its tiles are zarr's chunks
                    self._tiles.append((int(page.tilelength), int(page.tilewidth)))
                else:
                    chunks = dict(zip(series.axes, self._zarr(i).chunks, strict=True))
                    self._tiles.append((int(chunks["Y"]), int(chunks["X"])))
        except BaseException:
            self._tif.close()
            raise
        finally:
            log.removeHandler(heard)
        #: what tifffile had to work around in this file, in its words (Slide.warnings)
        self.warnings = tuple(
            f"the file may be damaged: tifffile reports {m!r} and read on without it, so "
            "the result may rest on incomplete data. Copy or export the slide again."
            for m in dict.fromkeys(heard.messages)
        )

    def _zarr(self, level: int):
        """The level as a read-only zarr array (tifffile's store), opened once."""
        arr = self._levels[level]
        if arr is None:
            import zarr

            store = self._series.aszarr(level=level, fillvalue=self._white)
            arr = self._levels[level] = zarr.open(store, mode="r")
        return arr

    @staticmethod
    def _pick_series(tif):
        """The image series: the first one that is not an associated image."""
        for s in tif.series:
            if s.name and s.name.lower() in ("thumbnail", "label", "macro"):
                continue
            return s
        raise ValueError("the file holds no image series")

    # -- facts -------------------------------------------------------------
    @property
    def vendor(self) -> str:
        t = self._tif
        if t.is_ome:
            return "ome"
        if t.is_svs:
            return "aperio"
        if t.is_ndpi:
            return "hamamatsu"
        if t.is_scn:
            return "leica"
        return "generic-tiff"

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return list(self._level_shapes)

    @property
    def tile_shapes(self) -> list[tuple[int, int]]:
        return list(self._tiles)

    def _stated_mpp(self) -> tuple[tuple[float, float], str] | None:
        """(y, x) µm per pixel as the file states it (unchecked), and where; or None."""
        t = self._tif
        page = self._series.levels[0].keyframe
        try:
            if t.is_ome:
                mpp = self._ome_mpp()
                return None if mpp is None else (mpp, "OME PhysicalSizeX/Y")
            if t.is_svs:
                m = re.search(r"\bMPP\s*=\s*([^|\r\n]*)", page.description or "")
                if m:
                    v = _number(m.group(1))
                    return (v, v), "MPP in the Aperio description"
                return None
            mpp = self._resolution_mpp(page)
            return None if mpp is None else (mpp, "TIFF resolution tags")
        except (ValueError, KeyError, AttributeError, TypeError):
            return None

    def _ome_mpp(self) -> tuple[float, float] | None:
        from ..tiff_structure import safe_xml

        root = safe_xml(self.path, self._tif.ome_metadata.encode(), "OME-XML")
        for el in root.iter():
            if el.tag.endswith("Pixels"):
                sx, sy = el.get("PhysicalSizeX"), el.get("PhysicalSizeY")
                if sx is None or sy is None:
                    return None
                factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
                ux = factor[el.get("PhysicalSizeXUnit", "µm")]
                uy = factor[el.get("PhysicalSizeYUnit", "µm")]
                return (_number(sy) * uy, _number(sx) * ux)
        return None

    @staticmethod
    def _resolution_mpp(page) -> tuple[float, float] | None:
        """µm per pixel from the resolution tags, as OpenSlide reads them (cm or inch).

        A resolution of 0 is an infinite pixel (reported, then refused by the slide);
        image software's default 72 or 96 dots per inch is no statement at all.
        """
        tags = page.tags
        if "ResolutionUnit" not in tags or "XResolution" not in tags:
            return None
        unit = int(tags["ResolutionUnit"].value)
        microns = {3: 1e4, 2: 25400.0}.get(unit)
        if microns is None:
            return None
        xn, xd = tags["XResolution"].value
        yn, yd = tags["YResolution"].value if "YResolution" in tags else (xn, xd)
        if unit == 2 and xd and round(xn / xd) in SCREEN_DPI:
            return None
        return (_per(microns, yn, yd), _per(microns, xn, xd))

    @property
    def properties(self) -> dict[str, str]:
        page = self._series.levels[0].keyframe
        props = {
            f"tiff.{tag.name}": str(tag.value)
            for tag in page.tags
            if tag.name in ("ImageDescription", "Software", "DateTime", "Make", "Model")
        }
        props["tifffile.series"] = self._series.kind
        return props

    @property
    def associated_names(self) -> tuple[str, ...]:
        return tuple(
            sorted(
                s.name.lower()
                for s in self._tif.series
                if s.name and s.name.lower() in ("thumbnail", "label", "macro")
            )
        )

    def associated_image(self, name: str) -> np.ndarray:
        for s in self._tif.series:
            if s.name and s.name.lower() == name:
                return self._to_rgb(s.asarray(), _rgb_layout(s.axes, s.shape))
        raise KeyError(name)

    # -- pixels ------------------------------------------------------------
    @staticmethod
    def _to_rgb(a: np.ndarray, layout: str) -> np.ndarray:
        a = np.squeeze(a)
        if layout == "SYX":
            a = np.moveaxis(a, 0, -1)
        elif layout == "YX":
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.shape[-1] == 4:  # RGBA: drop alpha
            a = a[..., :3]
        if a.dtype != np.uint8:
            a = _to_uint8(a)
        return np.ascontiguousarray(a)

    def read_level(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        page = self._direct[level]
        th, tw = self._tiles[level]
        if page is not None and y % th == 0 and x % tw == 0 and height <= th and width <= tw:
            return self._read_tile(page, level, y // th, x // tw, height, width)
        arr = self._zarr(level)
        index = []
        for axis in self._series.axes:
            if axis == "Y":
                index.append(slice(y, y + height))
            elif axis == "X":
                index.append(slice(x, x + width))
            elif axis in self._squeeze:
                index.append(slice(None))
            else:
                index.append(0)
        block = np.asarray(arr[tuple(index)])
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            raise SlideError(
                self.path,
                f"level {level} at y={y}, x={x} holds NaN or infinite pixel values: the pixel "
                "data is damaged.",
                "Export the slide again (as 8-bit RGB if it can be).",
            )
        return self._to_rgb(block, self._layout)

    def _read_tile(self, page, level: int, ty: int, tx: int, height: int, width: int):
        """One file tile decoded straight from its bytes (what :class:`Slide` asks for).

        zarr's chunk machinery costs about 2 ms a tile, more than decoding a 256² JPEG
        tile; a whole-slide view is hundreds of tiles.  The bytes are read with
        ``os.pread`` (a positioned read: no shared file position, so no seek of another
        thread's, locked or not, can move it; a widget test caught a tile read from the
        wrong place under a seek and read in the lock) and decoded in the calling
        thread, so threads decode in parallel.  Where there is no ``pread`` or file
        descriptor, seek and read under the file handle's lock.
        """
        th, tw = self._tiles[level]
        index = ty * -(-self._level_shapes[level][1] // tw) + tx
        count = int(page.databytecounts[index])
        if count == 0:  # not scanned: white glass, as the zarr path and OpenSlide show it
            return np.full((height, width, 3), self._white, np.uint8)
        offset = int(page.dataoffsets[index])
        fh = self._tif.filehandle
        data = None
        if self._fd is not None:
            try:
                data = os.pread(self._fd, count, offset)
            except OSError:
                data = None
        if data is None or len(data) != count:
            with fh.lock:
                fh.seek(offset)
                data = fh.read(count)
        tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
        return self._to_rgb(tile.reshape(th, tw, -1)[:height, :width], "YXS")

    def close(self) -> None:
        self._tif.close()


def _pread_descriptor(fh) -> int | None:
    """The descriptor to ``os.pread`` tiles from, or ``None`` to seek and read instead.

    The slide is opened by path, so its offsets are the file's own; a handle that
    says it starts inside a larger file (tifffile's embedded files) or has no
    descriptor gets the locked seek and read.
    """
    if not hasattr(os, "pread") or getattr(fh, "_offset", 0):
        return None
    try:
        return fh.fileno()
    except OSError:
        return None


def _direct_page(level_series):
    """The level's one page when its tiles can be decoded one by one without zarr: a
    single tiled, interleaved 8-bit RGB(A) page; ``None`` otherwise (zarr reads it)."""
    pages = level_series.pages
    if len(pages) != 1 or level_series.axes != "YXS":
        return None
    page = pages[0]
    if page is None or not page.is_tiled or page.tiledepth != 1 or page.planarconfig != 1:
        return None
    if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4):
        return None
    return page


def _number(text: str) -> float:
    """``text`` as a float; NaN when it is not a number."""
    try:
        return float(str(text).strip())
    except ValueError:
        return math.nan


def _per(microns: float, numerator: int, denominator: int) -> float:
    """µm per pixel from a TIFF rational resolution (pixels per unit); 0 → infinite."""
    if numerator == 0:
        return math.inf if denominator else math.nan
    return microns * denominator / numerator


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale a non-uint8 image to uint8 (integer types by their range, floats by 0..1)."""
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return (a.astype(np.float64) * (255.0 / info.max)).round().clip(0, 255).astype(np.uint8)
    return (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
