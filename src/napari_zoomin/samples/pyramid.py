"""Write pyramidal, tiled TIFFs: slides that encode each distinct tile only once.

Every pyramid napari-zoomin writes goes through :func:`write_tiff_pyramid`, the one
place that decides how reduced levels are stored (``"generic-tiff"`` for slides,
``"ome-tiff"`` for the attention maps; its docstring says why both are needed).

Slide layout (:func:`write_pyramid`; what OpenSlide's ``generic-tiff`` reader and
tifffile's ``series[0].levels`` both understand):

* BigTIFF; level 0 is the first page, each reduced level is its own top-level page
  with ``NewSubfileType = 1`` (reduced resolution), all tiled ``tile × tile``.
* Level ``k`` has shape ``floor(shape[k-1] / 2)`` and is the exact 2×2 area average
  of level ``k-1`` on the *un-encoded* pixels, rounded half up:
  ``(a + b + c + d + 2) // 4`` (:func:`napari_zoomin.geometry.mean_2x2`).  Each level
  is computed from the level above, never from level 0 directly.
* ``compression="jpeg"``: baseline JPEG, YCbCr **without chroma subsampling**
  (4:4:4), quality 90 by default, ``Photometric = YCbCr``.  OpenSlide and tifffile
  (also through zarr) decode these tiles to bit-identical RGB; chroma subsampling
  is avoided because upsampling is where decoders may differ.
  ``compression="zlib"``: lossless Adobe Deflate, ``Photometric = RGB``.
* ``XResolution``/``YResolution`` in pixels per centimetre (``1e4 / mpp`` at
  level 0, divided by the downsample on reduced levels), so µm/pixel is
  recoverable (OpenSlide reports it as ``openslide.mpp-x``).
* A plain-text ImageDescription (never starting with a vendor's signature, so
  OpenSlide does not mistake the file for an Aperio slide).

Speed comes from pre-compressed tiles: the caller describes level 0 as a function
``source(row, col) -> (key, pixels)``.  Tiles that share a non-``None`` key hold
identical pixels; the writer renders and encodes each key once and writes the same
bytes wherever the key repeats.  Reduced levels are derived through the same trick:
a parent tile whose four children are all keyed is memoised on the children's ids,
so a mirror-tiled 100,000² slide needs only a few hundred encodes in all.  Unique
tiles of the reduced levels wait for level 0 (TIFF order) in a temporary file
beside the output, not in memory.

All coordinates are ``(row, col)`` = ``(y, x)``; shapes are ``(height, width)``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import imagecodecs
import numpy as np
import tifffile

from .._version import __version__
from ..atomic import atomic_path
from ..geometry import mean_2x2

Compression = Literal["jpeg", "zlib"]
#: How a pyramid's reduced levels are stored; see :func:`write_tiff_pyramid`.
TiffLayout = Literal["generic-tiff", "ome-tiff"]
TIFF_LAYOUTS: tuple[str, ...] = ("generic-tiff", "ome-tiff")
TileContent = np.ndarray | Callable[[], np.ndarray]
TileSource = Callable[[int, int], tuple[Hashable | None, TileContent]]
#: ``progress(fraction, message)``: how far a build is, ``fraction`` in [0, 1]; called
#: from the thread that builds (never concurrently), so it must be cheap and thread-safe
Progress = Callable[[float, str], None]

DEFAULT_TILE = 512
DEFAULT_QUALITY = 90
MIN_LEVEL_SIZE = 1024
COMPRESSIONS: tuple[str, ...] = ("jpeg", "zlib")


@dataclass(frozen=True)
class PyramidInfo:
    """What :func:`write_pyramid` wrote.

    ``level_shapes`` are ``(height, width)`` per level; ``tiles_total`` counts the
    tiles stored per level and ``tiles_encoded`` the distinct tiles actually
    rendered and encoded (the rest are repeated bytes).
    """

    path: Path
    level_shapes: tuple[tuple[int, int], ...]
    tile: int
    compression: str
    mpp: float
    tiles_total: tuple[int, ...]
    tiles_encoded: tuple[int, ...]
    nbytes: int
    seconds: float

    @property
    def downsamples(self) -> tuple[int, ...]:
        return tuple(2**k for k in range(len(self.level_shapes)))


def pyramid_shapes(
    shape: tuple[int, int], n_levels: int | None = None, min_size: int = MIN_LEVEL_SIZE
) -> list[tuple[int, int]]:
    """Level shapes ``(h, w)``: halve (floor) until the long side is ``<= min_size``.

    With ``n_levels`` given, exactly that many levels (``ValueError`` if a level
    would be empty).
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    shapes = [(h, w)]
    if n_levels is None:
        while max(shapes[-1]) > min_size and min(shapes[-1]) >= 2:
            shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
        return shapes
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    for _ in range(n_levels - 1):
        nh, nw = shapes[-1][0] // 2, shapes[-1][1] // 2
        if nh < 1 or nw < 1:
            raise ValueError(f"{n_levels} levels are too many for an image of shape {shape}")
        shapes.append((nh, nw))
    return shapes


def encode_tile(tile: np.ndarray, compression: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """Encode one ``(t, t, 3)`` uint8 tile exactly as :func:`write_pyramid` stores it."""
    tile = np.ascontiguousarray(tile)
    if compression == "jpeg":
        return imagecodecs.jpeg8_encode(
            tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(1, 1)
        )
    if compression == "zlib":
        return imagecodecs.zlib_encode(tile, level=6)
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def _tiff_kwargs(compression: str) -> dict:
    if compression == "jpeg":
        # tifffile writes Photometric=YCbCr, YCbCrSubSampling=(1, 1) and
        # ReferenceBlackWhite, matching encode_tile's JPEG streams.
        return {"compression": "jpeg", "photometric": "rgb", "subsampling": (1, 1)}
    return {"compression": "zlib", "photometric": "rgb"}


class _Spool:
    """One reduced level's encoded tiles, in order, until level 0 has been written.

    Shared (keyed) tiles are kept as references to their one ``bytes``; unique tiles
    go to an anonymous temporary file beside the output (deleted when closed, or by
    the system if the process dies), so slides whose tiles are all different do not
    hold a third of their file in memory.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.file: Any = None
        self.entries: list[bytes | int] = []  # shared bytes, or the length of a spooled one

    def append(self, data: bytes, shared: bool) -> None:
        if shared:
            self.entries.append(data)
            return
        if self.file is None:
            # closed by close(), which write_pyramid always calls
            self.file = tempfile.TemporaryFile(dir=self.folder, prefix=".zoomin-level-")  # noqa: SIM115
        self.file.write(data)
        self.entries.append(len(data))

    def __iter__(self) -> Iterator[bytes]:
        if self.file is not None:
            self.file.seek(0)
        for entry in self.entries:
            yield entry if isinstance(entry, bytes) else self.file.read(entry)

    def close(self) -> None:
        self.entries = []
        if self.file is not None:
            self.file.close()
            self.file = None


# A tile record while the pyramid is built: (id, pixels).  Keyed tiles have an
# integer id and their pixels live in _Builder.arrays; unique tiles have id None
# and carry their pixels until their parent has been computed.
_Record = tuple[int | None, np.ndarray | None]


class _Builder:
    """Streams level 0 row by row and derives every reduced level on the fly.

    Level ``k+1`` row ``r`` is computed as soon as level ``k`` rows ``2r`` and
    ``2r+1`` exist, so only two tile rows per level are ever held as pixels.
    Encoded reduced levels are kept (as references to shared ``bytes`` where tiles
    repeat) until level 0 has been written.
    """

    def __init__(
        self,
        source: TileSource,
        shapes: list[tuple[int, int]],
        tile: int,
        compression: str,
        quality: int,
        pool: ThreadPoolExecutor | None,
        progress: Progress | None = None,
        spool_dir: Path | None = None,
    ):
        self.source = source
        self.progress = progress
        self.shapes = shapes
        self.tile = tile
        self.compression = compression
        self.quality = quality
        self.pool = pool
        self.grid = [(math.ceil(h / tile), math.ceil(w / tile)) for h, w in shapes]
        self.key_ids: dict[Hashable, int] = {}
        self.memo: dict[tuple[int, int, int, int], int] = {}
        self.arrays: dict[int, np.ndarray] = {}
        self.encoded: dict[int, bytes] = {}
        self.pending: list[list[_Record] | None] = [None] * len(shapes)
        self.out = [_Spool(spool_dir) for _ in shapes]
        self.n_encoded = [0] * len(shapes)
        self.nbytes = 0
        # Children beyond a level's last tile row/column only ever feed parent
        # pixels beyond the parent level's edge; any content will do.
        self.missing_id = -1
        self.arrays[-1] = np.zeros((tile, tile, 3), np.uint8)

    def _map(self, fn, items):
        if self.pool is None or len(items) < 2:
            return [fn(item) for item in items]
        return list(self.pool.map(fn, items))

    def _check(self, a: np.ndarray) -> np.ndarray:
        t = self.tile
        if a.shape != (t, t, 3) or a.dtype != np.uint8:
            raise ValueError(
                f"tile source must return ({t}, {t}, 3) uint8 arrays, got {a.shape} {a.dtype}"
            )
        return a

    def _render(self, content: TileContent) -> tuple[np.ndarray, bytes]:
        a = self._check(np.asarray(content() if callable(content) else content))
        return a, encode_tile(a, self.compression, self.quality)

    def level0_bytes(self) -> Iterator[bytes]:
        rows, cols = self.grid[0]
        for r in range(rows):
            records: list[_Record] = []
            jobs: list[TileContent] = []
            job_slot: list[tuple[int, int | None]] = []  # (col, new key id or None)
            for c in range(cols):
                key, content = self.source(r, c)
                if key is None:
                    records.append((None, None))
                    jobs.append(content)
                    job_slot.append((c, None))
                    continue
                tid = self.key_ids.get(key)
                if tid is None:
                    tid = len(self.key_ids) + len(self.memo)
                    self.key_ids[key] = tid
                    jobs.append(content)
                    job_slot.append((c, tid))
                records.append((tid, None))
            row_bytes: list[bytes | None] = [
                None if tid is None else self.encoded.get(tid) for tid, _ in records
            ]
            for (c, tid), (a, b) in zip(job_slot, self._map(self._render, jobs), strict=True):
                self.n_encoded[0] += 1
                if tid is None:
                    records[c] = (None, a)
                    row_bytes[c] = b
                else:
                    self.arrays[tid] = a
                    self.encoded[tid] = b
            for c, (tid, _) in enumerate(records):
                if row_bytes[c] is None:
                    row_bytes[c] = self.encoded[tid]
            # Derive the reduced levels before yielding: the consumer stops calling
            # next() after the last tile, so code after the last yield never runs.
            self._push(0, r, records)
            if self.progress is not None:
                self.progress((r + 1) / rows, f"level 0 (and its reductions): row {r + 1}/{rows}")
            for b in row_bytes:
                self.nbytes += len(b)
                yield b

    def _pixels(self, rec: _Record) -> np.ndarray:
        tid, a = rec
        return self.arrays[tid] if a is None else a

    def _parent(
        self, children: tuple[_Record, _Record, _Record, _Record]
    ) -> tuple[np.ndarray, bytes]:
        h = self.tile // 2
        out = np.empty((self.tile, self.tile, 3), np.uint8)
        for i, rec in enumerate(children):
            y, x = divmod(i, 2)
            out[y * h : (y + 1) * h, x * h : (x + 1) * h] = mean_2x2(self._pixels(rec))
        return out, encode_tile(out, self.compression, self.quality)

    def _push(self, k: int, r: int, records: list[_Record]) -> None:
        """Level ``k`` row ``r`` is complete: derive level ``k+1`` rows when possible."""
        if k + 1 >= len(self.shapes):
            return
        if r % 2 == 0:
            if r < self.grid[k][0] - 1:
                self.pending[k] = records
                return
            top, bottom = records, None
        else:
            top, bottom = self.pending[k], records
            self.pending[k] = None
        assert top is not None
        pr = r // 2
        prows, pcols = self.grid[k + 1]
        if pr >= prows:
            return
        missing: _Record = (self.missing_id, None)

        def child(row: list[_Record] | None, c: int) -> _Record:
            return row[c] if row is not None and c < len(row) else missing

        records_up: list[_Record] = []
        jobs: list[tuple[_Record, _Record, _Record, _Record]] = []
        job_slot: list[tuple[int, int | None]] = []
        for pc in range(pcols):
            kids = (
                child(top, 2 * pc),
                child(top, 2 * pc + 1),
                child(bottom, 2 * pc),
                child(bottom, 2 * pc + 1),
            )
            ids = tuple(rec[0] for rec in kids)
            if None in ids:
                records_up.append((None, None))
                jobs.append(kids)
                job_slot.append((pc, None))
                continue
            tid = self.memo.get(ids)  # type: ignore[arg-type]
            if tid is None:
                tid = len(self.key_ids) + len(self.memo)
                self.memo[ids] = tid  # type: ignore[index]
                jobs.append(kids)
                job_slot.append((pc, tid))
            records_up.append((tid, None))
        row_bytes: list[bytes | None] = [
            None if tid is None else self.encoded.get(tid) for tid, _ in records_up
        ]
        for (pc, tid), (a, b) in zip(job_slot, self._map(self._parent, jobs), strict=True):
            self.n_encoded[k + 1] += 1
            if tid is None:
                records_up[pc] = (None, a)
                row_bytes[pc] = b
            else:
                self.arrays[tid] = a
                self.encoded[tid] = b
        for pc, (tid, _) in enumerate(records_up):
            b = row_bytes[pc]
            if b is None:
                b = self.encoded[tid]
            self.nbytes += len(b)
            self.out[k + 1].append(b, shared=tid is not None)
        self._push(k + 1, pr, records_up)


def _tiles_with_repeats(tiles: Iterable[Any], repeats: dict[int, int]) -> Iterator[Any]:
    """Encoded ``tiles`` with each repeat of an earlier tile's exact bytes replaced by
    no bytes (a zero byte count, which :func:`_point_repeats` then points at the
    first copy), noted in ``repeats`` (tile index → index of the copy kept).

    Tiles are matched by a 128-bit BLAKE2b digest of their bytes (a chance collision
    is about 2⁻⁶⁴ even among 2³² tiles).  Iterators of arrays (encoded by tifffile)
    pass through unchanged.
    """
    import hashlib

    seen: dict[bytes, int] = {}
    for i, tile in enumerate(tiles):
        if not isinstance(tile, bytes) or not tile:
            yield tile
            continue
        digest = hashlib.blake2b(tile, digest_size=16).digest()
        first = seen.setdefault(digest, i)
        if first == i:
            yield tile
        else:
            repeats[i] = first
            yield b""


def _point_repeats(path: Path, layout: TiffLayout, repeats: list[dict[int, int]]) -> None:
    """Point each level's repeated tiles at the bytes of the tile they repeat, in place
    (the offset and byte-count arrays keep their size: nothing else moves)."""
    import struct

    patches: list[tuple[int, str, list[int]]] = []
    with tifffile.TiffFile(path) as tif:
        first = tif.pages.first
        pages = [first, *(first.pages or [])] if layout == "ome-tiff" else list(tif.pages)
        for page, rep in zip(pages, repeats, strict=True):
            if not rep:
                continue
            offsets, counts = list(page.dataoffsets), list(page.databytecounts)
            if {i for i, n in enumerate(counts) if n == 0} != set(rep):
                raise RuntimeError(f"{path}: unexpected empty tiles in a written level")
            for i, src in rep.items():
                offsets[i], counts[i] = offsets[src], counts[src]
            for code, values in ((324, offsets), (325, counts)):  # TileOffsets, -ByteCounts
                tag = page.tags[code]
                fmt = {4: "I", 16: "Q"}[int(tag.dtype)]
                patches.append((tag.valueoffset, f"{tif.byteorder}{len(values)}{fmt}", values))
    with open(path, "r+b") as fh:
        for offset, fmt, values in patches:
            fh.seek(offset)
            fh.write(struct.pack(fmt, *values))


def write_tiff_pyramid(
    path: str | os.PathLike,
    levels: Iterable[tuple[Any, dict[str, Any]]],
    *,
    layout: TiffLayout,
    n_levels: int,
    **common: Any,
) -> Path:
    """Write a pyramid's levels, finest first, into a BigTIFF at ``path`` (atomically).

    ``levels`` yields ``(data, options)`` per level: what
    :meth:`tifffile.TiffWriter.write` takes (an array, or an iterator of tiles with
    ``shape`` and ``dtype`` in the options); ``common`` options go to every level.
    It is consumed lazily, one level after the other, so a level may be produced
    while the level above is written.  ``n_levels`` is how many it yields.  Every
    reduced level gets ``NewSubfileType = 1``.  The file is written to a partial
    sibling and moved into place (:func:`napari_zoomin.atomic.atomic_path`).

    This is the one place that decides where reduced levels go.  Two layouts, because
    no single one serves both kinds of file napari-zoomin writes:

    * ``"generic-tiff"`` (the slides, :func:`write_pyramid`): every reduced level is a
      top-level page after level 0, and no OME-XML.  OpenSlide's ``generic-tiff``
      reader finds levels only among top-level pages: it reads a SubIFD pyramid as
      one level (checked with OpenSlide 4.0.1), so a slide would have no pyramid in
      OpenSlide (nor in QuPath when it opens the slide with OpenSlide).
    * ``"ome-tiff"`` (the attention maps,
      :func:`napari_zoomin.engine.results.write_attention_tiff`): OME-XML in page 0
      and the reduced levels in its SubIFDs.  The OME-XML carries what makes a map
      overlay its slide in QuPath (physical pixel size and the plane's position,
      which no plain TIFF tag holds), and the OME-TIFF specification stores
      sub-resolutions only as SubIFDs (Bio-Formats, which QuPath uses for OME-TIFF,
      reads its pyramids there); extra top-level pages would be unreferenced IFDs.
      OpenSlide cannot read these float32 maps in any layout.

    The project's reader (tifffile's ``series[0].levels``) reads both.

    A level given as encoded tiles stores each distinct tile's bytes once: a tile
    whose bytes repeat an earlier tile's of the same level gets that tile's offset
    and byte count.  TIFF asks nothing more of an offset than that it holds the
    tile's bytes, so every reader (libtiff, hence OpenSlide and libvips; tifffile;
    Bio-Formats) reads a shared tile like any other, and no tile has a zero byte
    count (the GeoTIFF "sparse" convention, which libtiff refuses).  Deflate cannot
    shrink zeros below 1/1032 of their size, so on a slide-wide, mostly empty map the
    empty tiles were most of the file (2.9 of the 5.3 MB of a 100,000² slide's
    stage-2 map); slides store their repeated glass and keyed tiles once.
    """
    if layout not in TIFF_LAYOUTS:
        raise ValueError(f"layout must be one of {TIFF_LAYOUTS}, got {layout!r}")
    path = Path(path)
    subifds = layout == "ome-tiff"
    written = 0
    repeats: list[dict[int, int]] = []
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=subifds) as tw:
            for k, (data, options) in enumerate(levels):
                kwargs = {**common, **options}
                if k:
                    kwargs["subfiletype"] = 1  # reduced resolution
                elif subifds:
                    kwargs["subifds"] = n_levels - 1
                repeats.append({})
                if not isinstance(data, np.ndarray):
                    data = _tiles_with_repeats(data, repeats[-1])
                tw.write(data, **kwargs)
                written += 1
            if written != n_levels:
                raise ValueError(f"expected {n_levels} levels, got {written}")
        if any(repeats):
            _point_repeats(Path(tmp), layout, repeats)
    return path


def write_pyramid(
    path: str | os.PathLike,
    source: TileSource,
    shape: tuple[int, int],
    *,
    tile: int = DEFAULT_TILE,
    compression: Compression = "jpeg",
    quality: int = DEFAULT_QUALITY,
    mpp: float = 0.5,
    n_levels: int | None = None,
    min_size: int = MIN_LEVEL_SIZE,
    description: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> PyramidInfo:
    """Write an RGB pyramid whose level 0 is described tile by tile.

    ``source(row, col)`` returns ``(key, pixels)`` for level-0 tile ``(row, col)``
    (pixels ``[row*tile, (row+1)*tile) × [col*tile, (col+1)*tile)``):
    ``pixels`` is a ``(tile, tile, 3)`` uint8 array or a zero-argument callable
    returning one (called only when needed).  Tiles returning the same non-``None``
    ``key`` must hold identical pixels; they are rendered and encoded once.  Edge
    tiles are full size; pixels beyond ``shape`` are stored but never shown.

    Reduced levels are 2×2 area averages of the level above
    (:func:`napari_zoomin.geometry.mean_2x2`), down to a long side ``<= min_size``
    unless ``n_levels`` is given, stored as top-level pages (the ``"generic-tiff"``
    layout of :func:`write_tiff_pyramid`, which OpenSlide needs).  ``mpp`` is
    the level-0 pixel size in micrometres.  The file is written atomically
    (:func:`napari_zoomin.atomic.atomic_path`), so ``path`` never holds a partial file.
    ``workers`` threads encode tiles (default: up to 4, one per core).
    ``progress(fraction, message)``, if given, is called after every level-0 tile row
    (the reduced levels are derived on the way, so the fraction is of the whole build)
    and once more when the file is in place.
    """
    path = Path(path)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    shapes = pyramid_shapes(shape, n_levels, min_size)
    if description is None:
        description = "napari-zoomin pyramid"
    description = f"{description}\nmpp={mpp:.6g}|levels={len(shapes)}|tile={tile}"
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    spools: list[_Spool] = []
    try:
        builder = _Builder(source, shapes, tile, compression, quality, pool, progress, path.parent)
        spools = builder.out

        def levels() -> Iterator[tuple[Iterator[bytes], dict[str, Any]]]:
            for k, (h, w) in enumerate(shapes):
                # level 0 streams; writing it derives (and encodes) every reduced level
                data = builder.level0_bytes() if k == 0 else iter(builder.out[k])
                res = 1e4 / (mpp * 2**k)
                options = {"shape": (h, w, 3), "resolution": (res, res), "description": None}
                if k == 0:
                    options.update(description=description, subfiletype=0)  # an explicit tag
                yield data, options
                if k:
                    builder.out[k].close()  # free the encoded level

        write_tiff_pyramid(
            path,
            levels(),
            layout="generic-tiff",
            n_levels=len(shapes),
            dtype=np.uint8,
            tile=(tile, tile),
            resolutionunit="CENTIMETER",
            metadata=None,
            software=f"napari-zoomin {__version__}",
            **_tiff_kwargs(compression),
        )
    finally:
        if pool is not None:
            pool.shutdown()
        for spool in spools:
            spool.close()
    if progress is not None:
        progress(1.0, f"wrote {len(shapes)} levels")
    return PyramidInfo(
        path=path,
        level_shapes=tuple(shapes),
        tile=tile,
        compression=compression,
        mpp=float(mpp),
        tiles_total=tuple(r * c for r, c in builder.grid),
        tiles_encoded=tuple(builder.n_encoded),
        nbytes=path.stat().st_size,
        seconds=time.perf_counter() - t0,
    )


def write_array_pyramid(
    path: str | os.PathLike,
    array: np.ndarray,
    tile: int = 256,
    compression: Compression = "jpeg",
    mpp: float = 0.5,
    n_levels: int | None = None,
    *,
    quality: int = DEFAULT_QUALITY,
    min_size: int = MIN_LEVEL_SIZE,
    description: str | None = None,
) -> PyramidInfo:
    """Write an in-memory ``(h, w, 3)`` uint8 RGB image as a pyramid (for tests, small images).

    Same layout and rules as :func:`write_pyramid`; edge tiles are zero-padded.
    """
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 array, got {array.shape} {array.dtype}")
    h, w = array.shape[:2]

    def source(r: int, c: int) -> tuple[None, Callable[[], np.ndarray]]:
        def render() -> np.ndarray:
            out = np.zeros((tile, tile, 3), np.uint8)
            part = array[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            out[: part.shape[0], : part.shape[1]] = part
            return out

        return None, render

    return write_pyramid(
        path,
        source,
        (h, w),
        tile=tile,
        compression=compression,
        quality=quality,
        mpp=mpp,
        n_levels=n_levels,
        min_size=min_size,
        description=description,
    )


def reference_levels(array: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """The un-encoded levels :func:`write_array_pyramid` stores for ``array``.

    Level ``k`` is :func:`~napari_zoomin.geometry.mean_2x2` of level ``k-1`` (floored
    shapes): useful to check a written pyramid against exact expectations.
    """
    levels = [np.asarray(array)]
    for _ in range(n_levels - 1):
        levels.append(mean_2x2(levels[-1]))
    return levels
