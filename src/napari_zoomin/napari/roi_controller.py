"""The ``ROI annotations`` widget's state and logic, without Qt or napari.

:class:`RoiController` holds what the widget knows between edits: one
:class:`RoiSession` per annotated slide (its key, the file its ROIs are saved to,
whether it has unsaved changes, its sample answer key, its label values) and the ROI
label names.  It answers where a slide's ROIs are saved (:func:`destination`, the
rules of :mod:`~napari_zoomin.annotations.sidecar`: beside the slide, else the
per-user folder, never into the cache nor over a sample's answer key), what an
existing ROI file gives before anything is saved (:meth:`RoiController.read_existing`,
an answer key is never read as the user's), and saves (:meth:`RoiController.save`).
Layers are opaque here, read only through their public data (``data``,
``shape_type``, ``features``, ``scale``, ``translate``), so a test drives the
controller with plain objects and real files, without a viewer; the widget
(:mod:`.roi_widget`) binds it to Qt and the viewer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..annotations import (
    DEFAULT_LABEL,
    EXCLUSION_LABEL,
    Annotation,
    fallback_annotations_dir,
    find_annotations,
    read_annotations,
    sidecar_for_saving,
    write_geojson,
)
from ..annotations.sidecar import answer_key_for, in_cache, is_answer_key
from ..errors import ZoominError
from .roi_shapes import (
    ANSWER_KEY_LAYER_NAME,
    LABEL_FEATURE,
    RINGS_FEATURE,
    labels_to_annotations,
    shapes_to_annotations,
)

__all__ = ["Existing", "RoiController", "RoiSession", "Saved", "destination", "slide_key"]

Frame = tuple[tuple[float, float], tuple[float, float]]


def slide_key(path: Path | None, name: str) -> str:
    """What ties ROI layers to their slide: its resolved path, or ``layer:<name>`` for a
    layer without a file."""
    return str(path.resolve()) if path is not None else f"layer:{name}"


def destination(path: Path | None, name: str) -> tuple[Path, bool]:
    """The ROI file a slide's annotations are saved to, and whether it is the per-user
    fallback: :func:`~napari_zoomin.annotations.sidecar_for_saving` for a slide file
    (``<stem>.geojson`` beside it unless that folder is not writable, the slide is in
    the cache or that file is its answer key); ``<data>/annotations/images/<name>.geojson``
    for a layer without a file."""
    if path is not None:
        return sidecar_for_saving(path)
    safe = re.sub(r"[^\w.-]+", "_", name) or "image"
    return fallback_annotations_dir() / "images" / f"{safe}.geojson", True


@dataclass(eq=False)
class RoiSession:
    """One slide's ROI layers and the file they are saved to (layers are opaque)."""

    key: str
    name: str
    slide_path: Path | None
    frame: Frame
    level_shapes: list[tuple[int, int]]
    units: tuple[str, str]
    sidecar: Path
    #: the sidecar is the per-user fallback, not the file beside the slide
    fallback: bool = False
    #: the sample slide's answer key (its planted regions), shown read-only, never saved
    answer_key_path: Path | None = None
    shapes: Any = None
    labels: Any = None
    #: the read-only layer of the answer key
    answer_key: Any = None
    labels_downsample: tuple[float, float] = (1.0, 1.0)
    autosave: bool = True
    dirty: bool = False
    label_names: dict[int, str] = field(default_factory=dict)
    #: annotations put into the shapes layer, by what napari stores of them: napari keeps
    #: shape vertices in float32, so an unedited shape is saved as the original (float64)
    originals: dict[tuple, Annotation] = field(default_factory=dict)

    @staticmethod
    def shape_key(vertices, kind: str, label, rings: str) -> tuple:
        return (kind, label, rings, np.asarray(vertices, dtype=np.float32).tobytes())

    def remember(self, annotations, data, types, labels, rings) -> None:
        for a, *shape in zip(annotations, data, types, labels, rings, strict=True):
            self.originals[self.shape_key(*shape)] = a

    def annotations(self) -> list[Annotation]:
        """What the layers hold, in level-0 pixels: shapes, then painted regions."""
        out: list[Annotation] = []
        if self.shapes is not None:
            features = self.shapes.features
            n = len(self.shapes.data)
            labels = list(features[LABEL_FEATURE]) if LABEL_FEATURE in features else [None] * n
            rings = list(features[RINGS_FEATURE]) if RINGS_FEATURE in features else [""] * n
            rings = [r if isinstance(r, str) else "" for r in rings]
            for shape in zip(self.shapes.data, self.shapes.shape_type, labels, rings, strict=True):
                original = self.originals.get(self.shape_key(*shape))
                if original is not None:
                    out.append(original)
                    continue
                vertices, kind, label, ring_sizes = shape
                converted, _ = shapes_to_annotations(
                    [vertices],
                    [kind],
                    [label],
                    layer_scale=self.shapes.scale,
                    layer_translate=self.shapes.translate,
                    frame=self.frame,
                    rings=[ring_sizes],
                )
                out.extend(converted)
        if self.labels is not None:
            out.extend(self.painted())
        return out

    def painted(self) -> list[Annotation]:
        """The painted regions of the labels layer, as polygons in level-0 pixels."""
        return labels_to_annotations(
            np.asarray(self.labels.data), self.labels_downsample, self.label_names
        )

    def where(self) -> str:
        """Where the ROIs are saved, and why there when it is not beside the slide."""
        message = f"Annotations are saved to {self.sidecar}"
        path = self.slide_path
        if self.fallback and path is not None:
            if self.answer_key_path is not None:
                message += (
                    f" (the slide's {self.answer_key_path.name} is its answer key, shown "
                    f"read-only as '{ANSWER_KEY_LAYER_NAME}')"
                )
            elif in_cache(path):
                message += " (the slide is in the napari-zoomin cache folder)"
            else:
                message += f" (the slide's folder {path.parent} is not writable)"
        return message + "."


@dataclass(frozen=True)
class Existing:
    """What a slide's existing ROI file gives before anything is saved: its annotations,
    a status note, and an error or warning to show (``None``: none)."""

    annotations: list[Annotation]
    note: str | None = None
    error: str | None = None
    warning: str | None = None


@dataclass(frozen=True)
class Saved:
    """A save: the file written (``None``: nothing written) and the status or error."""

    path: Path | None = None
    status: str | None = None
    error: str | None = None


class RoiController:
    """The state of one ``ROI annotations`` widget (see the module docstring)."""

    def __init__(self) -> None:
        self.sessions: dict[str, RoiSession] = {}
        #: the ROI labels offered, in the order they were met
        self.label_names: list[str] = [DEFAULT_LABEL, EXCLUSION_LABEL]

    # ------------------------------------------------------------------ sessions
    def open(
        self,
        name: str,
        path: Path | None,
        frame: Frame,
        level_shapes: list[tuple[int, int]],
        units: tuple[str, str],
    ) -> RoiSession:
        """The session of a slide (``path``: its file, ``None`` for a layer without one),
        made the first time: where its ROIs are saved, and its answer key if it is a
        sample's."""
        key = slide_key(path, name)
        session = self.sessions.get(key)
        if session is None:
            if path is not None and not path.exists():
                path = None  # saved as a layer without a file
            sidecar, fallback = destination(path, name)
            session = RoiSession(
                key=key,
                name=name,
                slide_path=path,
                frame=frame,
                level_shapes=level_shapes,
                units=units,
                sidecar=sidecar,
                fallback=fallback,
                answer_key_path=answer_key_for(path) if path is not None else None,
            )
            self.sessions[key] = session
        return session

    def close(self, session: RoiSession) -> None:
        """Forget a session (its shapes layer went; saved first by the widget)."""
        self.sessions.pop(session.key, None)

    def session_of(self, layer, same) -> RoiSession | None:
        """The session whose shapes or labels layer is ``layer`` (``same(a, b)``: whether
        two layers are one)."""
        for session in self.sessions.values():
            if same(layer, session.shapes) or (layer is not None and same(layer, session.labels)):
                return session
        return None

    def read_existing(self, session: RoiSession) -> Existing:
        """The annotations of the slide's existing ROI file, read before anything is saved.

        The file it saves to, else the file training would find; a sample's answer key
        is not the user's (it is shown read-only) and is never read as theirs.  A save
        file that cannot be read turns autosave off: it is never replaced unseen."""
        sidecar = session.sidecar
        found = sidecar if sidecar.is_file() else None
        if found is None and session.slide_path is not None:
            found = find_annotations(session.slide_path)
            if found is not None and is_answer_key(found):
                found = None
        if found is None:
            return Existing([])
        try:
            annotations = list(read_annotations(found))
        except ZoominError as exc:
            if found == sidecar:  # never replace a file we could not read
                session.autosave = False
                return Existing(
                    [],
                    note=f"Autosave is off: {sidecar} could not be read",
                    error=f"napari-zoomin: {exc} The ROI annotations of {session.name} are "
                    "not saved automatically until the file is fixed or moved away.",
                )
            return Existing([], warning=f"napari-zoomin: {exc} It was not loaded.")
        note = f"Loaded {len(annotations)} annotation(s) from {found}"
        if found != sidecar:
            note += f"; changes are saved to {sidecar}"
        return Existing(annotations, note=note)

    # ------------------------------------------------------------------ labels
    def add_label_name(self, name) -> bool:
        """Offer ``name`` as an ROI label; True when it is new."""
        if isinstance(name, str) and name and name not in self.label_names:
            self.label_names.append(name)
            return True
        return False

    @staticmethod
    def label_value(session: RoiSession, name: str) -> tuple[int, bool]:
        """The labels-layer value painting ``name``, and whether it is a new value."""
        for value, known in session.label_names.items():
            if known == name:
                return value, False
        value = max(session.label_names, default=0) + 1
        session.label_names[value] = name
        return value, True

    # ------------------------------------------------------------------ saving
    @staticmethod
    def mark(session: RoiSession) -> None:
        """An edit: the session is saved at the next :meth:`save`."""
        session.dirty = True

    def pending(self) -> list[RoiSession]:
        """The sessions with unsaved changes."""
        return [s for s in self.sessions.values() if s.dirty]

    @staticmethod
    def save(session: RoiSession) -> Saved:
        """Write the session's annotations to its ROI file (atomically), if it changed
        and autosave is on; an error is said, never raised."""
        if not session.dirty:
            return Saved()
        session.dirty = False
        if not session.autosave:
            return Saved()
        try:
            annotations = session.annotations()
            session.sidecar.parent.mkdir(parents=True, exist_ok=True)
            path = write_geojson(session.sidecar, annotations)
        except (ZoominError, OSError, RuntimeError) as exc:
            return Saved(
                error=f"napari-zoomin: the ROI annotations of {session.name} were not saved: {exc}"
            )
        return Saved(path, f"Saved {len(annotations)} annotation(s) to {path}.")
