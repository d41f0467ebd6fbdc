"""Region-of-interest annotations: the optional pixel-level supervision of Zoom-In (000 §2.5).

Polygons drawn by a pathologist around tumour, exchanged with QuPath (GeoJSON) and
the Camelyon16 ground truth (ASAP XML), and turned into ROI-fraction masks aligned
with the views and tiles the models read.  One concept per module:

- :mod:`.model`: :class:`Annotation` (level-0 pixels, **(x, y)** order) and
  :class:`Annotations` (what one file held);
- :mod:`.geojson`, :mod:`.asap`: the file formats; :mod:`.read` picks one by suffix;
- :mod:`.sidecar`: where a slide's annotation file is (one rule for every caller);
- :mod:`.raster`: ROI masks at any scale (:func:`rasterize`).

Numpy only: reading annotations or rasterising a mask never loads torch.
"""

from __future__ import annotations

from .asap import read_asap_xml
from .geojson import label_colour, read_geojson, write_geojson
from .model import DEFAULT_LABEL, EXCLUSION_LABEL, Annotation, Annotations
from .raster import AnnotationIndex, rasterize, rasterize_region
from .read import SUPPORTED_SUFFIXES, read_annotations
from .sidecar import (
    annotations_path_for,
    fallback_annotations_dir,
    fallback_sidecar,
    find_annotations,
    sidecar_for_saving,
)

__all__ = [
    "DEFAULT_LABEL",
    "EXCLUSION_LABEL",
    "SUPPORTED_SUFFIXES",
    "Annotation",
    "AnnotationIndex",
    "Annotations",
    "annotations_path_for",
    "fallback_annotations_dir",
    "fallback_sidecar",
    "find_annotations",
    "label_colour",
    "rasterize",
    "rasterize_region",
    "read_annotations",
    "read_asap_xml",
    "read_geojson",
    "sidecar_for_saving",
    "write_geojson",
]
