"""ASAP / Camelyon16 XML: the ground-truth format of the Camelyon challenges.

Parsed with the standard library's expat, event by event, with DOCTYPE and ENTITY
declarations refused before and during parsing: an annotation file is untrusted
input, and entity expansion (a "billion laughs" bomb) is the XML risk that matters.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any
from xml.parsers import expat

import numpy as np

from ..errors import AnnotationError
from ..xmlsafe import has_declaration, parser_refusing_declarations
from .model import (
    DEFAULT_LABEL,
    EXCLUSION_LABEL,
    Annotation,
    Annotations,
    VertexBudget,
    check_label,
    check_ring,
    checked_file,
)

__all__ = ["read_asap_xml"]

_XML_FIX = "Export the annotations again from ASAP, or convert them to GeoJSON."

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
    p = checked_file(path, _XML_FIX)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise AnnotationError(p, f"cannot be read ({e.strerror or e}).", None) from None
    unsafe = "contains a DOCTYPE or ENTITY declaration, which is refused for safety."
    if has_declaration(data):
        raise AnnotationError(p, unsafe, _XML_FIX)

    records: list[dict[str, Any]] = []
    stack: list[str] = []
    current: dict[str, Any] | None = None
    budget = VertexBudget(p, _XML_FIX)

    def refuse(*_args: Any) -> None:
        raise AnnotationError(p, unsafe, _XML_FIX)

    parser = parser_refusing_declarations(refuse)

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
            budget.take(1, f"line {line}")
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
        where = f"annotation {name!r:.40} (line {rec['line']})"
        label = check_label(p, _asap_label(attrs.get("PartOfGroup", "")), where, _XML_FIX)
        out.append(Annotation(check_ring(p, xy, where, _XML_FIX), label))
    return out
