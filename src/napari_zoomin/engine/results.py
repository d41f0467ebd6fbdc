"""What a classification returns, and the files it writes.

:class:`Result` is everything a viewer, a report or a batch table needs from one
classification: the prediction, where the model looked (stage-1 attention with its
placement on the slide, the drawn tiles with their stage-2 attention, the sub-tiles
with their weights), what it cost (decoded pixels beside the minimum the method
needs, seconds) and its provenance (model hash, versions).  It round-trips through
JSON (:meth:`Result.to_json` / :meth:`Result.from_json`).

Coordinates are level-0 pixels.  Regions are ``[top, left, height, width]``
(row/col order, as everywhere in napari-zoomin); GeoJSON vertices are (x, y) as
QuPath writes them.  A map *placement* ``origin (y, x)`` and ``cell_size (dy, dx)``
says that cell ``(i, j)`` of a map covers the level-0 square
``[origin_y + i·dy, origin_y + (i+1)·dy) × [origin_x + j·dx, origin_x + (j+1)·dx)``
(continuous coordinates: level-0 pixel ``(r, c)`` covers ``[r, r+1) × [c, c+1)``).
napari centres data pixel ``k`` on ``k`` (it covers ``[k − ½, k + ½)``), so over a
slide layer with unit scale and no translate that is ``scale=cell_size``,
``translate=origin + cell_size/2 − ½``; over a slide layer of scale ``s`` and
translate ``t``, ``scale=s·cell_size``, ``translate=t + s·(origin + cell_size/2 − ½)``
(``napari_zoomin.napari.result_layers.map_placement``).

:func:`write_outputs` writes ``result.json``, the attention maps as pyramidal
OME-TIFFs whose physical pixel size is the cell size × the slide's µm/pixel (so they
overlay the slide in QuPath and napari), ``sampled.geojson`` (drawn tiles and
sub-tiles as QuPath annotations), ``places.geojson`` (the places the evidence came
from) and, for a MagNet, ``magnified.geojson`` (the boxes it zoomed into).  Every file
is written to a hidden temporary
sibling and moved into place, ``result.json`` last: a folder with a ``result.json``
is complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np

from ..atomic import write_bytes_atomic
from ..geometry import max_2x2

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "JSON_MAX_CELLS",
    "PIXEL_DEFINITIONS",
    "MagnifiedBox",
    "Result",
    "SubtileRecord",
    "TileRecord",
    "check_output_path",
    "grid_placement",
    "stage2_canvas",
    "subtile_score",
    "write_attention_tiff",
    "write_outputs",
]

FORMAT = "napari-zoomin-result"
FORMAT_VERSION = 1
#: attention maps are stored inline in result.json (nested lists) up to this many
#: cells (stage 1, and all stage-2 maps together); larger maps go to ``MAPS_FILE``.
#: Small: as JSON text a map cell takes ~20 bytes, so 16,384 cells are ~300 kB (the
#: limit was 2^20 until 2026-12-06: a 2,220 × 2,967 slide wrote a 7.4 MB result.json)
JSON_MAX_CELLS = 1 << 14
MAPS_FILE = "attention_maps.npz"
#: tile side of the attention TIFFs, and the long side at which their pyramids stop
TIFF_TILE = 256

#: what the three pixel counts mean (also written into result.json)
PIXEL_DEFINITIONS = {
    "pixels_decoded": (
        "pixels the slide decoder produced during this classification: file tiles "
        "decoded x tile area, summed over levels (tissue detection included), from the "
        "slide's decode counter after resetting it and clearing its tile cache"
    ),
    "pixels_needed": (
        "the minimum for this method on this file: the distinct file tiles that contain "
        "the stage-1 view's level window, the drawn tiles' stage-2 views (at their "
        "level) and the sub-tiles (level 0), each counted once, x tile area"
    ),
    "pixels_read": (
        "area of the regions the model asked for, in pixels of the level each read "
        "came from (before resampling to the model's scale)"
    ),
    "stage2_scale": (
        "relative to the full-resolution tile (V(T(x, c), s2)): a drawn tile's "
        "stage-2 view is read from the level nearest a downsample of 1/s2"
    ),
}


# --------------------------------------------------------------------------- placement


def grid_placement(grid, index: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
    """Placement ``(origin (y, x), cell_size (dy, dx))`` of region ``index`` of a CellGrid.

    The model puts cell ``(i, j)`` at the level-0 pixel centre
    ``region_origin + offset·span + (i, j)·stride·span`` with
    ``span = (h − 1)/(h_v − 1)`` (000 §2.1, receptive-field offset included; see
    :mod:`napari_zoomin.models.coordinates`).  Giving every cell a square of side
    ``stride·span`` centred on that pixel's centre (``+ 0.5``) puts each cell exactly
    where the model reads around it (up to the half-pixel rounding of the centres).
    A 1-pixel view has one cell covering the whole region.
    """
    origin, size = [], []
    for axis in (0, 1):
        top = float(grid.origins[index, axis])
        h = float(grid.region_size[axis])
        h_v = float(grid.view_shape[axis])
        if h_v > 1:
            span = (h - 1) / (h_v - 1)
            cell = float(grid.stride[axis]) * span
            first = top + float(grid.offset[axis]) * span  # centre pixel of cell 0
            origin.append(first + 0.5 - cell / 2)
        else:
            cell = h
            origin.append(top)
        size.append(cell)
    return (origin[0], origin[1]), (size[0], size[1])


# --------------------------------------------------------------------------- result


class TileRecord(TypedDict, total=False):
    """One drawn tile in :attr:`Result.tiles` (plain JSON-able keys, typed here once).

    ``region`` [top, left, h, w] level-0 pixels; ``cell`` flat index into ``α``;
    ``count`` draws over all K estimates; ``alpha`` ``α_c``; two-stage models add
    ``stage2_attention`` ((u, v) float32 ``β^c``) and its placement
    ``stage2_origin`` / ``stage2_cell_size`` (module docstring).
    """

    region: list[int]
    cell: int
    count: int
    alpha: float
    stage2_attention: np.ndarray
    stage2_origin: tuple[float, float]
    stage2_cell_size: tuple[float, float]


class SubtileRecord(TypedDict):
    """One full-resolution region the feature network read, in :attr:`Result.subtiles`.

    ``region`` level-0 pixels; ``weight`` its attention relative to the whole slide
    (``α_c·β^c_c'``, or ``α_c`` for one-stage models); ``tile`` index into
    :attr:`Result.tiles`; ``cell`` flat index into that tile's ``β^c`` (or ``α``);
    ``scores`` the class probabilities the classifier gives the sub-tile alone
    (``g(f(x))``, in :attr:`Result.classes` order; absent for MagNets and for results
    written by earlier versions).
    """

    region: list[int]
    weight: float
    tile: int
    cell: int
    scores: NotRequired[list[float]]


def subtile_score(subtile: SubtileRecord, label_index: int) -> float | None:
    """The classifier's score of one sub-tile alone for class ``label_index`` (the
    predicted class, wherever it is shown); None for results without scores."""
    scores = subtile.get("scores")
    return float(scores[label_index]) if scores else None


def support(subtiles: Sequence[SubtileRecord], label_index: int) -> np.ndarray:
    """Each sub-tile's support for the predicted class: ``weight`` × its own score for
    that class (``scores[label_index]``; 1 where a result has no scores).

    Attention says where the model looked; on slides where look-alikes draw as much
    attention as the lesion, the most attended sub-tile is as often the look-alike.
    The score says what the classifier saw there, so ranking by support puts first
    the sub-tiles that made the call (the lesion of a positive slide).  Sub-tiles,
    places and their markers are ranked by it, one rule for every front end.
    """
    out = np.empty(len(subtiles), dtype=np.float64)
    for k, s in enumerate(subtiles):
        score = subtile_score(s, label_index)
        out[k] = float(s["weight"]) * (1.0 if score is None else score)
    return out


class MagnifiedBox(TypedDict):
    """One box a MagNet (002) magnified, in :attr:`Result.magnified` ``["boxes"]``.

    ``depth`` the 1-based magnifying layer that chose it; ``parent`` the index of the
    box it lies in (-1: the whole image); ``box`` float ``[top, left, height, width]``
    in level-0 pixels (it may reach beyond the slide: that part read black);
    ``zoom`` its magnification relative to the whole image (frame side / box side);
    ``level`` the slide level its pixels were read from (-2: wholly outside the slide,
    nothing read); ``read_scale`` output pixels per model pixel of that read (1 = full
    detail); ``scale`` and ``translation`` ``(t_y, t_x)`` the ``θ`` that chose it.
    """

    depth: int
    parent: int
    box: list[float]
    zoom: float
    level: int
    read_scale: float
    scale: float
    translation: list[float]


def _floats(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


def _map_to_json(a: np.ndarray) -> list:
    return np.asarray(a, np.float32).astype(np.float64).tolist()


def _map_from_json(a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    return arr.reshape(0, 0) if arr.size == 0 else arr


@dataclass
class Result:
    """One slide's classification: prediction, where the model looked, cost, provenance.

    Attributes:
        slide: ``{"path", "name", "shape" (rows, cols), "mpp" (y, x) µm or None,
            "vendor", "backend", "level_shapes"}``.
        label, label_index: the predicted class (most probable) and its index.
        classes: class names, index = class id.
        probabilities: ``{class: p}``, mean over the draws.
        spread: ``{class: standard deviation over the draws}`` (0 for top-k).
        draws: K, independent two-stage estimates averaged (1 for top-k and MagNets).
        mode: ``"sample"``, ``"topk"`` or ``"magnify"`` (a MagNet's one deterministic
            pass: nothing was sampled, so there is no spread to read).
        seed: seed of the sampling generator.
        stage1_attention: (h_a, w_a) float32 ``α``.
        stage1_origin, stage1_cell_size: its placement in level-0 pixels (module doc).
        tiles: one dict per distinct drawn tile, most attended first: ``region``
            [top, left, h, w], ``cell`` (flat index into ``α``), ``count`` (draws over
            all K runs), ``alpha`` (``α_c``), and for two-stage models
            ``stage2_attention`` ((u, v) float32 ``β^c``), ``stage2_origin``,
            ``stage2_cell_size``.
        subtiles: one dict per distinct full-resolution region the feature network
            saw (:class:`SubtileRecord`), largest :func:`support` for the predicted
            class first: ``region``, ``weight`` (``α_c·β^c_c'``, the attention
            relative to the whole slide; ``α_c`` for one-stage models), ``tile``
            (index into ``tiles``), ``cell`` (flat index into that ``β^c``),
            ``scores`` (the classifier's class probabilities for the sub-tile alone).
        pixels_decoded, pixels_needed, pixels_read: see :data:`PIXEL_DEFINITIONS`.
        decode: breakdown: decoded pixels and tiles per stored level, needed pixels
            per part (``view``, ``stage2``, ``subtiles``), tissue-detection decodes,
            the levels each read came from.
        seconds: wall time from opening the slide to the finished result (model
            loading excluded); ``timings`` splits it by step.
        model_sha256, model_kind, model_path, model_config: the checkpoint.
        device: where the model ran.
        tissue: ``{"source": "otsu" | mask path | "given" | None, "fraction"}``.
        versions: napari_zoomin, torch, python, numpy, tifffile, openslide.
        threads: torch CPU threads the model ran in (None on a GPU, or in results of
            earlier versions).  The count can change float rounding and so, rarely,
            the cell a draw lands on: to reproduce a result exactly, pass it back.
        warnings: plain-language reasons to doubt this result (the model was trained
            on other data, the slide's pixel size or stain is unlike its training
            slides', little tissue, evidence from very few places); shown beside the
            prediction by every front end.
        evidence: how concentrated the evidence is: ``places`` (distinct places the
            sub-tiles read, over all draws), ``subtiles`` (distinct sub-tiles read),
            ``link`` (level-0 pixels: sub-tiles whose centres are this close, chained,
            are one place; :func:`napari_zoomin.engine.places.places` lists them).
        resolution: how the slide was read: ``slide_mpp`` and ``model_mpp`` (µm per
            pixel, or None), ``factor`` (slide pixels per model pixel, 1 when read in
            pixels) and ``units`` (``"µm"`` or ``"pixel"``).
        magnified: a MagNet's magnification (``None`` for other kinds): ``boxes``
            (:class:`MagnifiedBox` per box, tree order: layer 1's, then each box's
            children; the last layer's are the classification patches, in the order
            the GRU read them), ``trace`` (one ``{class: p}`` per classification patch:
            the prediction having read patches ``0..k``, 002 figure 5), ``patches``
            (``P_l`` per layer) and ``view_scale`` (the scale layer 1 read the slide at).
    """

    slide: dict[str, Any]
    label: str
    label_index: int
    classes: list[str]
    probabilities: dict[str, float]
    spread: dict[str, float]
    draws: int
    mode: str
    seed: int
    stage1_attention: np.ndarray
    stage1_origin: tuple[float, float]
    stage1_cell_size: tuple[float, float]
    tiles: list[TileRecord]
    subtiles: list[SubtileRecord]
    pixels_decoded: int
    pixels_needed: int
    pixels_read: int
    seconds: float
    model_sha256: str
    model_kind: str
    device: str
    versions: dict[str, str]
    threads: int | None = None
    model_path: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    tissue: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    resolution: dict[str, Any] = field(default_factory=dict)
    magnified: dict[str, Any] | None = None

    # -- derived ------------------------------------------------------------------
    @property
    def probability(self) -> float:
        """Probability of the predicted class."""
        return float(self.probabilities[self.label])

    @property
    def decode_ratio(self) -> float:
        """``pixels_decoded / pixels_needed`` (how close reading came to the minimum)."""
        return self.pixels_decoded / self.pixels_needed if self.pixels_needed else 0.0

    @property
    def has_stage2(self) -> bool:
        return any("stage2_attention" in t for t in self.tiles)

    @property
    def stage2_cells(self) -> int:
        return sum(
            int(np.asarray(t["stage2_attention"]).size)
            for t in self.tiles
            if "stage2_attention" in t
        )

    def summary(self) -> str:
        """One line: ``name: label (p=0.93 ± 0.02 over 16 draws, 3 places) in 2.1 s, …``.

        A MagNet's says what it did instead of draws: ``p=0.93, one pass, 24 magnified
        regions at depths 1-3 (zoom up to 12x)``.  Warnings are not in it: every front
        end shows :attr:`warnings` beside it.
        """
        name = self.slide.get("name") or self.slide.get("path") or "image"
        p = self.probability
        places = self.evidence.get("places")
        if self.mode == "magnify" and self.magnified is not None:
            # no places: a MagNet's patches are read in order, not weighed into shares
            how, places = f"p={p:.2f}, one pass, {self.magnified_words()}", None
        elif self.mode == "topk":
            how = f"p={p:.2f}, top-k"
        else:
            sd = float(self.spread[self.label])
            how = f"p={p:.2f} ± {sd:.2f} over {self.draws} draw{'s' if self.draws != 1 else ''}"
        if places is not None:
            how += f", {places} place{'s' if places != 1 else ''}"
        return (
            f"{name}: {self.label} ({how}) in {self.seconds:.1f} s, decoded "
            f"{self.pixels_decoded / 1e6:.1f} Mpx ({self.decode_ratio:.1f}x the "
            f"{self.pixels_needed / 1e6:.1f} Mpx needed)"
        )

    def magnified_words(self) -> str:
        """What a MagNet did, in the words every front end uses: ``8 magnified regions
        at depths 1-2 (zoom up to 49.9x)`` (empty for the other kinds)."""
        if self.magnified is None or not self.magnified.get("boxes"):
            return ""
        boxes = self.magnified["boxes"]
        depths = sorted({int(b["depth"]) for b in boxes})
        at = f"depth {depths[0]}" if len(depths) == 1 else f"depths {depths[0]}-{depths[-1]}"
        zoom = max(float(b["zoom"]) for b in boxes)
        regions = f"{len(boxes)} magnified region{'s' if len(boxes) != 1 else ''}"
        return f"{regions} at {at} (zoom up to {zoom:.3g}x)"

    # -- JSON ---------------------------------------------------------------------
    def to_dict(self, maps_file: str | None = None) -> dict[str, Any]:
        """Plain JSON-able values.  Attention maps are nested lists, or, with
        ``maps_file``, references ``{"file": maps_file, "key": ...}`` into an ``.npz``
        written by :meth:`maps_npz` (what :func:`write_outputs` does for maps over
        :data:`JSON_MAX_CELLS` cells)."""

        def amap(a: np.ndarray, key: str):
            return {"file": maps_file, "key": key} if maps_file else _map_to_json(a)

        tiles = []
        for i, t in enumerate(self.tiles):
            d = {k: v for k, v in t.items() if k != "stage2_attention"}
            d["region"] = [int(v) for v in t["region"]]
            if "stage2_attention" in t:
                d["stage2_attention"] = amap(t["stage2_attention"], f"stage2_{i}")
                d["stage2_origin"] = _floats(t["stage2_origin"])
                d["stage2_cell_size"] = _floats(t["stage2_cell_size"])
            tiles.append(d)
        doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for f in fields(self):
            doc[f.name] = getattr(self, f.name)
        doc.update(
            stage1_attention=amap(self.stage1_attention, "stage1"),
            stage1_origin=_floats(self.stage1_origin),
            stage1_cell_size=_floats(self.stage1_cell_size),
            tiles=tiles,
            subtiles=[{**s, "region": [int(v) for v in s["region"]]} for s in self.subtiles],
            decode_ratio=self.decode_ratio,
            summary=self.summary(),
            definitions=PIXEL_DEFINITIONS,
        )
        return doc

    def to_json(self, maps_file: str | None = None, indent: int | None = None) -> str:
        """JSON text (NaN and infinity refused); see :meth:`to_dict`."""
        return json.dumps(self.to_dict(maps_file), indent=indent, allow_nan=False)

    def maps_npz(self) -> dict[str, np.ndarray]:
        """The attention maps by the keys :meth:`to_dict` uses with a ``maps_file``."""
        maps = {"stage1": np.asarray(self.stage1_attention, np.float32)}
        for i, t in enumerate(self.tiles):
            if "stage2_attention" in t:
                maps[f"stage2_{i}"] = np.asarray(t["stage2_attention"], np.float32)
        return maps

    @classmethod
    def from_dict(cls, doc: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Result:
        """Inverse of :meth:`to_dict`; ``base_dir`` is where a referenced maps file lies."""
        if doc.get("format") != FORMAT:
            raise ValueError("not a napari-zoomin result (missing or wrong 'format')")
        npz: dict[str, np.ndarray] = {}

        def amap(v) -> np.ndarray:
            if isinstance(v, dict) and str(v.get("file", "")).endswith(".tif"):
                import tifffile  # a map stored once, as level 0 of its OME-TIFF

                with tifffile.TiffFile(Path(base_dir or ".") / v["file"]) as tif:
                    return np.asarray(tif.series[0].levels[0].asarray(), np.float32)
            if isinstance(v, dict):
                if not npz:
                    where = Path(base_dir or ".") / v["file"]
                    with np.load(where, allow_pickle=False) as z:
                        npz.update({k: z[k] for k in z.files})
                return np.asarray(npz[v["key"]], np.float32)
            return _map_from_json(v)

        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in doc.items() if k in names}
        kw["stage1_attention"] = amap(doc["stage1_attention"])
        kw["stage1_origin"] = tuple(doc["stage1_origin"])
        kw["stage1_cell_size"] = tuple(doc["stage1_cell_size"])
        tiles = []
        for t in doc["tiles"]:
            t = dict(t)
            if "stage2_attention" in t:
                t["stage2_attention"] = amap(t["stage2_attention"])
                t["stage2_origin"] = tuple(t["stage2_origin"])
                t["stage2_cell_size"] = tuple(t["stage2_cell_size"])
            tiles.append(t)
        kw["tiles"] = tiles
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str, base_dir: str | os.PathLike | None = None) -> Result:
        return cls.from_dict(json.loads(text), base_dir)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Result:
        """Read a ``result.json`` (and the maps file beside it, if it references one)."""
        path = Path(path)
        return cls.from_json(path.read_text(encoding="utf-8"), path.parent)


# --------------------------------------------------------------------------- TIFFs


@dataclass
class SparseMap:
    """A mostly-empty 2-D float32 map: ``values`` at ``(rows, cols)``, zero elsewhere."""

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    def pooled(self) -> SparseMap:
        """2×2 max pool (ceil shapes), the pyramid rule of the attention TIFFs."""
        h, w = (self.shape[0] + 1) // 2, (self.shape[1] + 1) // 2
        r, c = self.rows // 2, self.cols // 2
        lin = r * w + c
        uniq, inv = np.unique(lin, return_inverse=True)
        vals = np.full(uniq.shape, -np.inf, np.float32)
        np.maximum.at(vals, inv, self.values)
        # empty cells are 0, so a pooled maximum is never below 0
        return SparseMap((h, w), uniq // w, uniq % w, np.maximum(vals, 0).astype(np.float32))

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        out[self.rows, self.cols] = self.values
        return out

    def tiles(self, tile: int) -> Iterator[np.ndarray | None]:
        """Row-major ``(tile, tile)`` float32 blocks, as tifffile writes tiled pages;
        ``None`` for a block without a value (most of a slide-wide stage-2 canvas)."""
        ny, nx = -(-self.shape[0] // tile), -(-self.shape[1] // tile)
        key = (self.rows // tile) * nx + self.cols // tile
        order = np.argsort(key, kind="stable")
        key, rows, cols, vals = key[order], self.rows[order], self.cols[order], self.values[order]
        bounds = np.searchsorted(key, np.arange(ny * nx + 1))
        for k in range(ny * nx):
            a, b = bounds[k], bounds[k + 1]
            if b == a:
                yield None
                continue
            block = np.zeros((tile, tile), np.float32)
            block[rows[a:b] % tile, cols[a:b] % tile] = vals[a:b]
            yield block


def dense_tiles(a: np.ndarray, tile: int) -> Iterator[np.ndarray | None]:
    """A 2-D map's row-major ``(tile, tile)`` float32 blocks (edge blocks zero-padded);
    ``None`` for an all-zero block."""
    h, w = a.shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            part = a[y : y + tile, x : x + tile]
            if not part.any():
                yield None
                continue
            block = np.zeros((tile, tile), np.float32)
            block[: part.shape[0], : part.shape[1]] = part
            yield block


def _deflate(block: np.ndarray) -> bytes:
    import zlib

    import imagecodecs

    data = np.ascontiguousarray(block, "<f4")
    if imagecodecs.ZLIBNG.available:
        return imagecodecs.zlibng_encode(data, level=DEFLATE_LEVEL)
    if imagecodecs.DEFLATE.available:  # builds without zlib-ng
        return imagecodecs.deflate_encode(data, level=DEFLATE_LEVEL)
    return zlib.compress(data.tobytes(), DEFLATE_LEVEL)


#: the maps' deflate level: on a 100,000² slide's maps level 3 encodes the dense
#: stage-1 tiles 2.3x faster than level 6 (0.10 against 0.24 s) and the sparse
#: stage-2 ones 1.15x, for 2 % and 1 % more bytes
DEFLATE_LEVEL = 3


def deflate_tiles(blocks: Iterable[np.ndarray | None], tile: int) -> Iterator[bytes]:
    """``blocks`` (``None`` = all zero) as TIFF Adobe Deflate tiles: zlib streams of
    little-endian float32, no predictor, as :func:`write_tiff_pyramid` writes
    pre-encoded tiles.

    zlib-ng (imagecodecs) writes the zlib format 8× (sparse stage-2 tiles) to 4×
    (dense stage-1 tiles) faster than zlib at the same level (6), and no larger: every
    TIFF reader decodes it as zlib.  On the sparse tiles that are most of a slide's
    output it is 4× faster than libdeflate (0.17 against 0.65 s for a 100,000² slide's
    stage-2 canvas, level 6), on dense ones 1.3× slower (0.22 against 0.17 s): one
    encoder, at :data:`DEFLATE_LEVEL`.  The empty block is encoded once, not for each
    of the 8,600 empty tiles of a 100,000² slide's stage-2 canvas (and the writer
    stores its bytes once).  The other blocks are encoded on every core, a bounded
    batch at a time (a slide-wide canvas does not fit in memory as floats): the
    encoders let go of the GIL.
    """
    empty = _deflate(np.zeros((tile, tile), np.float32))
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        batch: list[Future | None] = []
        for block in blocks:
            batch.append(None if block is None else pool.submit(_deflate, block))
            if len(batch) == 256:
                yield from (empty if f is None else f.result() for f in batch)
                batch = []
        yield from (empty if f is None else f.result() for f in batch)


def stage2_canvas(result: Result) -> tuple[SparseMap, tuple[float, float]]:
    """All drawn tiles' stage-2 attention on one slide-wide grid, as sub-tile weights.

    The canvas cell is the stage-2 cell size (the same for every tile), its origin
    is level-0 (0, 0).  Each tile's cell ``c'`` adds ``α_c·β^c_c'`` (its attention
    relative to the whole slide, as the sub-tile weights) to the canvas cell that
    holds its centre; overlapping tiles add up, so the canvas is the two-stage
    sampling mass over the drawn tiles, with every cell off by at most half a cell.
    Cells centred outside the slide (zero padding) are left out.
    """
    tiles = [t for t in result.tiles if "stage2_attention" in t]
    if not tiles:
        raise ValueError("the result has no stage-2 attention (a one-stage model)")
    dy, dx = (float(v) for v in tiles[0]["stage2_cell_size"])
    h, w = (int(v) for v in result.slide["shape"])
    shape = (max(1, math.ceil(h / dy)), max(1, math.ceil(w / dx)))
    rows, cols, vals = [], [], []
    for t in tiles:
        beta = np.asarray(t["stage2_attention"], np.float64)
        u, v = beta.shape
        oy, ox = (float(c) for c in t["stage2_origin"])
        # centre of cell (i, j) is origin + (i + 1/2)·cell: its canvas cell is
        # floor(origin/cell + 1/2) + i, computed once so neighbours never collide
        r0 = math.floor(oy / dy + 0.5)
        c0 = math.floor(ox / dx + 0.5)
        rr, cc = np.meshgrid(np.arange(u) + r0, np.arange(v) + c0, indexing="ij")
        rows.append(rr.ravel())
        cols.append(cc.ravel())
        vals.append((float(t["alpha"]) * beta).ravel())
    r, c, val = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    keep = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
    r, c, val = r[keep], c[keep], val[keep]
    lin = r.astype(np.int64) * shape[1] + c
    uniq, inv = np.unique(lin, return_inverse=True)
    sums = np.bincount(inv, weights=val, minlength=uniq.shape[0]).astype(np.float32)
    return SparseMap(shape, uniq // shape[1], uniq % shape[1], sums), (dy, dx)


#: exported attention maps keep the cells that carry this share of a map's mass
EXPORT_KEPT_MASS = 0.995
#: ... at float16's precision (10 mantissa bits, float32's range): about 3 digits
EXPORT_MANTISSA_BITS = 10


def export_precision(values: np.ndarray) -> tuple[np.ndarray, float]:
    """A non-negative map as the output files store it, and the share of its mass dropped.

    Attention is peaked: on the 40,000² sample 2 % of the stage-1 cells hold 99 % of α,
    and the rest is a thin tail whose float32 noise does not compress (3.5 MB of
    zlib for a map that shows one hot spot).  Files keep every cell of the exponent
    classes (powers of two) that together carry at least :data:`EXPORT_KEPT_MASS` of
    the mass, rounded to :data:`EXPORT_MANTISSA_BITS` mantissa bits (relative error
    ≤ 2⁻¹¹, float32 range, so tiny maps do not underflow as float16 would), and write
    the smaller cells as 0: 15× smaller files, invisible at any contrast a viewer
    uses.  The dropped share (≤ 0.5 %) is returned so that ``result.json`` says it;
    the in-memory :class:`Result` stays exact.  One pass over the values (a bincount
    of exponents, no sort), so it stays fast on 6,250² maps.
    """
    a = np.asarray(values, np.float32)
    flat = a.reshape(-1)
    step = 1 << 20  # cells per chunk: the temporaries stay a few MB on 6,250² maps
    chunks = [slice(i, i + step) for i in range(0, flat.size, step)]

    def cleaned(part: slice) -> np.ndarray:
        v = flat[part]
        return np.where(v > 0, v, np.float32(0))  # negatives and NaN → 0

    mass = np.zeros(256)
    for part in chunks:
        v = cleaned(part)
        mass += np.bincount(v.view(np.uint32) >> 23, weights=v, minlength=256)
    total = float(mass.sum())
    if not (total > 0 and np.isfinite(total)):
        return np.where(a > 0, a, np.float32(0)), 0.0
    below = np.cumsum(mass) - mass  # mass of the exponent classes under each class
    lowest = max(int(np.searchsorted(below, (1 - EXPORT_KEPT_MASS) * total, "right")) - 1, 0)
    shift = 23 - EXPORT_MANTISSA_BITS
    half, mask = np.uint32(1 << (shift - 1)), np.uint32(~((1 << shift) - 1) & 0xFFFFFFFF)
    out = np.empty(flat.size, np.uint32)
    for part in chunks:
        bits = cleaned(part).view(np.uint32)
        rounded = np.minimum((bits + half) & mask, np.uint32(0x7F7FFFFF))  # never inf
        out[part] = np.where(bits >> 23 >= lowest, rounded, np.uint32(0))
    return out.view(np.float32).reshape(a.shape), float(below[lowest]) / total


def write_attention_tiff(
    path: str | os.PathLike,
    data: np.ndarray | SparseMap,
    origin: tuple[float, float],
    cell_size: tuple[float, float],
    mpp: tuple[float, float] | None,
    name: str,
) -> Path:
    """A float32 map as a tiled, zlib-compressed, pyramidal OME-TIFF (atomic write).

    Level 0 holds the values given; reduced levels (SubIFDs) are 2×2 maxima (ceil
    shapes), so a hot spot stays visible at every zoom with the same contrast
    limits, down to a long side ≤ 256.  The physical pixel size is ``cell_size ×
    mpp`` (OME ``PhysicalSizeX/Y`` in µm, and TIFF X/YResolution in pixels per cm)
    and the OME ``Plane`` position is ``origin × mpp``, so the map overlays the slide.
    Without ``mpp`` the resolution tags have no unit and count map pixels per
    level-0 pixel.  Stored in the ``"ome-tiff"`` layout of
    :func:`napari_zoomin.samples.pyramid.write_tiff_pyramid` (which says why).
    """
    from ..samples.pyramid import write_tiff_pyramid

    levels: list[np.ndarray | SparseMap] = [
        data if isinstance(data, SparseMap) else np.asarray(data, np.float32)
    ]
    while max(levels[-1].shape) > TIFF_TILE:
        lv = levels[-1]
        levels.append(lv.pooled() if isinstance(lv, SparseMap) else max_2x2(lv))

    def resolution(k: int):
        sy, sx = cell_size[0] * 2**k, cell_size[1] * 2**k
        if mpp is None:
            return (1.0 / sx, 1.0 / sy), "NONE"
        return (1e4 / (sx * mpp[1]), 1e4 / (sy * mpp[0])), "CENTIMETER"

    meta: dict[str, Any] = {"axes": "YX", "Name": name}
    if mpp is not None:
        meta.update(
            PhysicalSizeX=cell_size[1] * mpp[1],
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=cell_size[0] * mpp[0],
            PhysicalSizeYUnit="µm",
            Plane={
                "PositionX": [origin[1] * mpp[1]],
                "PositionXUnit": ["µm"],
                "PositionY": [origin[0] * mpp[0]],
                "PositionYUnit": ["µm"],
            },
        )

    def pages():
        for k, lv in enumerate(levels):
            res, unit = resolution(k)
            options: dict[str, Any] = {
                "resolution": res,
                "resolutionunit": unit,
                "metadata": meta if k == 0 else None,
            }
            blocks = (
                lv.tiles(TIFF_TILE) if isinstance(lv, SparseMap) else dense_tiles(lv, TIFF_TILE)
            )
            yield deflate_tiles(blocks, TIFF_TILE), {**options, "shape": lv.shape, "dtype": "<f4"}

    return write_tiff_pyramid(
        path,
        pages(),
        layout="ome-tiff",
        n_levels=len(levels),
        tile=(TIFF_TILE, TIFF_TILE),
        compression="zlib",
        # no floating-point predictor: on maps at export precision (long runs of 0,
        # 10-bit mantissas) it makes zlib's output 26 % larger (40,000² sample)
        predictor=False,
        photometric="minisblack",
    )


# --------------------------------------------------------------------------- outputs


def _geojson_annotations(result: Result):
    from ..annotations import Annotation

    anns, props = [], []
    for i, t in enumerate(result.tiles):
        top, left, h, w = (int(v) for v in t["region"])
        anns.append(Annotation.rectangle(top, left, h, w, label="Sampled tile"))
        m = {"count": int(t["count"]), "alpha": float(t["alpha"])}
        props.append({"name": f"tile {i}", "tile": i, **m, "measurements": m})
    for k, s in enumerate(result.subtiles):
        top, left, h, w = (int(v) for v in s["region"])
        anns.append(Annotation.rectangle(top, left, h, w, label="Sampled sub-tile"))
        m = {"weight": float(s["weight"]), "tile": int(s["tile"])}
        score = subtile_score(s, result.label_index)
        if score is not None:
            m["score"] = score
        props.append({"name": f"sub-tile {k}", **m, "measurements": m})
    return anns, props


def _magnified_annotations(result: Result):
    """A MagNet's boxes as QuPath rectangles, classified by layer ("Magnified layer 2"),
    so QuPath colours them by depth; measurements: depth, zoom, level, read scale, and
    for classification patches their reading order and the predicted class's
    probability once read (the trace)."""
    from ..annotations import Annotation

    boxes = result.magnified["boxes"]
    trace = result.magnified.get("trace") or []
    last = max(int(b["depth"]) for b in boxes)
    anns, props, patch = [], [], 0
    for m, b in enumerate(boxes):
        top, left, h, w = (float(v) for v in b["box"])
        depth = int(b["depth"])
        anns.append(Annotation.rectangle(top, left, h, w, label=f"{MAGNIFIED_LABEL} {depth}"))
        meas = {
            "depth": depth,
            "zoom": round(float(b["zoom"]), 6),
            "level": int(b["level"]),
            "read_scale": round(float(b["read_scale"]), 6),
        }
        if depth == last:
            meas["patch"] = patch
            if patch < len(trace):
                meas[f"p {result.label}"] = round(float(trace[patch][result.label]), 6)
            patch += 1
        props.append({"name": f"box {m}", "parent": int(b["parent"]), **meas, "measurements": meas})
    return anns, props


#: QuPath classification of a MagNet's boxes in ``magnified.geojson`` (+ the layer)
MAGNIFIED_LABEL = "Magnified layer"
#: QuPath classification of the outlines in ``places.geojson``
PLACE_LABEL = "Attention place"


def _place_annotations(result: Result):
    from ..annotations import Annotation
    from .places import places

    anns, props = [], []
    for p in places(result):
        anns.append(Annotation.from_rows_cols(p.outline, label=PLACE_LABEL))
        m = {"rank": p.rank, "share": round(p.share, 6), "subtiles": p.n_subtiles}
        if p.score is not None and math.isfinite(p.score):
            m["score"] = round(p.score, 6)
        props.append({"name": f"place {p.rank}", **m, "measurements": m})
    return anns, props


#: folders of the operating system's own (kernel views, devices): never a destination
_SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")


def check_output_path(
    path: str | os.PathLike,
    *,
    folder: bool,
    what: str = "--out",
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Refuse a destination that cannot take the results, before any work starts.

    ``folder``: the destination is a folder (``zoomin classify``'s results) or a file
    (the batch CSV, a checkpoint).  Refused, with ``what`` (the flag or field) named: an
    empty path; a file where a folder is wanted or the reverse; one of ``inputs`` (the
    slide, the model); a place under a file, under ``/proc``, ``/sys`` or ``/dev``; a
    folder that cannot be written (a probe file is created and removed in the nearest
    existing folder, so read-only mounts are refused too, even for root).  Nothing is
    created.  Returns the absolute path.
    """
    from ..errors import ZoominError

    if not str(path).strip():
        raise ZoominError(None, f"{what} is empty.", f"Give {what} a path.")
    target = Path(path).expanduser().absolute()
    shown = Path(path)
    if any(target == Path(p) or Path(p) in target.parents for p in _SYSTEM_FOLDERS):
        raise ZoominError(
            shown, f"is a system folder, not a place for results ({what}).", "Choose another."
        )
    for given in inputs:
        if target.resolve() == Path(given).expanduser().resolve():
            raise ZoominError(
                shown,
                f"is an input of this command; {what} would overwrite it.",
                f"Choose another {what}.",
            )
    if target.is_dir() and not folder:
        raise ZoominError(
            shown, f"is a folder; {what} names a file here.", "Give a file name inside it."
        )
    if target.exists() and not target.is_dir() and folder:
        raise ZoominError(
            shown, f"is a file; {what} names a folder for the results.", "Give a folder."
        )
    existing = target if target.is_dir() else target.parent
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise ZoominError(
            shown,
            f"lies under {existing}, which is a file, not a folder ({what}).",
            f"Choose another {what}.",
        )
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".zoomin-probe-"):
            pass
    except OSError as exc:
        raise ZoominError(
            shown,
            f"cannot be written: {existing} is not writable ({exc.strerror or exc}; {what}).",
            f"Choose a folder you can write to for {what}.",
        ) from None
    return target


def _savez(file, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed(file, **arrays)`` at deflate level 1 instead of 6: the
    same ``.npz`` for ``np.load``, 2x faster on a slide's 511 stage-2 tile maps (0.055
    against 0.118 s) for 2 % more bytes (numpy has no level argument)."""
    import zipfile

    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def write_outputs(result: Result, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write a result's files into ``out_dir`` (created); returns ``{what: path}``.

    - ``stage1_attention`` → ``stage1_attention.ome.tif``: ``α`` at its placement
      (:func:`write_attention_tiff`).
    - ``stage2_attention`` → ``stage2_attention.ome.tif`` (two-stage models): the
      drawn tiles' ``α_c·β^c`` on one slide-wide grid (:func:`stage2_canvas`).
    - ``geojson`` → ``sampled.geojson``: QuPath annotations "Sampled tile"
      (properties ``count``, ``alpha``) and "Sampled sub-tile" (``weight``, ``tile``),
      rectangles in level-0 (x, y) pixels, also as QuPath measurements.
    - ``places`` → ``places.geojson`` (not for a MagNet, whose patches carry no
      weights: see ``magnified``): one QuPath annotation "Attention place" per
      place the evidence came from (:func:`napari_zoomin.engine.places.places`): the
      convex hull of its sub-tiles, properties and measurements ``rank`` (1 = largest
      share), ``share`` (% of the sub-tiles' :func:`support`), ``score``
      (:attr:`~napari_zoomin.engine.places.Place.score`) and ``subtiles`` (how many).
    - ``magnified`` → ``magnified.geojson`` (MagNets): every box each magnifying layer
      chose, as a rectangle classified "Magnified layer <depth>", with measurements
      ``depth``, ``zoom``, ``level`` (the slide level read) and ``read_scale``; the
      classification patches add ``patch`` (reading order) and ``p <label>`` (the
      predicted class's probability after reading it).
    - ``maps`` → ``attention_maps.npz`` only when the maps exceed
      :data:`JSON_MAX_CELLS` cells (the stage-2 maps of the drawn tiles);
      ``result.json`` then references it, and the stage-1 map in the TIFF's level 0.
    - ``json`` → ``result.json``, written last.

    The maps in the files (the TIFFs, the ``.npz``, ``result.json``'s stage-1 map)
    are at export precision (:func:`export_precision`): ``result.json`` key
    ``exported_maps`` records the rule and the share of each map's mass written as 0.
    """
    from ..annotations import write_geojson

    out = check_output_path(out_dir, folder=True, what="the output folder")
    out.mkdir(parents=True, exist_ok=True)
    mpp = result.slide.get("mpp")
    mpp = None if mpp is None else (float(mpp[0]), float(mpp[1]))
    written: dict[str, Path] = {}
    # the files hold the maps at export precision (export_precision says why and how)
    stage1, stage1_dropped = export_precision(result.stage1_attention)
    exported: dict[str, Any] = {
        "kept_mass": EXPORT_KEPT_MASS,
        "mantissa_bits": EXPORT_MANTISSA_BITS,
        "stage1_dropped_mass": stage1_dropped,
    }

    def stage2_file() -> tuple[Path, float]:
        canvas, cell = stage2_canvas(result)
        values, dropped = export_precision(canvas.values)
        kept = values > 0
        canvas = SparseMap(canvas.shape, canvas.rows[kept], canvas.cols[kept], values[kept])
        path = write_attention_tiff(
            out / "stage2_attention.ome.tif",
            canvas,
            (0.0, 0.0),
            cell,
            mpp,
            "stage-2 attention (sub-tile weights)",
        )
        return path, dropped

    def annotation_files() -> dict[str, Path]:
        files = {"geojson": write_geojson(out / "sampled.geojson", *_geojson_annotations(result))}
        if result.mode != "magnify":  # a MagNet's patches are read in order, not weighed
            files["places"] = write_geojson(out / "places.geojson", *_place_annotations(result))
        if result.magnified is not None and result.magnified.get("boxes"):
            anns, props = _magnified_annotations(result)
            files["magnified"] = write_geojson(out / "magnified.geojson", anns, props)
        return files

    # the files are independent (result.json, written last, names them): written side
    # by side, their compression lets go of the GIL (1.06 → 0.9 s on a 100,000² slide)
    with ThreadPoolExecutor(3) as pool:
        stage1_job = pool.submit(
            write_attention_tiff,
            out / "stage1_attention.ome.tif",
            stage1,
            result.stage1_origin,
            result.stage1_cell_size,
            mpp,
            "stage-1 attention",
        )
        stage2_job = pool.submit(stage2_file) if result.has_stage2 else None
        annotations_job = pool.submit(annotation_files)
        # meanwhile, here: the drawn tiles' maps, in result.json or in the .npz
        maps_file = None
        tiles, tile_dropped = [], [0.0]
        for t in result.tiles:
            if "stage2_attention" in t:
                beta, lost = export_precision(t["stage2_attention"])
                t, tile_dropped = {**t, "stage2_attention": beta}, [*tile_dropped, lost]
            tiles.append(t)
        exported["stage2_tile_maps_dropped_mass_max"] = max(tile_dropped)
        exported_result = dataclasses.replace(result, stage1_attention=stage1, tiles=tiles)
        maps_bytes = None
        if max(result.stage1_attention.size, result.stage2_cells) > JSON_MAX_CELLS:
            import io

            buf = io.BytesIO()
            maps = exported_result.maps_npz()
            del maps["stage1"]  # stored once: level 0 of stage1_attention.ome.tif
            _savez(buf, maps)
            maps_bytes = buf.getvalue()
        written["stage1_attention"] = stage1_job.result()
        if stage2_job is not None:
            written["stage2_attention"], exported["stage2_dropped_mass"] = stage2_job.result()
        written.update(annotations_job.result())
    if maps_bytes is not None:
        written["maps"] = write_bytes_atomic(out / MAPS_FILE, maps_bytes)
        maps_file = MAPS_FILE
    doc = exported_result.to_dict(maps_file=maps_file)
    if maps_file is not None:
        doc["stage1_attention"] = {"file": written["stage1_attention"].name, "level": 0}
    doc["exported_maps"] = exported
    text = json.dumps(doc, allow_nan=False)
    written["json"] = write_bytes_atomic(out / "result.json", text.encode("utf-8"))
    return written
