"""Where a slide's annotation file is: one rule for ``zoomin train``, the widgets, the API.

A slide's ROI file is found by name, never recorded anywhere, so every path into
training (the CLI, the train widget) and the ROI widget must use this one lookup, or
the same labels CSV would train with different supervision depending on where it
was started.  :func:`find_annotations` is that lookup; :func:`sidecar_for_saving` is
where the ROI widget writes, so what it saves is what training finds.

A sample slide's GeoJSON is its *answer key* (:func:`is_answer_key`): the planted
regions the sample generator wrote, not the user's annotations.  The user's ROIs are
never saved over it nor into the cache folder (:func:`sidecar_for_saving`), and once
saved they are found before it (:func:`find_annotations`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..paths import cache_dir, user_data_dir
from .read import SUPPORTED_SUFFIXES

__all__ = [
    "annotations_path_for",
    "answer_key_for",
    "fallback_annotations_dir",
    "fallback_sidecar",
    "find_annotations",
    "in_cache",
    "is_answer_key",
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


#: an answer key larger than this is not a sample's (they hold a few regions)
_ANSWER_KEY_MAX_BYTES = 16 * 1024 * 1024


def in_cache(path: str | os.PathLike) -> bool:
    """True when ``path`` is in the cache (:func:`~napari_zoomin.paths.cache_dir`).

    The cache holds what can be built again and may be cleared: nothing the user made
    belongs there.
    """
    try:
        return Path(path).resolve().is_relative_to(cache_dir().resolve())
    except OSError:
        return False


def is_answer_key(path: str | os.PathLike) -> bool:
    """True when ``path`` is a sample slide's answer key, not annotations a user made.

    The sample generator (:func:`~napari_zoomin.samples.write_sample_slide`) writes its
    planted regions as a GeoJSON FeatureCollection whose top-level ``properties`` name
    the ``generator`` (``"napari-zoomin <version>"``) and the ``recipe_version``;
    annotations the ROI widget or QuPath write have neither.  Outside the cache such a
    file is an answer key only when it has planted regions (a region-free sample's
    empty file, used as a plain test slide, keeps nothing to protect).  A file inside the cache
    folder (:func:`in_cache`) is never the user's either.  Files that cannot be read
    are not answer keys (reading them reports the problem).
    """
    p = Path(path)
    if not p.is_file():
        return False
    if in_cache(p):
        return True
    if p.suffix.casefold() not in (".geojson", ".json"):
        return False
    try:
        if p.stat().st_size > _ANSWER_KEY_MAX_BYTES:
            return False
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    props = doc.get("properties") if isinstance(doc, dict) else None
    if not isinstance(props, dict):
        return False
    generator = props.get("generator")
    return (
        isinstance(generator, str)
        and generator.startswith("napari-zoomin")
        and "recipe_version" in props
        and bool(doc.get("features"))  # a region-free sample's empty file holds no key
    )


def answer_key_for(slide_path: str | os.PathLike) -> Path | None:
    """The slide's answer key (its ``<stem>.geojson`` beside it, when :func:`is_answer_key`)."""
    beside = annotations_path_for(slide_path)
    return beside if is_answer_key(beside) else None


def sidecar_for_saving(slide_path: str | os.PathLike) -> tuple[Path, bool]:
    """The ROI file to save a slide's annotations to, and whether it is the fallback.

    ``<stem>.geojson`` beside the slide, unless that folder is not writable, the slide
    is in the cache folder (:func:`in_cache`: clearing the cache would lose them), or
    that file is the slide's answer key (:func:`is_answer_key`); then the per-user
    fallback (:func:`fallback_sidecar`).  :func:`find_annotations` finds both, the
    fallback first.
    """
    slide_path = Path(slide_path)
    beside = annotations_path_for(slide_path)
    if _is_writable(beside) and not in_cache(beside) and not is_answer_key(beside):
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
       when the slide's folder is not writable, or the slide is a sample in the cache
       or beside its answer key, so it holds the latest edits of a file beside the
       slide, or the user's own ROIs of a sample (found before its answer key);
    3. ``<stem>.geojson``, ``<stem>.json``, ``<stem>.xml`` beside the slide (a
       sample's answer key when the user saved no ROIs of their own).

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
