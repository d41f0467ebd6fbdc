"""QuPath GeoJSON: read its annotation objects, write annotations QuPath opens.

GeoJSON is the format the ROI widget saves and QuPath exports, so the reader is
lenient about what QuPath may put in a file (detections, points, derived classes,
GeometryCollections) and strict about what would make a wrong mask (bad numbers,
rings with fewer than three points): those raise :class:`AnnotationError` naming
the file and the fix.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open
from ..errors import AnnotationError
from .model import (
    DEFAULT_LABEL,
    Annotation,
    Annotations,
    VertexBudget,
    check_label,
    check_ring,
    checked_file,
)

__all__ = ["label_colour", "read_geojson", "write_geojson"]

# QuPath's default class colours, so that exported files look familiar there.
_QUPATH_COLOURS: dict[str, tuple[int, int, int]] = {
    "tumor": (200, 0, 0),
    "stroma": (150, 200, 150),
    "immune cells": (160, 90, 160),
    "necrosis": (50, 50, 50),
    "other": (255, 200, 0),
    "region*": (0, 0, 180),
    "ignore*": (180, 180, 180),
    "exclusion": (180, 180, 180),
    "positive": (200, 50, 50),
    "negative": (112, 112, 225),
}

_GEOJSON_FIX = (
    "Export the annotations again from QuPath (File > Export objects as GeoJSON) "
    "or fix the file in a text editor."
)


# --------------------------------------------------------------------------- reader


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _json_ring(path: Path, ring: Any, where: str, budget: VertexBudget) -> np.ndarray:
    """One GeoJSON linear ring → open (k, 2) float64 ring, or AnnotationError."""
    if not isinstance(ring, list):
        raise AnnotationError(path, f"{where} is not a list of [x, y] positions.", _GEOJSON_FIX)
    budget.take(len(ring), where)
    for i, p in enumerate(ring):
        if not (isinstance(p, list) and len(p) >= 2 and _is_number(p[0]) and _is_number(p[1])):
            raise AnnotationError(
                path, f"{where}, position {i} is not a pair of numbers: {p!r:.60}.", _GEOJSON_FIX
            )
    try:
        arr = np.array([p[:2] for p in ring], dtype=np.float64).reshape(-1, 2)
    except OverflowError:
        arr = np.full((len(ring), 2), np.inf)
    if not np.isfinite(arr).all():
        raise AnnotationError(path, f"{where} has a NaN or infinite coordinate.", _GEOJSON_FIX)
    if len(arr) >= 2 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    if len(arr) < 3:
        raise AnnotationError(
            path,
            f"{where} has {len(arr)} distinct points; a polygon needs at least 3.",
            _GEOJSON_FIX,
        )
    return check_ring(path, arr, where, _GEOJSON_FIX)


def _json_label(props: Any) -> str:
    """QuPath ≥0.2 ``classification.name``, else ``name``, else the default label."""
    if isinstance(props, dict):
        cls = props.get("classification")
        if isinstance(cls, dict):
            name = cls.get("name")
            if isinstance(name, str) and name.strip():
                return name.strip()
            names = cls.get("names")  # QuPath ≥0.4 derived classes
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                return ": ".join(names)
        elif isinstance(cls, str) and cls.strip():
            return cls.strip()
        name = props.get("name")
        if isinstance(name, str) and name.strip():
            return name.strip()
    return DEFAULT_LABEL


_AREA_FREE_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString")
_SKIPPED_OBJECT_TYPES = ("detection", "cell", "tile")


def _json_polygons(
    path: Path,
    geometry: Any,
    where: str,
    skipped: dict[str, int],
    budget: VertexBudget,
    depth: int = 0,
):
    """Yield (exterior, holes) of a GeoJSON geometry; count area-free geometries."""
    if not isinstance(geometry, dict):
        raise AnnotationError(path, f"{where}: geometry is not an object.", _GEOJSON_FIX)
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        polys = [coords]
    elif kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise AnnotationError(path, f"{where}: MultiPolygon without a list.", _GEOJSON_FIX)
        polys = coords
    elif kind in _AREA_FREE_GEOMETRIES:
        skipped[kind] = skipped.get(kind, 0) + 1
        return
    elif kind == "GeometryCollection" and depth < 8:
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise AnnotationError(
                path, f"{where}: GeometryCollection without a list.", _GEOJSON_FIX
            )
        for k, part in enumerate(parts):
            yield from _json_polygons(path, part, f"{where}, part {k}", skipped, budget, depth + 1)
        return
    else:
        raise AnnotationError(
            path,
            f"{where}: unsupported geometry type {kind!r:.40}.",
            "Polygons and MultiPolygons are read; points and lines are skipped.",
        )
    for k, rings in enumerate(polys):
        w = where if kind == "Polygon" else f"{where}, polygon {k}"
        if not isinstance(rings, list) or not rings:
            raise AnnotationError(path, f"{w}: a polygon needs a list of rings.", _GEOJSON_FIX)
        arrs = [_json_ring(path, r, f"{w}, ring {i}", budget) for i, r in enumerate(rings)]
        yield arrs[0], arrs[1:]


def read_geojson(path: str | os.PathLike) -> Annotations:
    """Read QuPath GeoJSON: a FeatureCollection, a single Feature, or a list of Features.

    Polygon and MultiPolygon geometries become one :class:`Annotation` per polygon (holes
    kept), labelled by ``properties.classification.name`` (QuPath ≥0.2), else
    ``properties.name``, else ``"Tumor"``.  Points and lines, features without a
    geometry and QuPath detections/cells/tiles (``objectType``) carry no ROI and are
    skipped, counted in ``result.skipped``.  Anything malformed raises
    :class:`AnnotationError` naming the file.
    """
    p = checked_file(path, _GEOJSON_FIX)
    try:
        doc = json.loads(p.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise AnnotationError(p, f"is not valid JSON ({e!s:.120}).", _GEOJSON_FIX) from None
    except OSError as e:
        raise AnnotationError(p, f"cannot be read ({e.strerror or e}).", None) from None

    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise AnnotationError(p, "FeatureCollection has no list of features.", _GEOJSON_FIX)
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, dict) and doc.get("type") in ("Polygon", "MultiPolygon"):
        features = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        raise AnnotationError(
            p,
            "is not GeoJSON annotations (expected a FeatureCollection, a Feature or a list "
            "of Features).",
            _GEOJSON_FIX,
        )

    out = Annotations(path=p)
    budget = VertexBudget(p, _GEOJSON_FIX)
    for n, feature in enumerate(features):
        where = f"feature {n}"
        if not isinstance(feature, dict) or feature.get("type", "Feature") != "Feature":
            raise AnnotationError(p, f"{where} is not a GeoJSON Feature.", _GEOJSON_FIX)
        props = feature.get("properties")
        object_type = props.get("objectType") if isinstance(props, dict) else None
        if isinstance(object_type, str) and object_type.casefold() in _SKIPPED_OBJECT_TYPES:
            out.skipped[object_type] = out.skipped.get(object_type, 0) + 1
            continue
        geometry = feature.get("geometry")
        if geometry is None:
            out.skipped["no geometry"] = out.skipped.get("no geometry", 0) + 1
            continue
        label = check_label(p, _json_label(props), where, _GEOJSON_FIX)
        for exterior, holes in _json_polygons(p, geometry, where, out.skipped, budget):
            out.append(Annotation(exterior, label, tuple(holes)))
    return out


# --------------------------------------------------------------------------- writer


def label_colour(label: str) -> list[int]:
    """QuPath's colour of a class label (RGB), or a stable colour made from an unknown one."""
    colour = _QUPATH_COLOURS.get(label.casefold())
    if colour is None:  # a stable colour per unknown label
        h = zlib.crc32(label.encode("utf-8"))
        colour = (64 + (h & 0x7F), 64 + ((h >> 8) & 0x7F), 64 + ((h >> 16) & 0x7F))
    return list(colour)


def _closed(ring: np.ndarray) -> list[list[float]]:
    coords = ring.tolist()
    return [*coords, coords[0]]


def write_geojson(
    path: str | os.PathLike,
    annotations: Iterable[Annotation],
    properties: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
) -> Path:
    """Write annotations as a QuPath-compatible GeoJSON FeatureCollection, atomically.

    Each annotation becomes a Polygon Feature (rings closed, holes after the exterior,
    coordinates as written by ``repr`` so floats round-trip exactly) with
    ``properties = {"objectType": "annotation", "classification": {"name", "color"}}``.
    ``properties`` adds keys to every feature (a mapping) or per feature (a sequence as
    long as ``annotations``); it cannot override the two keys above.  The file is
    written atomically (:func:`napari_zoomin.atomic.atomic_open`), so an interrupted
    save leaves any previous file untouched.
    """
    p = Path(path)
    anns = list(annotations)
    if any(not isinstance(a, Annotation) for a in anns):
        raise TypeError("write_geojson takes Annotation objects")
    if properties is None or isinstance(properties, Mapping):
        extras: list[Mapping[str, Any] | None] = [properties] * len(anns)
    else:
        extras = list(properties)
        if len(extras) != len(anns):
            raise ValueError(f"{len(extras)} property sets for {len(anns)} annotations")

    features = []
    for a, extra in zip(anns, extras, strict=True):
        props = {
            **(extra or {}),
            "objectType": "annotation",
            "classification": {"name": a.label, "color": label_colour(a.label)},
        }
        rings = [_closed(a.polygon), *(_closed(h) for h in a.holes)]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": props,
            }
        )
    doc = {"type": "FeatureCollection", "features": features}

    try:
        with atomic_open(p, "w", encoding="utf-8") as f:
            # dumps, not dump: json.dump encodes in pure Python, 5x slower (0.4 s for
            # the 1,000 rectangles of a 16-draw result)
            f.write(json.dumps(doc, allow_nan=False))
    except OSError as e:
        raise AnnotationError(
            p, f"cannot be written ({e.strerror or e}).", "Check the folder and free space."
        ) from None
    return p
