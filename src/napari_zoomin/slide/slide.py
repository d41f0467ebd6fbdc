"""A whole-slide image: lazy pyramid access, coordinates, physical scale, decode cost.

Coordinates are (row, col) = (y, x) in pixels of the level being read; level 0
is full resolution.  ``Slide.read`` is the single place pixels are decoded, so
the decode counter sees every read, whether it comes from the engine, a
dask array behind a napari layer, or a benchmark.
"""

from __future__ import annotations

import math
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SlideError
from ..geometry import mean_2x2

if TYPE_CHECKING:
    import dask.array as da

    from .backends.base import SlideBackend

#: a file whose coarsest stored level is longer than this on a side gets
#: lazily derived coarser levels (and a warning) instead of being viewed whole
MAX_COARSEST_SIDE = 8192
#: derived levels stop once the long side is at most this
DERIVED_MIN_SIDE = 1024
#: decoded tiles kept in memory per slide (least recently used go first)
DEFAULT_CACHE_BYTES = 192 * 2**20


#: pixel sizes a scanner can plausibly record, in µm per level-0 pixel (0.25 at 40x,
#: 0.5 at 20x, about 10 for a low-power overview): a file's value outside is not used
MPP_RANGE = (0.02, 50.0)
#: pixel height and width further apart than this (relative) are kept, with a warning
MPP_ANISOTROPY = 0.10
#: resolutions that image software writes by default (dots per inch): they say nothing
#: about a microscope, so a file that gives one has no pixel size
SCREEN_DPI = (72.0, 96.0)


def _um(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "infinite" if value > 0 else "minus infinite"
    return f"{value:.6g}"


def _pixel_size_words(mpp: tuple[float, float]) -> str:
    y, x = mpp
    if _um(y) == _um(x):
        return f"{_um(x)} µm per pixel"
    return f"{_um(x)} µm per pixel across and {_um(y)} µm down"


def mpp_problem(mpp: tuple[float, float]) -> str | None:
    """Why ``(y, x)`` µm per pixel cannot be a scanner's pixel size, in words; None if it can."""
    lo, hi = MPP_RANGE
    values = [float(v) for v in mpp]
    if all(math.isfinite(v) and lo <= v <= hi for v in values):
        return None
    if any(math.isnan(v) for v in values):
        return "which is not a number"
    if any(v <= 0 for v in values):
        return "which is not a positive size"
    if any(math.isinf(v) for v in values):
        return "which is not a finite size"
    return f"which is not a plausible scanner pixel size ({lo:g} to {hi:g} µm)"


def _anisotropy(mpp: tuple[float, float]) -> float:
    y, x = mpp
    return max(y, x) / min(y, x) - 1


def parse_mpp(mpp, path: Path | None = None) -> tuple[float, float] | None:
    """A user's ``mpp`` (a number, or (y, x)) as a checked ``(y, x)`` pair; None stays None.

    Raises :class:`SlideError` for anything that is not two plausible pixel sizes.
    """
    if mpp is None:
        return None
    shown = repr(mpp) if isinstance(mpp, str | bytes) else str(mpp)
    fix = (
        f"Give micrometres per level-0 pixel, between {MPP_RANGE[0]:g} and {MPP_RANGE[1]:g} "
        "(0.25 at 40x, 0.5 at 20x), or leave mpp out to use the file's own."
    )
    try:
        if isinstance(mpp, str | bytes) or np.ndim(mpp) == 0:
            pair = (float(mpp), float(mpp))
        else:
            pair = tuple(float(v) for v in mpp)
    except (TypeError, ValueError):
        raise SlideError(path, f"mpp={shown} is not a number.", fix) from None
    if len(pair) != 2:
        raise SlideError(path, f"mpp={shown} has {len(pair)} values, not one or (y, x).", fix)
    problem = mpp_problem(pair)
    if problem is not None:
        raise SlideError(path, f"mpp={shown} gives {_pixel_size_words(pair)}, {problem}.", fix)
    return pair


def _checked_mpp(
    given: tuple[float, float] | None, backend: SlideBackend, path: Path | None
) -> tuple[tuple[float, float] | None, str | None]:
    """``(mpp, warning)``: the user's pixel size, else the file's if it is plausible."""
    if given is not None:
        mpp = parse_mpp(given, path)
        said = "the given pixel size is {x} µm wide and {y} µm high"
    else:
        try:
            raw = backend.mpp
        except Exception:  # a backend's metadata parser must not stop the slide opening
            raw = None
        if raw is None:
            return None, None
        mpp = (float(raw[0]), float(raw[1]))
        where = f" ({backend.mpp_source})" if backend.mpp_source else ""
        problem = mpp_problem(mpp)
        if problem is not None:
            return None, (
                f"the file says {_pixel_size_words(mpp)}{where}, {problem}; the slide is "
                "read in pixels, without a physical scale. If you know the pixel size, "
                "pass it: zoomin classify --mpp <µm per pixel> (Python: "
                "open_slide(path, mpp=...))."
            )
        said = "the file says the pixels are {x} µm wide and {y} µm high" + where
    if _anisotropy(mpp) > MPP_ANISOTROPY:
        y, x = mpp
        return mpp, (
            said.format(x=_um(x), y=_um(y))
            + f": they differ by {100 * _anisotropy(mpp):.0f} %. Kept as given, but images "
            "are analysed in square pixels, so check the scanner's calibration if the "
            "slide looks stretched."
        )
    return mpp, None


def _nothing() -> None:
    """The ``stop`` of a prefetch that started nothing."""


def _clipped(lv: Level, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the part of a region that lies inside the level."""
    rows, cols = lv.shape
    return max(y, 0), min(y + height, rows), max(x, 0), min(x + width, cols)


def _file_tiles(lv: Level, y0: int, y1: int, x0: int, x1: int) -> list[tuple[int, int]]:
    """``(row, col)`` of the file tiles a stored level's window ``[y0, y1) × [x0, x1)``
    (inside the level, not empty) touches, row by row."""
    th, tw = lv.tile
    return [
        (ty, tx)
        for ty in range(y0 // th, (y1 - 1) // th + 1)
        for tx in range(x0 // tw, (x1 - 1) // tw + 1)
    ]


class SlideWarning(UserWarning):
    """Something about a slide makes it slow or approximate, but it still works."""


@dataclass(frozen=True)
class Level:
    """One pyramid level.

    ``downsample`` is (rows, cols) of level 0 per pixel of this level;
    ``tile`` the decode unit; ``stored`` the file's own level index, or None for a
    level napari-zoomin derives by 2×2 averaging of the level above.
    """

    shape: tuple[int, int]
    downsample: tuple[float, float]
    tile: tuple[int, int]
    stored: int | None


class Slide:
    """A whole-slide image opened through one backend.  Use :func:`open_slide`."""

    def __init__(
        self,
        backend: SlideBackend,
        path: Path | None = None,
        mpp: tuple[float, float] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self._backend = backend
        self.path = path
        self._mpp, self._mpp_warning = _checked_mpp(mpp, backend, path)
        self._lock = threading.Lock()
        self._decoded: dict[int, int] = {}
        self._decoded_tiles: dict[int, int] = {}
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self._pending: dict[tuple[int, int, int], threading.Event] = {}
        self._levels = self._build_levels()

    # -- construction ----------------------------------------------------------
    def _build_levels(self) -> list[Level]:
        shapes = self._backend.level_shapes
        tiles = self._backend.tile_shapes
        if not shapes:
            raise SlideError(self.path, "the file holds no image levels.")
        for i, (rows, cols) in enumerate(shapes):
            if rows <= 0 or cols <= 0:
                raise SlideError(
                    self.path,
                    f"level {i} has zero size ({rows} x {cols} pixels).",
                    "The file is damaged or not an image; re-export it from the scanner software.",
                )
        h0, w0 = shapes[0]
        levels = [
            Level((r, c), (h0 / r, w0 / c), (min(th, r), min(tw, c)), i)
            for i, ((r, c), (th, tw)) in enumerate(zip(shapes, tiles, strict=True))
        ]
        if max(levels[-1].shape) > MAX_COARSEST_SIDE:
            coarsest = levels[-1]
            while max(levels[-1].shape) > DERIVED_MIN_SIDE:
                r, c = levels[-1].shape
                r, c = max(r // 2, 1), max(c // 2, 1)
                levels.append(Level((r, c), (h0 / r, w0 / c), (min(512, r), min(512, c)), None))
            warnings.warn(
                f"{self.path or 'image'}: the coarsest stored level is "
                f"{coarsest.shape[0]} x {coarsest.shape[1]} pixels (no pyramid below it). "
                f"napari-zoomin derives {len(levels) - len(shapes)} coarser levels on the fly, "
                "which decodes the full-resolution pixels and is slow. Convert the file to a "
                "tiled pyramidal TIFF for fast viewing and classification.",
                SlideWarning,
                stacklevel=3,
            )
        return levels

    # -- facts -----------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the library reading the file: "openslide", "tifffile" or "array"."""
        return self._backend.name

    @property
    def vendor(self) -> str:
        """Scanner vendor or format, e.g. "aperio", "generic-tiff", "ome", "image"."""
        return self._backend.vendor

    @property
    def levels(self) -> tuple[Level, ...]:
        return tuple(self._levels)

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_shapes(self) -> tuple[tuple[int, int], ...]:
        """(rows, cols) of each level, finest first (derived levels included)."""
        return tuple(level.shape for level in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of each level relative to level 0 (mean of rows and cols)."""
        return tuple((dy + dx) / 2 for dy, dx in (lv.downsample for lv in self._levels))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of level 0."""
        return self._levels[0].shape

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Micrometres per level-0 pixel as (y, x), or None when unknown.

        None when the file does not say, and when what it says is not a plausible
        scanner pixel size (0, negative, NaN, infinite, or outside ``MPP_RANGE``):
        then :attr:`mpp_warning` says why.
        """
        return self._mpp

    @property
    def mpp_warning(self) -> str | None:
        """Why the file's pixel size was not used, or why it is odd; None when all is well.

        One plain-language sentence or two, e.g. "the file says 1000 µm per pixel (...),
        which is not a plausible scanner pixel size (0.02 to 50 µm); the slide is read
        in pixels, ...".  Pixels more than 10 % taller than wide (or the reverse) keep
        their mpp and get a warning too.
        """
        return self._mpp_warning

    @property
    def warnings(self) -> tuple[str, ...]:
        """Everything doubtful about the file, one plain-language sentence or two each:
        :attr:`mpp_warning`, and damage the reading library worked around (a
        directory it could not read, a page it dropped).  The engine carries them
        into ``Result.warnings``; ``zoomin info`` shows them."""
        own = (self._mpp_warning,) if self._mpp_warning else ()
        return own + tuple(self._backend.warnings)

    @property
    def properties(self) -> dict[str, str]:
        return self._backend.properties

    @property
    def associated_names(self) -> tuple[str, ...]:
        """Associated images in the file (e.g. "thumbnail", "label", "macro")."""
        return self._backend.associated_names

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image as (rows, cols, 3) uint8 RGB."""
        try:
            return self._backend.associated_image(name)
        except KeyError:
            raise KeyError(
                f"{self.path}: no associated image {name!r}; it has {list(self.associated_names)}"
            ) from None

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as ``downsample``.

        Views at a scale ``s`` are resampled from ``best_level(1 / s)``, never from
        a finer level than needed.
        """
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    def level_window(
        self, level: int, top: float, left: float, height: float, width: float
    ) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``: the pixels of ``level`` covering a level-0 region (edges
        rounded outwards), the window a read of that region at ``level`` takes."""
        dy, dx = self._levels[level].downsample
        return (
            math.floor(top / dy),
            math.ceil((top + height) / dy),
            math.floor(left / dx),
            math.ceil((left + width) / dx),
        )

    def file_tiles(
        self, level: int, y: int, x: int, height: int, width: int
    ) -> set[tuple[int, int, int]]:
        """The file tiles ``(stored level, row, col)`` that :meth:`read` decodes for this
        region: none outside the slide; a derived level's are those of the level it is
        averaged from.  (What a classification counts as needed, beside what it
        decoded.)"""
        lv = self._levels[level]
        y0, y1, x0, x1 = _clipped(lv, int(y), int(x), int(height), int(width))
        if y1 <= y0 or x1 <= x0:
            return set()
        if lv.stored is None:  # as _read_derived reads it
            return self.file_tiles(level - 1, 2 * y0, 2 * x0, 2 * (y1 - y0), 2 * (x1 - x0))
        return {(lv.stored, ty, tx) for ty, tx in _file_tiles(lv, y0, y1, x0, x1)}

    # -- decode counter --------------------------------------------------------
    @property
    def decoded_pixels(self) -> dict[int, int]:
        """Pixels decoded per stored level so far: tiles decoded × tile area.

        A tile still in the slide's tile cache is served without decoding and not
        counted again; with ``cache_bytes=0`` every read decodes every tile it touches.
        """
        with self._lock:
            return dict(self._decoded)

    @property
    def decoded_tiles(self) -> dict[int, int]:
        """Tiles decoded per stored level so far."""
        with self._lock:
            return dict(self._decoded_tiles)

    @property
    def total_decoded_pixels(self) -> int:
        with self._lock:
            return sum(self._decoded.values())

    def reset_decoded(self) -> None:
        with self._lock:
            self._decoded.clear()
            self._decoded_tiles.clear()

    def clear_cache(self) -> None:
        """Forget decoded tiles (e.g. before measuring one classification's decode cost)."""
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0

    # -- pixels ----------------------------------------------------------------
    def read(
        self, level: int, y: int, x: int, height: int, width: int, workers: int = 1
    ) -> np.ndarray:
        """Read a region of ``level`` as (height, width, 3) uint8 RGB.

        ``y, x`` is the top-left corner in that level's pixels; the part of the
        region outside the slide is zero-filled.  ``workers`` > 1 decodes the file
        tiles of a large region (a gigapixel slide's stage-1 view: hundreds of tiles)
        in that many threads; the codecs release the GIL, so one region need not
        wait on one core.
        """
        if not 0 <= level < len(self._levels):
            raise IndexError(f"level {level} out of range (slide has {len(self._levels)})")
        y, x, height, width = int(y), int(x), int(height), int(width)
        if height < 0 or width < 0:
            raise ValueError(f"negative region size {height} x {width}")
        out = np.zeros((height, width, 3), np.uint8)
        lv = self._levels[level]
        y0, y1, x0, x1 = _clipped(lv, y, x, height, width)
        if y1 <= y0 or x1 <= x0:
            return out
        if lv.stored is None:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_derived(
                level, y0, x0, y1 - y0, x1 - x0
            )
            return out
        th, tw = lv.tile

        def place(tile_yx: tuple[int, int]) -> None:  # tiles cover disjoint parts of out
            ty, tx = tile_yx
            tile = self._tile(level, ty, tx)
            top, left = ty * th, tx * tw
            a0, a1 = max(y0, top), min(y1, top + tile.shape[0])
            b0, b1 = max(x0, left), min(x1, left + tile.shape[1])
            out[a0 - y : a1 - y, b0 - x : b1 - x] = tile[a0 - top : a1 - top, b0 - left : b1 - left]

        tiles = _file_tiles(lv, y0, y1, x0, x1)
        if workers > 1 and len(tiles) > 1:
            with ThreadPoolExecutor(min(int(workers), len(tiles))) as pool:
                list(pool.map(place, tiles))  # list(): re-raises a tile's decode error
        else:
            for tile_yx in tiles:
                place(tile_yx)
        return out

    def prefetch(
        self, level: int, y: int, x: int, height: int, width: int, workers: int = 4
    ) -> Callable[[], None]:
        """Start decoding a region's file tiles into the tile cache in ``workers``
        background threads, and return ``stop``: it cancels the tiles not started yet
        and waits for the others (call it before the slide is closed).

        A read meanwhile takes the tiles already decoded and waits for those being
        decoded (:meth:`_tile`), so nothing is decoded twice and the decode counter
        stays true.  A classification prefetches its stage-1 view while it detects
        tissue on one core.  Nothing starts for a derived level, without a cache, or
        when the tiles would take more than 3/4 of the cache (they would evict each
        other); a tile that fails here is decoded again, and its error raised, by the
        read that needs it.
        """
        lv = self._levels[level]
        y0, y1, x0, x1 = _clipped(lv, int(y), int(x), int(height), int(width))
        if lv.stored is None or y1 <= y0 or x1 <= x0 or workers < 1:
            return _nothing
        tiles = _file_tiles(lv, y0, y1, x0, x1)
        if len(tiles) * lv.tile[0] * lv.tile[1] * 3 > 0.75 * self._cache_limit:
            return _nothing
        stopped = threading.Event()

        def decode(tile_yx: tuple[int, int]) -> None:
            if not stopped.is_set():  # an error stays in the future, never looked at
                self._tile(level, *tile_yx)

        pool = ThreadPoolExecutor(min(int(workers), len(tiles)))
        for tile_yx in tiles:
            pool.submit(decode, tile_yx)

        def stop() -> None:
            stopped.set()
            pool.shutdown(wait=True)

        return stop

    def _tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """One file tile of a stored level, from the cache or decoded (and counted).

        Threads asking for a tile another thread is decoding wait for that decode
        instead of repeating it, so parallel sub-tile reads decode each tile once.
        """
        lv = self._levels[level]
        if self._cache_limit <= 0:
            return self._decode_tile(level, ty, tx)
        key = (lv.stored, ty, tx)
        while True:
            with self._lock:
                tile = self._cache.get(key)
                if tile is not None:
                    self._cache.move_to_end(key)
                    return tile
                pending = self._pending.get(key)
                if pending is None:  # nobody is decoding it: we do
                    pending = self._pending[key] = threading.Event()
                    break
            pending.wait()  # then look again (it may have failed, or been evicted)
        try:
            tile = self._decode_tile(level, ty, tx)
            with self._lock:
                self._cache[key] = tile
                self._cache_bytes += tile.nbytes
                while self._cache_bytes > self._cache_limit and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.nbytes
        finally:
            with self._lock:
                del self._pending[key]
            pending.set()
        return tile

    def _decode_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        lv = self._levels[level]
        th, tw = lv.tile
        top, left = ty * th, tx * tw
        height, width = min(th, lv.shape[0] - top), min(tw, lv.shape[1] - left)
        try:
            tile = self._backend.read_level(lv.stored, top, left, height, width)
        except SlideError:
            raise  # the backend's own words (e.g. damaged pixel values)
        except Exception as exc:
            raise SlideError(
                self.path,
                f"cannot decode level {level} tile at y={top}, x={left} "
                f"({type(exc).__name__}: {exc}).",
                "The file may be truncated or corrupt; re-copy it from the source.",
            ) from exc
        tile.setflags(write=False)
        with self._lock:
            self._decoded[lv.stored] = self._decoded.get(lv.stored, 0) + th * tw
            self._decoded_tiles[lv.stored] = self._decoded_tiles.get(lv.stored, 0) + 1
        return tile

    def _read_derived(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """A derived level's region: 2×2 mean of the level above (rounded half up)."""
        return mean_2x2(self.read(level - 1, 2 * y, 2 * x, 2 * height, 2 * width))

    def pyramid(self) -> list[da.Array]:
        """The pyramid as dask arrays (rows, cols, 3) uint8, chunked on the file's tiles.

        Nothing is decoded until a chunk is computed, and every chunk goes
        through :meth:`read`, so the decode counter includes what a viewer reads.
        """
        import dask.array as da

        # A name of its own for every call: dask (and napari's opportunistic chunk
        # cache) key chunks by name, and ``id(self)`` is reused once a slide is
        # collected, so another slide's cached tiles came back for this one (seen as a
        # 256-px tile in a 128-px edge chunk; with equal shapes it would have shown
        # the other slide's pixels).
        token = f"zoomin-{uuid.uuid4().hex}"
        arrays = []
        for i, lv in enumerate(self._levels):
            arrays.append(
                da.from_array(
                    _LevelArray(self, i),
                    chunks=(lv.tile[0], lv.tile[1], 3),
                    name=f"{token}-level{i}",
                    asarray=False,
                    fancy=False,
                    lock=False,
                    # the reader in each task, not a graph dependency: 20x faster slicing
                    inline_array=True,
                    meta=np.empty((0, 0, 0), np.uint8),
                )
            )
        return arrays

    # -- summary ---------------------------------------------------------------
    def info(self) -> dict:
        """Facts about the slide as plain JSON-able values (``zoomin info``)."""
        return {
            "path": None if self.path is None else str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "level_count": self.level_count,
            "level_shapes": [list(s) for s in self.level_shapes],
            "level_downsamples": [round(d, 6) for d in self.level_downsamples],
            "tile_shapes": [list(lv.tile) for lv in self._levels],
            "derived_levels": [i for i, lv in enumerate(self._levels) if lv.stored is None],
            "mpp": None if self.mpp is None else list(self.mpp),
            "mpp_warning": self.mpp_warning,
            "warnings": list(self.warnings),
            "associated_images": list(self.associated_names),
        }

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        rows, cols = self.shape
        return (
            f"Slide({str(self.path) if self.path else 'array'!r}, {rows}x{cols}, "
            f"levels={self.level_count}, backend={self.backend!r}, vendor={self.vendor!r})"
        )


class _LevelArray:
    """Array-like view of one level for ``dask.array.from_array``."""

    def __init__(self, slide: Slide, level: int):
        self._slide = slide
        self._level = level
        rows, cols = slide.levels[level].shape
        self.shape = (rows, cols, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        ys, xs, *rest = index + (slice(None),) * (3 - len(index))
        ry, rx = _as_range(ys, self.shape[0]), _as_range(xs, self.shape[1])
        block = self._slide.read(
            self._level, ry.start, rx.start, ry.stop - ry.start, rx.stop - rx.start
        )[:: ry.step, :: rx.step]
        # integer indices drop their axis, as numpy does
        keep = tuple(slice(None) if isinstance(s, slice) else 0 for s in (ys, xs))
        return block[(*keep, *rest)]


def _as_range(index, size: int) -> range:
    """A slice or integer on an axis of ``size`` as a forward range (dask asks only slices)."""
    if isinstance(index, slice):
        r = range(size)[index]
        if r.step < 0:
            raise IndexError("negative steps are not supported")
        return range(r.start, max(r.start, r.stop), r.step) if len(r) else range(r.start, r.start)
    i = range(size)[index]
    return range(i, i + 1)
