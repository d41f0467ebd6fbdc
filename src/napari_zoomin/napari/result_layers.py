"""A classification :class:`~napari_zoomin.engine.results.Result` as napari layer data.

Pure functions (no Qt, no viewer): they return napari ``LayerData`` tuples
``(data, kwargs, layer_type)`` placed on a slide layer whose level-0 frame is
``(scale, translate)`` (:func:`~.slide_layers.level0_frame`), plus the text and table
rows the ``Classify slide`` widget shows.

Placement.  Results use continuous level-0 coordinates (pixel ``c`` covers
``[c, c + 1)``); napari puts the *centre* of data pixel ``k`` at ``translate + k·scale``,
so the level-0 point ``x`` lies at world ``t + s·(x − ½)``
(:func:`~.roi_shapes.level0_to_world`).  A map whose cell ``(i, j)`` covers
``origin + [i, i+1)·cell`` therefore gets ``scale = s·cell`` and
``translate = t + s·(origin + cell/2 − ½)`` (:func:`map_placement`); shapes layers hold
level-0 coordinates as they are in ``result.json`` and are placed like the ``ROI
annotations`` layer (:func:`~.roi_shapes.roi_shapes_placement`).

Display choices.  Attention maps use :data:`ATTENTION_COLORMAP`, inferno's colours
with an opacity that rises with the value (0 is fully transparent), in translucent
blending: attention is heavily skewed (a few cells hold most of it), so the slide stays
visible under weak attention and hot spots glow.  Background is NaN, which napari
draws fully transparent too: cells off the tissue (``α = 0``, never sampled) and
everywhere outside the drawn tiles leave the slide's pixels exactly as they were.
(Additive blending would brighten every pixel and wash out on bright-field slides;
plain inferno at a fixed opacity veils all the tissue in near-black.)  Stage-2 attention
is drawn at :data:`STAGE2_OPACITY` (half), so the tissue of the top place reads through
it without hiding a layer.

Overview.  At whole-slide zoom a stage-1 cell is below one screen pixel and the raw
map's hot cells alias away, so :data:`OVERVIEW_LAYER` shows the same ``α``, blurred
over the tissue by a few screen pixels' worth (:data:`OVERVIEW_BLUR`) and with its top
colour at a high percentile (:data:`OVERVIEW_PERCENTILE`): where the model looked
becomes a glow visible without zooming.  It is its own layer, below the raw map, so
the raw layer's values stay exactly ``α`` (as saved and exported); it hides itself
once the raw cells are readable (:data:`OVERVIEW_SHOWN_BELOW_PX`, by
:mod:`.zoom_follow`) so it never veils the tissue the user zoomed in to read.

Visible at every zoom.  Tiles (128–256 level-0 px) are below one screen pixel on a
whole slide at whole-slide zoom, so the top places are also marked by
:data:`MARKERS_LAYER`: a points layer whose markers keep :data:`MARKER_SIZE` screen
pixels at any zoom (napari 0.9 has no screen-space size mode; ``canvas_size_limits``
clamps every marker's on-screen size to exactly that), the main places numbered by
rank and the others faint (:func:`markers_layer_data`).  The
outlines of tiles, sub-tiles and places are :data:`OUTLINE_WIDTH_PX` screen pixels wide
at every zoom (their metadata asks :mod:`.zoom_follow` to keep them so).

MagNets (002).  A MagNet samples nothing: it zooms.  Its result gets the overview and
``stage-1 attention`` (layer 1's spatial-sparsemax distribution ``p`` over the whole
slide, the map its first boxes came from) and :data:`MAGNIFIED_LAYER`, every box each
magnifying layer read, outlined in its layer's colour (:func:`depth_colours`; the
classification patches, the last layer, in :data:`PATCH_COLOR` and numbered in the
order the GRU read them).  The sampling kinds' other layers are left out: a MagNet has
no stage 2, its "tiles" and "sub-tiles" are its layer-1 boxes and patches with made-up
counts and equal weights (the boxes layer shows them as they are), and its patches are
read in sequence, not weighed, so "places" by share of evidence would mislead.

Several slides.  Each slide keeps its own result layers (the ``Classify slide`` widget
puts them directly above their slide).  The most recent classification's layers have
the bare names above; an earlier result of *another* slide gets its slide's name
appended (:func:`result_layer_name`, ``stage-1 attention [slide-a]``).  Every result
layer's metadata names its bare name under :data:`LAYER_KEY`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..engine.places import Place, main_places, places
from ..engine.results import Result, SparseMap, subtile_score
from ..engine.tissue import TissueMask
from .roi_shapes import level0_to_world, roi_shapes_placement
from .zoom_follow import OUTLINE_PX, SCREEN_WIDTH_KEY, SHOWN_BELOW_KEY

__all__ = [
    "LAYER_KEY",
    "MAGNET_LAYER_NAMES",
    "MAGNIFIED_LAYER",
    "MARKERS_LAYER",
    "MAX_PLACES",
    "OUTLINE_WIDTH_PX",
    "OVERVIEW_LAYER",
    "PLACES_LAYER",
    "RESULT_KEY",
    "RESULT_LAYER_NAMES",
    "STAGE1_LAYER",
    "STAGE2_LAYER",
    "SUBTILES_LAYER",
    "TILES_LAYER",
    "TISSUE_LAYER",
    "TISSUE_SOURCE",
    "depth_colours",
    "magnified_layer_data",
    "magnified_legend",
    "map_placement",
    "markers_layer_data",
    "overview_layer_data",
    "overview_values",
    "patch_indices",
    "place_rows",
    "place_view",
    "places_layer_data",
    "result_layer_data",
    "result_layer_name",
    "stage1_layer_data",
    "stage2_canvas_raw",
    "stage2_layer_data",
    "subtiles_layer_data",
    "summary_lines",
    "tiles_layer_data",
    "tissue_layer_data",
    "tissue_mask_from_labels",
    "warning_lines",
]

OVERVIEW_LAYER = "attention overview"
STAGE1_LAYER = "stage-1 attention"
STAGE2_LAYER = "stage-2 attention"
TILES_LAYER = "sampled tiles"
SUBTILES_LAYER = "sampled sub-tiles"
PLACES_LAYER = "attention places"
MARKERS_LAYER = "top places"
#: bottom to top, the order the layers are added in
RESULT_LAYER_NAMES = (
    OVERVIEW_LAYER,
    STAGE1_LAYER,
    STAGE2_LAYER,
    TILES_LAYER,
    SUBTILES_LAYER,
    PLACES_LAYER,
    MARKERS_LAYER,
)
MAGNIFIED_LAYER = "magnified regions"
#: a MagNet result's layers, bottom to top (module docstring)
MAGNET_LAYER_NAMES = (OVERVIEW_LAYER, STAGE1_LAYER, MAGNIFIED_LAYER)
#: outline colours of the magnifying layers' boxes, layer 1 first (cycled past 4 layers)
DEPTH_COLORS = ("#00e5ff", "#ffd400", "#7cff4f", "#ff8c00")
#: outline and number colour of the classification patches (the last layer's boxes)
PATCH_COLOR = "#ff3df2"
#: metadata key of every result layer: its bare name (one of RESULT_LAYER_NAMES)
LAYER_KEY = "napari_zoomin_result_layer"
#: markers: how many places get one, and their size on screen (pixels, any zoom)
MAX_MARKERS = 10
MARKER_SIZE = 18
MARKER_COLOR = "#00ff66"
#: a marker of a place outside the main ones (``engine.places.main_places``): the same
#: ring, faint, and no number (the widget's table still lists it)
MINOR_MARKER_COLOR = "#00ff6659"
#: rows of the widget's "where the evidence is" table (the places with most weight)
MAX_PLACES = 20
TISSUE_LAYER = "tissue mask"
#: ``TissueMask.source`` (and ``result.tissue["source"]``) of a mask edited in napari
TISSUE_SOURCE = "tissue mask layer"
#: metadata key of every result layer: the Result itself (provenance; ``to_json`` saves it)
RESULT_KEY = "napari_zoomin_result"

#: inferno (matplotlib's control colours) with alpha rising from 0, as napari's dict form
ATTENTION_COLORMAP = {
    "name": "attention (inferno, transparent at 0)",
    "colors": [
        [0.001, 0.000, 0.014, 0.0],
        [0.342, 0.062, 0.429, 0.55],
        [0.735, 0.216, 0.330, 0.8],
        [0.978, 0.557, 0.035, 0.95],
        [0.988, 0.998, 0.645, 1.0],
    ],
    "controls": [0.0, 0.25, 0.5, 0.75, 1.0],
}
ATTENTION_OPACITY = 0.85
#: stage-2 maps cover the top places' tissue: half opacity keeps it readable under them
STAGE2_OPACITY = 0.5
#: α is very peaked (one cell may hold 10 % of the slide's attention, a typical tissue
#: cell 0.004 %): gamma 0.5 shows the secondary places the model drew from too
STAGE1_GAMMA = 0.5
SUBTILE_COLORMAP = "viridis"
TILE_EDGE_COLOR = "#00e5ff"
PLACE_EDGE_COLOR = "#ffffff"
#: a place's outline is this many times wider while its table row is selected
PLACE_HIGHLIGHT = 3.0
#: outlines of tiles, sub-tiles and places on screen (pixels, at every zoom:
#: :mod:`.zoom_follow`); ``edge_width`` in the layer data is only the start value
OUTLINE_WIDTH_PX = OUTLINE_PX
#: the overview's blur (σ) as a share of the slide's long side: about 3 screen pixels
#: when the whole slide fills a 1,000-pixel canvas
OVERVIEW_BLUR = 1 / 300
#: the overview's top colour is at this percentile of its values on the tissue, so the
#: top region is a patch of full colour, not a one-pixel peak
OVERVIEW_PERCENTILE = 99.0
#: the overview hides when a stage-1 cell spans this many screen pixels (the raw map is
#: readable then) and shows again when zoomed back out
OVERVIEW_SHOWN_BELOW_PX = 3.0
#: chunk side of the lazy stage-2 pyramid, and the long side at which it stops
STAGE2_CHUNK = 256

Frame = tuple[tuple[float, float], tuple[float, float]]
LayerData = tuple[Any, dict[str, Any], str]


def map_placement(
    origin: tuple[float, float], cell_size: tuple[float, float], frame: Frame
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` of an image whose cell ``(i, j)`` covers level-0
    ``[origin + i·cell, origin + (i+1)·cell)`` (the Result placement convention)."""
    (sy, sx), (ty, tx) = frame
    (oy, ox), (dy, dx) = origin, cell_size
    scale = (sy * dy, sx * dx)
    translate = (ty + sy * (oy + dy / 2 - 0.5), tx + sx * (ox + dx / 2 - 0.5))
    return scale, translate


def _limits(values: np.ndarray) -> tuple[float, float]:
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
    return (0.0, top if top > 0 else 1.0)


def stage1_layer_data(result: Result, frame: Frame) -> LayerData:
    """``α`` over the whole slide, one pixel per stage-1 cell; background cells NaN."""
    alpha = np.asarray(result.stage1_attention, np.float32)
    data = np.where(alpha > 0, alpha, np.float32(np.nan)).astype(np.float32)
    scale, translate = map_placement(result.stage1_origin, result.stage1_cell_size, frame)
    values = (
        "stage-1 attention alpha per cell (sums to 1 over the slide); "
        "NaN = background, never sampled"
    )
    if result.magnified is not None:
        values = (
            "MagNet: layer 1's spatial-sparsemax distribution p over the whole slide "
            "(mean over its boxes; sums to 1), the map its first boxes came from; "
            "NaN = outside its support"
        )
    return (
        data,
        {
            "name": STAGE1_LAYER,
            "scale": scale,
            "translate": translate,
            "colormap": ATTENTION_COLORMAP,
            "contrast_limits": _limits(data),
            "gamma": STAGE1_GAMMA,
            "opacity": ATTENTION_OPACITY,
            "blending": "translucent",
            "interpolation2d": "nearest",
            "metadata": {
                RESULT_KEY: result,
                "values": values,
                "origin": list(result.stage1_origin),
                "cell_size": list(result.stage1_cell_size),
            },
        },
        "image",
    )


def overview_values(result: Result) -> tuple[np.ndarray, tuple[float, float]]:
    """The overview of ``α`` on the stage-1 grid, and its contrast limits.

    ``α`` (background 0) blurred by a gaussian of σ = :data:`OVERVIEW_BLUR` × the
    slide's long side (in level-0 pixels, converted to cells), kept on the tissue (cells
    with ``α > 0``) and NaN elsewhere, so glass stays untouched; the limits are ``(0,
    the OVERVIEW_PERCENTILE-th percentile of the tissue's values)``.  For display
    only: nothing saved or exported uses it.
    """
    from scipy.ndimage import gaussian_filter

    alpha = np.nan_to_num(np.asarray(result.stage1_attention, np.float64), nan=0.0)
    tissue = alpha > 0
    h, w = (float(v) for v in result.slide["shape"])
    dy, dx = (float(v) for v in result.stage1_cell_size)
    sigma = OVERVIEW_BLUR * max(h, w)
    blurred = gaussian_filter(alpha, sigma=(sigma / dy, sigma / dx), mode="constant")
    data = np.where(tissue, blurred, np.nan).astype(np.float32)
    values = data[tissue]
    top = float(np.percentile(values, OVERVIEW_PERCENTILE)) if values.size else 0.0
    return data, (0.0, top if top > 0 else 1.0)


def overview_layer_data(result: Result, frame: Frame) -> LayerData:
    """The overview (:func:`overview_values`) on the stage-1 grid, shown while zoomed
    out (:data:`OVERVIEW_SHOWN_BELOW_PX`)."""
    data, limits = overview_values(result)
    scale, translate = map_placement(result.stage1_origin, result.stage1_cell_size, frame)
    return (
        data,
        {
            "name": OVERVIEW_LAYER,
            "scale": scale,
            "translate": translate,
            "colormap": ATTENTION_COLORMAP,
            "contrast_limits": limits,
            "opacity": ATTENTION_OPACITY,
            "blending": "translucent",
            "interpolation2d": "linear",
            "metadata": {
                RESULT_KEY: result,
                "values": (
                    "display only: stage-1 attention alpha blurred over the tissue "
                    f"(sigma = {OVERVIEW_BLUR:.4g} x the slide's long side), colour "
                    f"saturated at its {OVERVIEW_PERCENTILE:g}th percentile; NaN off the "
                    "tissue. The stage-1 attention layer holds alpha itself."
                ),
                SHOWN_BELOW_KEY: OVERVIEW_SHOWN_BELOW_PX,
            },
        },
        "image",
    )


def stage2_canvas_raw(result: Result) -> tuple[SparseMap, tuple[float, float]] | None:
    """The drawn tiles' raw ``β^c`` on one slide-wide grid of the stage-2 cell size.

    Every tile's stage-2 map has the same cell size, but tiles start at whole level-0
    pixels, not at whole cells, so no single grid holds them all exactly: each tile is
    put at the grid cell nearest its origin (as :func:`~napari_zoomin.engine.results.
    stage2_canvas` does for the exported TIFF), at most half a cell from its exact
    placement.  Drawn tiles overlap (neighbouring stage-1 cells); where they do, the
    more attended tile is shown, as if each tile were a layer stacked by attention.
    Canvas cell ``(i, j)`` covers level-0 ``[i·dy, (i+1)·dy) × [j·dx, (j+1)·dx)``.
    Returns ``None`` for one-stage models.
    """
    tiles = [t for t in result.tiles if "stage2_attention" in t]
    if not tiles:
        return None
    dy, dx = (float(v) for v in tiles[0]["stage2_cell_size"])
    h, w = (int(v) for v in result.slide["shape"])
    shape = (max(1, math.ceil(h / dy)), max(1, math.ceil(w / dx)))
    rows, cols, vals = [], [], []
    for t in tiles:  # most attended first (Result order): first occurrence wins below
        beta = np.asarray(t["stage2_attention"], np.float32)
        oy, ox = (float(v) for v in t["stage2_origin"])
        r0, c0 = math.floor(oy / dy + 0.5), math.floor(ox / dx + 0.5)
        rr, cc = np.meshgrid(
            np.arange(beta.shape[0]) + r0, np.arange(beta.shape[1]) + c0, indexing="ij"
        )
        rows.append(rr.ravel())
        cols.append(cc.ravel())
        vals.append(beta.ravel())
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    keep = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
    r, c, v = r[keep], c[keep], v[keep]
    _, first = np.unique(r.astype(np.int64) * shape[1] + c, return_index=True)
    return SparseMap(shape, r[first], c[first], v[first]), (dy, dx)


def _lazy_level(level: SparseMap, chunk: int):
    """A dask array of a sparse map, NaN where it has no value, built chunk by chunk."""
    import dask.array as da

    h, w = level.shape
    nx = -(-w // chunk)
    key = (level.rows // chunk) * nx + level.cols // chunk
    order = np.argsort(key, kind="stable")
    key, rows, cols, vals = key[order], level.rows[order], level.cols[order], level.values[order]
    bounds = np.searchsorted(key, np.arange(-(-h // chunk) * nx + 1))

    def block(block_info=None):
        info = block_info[None]
        i, j = info["chunk-location"]
        out = np.full(info["chunk-shape"], np.nan, np.float32)
        a, b = bounds[i * nx + j], bounds[i * nx + j + 1]
        out[rows[a:b] - i * chunk, cols[a:b] - j * chunk] = vals[a:b]
        return out

    chunks = tuple(tuple(min(chunk, n - k) for k in range(0, n, chunk)) for n in (h, w))
    return da.map_blocks(block, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0), np.float32))


def stage2_layer_data(result: Result, frame: Frame) -> LayerData | None:
    """Raw ``β^c`` of the drawn tiles (:func:`stage2_canvas_raw`) as one lazy multiscale
    image over the slide: memory grows with the drawn tiles, not with the slide."""
    canvas = stage2_canvas_raw(result)
    if canvas is None:
        return None
    level, cell = canvas
    levels = [level]
    while len(levels) < 2 or (max(levels[-1].shape) > STAGE2_CHUNK and levels[-1].shape != (1, 1)):
        levels.append(levels[-1].pooled())  # 2×2 maxima: a hot spot stays visible
    scale, translate = map_placement((0.0, 0.0), cell, frame)
    return (
        [_lazy_level(lv, STAGE2_CHUNK) for lv in levels],
        {
            "name": STAGE2_LAYER,
            "multiscale": True,
            "scale": scale,
            "translate": translate,
            "colormap": ATTENTION_COLORMAP,
            "contrast_limits": _limits(level.values),
            "opacity": STAGE2_OPACITY,
            "blending": "translucent",
            "interpolation2d": "nearest",
            "metadata": {
                RESULT_KEY: result,
                "values": (
                    "raw stage-2 attention beta^c of each drawn tile (each tile's map sums "
                    "to 1; not weighted by the tile's alpha_c); where drawn tiles overlap, "
                    "the more attended tile is shown; NaN outside the drawn tiles"
                ),
                "placement": (
                    "one grid of the stage-2 cell size from level-0 (0, 0); each tile "
                    "snapped to the nearest cell (at most half a cell off)"
                ),
                "cell_size": list(cell),
            },
        },
        "image",
    )


def _rectangles(regions) -> list[np.ndarray]:
    """napari rectangles (4 corners, (y, x)) of level-0 ``[top, left, h, w]`` regions."""
    out = []
    for top, left, h, w in regions:
        y0, x0, y1, x1 = float(top), float(left), float(top + h), float(left + w)
        out.append(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]))
    return out


def tiles_layer_data(result: Result, frame: Frame) -> LayerData:
    """The drawn stage-1 tiles as rectangles (data in level-0 pixels), with ``count``,
    ``alpha`` and ``tile`` (index into ``result.tiles``) features."""
    scale, translate = roi_shapes_placement(frame)
    side = max((t["region"][2] for t in result.tiles), default=64)
    features = {
        "tile": np.arange(len(result.tiles), dtype=np.int64),
        "count": np.array([int(t["count"]) for t in result.tiles], np.int64),
        "alpha": np.array([float(t["alpha"]) for t in result.tiles], np.float64),
    }
    return (
        _rectangles(t["region"] for t in result.tiles),
        {
            "name": TILES_LAYER,
            "shape_type": "rectangle",
            "scale": scale,
            "translate": translate,
            "features": features,
            "edge_color": TILE_EDGE_COLOR,
            "edge_width": side / 128,
            "face_color": "transparent",
            "metadata": {
                RESULT_KEY: result,
                "units": "level-0 pixels (result.json regions)",
                SCREEN_WIDTH_KEY: OUTLINE_WIDTH_PX,
            },
        },
        "shapes",
    )


def subtiles_layer_data(result: Result, frame: Frame) -> LayerData:
    """The sub-tiles the feature network saw, edges coloured by ``weight`` (``α_c·β^c_c'``);
    features ``weight``, ``tile``, ``rank`` (1 = most support for the predicted class)
    and ``score`` (the classifier's score of the sub-tile alone for that class)."""
    scale, translate = roi_shapes_placement(frame)
    weights = np.array([float(s["weight"]) for s in result.subtiles], np.float64)
    side = max((s["region"][2] for s in result.subtiles), default=32)
    features = {
        "weight": weights,
        "tile": np.array([int(s["tile"]) for s in result.subtiles], np.int64),
        "rank": np.arange(1, len(weights) + 1, dtype=np.int64),  # by support (results.py)
    }
    scores = [subtile_score(s, result.label_index) for s in result.subtiles]
    if scores and None not in scores:
        features["score"] = np.array(scores, np.float64)
    kwargs: dict[str, Any] = {
        "name": SUBTILES_LAYER,
        "shape_type": "rectangle",
        "scale": scale,
        "translate": translate,
        "features": features,
        "edge_width": side / 64,
        "face_color": "transparent",
        "metadata": {
            RESULT_KEY: result,
            "units": "level-0 pixels (result.json regions)",
            SCREEN_WIDTH_KEY: OUTLINE_WIDTH_PX,
        },
    }
    if len(weights):
        kwargs.update(
            edge_color="weight",
            edge_colormap=SUBTILE_COLORMAP,
            edge_contrast_limits=_limits(weights),
        )
    return (_rectangles(s["region"] for s in result.subtiles), kwargs, "shapes")


def place_edge_width(result: Result) -> float:
    """Start outline width of a place (level-0 pixels): a 64th of the linkage distance
    (the widgets then keep it :data:`OUTLINE_WIDTH_PX` screen pixels wide)."""
    from ..engine.places import link_of

    return max(link_of(result), 64.0) / 64


def places_layer_data(result: Result, frame: Frame) -> LayerData:
    """The places the evidence came from (:func:`napari_zoomin.engine.places.places`),
    largest share first: their outlines (convex hulls of their sub-tiles, level-0
    pixels) with ``rank``, ``share`` (%) and ``subtiles`` features."""
    scale, translate = roi_shapes_placement(frame)
    found = places(result)
    features = {
        "rank": np.array([p.rank for p in found], np.int64),
        "share": np.array([p.share for p in found], np.float64),
        "subtiles": np.array([p.n_subtiles for p in found], np.int64),
    }
    return (
        [np.asarray(p.outline, np.float64) for p in found],
        {
            "name": PLACES_LAYER,
            "shape_type": "polygon",
            "scale": scale,
            "translate": translate,
            "features": features,
            "edge_color": PLACE_EDGE_COLOR,
            "edge_width": place_edge_width(result),
            "face_color": "transparent",
            "metadata": {
                RESULT_KEY: result,
                "units": "level-0 pixels (convex hull of each place's sub-tiles)",
                SCREEN_WIDTH_KEY: OUTLINE_WIDTH_PX,
            },
        },
        "shapes",
    )


def markers_layer_data(result: Result, frame: Frame, n: int = MAX_MARKERS) -> LayerData:
    """A marker at the centre of each of the ``n`` top places, of :data:`MARKER_SIZE`
    screen pixels at every zoom (so where the model looked shows on a whole slide at
    whole-slide zoom, where its tiles are below one screen pixel).  The main places
    (those holding :data:`~napari_zoomin.engine.places.MAIN_SHARE` % of the evidence)
    are numbered by rank; the others are faint rings without a number, so a call that
    rests on three places does not read as ten findings."""
    scale, translate = roi_shapes_placement(frame)
    ranked = places(result)
    found = ranked[:n]
    main = np.arange(len(found)) < main_places(ranked)
    centres = np.array(
        [[b[0] + b[2] / 2, b[1] + b[3] / 2] for b in (p.box for p in found)], np.float64
    ).reshape(-1, 2)
    kwargs: dict[str, Any] = {
        "name": MARKERS_LAYER,
        "scale": scale,
        "translate": translate,
        "features": {
            "rank": np.array([p.rank for p in found], np.int64),
            "share": np.array([p.share for p in found], np.float64),
            "main": main,
            "label": np.array(
                [str(p.rank) if m else "" for p, m in zip(found, main, strict=True)], object
            ),
        },
        "symbol": "ring",
        "size": 1.0,  # data units; the screen size comes from canvas_size_limits
        "canvas_size_limits": (MARKER_SIZE, MARKER_SIZE),
        "face_color": [MARKER_COLOR if m else MINOR_MARKER_COLOR for m in main] or MARKER_COLOR,
        "border_width": 0.0,
        # napari 0.9 draws a clamped marker's border over all of it (a grey disc that
        # hid the place and its overview glow): no border colour, so only the number
        # and the ring's face show
        "border_color": "transparent",
        "metadata": {RESULT_KEY: result, "units": "level-0 pixels (centre of each place)"},
    }
    if len(found):
        kwargs["text"] = {
            "string": "{label}",
            "color": MARKER_COLOR,
            "size": 11,
            "anchor": "upper_left",
            "translation": [0.0, 0.0],
        }
    return centres, kwargs, "points"


def depth_colours(depths) -> dict[int, str]:
    """Outline colour of each magnifying layer (1-based depth): :data:`DEPTH_COLORS` in
    turn, and :data:`PATCH_COLOR` for the deepest, whose boxes are the patches the
    classifier read."""
    depths = sorted({int(d) for d in depths})
    last = depths[-1] if depths else 0
    return {
        d: PATCH_COLOR if d == last else DEPTH_COLORS[(d - 1) % len(DEPTH_COLORS)] for d in depths
    }


def magnified_legend(result: Result) -> list[tuple[str, str]]:
    """``(words, colour)`` of each depth of a MagNet result's boxes, layer 1 first
    (empty for the other kinds): what the ``magnified regions`` colours mean."""
    if not _is_magnet(result):
        return []
    boxes = result.magnified["boxes"]
    colours = depth_colours(b["depth"] for b in boxes)
    last = max(colours)
    words = {
        d: f"patches read by the classifier (layer {d})" if d == last else f"layer {d}"
        for d in colours
    }
    return [(words[d], colours[d]) for d in sorted(colours)]


def _is_magnet(result: Result) -> bool:
    return bool(result.magnified is not None and result.magnified.get("boxes"))


def patch_indices(result: Result) -> list[int]:
    """Indices into ``result.magnified["boxes"]`` of the classification patches (the
    deepest layer's boxes), in the order the GRU read them (= the trace's order)."""
    if not _is_magnet(result):
        return []
    boxes = result.magnified["boxes"]
    last = max(int(b["depth"]) for b in boxes)
    return [m for m, b in enumerate(boxes) if int(b["depth"]) == last]


def magnified_layer_data(result: Result, frame: Frame) -> LayerData | None:
    """Every box a MagNet read, as rectangles in level-0 pixels (``box`` as recorded:
    floats, possibly reaching past the slide's edge), outlined in its depth's colour
    (:func:`depth_colours`); the patches are numbered in reading order.  Features:
    ``box`` (index into ``result.magnified["boxes"]``), ``depth``, ``patch`` (1-based
    reading order, 0 for the magnifying layers' boxes), ``zoom``, ``level`` and ``p``
    (the predicted class's probability once the patch was read; NaN for the others).
    ``None`` for the other kinds."""
    if not _is_magnet(result):
        return None
    boxes = result.magnified["boxes"]
    trace = result.magnified.get("trace") or []
    depths = np.array([int(b["depth"]) for b in boxes], np.int64)
    colours = depth_colours(depths)
    patch = np.zeros(len(boxes), np.int64)
    p = np.full(len(boxes), np.nan)
    for k, m in enumerate(patch_indices(result)):
        patch[m] = k + 1
        if k < len(trace):
            p[m] = float(trace[k][result.label])
    scale, translate = roi_shapes_placement(frame)
    side = max(float(b["box"][2]) for b in boxes)
    features = {
        "box": np.arange(len(boxes), dtype=np.int64),
        "depth": depths,
        "patch": patch,
        "zoom": np.array([float(b["zoom"]) for b in boxes], np.float64),
        "level": np.array([int(b["level"]) for b in boxes], np.int64),
        "p": p,
        "number": np.array([str(k) if k else "" for k in patch], dtype=object),
    }
    return (
        _rectangles(b["box"] for b in boxes),
        {
            "name": MAGNIFIED_LAYER,
            "shape_type": "rectangle",
            "scale": scale,
            "translate": translate,
            "features": features,
            "edge_color": [colours[int(d)] for d in depths],
            "edge_width": side / 128,
            "face_color": "transparent",
            "text": {
                "string": "{number}",
                "color": PATCH_COLOR,
                "size": 10,
                "anchor": "upper_left",
            },
            "metadata": {
                RESULT_KEY: result,
                "units": "level-0 pixels (result.json magnified boxes)",
                "depth colours": {str(d): c for d, c in colours.items()},
                SCREEN_WIDTH_KEY: OUTLINE_WIDTH_PX,
            },
        },
        "shapes",
    )


def result_layer_name(name: str, slide: str | None = None) -> str:
    """A result layer's name: the bare ``name`` (one of :data:`RESULT_LAYER_NAMES`) for
    the most recent result, ``"name [slide]"`` for an earlier result of another slide."""
    return name if slide is None else f"{name} [{slide}]"


def result_layer_data(result: Result, frame: Frame) -> list[LayerData]:
    """The result layers, bottom to top (no stage-2 layer for one-stage models; a
    MagNet's: :data:`MAGNET_LAYER_NAMES`)."""
    layers = [overview_layer_data(result, frame), stage1_layer_data(result, frame)]
    if _is_magnet(result):
        out = [*layers, magnified_layer_data(result, frame)]
        for _, kwargs, _ in out:
            kwargs["metadata"][LAYER_KEY] = kwargs["name"]
        return out
    layers += [stage2_layer_data(result, frame)]
    layers += [tiles_layer_data(result, frame), subtiles_layer_data(result, frame)]
    layers += [places_layer_data(result, frame), markers_layer_data(result, frame)]
    out = [layer for layer in layers if layer is not None]
    for _, kwargs, _ in out:
        kwargs["metadata"][LAYER_KEY] = kwargs["name"]
    return out


# --------------------------------------------------------------------------- text


def summary_lines(result: Result) -> list[str]:
    """What the widget shows: prediction, probabilities ± spread, cost, what was looked at."""
    p = result.probability
    if result.mode == "topk":
        how = f"p = {p:.3f} (top-k, deterministic)"
    else:
        sd = float(result.spread[result.label])
        how = f"p = {p:.3f} ± {sd:.3f} over {result.draws} draw{'s' * (result.draws != 1)}"
    probs = ", ".join(
        f"{c} {result.probabilities[c]:.3f} ± {result.spread[c]:.3f}" for c in result.classes
    )
    return [
        f"Prediction: {result.label} ({how})",
        f"Probabilities (mean ± spread over draws): {probs}",
        f"Time: {result.seconds:.1f} s on {result.device}",
        f"Decoded {result.pixels_decoded / 1e6:.1f} Mpx = {result.decode_ratio:.2f}x the "
        f"{result.pixels_needed / 1e6:.1f} Mpx needed",
        f"Looked at {len(result.tiles)} tiles and {len(result.subtiles)} sub-tiles"
        f"{_places(result)}; tissue: {tissue_words(result)}",
    ]


def tissue_words(result: Result) -> str:
    """Where the model could look: ``23.6% of the slide (otsu)``, or ``whole slide``."""
    source = result.tissue.get("source")
    if source is None:
        return "whole slide"
    return f"{result.tissue.get('fraction'):.1%} of the slide ({source})"


def _places(result: Result) -> str:
    places = result.evidence.get("places")
    return "" if places is None else f" in {places} place{'s' * (places != 1)}"


def warning_lines(result: Result) -> list[str]:
    """The result's warnings as the widget shows them, one per line, beside the prediction."""
    return [f"⚠ {w}" for w in result.warnings]


def place_rows(result: Result, n: int = MAX_PLACES) -> list[dict[str, Any]]:
    """The ``n`` places with most evidence, as the widget's table shows them: ``rank``,
    ``share`` (%), ``score`` (:attr:`~napari_zoomin.engine.places.Place.score`, or
    ``None``), ``subtiles`` (how many), centre ``x``/``y`` and ``w``/``h`` in
    ``unit`` (``"µm"``, or ``"px"`` when the slide has no pixel size), ``place``."""
    rows = []
    for p in places(result)[:n]:
        (cy, cx), (h, w) = p.centre, p.size
        rows.append(
            {
                "rank": p.rank,
                "share": p.share,
                "score": p.score,
                "subtiles": p.n_subtiles,
                "x": cx,
                "y": cy,
                "w": w,
                "h": h,
                "unit": p.unit,
                "place": p,
            }
        )
    return rows


def _fit(region, frame: Frame, canvas_size: tuple[int, int], fill: float):
    """World centre of a level-0 region, and the zoom at which it spans ``fill`` of the
    canvas' short side (napari's zoom: screen pixels per world unit)."""
    top, left, h, w = (float(v) for v in region)
    (sy, sx), _ = frame
    centre = level0_to_world([top + h / 2, left + w / 2], frame)
    zoom = fill * min(canvas_size) / max(h * sy, w * sx, 1e-12)
    return (float(centre[0]), float(centre[1])), zoom


def place_view(
    place: Place | Any, frame: Frame, canvas_size: tuple[int, int], fill: float = 0.8
) -> tuple[tuple[float, float], float]:
    """Camera ``(centre (y, x) world, zoom)`` showing a place (or a level-0
    ``[top, left, h, w]`` box): its box spans ``fill`` of the canvas' short side, but
    never magnified past full resolution (at most one screen pixel per level-0 pixel
    along either axis), so a one-sub-tile place is shown at level 0 with its
    surroundings rather than blown up."""
    box = place.box if isinstance(place, Place) else place
    centre, zoom = _fit(box, frame, canvas_size, fill)
    (sy, sx), _ = frame
    return centre, min(zoom, 1.0 / max(sy, sx))


# --------------------------------------------------------------------------- tissue


def tissue_layer_data(mask: TissueMask, frame: Frame, slide_layer: str) -> LayerData:
    """A tissue mask as a paintable labels layer on the slide (1 = tissue, 0 = not).

    Mask pixel ``(i, j)`` covers level-0 ``[i·dy, (i+1)·dy) × [j·dx, (j+1)·dx)`` with
    ``(dy, dx) = level-0 shape / mask shape`` (:class:`TissueMask`).
    """
    h, w = mask.level0_shape
    cell = (h / mask.mask.shape[0], w / mask.mask.shape[1])
    scale, translate = map_placement((0.0, 0.0), cell, frame)
    return (
        np.asarray(mask.mask, np.uint8),
        {
            "name": TISSUE_LAYER,
            "scale": scale,
            "translate": translate,
            "opacity": 0.4,
            "metadata": {
                "napari_zoomin_tissue": {
                    "slide_layer": slide_layer,
                    "level0_shape": [int(h), int(w)],
                    "source": mask.source,
                }
            },
        },
        "labels",
    )


def tissue_mask_from_labels(labels: np.ndarray, level0_shape: tuple[int, int]) -> TissueMask:
    """The sampling mask of a (possibly edited) tissue labels layer: non-zero = tissue."""
    return TissueMask(np.asarray(labels) != 0, tuple(int(v) for v in level0_shape), TISSUE_SOURCE)
