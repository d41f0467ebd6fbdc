"""ROI annotations ↔ napari Shapes and Labels data, in level-0 pixels (no Qt, no viewer).

Two conventions meet here.  napari puts the *centre* of data pixel ``k`` at ``k``
(pixel ``k`` covers ``[k − ½, k + ½)``); annotations and ROI masks
(:mod:`napari_zoomin.annotations`) say level-0 pixel ``c`` covers ``[c, c + 1)``.
A slide layer with level-0 frame ``(s, t)`` (:func:`~.slide_layers.level0_frame`)
therefore shows the level-0 point ``x`` (annotation convention) at world
``t + s·(x − ½)``, and a world point ``w`` is the level-0 point ``(w − t)/s + ½``.

The ``ROI annotations`` shapes layer is placed with scale ``s`` and translate
``t − s/2`` (:func:`roi_shapes_placement`), so its data *are* level-0 pixels in the
annotation convention: what a user draws is saved without arithmetic.  The ``ROI
labels`` layer paints one pyramid level of downsample ``d``: its pixel ``j`` covers
level-0 ``[j·d, (j+1)·d)``, exactly the output pixel of
:func:`~napari_zoomin.annotations.rasterize_region` at scale ``1/d``, so it is
placed with scale ``s·d`` and translate ``t + s·(d − 1)/2``
(:func:`roi_labels_placement`).

Painted labels become polygons that follow the pixel squares exactly
(:func:`mask_outlines`), not the half-pixel-cut contours of
``skimage.measure.find_contours``: the ROI mask of the saved file is then exactly the
painted mask, at the painted level and at level 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from skimage.measure import label as connected_components

from ..annotations import DEFAULT_LABEL, Annotation, Annotations
from ..geometry import ring_area

__all__ = [
    "ANSWER_KEY_LAYER_NAME",
    "ELLIPSE_VERTICES",
    "LABEL_FEATURE",
    "RINGS_FEATURE",
    "ROI_LABELS_LAYER_NAME",
    "ROI_LAYER_NAME",
    "annotations_to_shapes",
    "keyhole_ring",
    "labels_to_annotations",
    "level0_to_world",
    "mask_outlines",
    "nearest_level",
    "roi_labels_placement",
    "roi_shapes_placement",
    "shapes_to_annotations",
    "world_to_level0",
]

ROI_LAYER_NAME = "ROI annotations"
#: the read-only shapes layer showing a sample slide's planted regions (its answer key)
ANSWER_KEY_LAYER_NAME = "answer key (sample)"
ROI_LABELS_LAYER_NAME = "ROI labels"
#: the shapes-layer feature holding each shape's class label
LABEL_FEATURE = "label"
#: the shapes-layer feature recording the ring sizes of a polygon with holes ("12,4,4")
RINGS_FEATURE = "rings"
#: vertices of the polygon an ellipse is saved as (area 0.16 % short of the ellipse)
ELLIPSE_VERTICES = 64
#: level-0 coordinates are rounded to 1e-6 px when saved: world ↔ level-0 arithmetic
#: then round-trips exactly, far below any meaningful precision
COORDINATE_DECIMALS = 6

Frame = tuple[tuple[float, float], tuple[float, float]]


# --------------------------------------------------------------------------- frames


def world_to_level0(points_yx, frame: Frame) -> np.ndarray:
    """World (y, x) points → level-0 (y, x) in the annotation convention (pixel c = [c, c+1))."""
    scale, translate = (np.asarray(v, dtype=np.float64) for v in frame)
    return (np.asarray(points_yx, dtype=np.float64) - translate) / scale + 0.5


def level0_to_world(points_yx, frame: Frame) -> np.ndarray:
    """The inverse of :func:`world_to_level0`."""
    scale, translate = (np.asarray(v, dtype=np.float64) for v in frame)
    return translate + scale * (np.asarray(points_yx, dtype=np.float64) - 0.5)


def roi_shapes_placement(frame: Frame) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` of a shapes layer whose data are level-0 annotation coordinates."""
    (sy, sx), (ty, tx) = frame
    return (sy, sx), (ty - 0.5 * sy, tx - 0.5 * sx)


def roi_labels_placement(
    frame: Frame, shape_level0: Sequence[int], shape_level: Sequence[int]
) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """``(scale, translate, downsample)`` of a labels layer painting one pyramid level.

    The downsample per axis is ``level-0 size / level size`` (the level's pixel ``j``
    covers level-0 ``[j·d, (j+1)·d)``, as the pyramid was built); its centre
    ``j·d + (d − 1)/2`` in napari's level-0 data coordinates gives the translate.
    """
    (sy, sx), (ty, tx) = frame
    dy, dx = (float(a) / float(b) for a, b in zip(shape_level0[:2], shape_level[:2], strict=True))
    scale = (sy * dy, sx * dx)
    translate = (ty + sy * (dy - 1.0) / 2.0, tx + sx * (dx - 1.0) / 2.0)
    return scale, translate, (dy, dx)


def nearest_level(downsamples: Sequence[float], target: float = 16.0) -> int:
    """The pyramid level whose downsample is nearest ``target`` on a log scale."""
    logs = np.abs(np.log(np.asarray(downsamples, dtype=np.float64)) - np.log(target))
    return int(np.argmin(logs))


def _data_to_level0(
    layer_scale: Sequence[float], layer_translate: Sequence[float], frame: Frame
) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` with ``level0 = a·data + b`` for a layer placed at (scale, translate)."""
    scale = np.asarray(layer_scale[-2:], dtype=np.float64)
    translate = np.asarray(layer_translate[-2:], dtype=np.float64)
    own_scale, own_translate = roi_shapes_placement(frame)
    if np.array_equal(scale, own_scale) and np.array_equal(translate, own_translate):
        return np.ones(2), np.zeros(2)  # an ROI layer: its data are level-0 pixels
    frame_scale, frame_translate = (np.asarray(v, dtype=np.float64) for v in frame)
    return scale / frame_scale, (translate - frame_translate) / frame_scale + 0.5


# --------------------------------------------------------------------------- shapes


def keyhole_ring(annotation: Annotation) -> tuple[np.ndarray, str]:
    """One (y, x) ring for a polygon with holes, and its ring sizes (``"12,4,4"``).

    napari shapes have no holes.  The exterior, then for each hole a bridge from the
    exterior's first vertex into the hole, the hole closed on its first vertex, and
    back, form one ring whose even-odd filling (the rule ROI masks use) is the polygon
    minus its holes: every bridge is walked there and back and covers nothing.  The
    sizes let :func:`shapes_to_annotations` split an unedited ring back into its rings.
    """
    exterior = annotation.rows_cols()
    parts = [exterior]
    for hole in annotation.holes:
        hole_yx = hole[:, ::-1]
        parts += [exterior[:1], hole_yx, hole_yx[:1]]
    sizes = ",".join(str(len(r)) for r in (exterior, *annotation.holes))
    return np.concatenate(parts), sizes


def annotations_to_shapes(
    annotations: Sequence[Annotation],
) -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
    """Shapes-layer data of annotations: (y, x) level-0 vertices, types, labels, ring sizes.

    Every annotation becomes a ``"polygon"`` (ring sizes ``""``), one with holes a
    :func:`keyhole_ring`.
    """
    data, types, labels, rings = [], [], [], []
    for a in annotations:
        if a.holes:
            ring, sizes = keyhole_ring(a)
        else:
            ring, sizes = a.rows_cols(), ""
        data.append(ring)
        types.append("polygon")
        labels.append(a.label)
        rings.append(sizes)
    return data, types, labels, rings


def _split_keyhole(ring_xy: np.ndarray, sizes: str) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Exterior and holes of an unedited :func:`keyhole_ring`, or ``None`` if it was edited."""
    try:
        counts = [int(n) for n in sizes.split(",")]
    except ValueError:
        return None
    if len(counts) < 2 or min(counts) < 3 or len(ring_xy) != sum(counts) + 2 * (len(counts) - 1):
        return None
    exterior, holes, start = ring_xy[: counts[0]], [], counts[0]
    for n in counts[1:]:
        hole = ring_xy[start + 1 : start + 1 + n]
        bridge, closing = ring_xy[start], ring_xy[start + 1 + n]
        if not (np.array_equal(bridge, exterior[0]) and np.array_equal(closing, hole[0])):
            return None
        holes.append(hole)
        start += n + 2
    return exterior, holes


def _ellipse(corners_yx: np.ndarray, label: str, n: int) -> Annotation:
    """An n-gon on the ellipse inscribed in napari's 4-corner ellipse box (any rotation)."""
    c0, c1, _, c3 = corners_yx
    centre = corners_yx.mean(axis=0)
    axis_a, axis_b = (c1 - c0) / 2.0, (c3 - c0) / 2.0
    if axis_a[1] == 0 and axis_b[0] == 0:  # axis-aligned: the engine's own construction
        return Annotation.ellipse(centre[0], centre[1], abs(axis_a[0]), abs(axis_b[1]), label, n)
    if axis_a[0] == 0 and axis_b[1] == 0:
        return Annotation.ellipse(centre[0], centre[1], abs(axis_b[0]), abs(axis_a[1]), label, n)
    t = 2.0 * np.pi * np.arange(n) / n
    ring_yx = centre + np.cos(t)[:, None] * axis_a + np.sin(t)[:, None] * axis_b
    return Annotation.from_rows_cols(ring_yx, label)


def _rectangle(corners_yx: np.ndarray, label: str) -> Annotation:
    """An axis-aligned rectangle as :meth:`Annotation.rectangle`, a rotated one as its ring."""
    ys, xs = corners_yx[:, 0], corners_yx[:, 1]
    top, left, bottom, right = ys.min(), xs.min(), ys.max(), xs.max()
    aligned = all(y in (top, bottom) for y in ys) and all(x in (left, right) for x in xs)
    if aligned and bottom > top and right > left:
        return Annotation.rectangle(top, left, bottom - top, right - left, label)
    return Annotation.from_rows_cols(corners_yx, label)


def shapes_to_annotations(
    data: Sequence[np.ndarray],
    shape_types: Sequence[str],
    labels: Sequence[str],
    *,
    layer_scale: Sequence[float],
    layer_translate: Sequence[float],
    frame: Frame,
    rings: Sequence[str] | None = None,
    ellipse_vertices: int = ELLIPSE_VERTICES,
) -> tuple[Annotations, dict[str, int]]:
    """Annotations (level-0 pixels) of a shapes layer's data, and what had no area.

    ``data`` are the layer's (y, x) data coordinates; the layer's ``scale`` and
    ``translate`` and the slide's level-0 ``frame`` place them on the slide.
    Polygons keep their vertices, rectangles and ellipses become the engine's
    :meth:`~Annotation.rectangle` and :meth:`~Annotation.ellipse` (an n-gon), a keyhole
    polygon with unedited ring sizes gets its holes back; lines, paths and polygons
    with fewer than three distinct vertices carry no ROI and are counted by type in the
    second return value.  Coordinates are rounded to :data:`COORDINATE_DECIMALS`.
    """
    a, b = _data_to_level0(layer_scale, layer_translate, frame)
    out = Annotations()
    skipped: dict[str, int] = {}
    rings = list(rings) if rings is not None else [""] * len(data)
    for vertices, kind, label, sizes in zip(data, shape_types, labels, rings, strict=True):
        yx = np.round(np.asarray(vertices, dtype=np.float64)[:, -2:] * a + b, COORDINATE_DECIMALS)
        label = str(label) if isinstance(label, str) and label else DEFAULT_LABEL
        try:
            if kind == "ellipse":
                out.append(_ellipse(yx, label, ellipse_vertices))
            elif kind == "rectangle":
                out.append(_rectangle(yx, label))
            elif kind == "polygon":
                split = _split_keyhole(yx[:, ::-1], sizes) if sizes else None
                if split is not None:
                    out.append(Annotation(split[0], label, tuple(split[1])))
                else:
                    out.append(Annotation.from_rows_cols(yx, label))
            else:
                skipped[kind] = skipped.get(kind, 0) + 1
        except ValueError:  # fewer than three distinct vertices, zero-size box
            skipped[f"degenerate {kind}"] = skipped.get(f"degenerate {kind}", 0) + 1
    return out, skipped


# --------------------------------------------------------------------------- labels

# Boundary edges of a pixel (r, c) whose neighbour in that direction is outside, walked
# clockwise on screen (rows down), so the inside is on the right: (start offset, step).
_EDGES = (
    ((0, 0), (0, 1)),  # top: (r, c) → (r, c+1)
    ((0, 1), (1, 0)),  # right: (r, c+1) → (r+1, c+1)
    ((1, 1), (0, -1)),  # bottom: (r+1, c+1) → (r+1, c)
    ((1, 0), (-1, 0)),  # left: (r+1, c) → (r, c)
)


def mask_outlines(mask: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Exact outlines of a boolean mask: ``(exterior, holes)`` per 4-connected component.

    Vertices are (row, col) corners of the pixel grid (pixel ``(r, c)`` is the square
    ``[r, r+1) × [c, c+1)``), collinear vertices removed.  Filled with the even-odd rule
    the outlines cover exactly the mask's pixels.  Where two pixels touch only at a
    corner, the outline turns so as to keep them apart (they are separate components).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    components, n_components = connected_components(mask, connectivity=1, return_num=True)
    if n_components == 0:
        return []
    padded = np.pad(mask, 1)
    h, w = mask.shape
    width = w + 1  # vertex keys: r · (w + 1) + c on the (h + 1) × (w + 1) corner grid
    starts, ends, steps, owners = [], [], [], []
    for k, ((r0, c0), (dr, dc)) in enumerate(_EDGES):
        nr, nc = ((-1, 0), (0, 1), (1, 0), (0, -1))[k]
        outside = ~padded[1 + nr : 1 + nr + h, 1 + nc : 1 + nc + w]
        rr, cc = np.nonzero(mask & outside)
        starts.append((rr + r0) * width + (cc + c0))
        ends.append((rr + r0 + dr) * width + (cc + c0 + dc))
        steps.append(np.full(len(rr), k))
        owners.append(components[rr, cc])
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    step = np.concatenate(steps)
    owner = np.concatenate(owners)

    # The edge that follows each edge: the one starting where it ends.  At a corner
    # shared by two diagonal pixels two edges start there; take the right turn
    # (clockwise: top → right → bottom → left), which stays around the same pixel.
    order = np.argsort(start, kind="stable")
    first = np.searchsorted(start[order], end, side="left")
    count = np.searchsorted(start[order], end, side="right") - first
    following = order[first]
    saddle = np.flatnonzero(count == 2)
    if saddle.size:
        other = order[first[saddle] + 1]
        right_turn = (step[saddle] + 1) % 4
        following[saddle] = np.where(
            step[following[saddle]] == right_turn, following[saddle], other
        )

    done = np.zeros(len(start), dtype=bool)
    per_component: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for e0 in range(len(start)):
        if done[e0]:
            continue
        ring_edges = []
        e = e0
        while not done[e]:
            done[e] = True
            ring_edges.append(e)
            e = following[e]
        ring_edges = np.asarray(ring_edges)
        turns = step[ring_edges] != step[np.roll(ring_edges, 1)]  # corners only
        keys = start[ring_edges[turns]]
        ring = np.stack([keys // width, keys % width], axis=1).astype(np.float64)
        exteriors, holes = per_component.setdefault(int(owner[e0]), ([], []))
        # signed area in (x, y) = (col, row): the walk above makes exteriors > 0, holes < 0
        (exteriors if ring_area(ring[:, ::-1], signed=True) > 0 else holes).append(ring)
    out = []
    for k in sorted(per_component):
        exteriors, holes = per_component[k]
        if len(exteriors) != 1:  # pragma: no cover - a 4-connected set has one outer ring
            raise RuntimeError(f"component {k} has {len(exteriors)} outer outlines")
        out.append((exteriors[0], holes))
    return out


def labels_to_annotations(
    labels: np.ndarray,
    downsample: Sequence[float],
    names: Mapping[int, str],
) -> Annotations:
    """Annotations (level-0 pixels) of a labels layer painting a level of ``downsample``.

    Every 4-connected region of one value becomes one polygon (with holes) following
    its pixel squares exactly, scaled by the downsample (pixel ``j`` covers level-0
    ``[j·d, (j+1)·d)``) and labelled ``names[value]`` (``"Label <value>"`` if unnamed).
    """
    labels = np.asarray(labels)
    out = Annotations()
    rows = np.flatnonzero(labels.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.flatnonzero(labels.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    painted = labels[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1]  # what was painted
    to_level0 = np.array([float(d) for d in downsample])
    origin = np.array([r0, c0], dtype=np.float64)
    for value in np.unique(painted):
        if value == 0:
            continue
        name = names.get(int(value)) or f"Label {int(value)}"
        for exterior, holes in mask_outlines(painted == value):
            out.append(
                Annotation.from_rows_cols(
                    (exterior + origin) * to_level0,
                    name,
                    tuple((h + origin) * to_level0 for h in holes),
                )
            )
    return out
