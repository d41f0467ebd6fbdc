"""Read an annotation file of any supported format, chosen by its suffix."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AnnotationError
from .asap import read_asap_xml
from .geojson import read_geojson
from .model import Annotations

__all__ = ["SUPPORTED_SUFFIXES", "read_annotations"]

#: the suffixes :func:`read_annotations` reads, in the order a slide's file is looked up
SUPPORTED_SUFFIXES: tuple[str, ...] = (".geojson", ".json", ".xml")


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
