"""Region-of-interest annotations: data model, QuPath/ASAP files, ROI masks at any scale.

Annotations are the optional pixel-level supervision of Zoom-In (000 §2.5): polygons
drawn by a pathologist around tumour, exchanged with QuPath (GeoJSON) and the
Camelyon16 ground truth (ASAP XML), and turned into ROI-fraction masks aligned with
the views and tiles the models read.

Coordinate frame
----------------
Vertices are **level-0 pixels in (x, y) order** — (column, row), as GeoJSON, QuPath and
ASAP store them.  Everything else in napari-zoomin (slides, regions, napari shapes)
speaks (y, x) = (row, col); use :meth:`Annotation.rows_cols` and
:meth:`Annotation.from_rows_cols` at that boundary.

Pixel convention: level-0 pixel (row ``r``, col ``c``) covers ``[c, c+1) × [r, r+1)``
in (x, y).  An output pixel ``(i, j)`` of a mask at scale ``s`` whose region starts
at level-0 ``(top, left)`` covers ``x ∈ [left + j/s, left + (j+1)/s)``,
``y ∈ [top + i/s, top + (i+1)/s)``; its value is the fraction of that square inside
the ROI.  Output sizes follow the project rule :func:`scaled_size`.

Polygons use the even-odd rule (GeoJSON holes are rings inside the exterior).  The
ROI of a mask is the union of the selected annotations minus the union of the
exclusions (label ``"Exclusion"``, e.g. Camelyon16 group ``_2``).
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

import numpy as np

from ..atomic import atomic_open
from ..errors import AnnotationError
from ..models.source import scaled_size

__all__ = [
    "DEFAULT_LABEL",
    "EXCLUSION_LABEL",
    "SUPPORTED_SUFFIXES",
    "Annotation",
    "AnnotationIndex",
    "Annotations",
    "annotations_path_for",
    "find_annotations",
    "rasterize",
    "rasterize_region",
    "read_annotations",
    "read_asap_xml",
    "read_geojson",
    "write_geojson",
]

DEFAULT_LABEL = "Tumor"
EXCLUSION_LABEL = "Exclusion"
SUPPORTED_SUFFIXES: tuple[str, ...] = (".geojson", ".json", ".xml")

# Sub-rows per output row when rasterising (see :func:`rasterize_region`).
DEFAULT_SUPERSAMPLE = 16
# Output pixels (rows × (width + 2)) accumulated at once: bounds temporary memory.
_STRIP_PIXELS = 1 << 22

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
_XML_FIX = "Export the annotations again from ASAP, or convert them to GeoJSON."


# --------------------------------------------------------------------------- model


def _as_ring(points: Any, what: str) -> np.ndarray:
    """A read-only float64 (k, 2) ring, the closing repeat of the first vertex dropped."""
    ring = np.array(points, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2:
        raise ValueError(f"{what} must be a (k, 2) array of (x, y) vertices, got {ring.shape}")
    if len(ring) >= 2 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3:
        raise ValueError(f"{what} has {len(ring)} distinct vertices; a polygon needs at least 3")
    if not np.isfinite(ring).all():
        raise ValueError(f"{what} has a NaN or infinite coordinate")
    ring = np.ascontiguousarray(ring)
    ring.setflags(write=False)
    return ring


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


@dataclass(frozen=True, eq=False)
class Annotation:
    """One annotated region: a polygon with optional holes and a class label.

    ``polygon`` is a float64 (k, 2) array of **(x, y) level-0 pixels** (GeoJSON/QuPath
    order, *not* the (row, col) order of slides and napari); the ring is stored open
    (the closing repeat of the first vertex is dropped) and read-only.  ``holes`` are
    rings of the same form inside the polygon.  ``label`` is the class (QuPath
    classification, ASAP group); ``"Exclusion"`` marks an area to subtract from every
    ROI.  Equality compares labels and vertices exactly.
    """

    polygon: np.ndarray
    label: str = DEFAULT_LABEL
    holes: tuple[np.ndarray, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"label must be a non-empty string, got {self.label!r}")
        object.__setattr__(self, "polygon", _as_ring(self.polygon, "polygon"))
        holes = tuple(_as_ring(h, f"hole {i}") for i, h in enumerate(self.holes))
        object.__setattr__(self, "holes", holes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Annotation):
            return NotImplemented
        return (
            self.label == other.label
            and np.array_equal(self.polygon, other.polygon)
            and len(self.holes) == len(other.holes)
            and all(np.array_equal(a, b) for a, b in zip(self.holes, other.holes, strict=True))
        )

    def __hash__(self) -> int:
        return hash((self.label, self.polygon.tobytes(), *(h.tobytes() for h in self.holes)))

    # ---- constructors -----------------------------------------------------------

    @classmethod
    def from_rows_cols(
        cls,
        vertices: Any,
        label: str = DEFAULT_LABEL,
        holes: Iterable[Any] = (),
    ) -> Annotation:
        """An annotation from (row, col) = (y, x) vertices, e.g. napari Shapes data."""
        flip = lambda a: np.asarray(a, dtype=np.float64)[:, ::-1]  # noqa: E731
        return cls(flip(vertices), label, tuple(flip(h) for h in holes))

    @classmethod
    def rectangle(
        cls, top: float, left: float, height: float, width: float, label: str = DEFAULT_LABEL
    ) -> Annotation:
        """The axis-aligned rectangle ``x ∈ [left, left+width)``, ``y ∈ [top, top+height)``."""
        if not (height > 0 and width > 0):
            raise ValueError(f"rectangle needs a positive height and width, got {height}×{width}")
        x0, y0, x1, y1 = left, top, left + width, top + height
        return cls(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64), label)

    @classmethod
    def ellipse(
        cls, cy: float, cx: float, ry: float, rx: float, label: str = DEFAULT_LABEL, n: int = 64
    ) -> Annotation:
        """The ellipse centred at (cy, cx) with radii (ry, rx) as an n-gon inscribed in it.

        Its area is ``π·rx·ry · sin(2π/n)·n/(2π)`` (0.16 % short of the ellipse at n = 64).
        """
        if not (ry > 0 and rx > 0) or n < 3:
            raise ValueError(f"ellipse needs positive radii and n >= 3, got {ry}, {rx}, {n}")
        t = 2.0 * np.pi * np.arange(n) / n
        return cls(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1), label)

    # ---- views ------------------------------------------------------------------

    def rows_cols(self) -> np.ndarray:
        """The exterior as (row, col) = (y, x) vertices (napari Shapes order), a copy."""
        return self.polygon[:, ::-1].copy()

    @property
    def is_exclusion(self) -> bool:
        """True for an area subtracted from every ROI (label ``"Exclusion"``, any case)."""
        return self.label.casefold() == EXCLUSION_LABEL.casefold()

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of the exterior in level-0 pixels."""
        lo, hi = self.polygon.min(axis=0), self.polygon.max(axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    @property
    def area(self) -> float:
        """Exterior area minus hole areas in level-0 pixels² (exact for simple polygons)."""
        return _ring_area(self.polygon) - sum(_ring_area(h) for h in self.holes)


class Annotations(list):
    """The annotations read from one file (a ``list[Annotation]``), with what was skipped.

    ``skipped`` counts the features that carry no area, by kind (``"Point"``,
    ``"LineString"``, ``"Dot"``, ``"detection"``, …); ``path`` is the file read.
    """

    def __init__(
        self,
        items: Iterable[Annotation] = (),
        path: Path | None = None,
        skipped: Mapping[str, int] | None = None,
    ):
        super().__init__(items)
        self.path = path
        self.skipped: dict[str, int] = dict(skipped or {})


# --------------------------------------------------------------------------- readers


def _checked_file(path: str | os.PathLike, fix: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise AnnotationError(p, "annotation file not found.", "Check the path.")
    if not p.is_file():
        raise AnnotationError(p, "is not a file.", fix)
    return p


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _json_ring(path: Path, ring: Any, where: str) -> np.ndarray:
    """One GeoJSON linear ring → open (k, 2) float64 ring, or AnnotationError."""
    if not isinstance(ring, list):
        raise AnnotationError(path, f"{where} is not a list of [x, y] positions.", _GEOJSON_FIX)
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
    return arr


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


def _json_polygons(path: Path, geometry: Any, where: str, skipped: dict[str, int], depth: int = 0):
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
            yield from _json_polygons(path, part, f"{where}, part {k}", skipped, depth + 1)
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
        arrs = [_json_ring(path, r, f"{w}, ring {i}") for i, r in enumerate(rings)]
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
    p = _checked_file(path, _GEOJSON_FIX)
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
        label = _json_label(props)
        for exterior, holes in _json_polygons(p, geometry, where, out.skipped):
            out.append(Annotation(exterior, label, tuple(holes)))
    return out


_ASAP_AREA_TYPES = ("polygon", "spline", "rectangle")
_CAMELYON_TUMOUR_GROUPS = ("_0", "_1", "", "none")


def _asap_label(group: str) -> str:
    """Camelyon16 groups ``_0``/``_1`` (and none) are tumour, ``_2``/``*exclusion*`` exclusion."""
    g = group.strip()
    if g == "_2" or "exclusion" in g.casefold():
        return EXCLUSION_LABEL
    if g.casefold() in _CAMELYON_TUMOUR_GROUPS:
        return DEFAULT_LABEL
    return g


def _asap_number(text: str) -> float:
    t = text.strip()
    if re.fullmatch(r"[-+]?\d+,\d+", t):  # a decimal comma, written by some locales
        t = t.replace(",", ".")
    return float(t)


def read_asap_xml(path: str | os.PathLike) -> Annotations:
    """Read ASAP / Camelyon16 XML annotations.

    ``<ASAP_Annotations><Annotations><Annotation Type=".." PartOfGroup=".."><Coordinates>
    <Coordinate Order="0" X=".." Y=".."/>…``, X and Y in level-0 pixels, vertices sorted
    by ``Order``.  Types Polygon, Spline (read as the polygon of its control points) and
    Rectangle are areas; Dot, PointSet and other types are skipped and counted.  Groups
    ``_0``/``_1``/none are labelled ``"Tumor"``; ``_2`` and groups whose name contains
    "exclusion" become ``"Exclusion"`` annotations that rasterisation subtracts; other
    group names are kept.  DOCTYPE and ENTITY declarations are refused (entity bombs).
    """
    p = _checked_file(path, _XML_FIX)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise AnnotationError(p, f"cannot be read ({e.strerror or e}).", None) from None
    unsafe = "contains a DOCTYPE or ENTITY declaration, which is refused for safety."
    if re.search(rb"<!\s*(DOCTYPE|ENTITY)", data, re.IGNORECASE):
        raise AnnotationError(p, unsafe, _XML_FIX)

    records: list[dict[str, Any]] = []
    stack: list[str] = []
    current: dict[str, Any] | None = None
    parser = expat.ParserCreate()

    def refuse(*_args: Any) -> None:
        raise AnnotationError(p, unsafe, _XML_FIX)

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal current
        if not stack and name != "ASAP_Annotations":
            raise AnnotationError(
                p, f"is not an ASAP annotation file (root element <{name:.40}>).", _XML_FIX
            )
        parent = stack[-1] if stack else None
        stack.append(name)
        if name == "Annotation" and parent == "Annotations":
            current = {"attrs": dict(attrs), "coords": [], "line": parser.CurrentLineNumber}
        elif name == "Coordinate" and parent == "Coordinates" and current is not None:
            line = parser.CurrentLineNumber
            try:
                order = int(attrs.get("Order", len(current["coords"])))
                x, y = _asap_number(attrs["X"]), _asap_number(attrs["Y"])
            except (KeyError, ValueError):
                raise AnnotationError(
                    p, f"line {line}: a Coordinate needs a numeric Order, X and Y.", _XML_FIX
                ) from None
            if not (math.isfinite(x) and math.isfinite(y)):
                raise AnnotationError(p, f"line {line}: NaN or infinite coordinate.", _XML_FIX)
            current["coords"].append((order, x, y))

    def end(name: str) -> None:
        nonlocal current
        stack.pop()
        if name == "Annotation" and current is not None and stack and stack[-1] == "Annotations":
            records.append(current)
            current = None

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise AnnotationError(p, f"is not valid XML ({e}).", _XML_FIX) from None

    out = Annotations(path=p)
    for rec in records:
        attrs = rec["attrs"]
        kind = attrs.get("Type", "Polygon")
        name = attrs.get("Name", "?")
        if kind.casefold() not in _ASAP_AREA_TYPES:
            out.skipped[kind] = out.skipped.get(kind, 0) + 1
            continue
        coords = sorted(rec["coords"], key=lambda c: c[0])
        xy = np.array([c[1:] for c in coords], dtype=np.float64).reshape(-1, 2)
        if kind.casefold() == "rectangle" and len(xy) == 2:  # two opposite corners
            (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
            xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        if len(xy) >= 2 and np.array_equal(xy[0], xy[-1]):
            xy = xy[:-1]
        if len(xy) < 3:
            raise AnnotationError(
                p,
                f"annotation {name!r:.40} (line {rec['line']}) has {len(xy)} distinct points; "
                "a polygon needs at least 3.",
                _XML_FIX,
            )
        out.append(Annotation(xy, _asap_label(attrs.get("PartOfGroup", ""))))
    return out


def read_annotations(path: str | os.PathLike) -> Annotations:
    """Read an annotation file by extension: ``.geojson``/``.json`` (QuPath), ``.xml`` (ASAP)."""
    p = Path(path)
    suffix = p.suffix.casefold()
    if suffix in (".geojson", ".json"):
        return read_geojson(p)
    if suffix == ".xml":
        return read_asap_xml(p)
    raise AnnotationError(
        p,
        f"unknown annotation format {p.suffix or '(no extension)'!r}.",
        f"Supported: {', '.join(SUPPORTED_SUFFIXES)} (QuPath GeoJSON, ASAP/Camelyon16 XML).",
    )


# --------------------------------------------------------------------------- writer


def _label_colour(label: str) -> list[int]:
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
            "classification": {"name": a.label, "color": _label_colour(a.label)},
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
            json.dump(doc, f, allow_nan=False)
    except OSError as e:
        raise AnnotationError(
            p, f"cannot be written ({e.strerror or e}).", "Check the folder and free space."
        ) from None
    return p


# --------------------------------------------------------------------------- sidecars

_COMPOUND_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.btf", ".ome.zarr", ".ome.tf2", ".ome.tf8")


def _slide_stem(slide_path: Path) -> str:
    name = slide_path.name
    for suffix in _COMPOUND_SUFFIXES:
        if name.casefold().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return slide_path.stem


def annotations_path_for(slide_path: str | os.PathLike) -> Path:
    """The sidecar annotation file of a slide: ``<stem>.geojson`` beside it.

    ``slide.svs`` → ``slide.geojson``; ``x.ome.tif`` → ``x.geojson``.
    """
    p = Path(slide_path)
    return p.with_name(_slide_stem(p) + ".geojson")


def find_annotations(
    slide_path: str | os.PathLike, folder: str | os.PathLike | None = None
) -> Path | None:
    """The first existing ``<stem>.geojson``, ``<stem>.json`` or ``<stem>.xml`` of a slide.

    Looks in ``folder`` first (when given), then beside the slide; ``None`` if absent.
    """
    p = Path(slide_path)
    stems = [_slide_stem(p)]
    if p.stem not in stems:
        stems.append(p.stem)  # x.ome.tif → also x.ome.geojson
    folders = [Path(folder)] if folder is not None else []
    folders.append(p.parent)
    for d in folders:
        for stem in stems:
            for suffix in SUPPORTED_SUFFIXES:
                candidate = d / (stem + suffix)
                if candidate.is_file() and candidate != p:
                    return candidate
    return None


# --------------------------------------------------------------------------- rasterise


class AnnotationIndex:
    """Annotations prepared for repeated rasterisation (edges and bounding boxes cached).

    Build it once per slide and pass it to :func:`rasterize_region` for every tile:
    each call then only touches the annotations whose bounding box meets the region.
    """

    def __init__(self, annotations: Iterable[Annotation]):
        self.annotations: tuple[Annotation, ...] = tuple(annotations)
        n = len(self.annotations)
        self.labels = np.array([a.label for a in self.annotations], dtype=object)
        self.exclusion = np.array([a.is_exclusion for a in self.annotations], dtype=bool)
        self.bounds = np.array([a.bounds for a in self.annotations], dtype=np.float64).reshape(n, 4)
        x0s, y0s, x1s, y1s, starts = [], [], [], [], [0]
        for a in self.annotations:
            count = 0
            for ring in (a.polygon, *a.holes):
                nxt = np.roll(ring, -1, axis=0)
                keep = ring[:, 1] != nxt[:, 1]  # horizontal edges never cross a scanline
                x0s.append(ring[keep, 0])
                y0s.append(ring[keep, 1])
                x1s.append(nxt[keep, 0])
                y1s.append(nxt[keep, 1])
                count += int(keep.sum())
            starts.append(starts[-1] + count)
        cat = lambda parts: np.concatenate(parts) if parts else np.empty(0)  # noqa: E731
        self.x0, self.y0, self.x1, self.y1 = cat(x0s), cat(y0s), cat(x1s), cat(y1s)
        self.edge_start = np.array(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.annotations)

    def _positive(self, labels: Iterable[str] | None) -> np.ndarray:
        if labels is None:
            return ~self.exclusion
        wanted = set(labels)
        return ~self.exclusion & np.array([lab in wanted for lab in self.labels], dtype=bool)


def _as_index(annotations: Iterable[Annotation] | AnnotationIndex) -> AnnotationIndex:
    return annotations if isinstance(annotations, AnnotationIndex) else AnnotationIndex(annotations)


def rasterize(
    annotations: Iterable[Annotation] | AnnotationIndex,
    shape_level0: tuple[int, int],
    scale: float,
    labels: Iterable[str] | None = None,
    *,
    supersample: int = DEFAULT_SUPERSAMPLE,
) -> np.ndarray:
    """ROI fraction of every pixel of the whole-slide view at ``scale``.

    Returns float32 ``(scaled_size(H, scale), scaled_size(W, scale))`` in [0, 1], pixel-
    aligned with ``source.read([[0, 0, H, W]], scale)``: the fraction of each output
    pixel inside the union of the annotations labelled in ``labels`` (default: every
    label but ``"Exclusion"``), minus holes and exclusions, and inside the slide.  See
    :func:`rasterize_region` for the pixel convention and the accuracy.
    """
    h, w = (int(v) for v in shape_level0)
    if h <= 0 or w <= 0:
        raise ValueError(f"shape_level0 must be positive, got {shape_level0}")
    return rasterize_region(
        annotations, (0, 0, h, w), scale, labels, shape_level0=(h, w), supersample=supersample
    )


def rasterize_region(
    annotations: Iterable[Annotation] | AnnotationIndex,
    region: tuple[int, int, int, int],
    scale: float,
    labels: Iterable[str] | None = None,
    *,
    shape_level0: tuple[int, int] | None = None,
    supersample: int = DEFAULT_SUPERSAMPLE,
) -> np.ndarray:
    """ROI fraction of every pixel of one region ``(top, left, height, width)`` at ``scale``.

    Returns float32 ``(scaled_size(height, scale), scaled_size(width, scale))``.  Output
    pixel ``(i, j)`` covers level-0 ``x ∈ [left + j/s, left + (j+1)/s)``,
    ``y ∈ [top + i/s, top + (i+1)/s)`` (level-0 pixel (r, c) is ``[c, c+1) × [r, r+1)``)
    and holds the fraction of that square inside the ROI: the union of the selected
    annotations (even-odd rule within each, so holes are empty) minus the union of the
    exclusions.  The region may extend beyond the slide; with ``shape_level0`` given,
    everything outside ``[0, W) × [0, H)`` counts as outside the ROI.

    Accuracy: each output row is cut into ``supersample`` (k) horizontal sub-rows; along
    each sub-row's centre line the covered length is computed exactly (scanline
    crossings, interval union), and the rows are integrated with the midpoint rule.
    The result is therefore exact (to float rounding) wherever the covered length is
    linear in y within each sub-row: vertical edges, horizontal edges on sub-row
    boundaries (e.g. rectangles on the level-0 grid at scales 1/16, 1/2, 1), straight
    edges through a pixel.  Otherwise the error of a pixel is at most ``1/k`` per
    sub-row holding a vertex or an edge crossing the pixel's left or right side, and
    at most ``1/(2k)`` per horizontal edge inside a sub-row; with k = 16 boundary
    pixels are within ~0.03 of the true fraction, pixels away from the boundary are
    exactly 0 or 1, and areas summed over many pixels are far more accurate.

    Cost is linear in the number of sub-rows (``k · height · s``) times the edges
    crossing them, plus the output size; only annotations whose bounding box meets
    the region are used.  Pass an :class:`AnnotationIndex` when reading many tiles.
    """
    index = _as_index(annotations)
    top, left, height, width = (float(v) for v in region)
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale must be a positive number, got {scale}")
    if not (height > 0 and width > 0):
        raise ValueError(f"region height and width must be positive, got {region}")
    k = int(supersample)
    if k < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    h_out, w_out = scaled_size(int(height), s), scaled_size(int(width), s)
    out = np.zeros((h_out, w_out), dtype=np.float32)
    if len(index) == 0:
        return out

    # Level-0 extent of the output grid (it may differ from the region by rounding).
    x_lo, x_hi = left, left + w_out / s
    y_lo, y_hi = top, top + h_out / s
    # Clip to the slide, in output-pixel units of this region.
    clip_x0, clip_x1, clip_y0, clip_y1 = 0.0, float(w_out), -math.inf, math.inf
    if shape_level0 is not None:
        slide_h, slide_w = (float(v) for v in shape_level0)
        clip_x0 = max(clip_x0, (0.0 - left) * s)
        clip_x1 = min(clip_x1, (slide_w - left) * s)
        clip_y0, clip_y1 = (0.0 - top) * s, (slide_h - top) * s
        x_lo, x_hi = max(x_lo, 0.0), min(x_hi, slide_w)
        y_lo, y_hi = max(y_lo, 0.0), min(y_hi, slide_h)
        if x_lo >= x_hi or y_lo >= y_hi:
            return out

    b = index.bounds
    meets = (b[:, 0] < x_hi) & (b[:, 2] > x_lo) & (b[:, 1] < y_hi) & (b[:, 3] > y_lo)
    positive = index._positive(labels) & meets
    if not positive.any():
        return out
    active = np.flatnonzero(positive | (index.exclusion & meets))
    starts, stops = index.edge_start[active], index.edge_start[active + 1]
    counts = stops - starts
    edges = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    edge_ann = np.repeat(np.arange(len(active)), counts)
    edge_pos = positive[active][edge_ann]

    # Edges in output-pixel units of this region.
    ex0 = (index.x0[edges] - left) * s
    ex1 = (index.x1[edges] - left) * s
    ey0 = (index.y0[edges] - top) * s
    ey1 = (index.y1[edges] - top) * s
    ey_min, ey_max = np.minimum(ey0, ey1), np.maximum(ey0, ey1)
    slope = (ex1 - ex0) / (ey1 - ey0)  # no horizontal edges in the index

    strip = max(1, min(h_out, _STRIP_PIXELS // (w_out + 2)))
    for r0 in range(0, h_out, strip):
        r1 = min(h_out, r0 + strip)
        sel = np.flatnonzero((ey_max > r0) & (ey_min < r1))
        if sel.size == 0:
            continue
        cov = _strip_coverage(
            r0,
            r1,
            k,
            w_out,
            ex0[sel],
            ey0[sel],
            slope[sel],
            ey_min[sel],
            ey_max[sel],
            edge_ann[sel],
            edge_pos[sel],
            (clip_x0, clip_x1, clip_y0, clip_y1),
        )
        out[r0:r1] = cov
    return out


def _strip_coverage(
    r0: int,
    r1: int,
    k: int,
    w_out: int,
    x0: np.ndarray,
    y0: np.ndarray,
    slope: np.ndarray,
    y_min: np.ndarray,
    y_max: np.ndarray,
    ann: np.ndarray,
    pos: np.ndarray,
    clip: tuple[float, float, float, float],
) -> np.ndarray:
    """Coverage of output rows [r0, r1): k scanlines per row, exact lengths along x."""
    n_rows = r1 - r0
    centres = r0 + (np.arange(n_rows * k) + 0.5) / k  # sub-row centre lines
    # Half-open crossing rule y_min <= yc < y_max: a ring crosses each line an even
    # number of times, and shared vertices are counted once.
    first = np.searchsorted(centres, y_min, side="left")
    last = np.searchsorted(centres, y_max, side="left")
    n_cross = last - first
    total = int(n_cross.sum())
    if total == 0:
        return np.zeros((n_rows, w_out), dtype=np.float32)
    e = np.repeat(np.arange(len(x0)), n_cross)
    t = np.repeat(first - np.cumsum(n_cross) + n_cross, n_cross) + np.arange(total)
    x = x0[e] + (centres[t] - y0[e]) * slope[e]
    a = ann[e]
    p = pos[e]

    # Even-odd spans per (annotation, sub-row): consecutive crossings pair up.
    order = np.lexsort((x, t, a))
    x, t, a, p = x[order], t[order], a[order], p[order]
    if np.any(t[0::2] != t[1::2]) or np.any(a[0::2] != a[1::2]):
        raise RuntimeError("unpaired polygon crossings (internal error)")
    span_t, span_a, span_b = t[0::2], x[0::2], x[1::2]
    span_pos = p[0::2].astype(np.int64)

    # Union of positive spans minus union of exclusion spans, per sub-row: sweep the
    # span ends with two counters; a piece is ROI where positives > 0 and exclusions == 0.
    ev_t = np.concatenate([span_t, span_t])
    ev_x = np.concatenate([span_a, span_b])
    ev_p = np.concatenate([span_pos, -span_pos])
    ev_e = np.concatenate([1 - span_pos, span_pos - 1])
    order = np.lexsort((ev_x, ev_t))
    ev_t, ev_x = ev_t[order], ev_x[order]
    n_pos, n_exc = np.cumsum(ev_p[order]), np.cumsum(ev_e[order])
    keep = (ev_t[:-1] == ev_t[1:]) & (n_pos[:-1] > 0) & (n_exc[:-1] == 0)
    seg_t = ev_t[:-1][keep]
    seg_a = ev_x[:-1][keep]
    seg_b = ev_x[1:][keep]

    clip_x0, clip_x1, clip_y0, clip_y1 = clip
    inside = (centres[seg_t] >= clip_y0) & (centres[seg_t] < clip_y1)
    seg_a = np.clip(seg_a, clip_x0, clip_x1)
    seg_b = np.clip(seg_b, clip_x0, clip_x1)
    inside &= seg_b > seg_a
    seg_t, seg_a, seg_b = seg_t[inside], seg_a[inside], seg_b[inside]

    # Exact length of each segment in each output pixel of its row.
    stride = w_out + 2
    row = (seg_t // k) * stride
    ja = np.floor(seg_a).astype(np.int64)
    jb = np.floor(seg_b).astype(np.int64)
    same = ja == jb
    size = n_rows * stride
    partial = np.zeros(size)
    partial += np.bincount(row[same] + ja[same], seg_b[same] - seg_a[same], size)
    d = ~same
    partial += np.bincount(row[d] + ja[d], ja[d] + 1 - seg_a[d], size)
    partial += np.bincount(row[d] + jb[d], seg_b[d] - jb[d], size)
    full = np.bincount(row[d] + ja[d] + 1, minlength=size).astype(np.float64)
    full -= np.bincount(row[d] + jb[d], minlength=size)
    cov = partial.reshape(n_rows, stride) + np.cumsum(full.reshape(n_rows, stride), axis=1)
    cov = cov[:, :w_out] / k
    return np.clip(cov, 0.0, 1.0).astype(np.float32)
