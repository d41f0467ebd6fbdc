"""Where a slide's annotation file is: one rule for ``zoomin train``, the widgets, the API.

A slide's ROI file is found by name, never recorded anywhere, so every path into
training (the CLI, the train widget) and the ROI widget must use this one lookup, or
the same labels CSV would train with different supervision depending on where it
was started.  :func:`find_annotations` is that lookup; :func:`sidecar_for_saving` is
where the ROI widget writes, so what it saves is what training finds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..paths import user_data_dir
from .read import SUPPORTED_SUFFIXES

__all__ = [
    "annotations_path_for",
    "fallback_annotations_dir",
    "fallback_sidecar",
    "find_annotations",
    "sidecar_for_saving",
]

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


def fallback_annotations_dir() -> Path:
    """Where ROI files go when a slide's folder is not writable (per-user data folder)."""
    return user_data_dir("annotations")


def fallback_sidecar(slide_path: str | os.PathLike) -> Path:
    """``<data>/annotations/<hash of the slide's path>/<stem>.geojson``: unique per slide."""
    slide_path = Path(slide_path)
    digest = hashlib.sha256(str(slide_path.resolve()).encode()).hexdigest()[:16]
    return fallback_annotations_dir() / digest / annotations_path_for(slide_path).name


def _is_writable(path: Path) -> bool:
    """True when ``path`` can be created or replaced (its folder is writable)."""
    folder = path.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def sidecar_for_saving(slide_path: str | os.PathLike) -> tuple[Path, bool]:
    """The ROI file to save a slide's annotations to, and whether it is the fallback.

    ``<stem>.geojson`` beside the slide, unless that folder is not writable, then the
    per-user fallback (:func:`fallback_sidecar`); :func:`find_annotations` finds both.
    """
    slide_path = Path(slide_path)
    beside = annotations_path_for(slide_path)
    if _is_writable(beside):
        return beside, False
    return fallback_sidecar(slide_path), True


def _first_in(folder: Path, slide_path: Path) -> Path | None:
    """The first existing ``<stem><suffix>`` in ``folder`` (stems, then suffixes, in order)."""
    stems = [_slide_stem(slide_path)]
    if slide_path.stem not in stems:
        stems.append(slide_path.stem)  # x.ome.tif → also x.ome.geojson
    for stem in stems:
        for suffix in SUPPORTED_SUFFIXES:
            candidate = folder / (stem + suffix)
            if candidate.is_file() and candidate != slide_path:
                return candidate
    return None


def find_annotations(
    slide_path: str | os.PathLike, folder: str | os.PathLike | None = None
) -> Path | None:
    """A slide's annotation file, or ``None``: the first that exists of

    1. ``<stem>.geojson``, ``<stem>.json``, ``<stem>.xml`` in ``folder``, when given
       (``zoomin train --annotations``, the train widget's ROI folder): an explicit
       choice for this run wins;
    2. the ROI widget's fallback copy (:func:`fallback_sidecar`): it is written only
       when the slide's folder is not writable, so it holds the latest edits of a
       file beside the slide;
    3. ``<stem>.geojson``, ``<stem>.json``, ``<stem>.xml`` beside the slide.

    ``<stem>`` drops a compound suffix (``x.ome.tif`` → ``x``); the plain stem
    (``x.ome``) is tried after it.
    """
    p = Path(slide_path)
    if folder is not None:
        found = _first_in(Path(folder), p)
        if found is not None:
            return found
    fallback = fallback_sidecar(p)
    if fallback.is_file():
        return fallback
    return _first_in(p.parent, p)
