"""``ROI annotations``: draw or paint regions of interest on a slide, saved beside it.

For the chosen slide layer the widget keeps a shapes layer ``ROI annotations`` (polygons,
rectangles, ellipses; a ``label`` feature per shape, coloured per label) and, on
request, a labels layer ``ROI labels`` painting one low pyramid level.  Both are
placed so that their data map exactly onto the slide's level-0 pixels (see
:mod:`.roi_shapes`).  Every change is saved, one second after the last one and when
the widget or the viewer closes, to the slide's ROI file ``<stem>.geojson`` beside the
slide (atomically, QuPath-compatible; a per-user copy when that folder is not
writable, :func:`~napari_zoomin.annotations.sidecar_for_saving`), which is the file
training reads its ROI masks from (:func:`~napari_zoomin.annotations.find_annotations`).
A ROI file that exists when a slide is first annotated is loaded first, so it is
extended, never replaced unseen.

A sample slide's GeoJSON is its answer key (the planted regions,
:func:`~napari_zoomin.annotations.sidecar.is_answer_key`), not the user's: it is shown
as a read-only shapes layer ``answer key (sample)`` (thin outlines, not editable, never
saved) beside an ``ROI annotations`` layer of the user's own, which is saved to the
per-user folder, never into the cache folder nor over the answer key.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton
from napari.layers import Labels, Shapes
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QTimer

from ..annotations import (
    DEFAULT_LABEL,
    EXCLUSION_LABEL,
    Annotation,
    fallback_annotations_dir,
    find_annotations,
    label_colour,
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
    ROI_LABELS_LAYER_NAME,
    ROI_LAYER_NAME,
    annotations_to_shapes,
    labels_to_annotations,
    nearest_level,
    roi_labels_placement,
    roi_shapes_placement,
    shapes_to_annotations,
)
from .slide_layers import _layer_path, level0_frame, slide_layers

if TYPE_CHECKING:
    import napari

__all__ = ["AUTOSAVE_DELAY_MS", "MAX_PAINT_PIXELS", "RoiWidget", "flush_pending_saves"]

#: a change is saved this long after the last one (milliseconds)
AUTOSAVE_DELAY_MS = 1000
#: the largest level that can be painted (napari paints in memory: 200 MB of uint8)
MAX_PAINT_PIXELS = 200_000_000
#: layer metadata key tying an ROI layer to its slide (the slide's resolved path, or
#: ``layer:<name>``); the Classify widget finds the slide's ROI shapes by it
ROI_METADATA = "napari_zoomin_roi"
#: layer metadata key of a sample's read-only answer-key layer (the slide's key, as above)
ANSWER_KEY_METADATA = "napari_zoomin_answer_key"
_TRANSPARENT = (0.0, 0.0, 0.0, 0.0)

_widgets: weakref.WeakSet[RoiWidget] = weakref.WeakSet()


def flush_pending_saves() -> None:
    """Save every ROI change not yet written (``Train classifier`` calls it before a run)."""
    for widget in list(_widgets):
        try:
            widget.flush()
        except RuntimeError:  # its Qt side is gone (viewer closed); it saved when closing
            _widgets.discard(widget)


def _rgba(label: str) -> tuple[float, float, float, float]:
    r, g, b = label_colour(label)
    return np.array([r / 255.0, g / 255.0, b / 255.0, 1.0])


def _real(obj):
    """The object behind napari's ``PublicOnlyProxy`` (plugin widgets get a proxied viewer)."""
    return getattr(obj, "__wrapped__", obj)


def _on_slide(slide_layer) -> dict:
    """Shapes-layer placement on a slide layer: scale, translate and units (level-0 px)."""
    scale, translate = roi_shapes_placement(level0_frame(slide_layer))
    units = tuple(str(u) for u in slide_layer.units[-2:])
    return {"scale": scale, "translate": translate, "units": units}


def _roi_edge_width(slide_layer) -> float:
    """ROI outline width in data units (level-0 px): thin enough not to hide a 50-px
    region when zoomed in, still a line at whole-slide view."""
    h0, w0 = _level_shapes(slide_layer)[0]
    return max(2.0, max(h0, w0) / 4000.0)


def _level_shapes(layer) -> list[tuple[int, int]]:
    levels = layer.data if layer.multiscale else [layer.data]
    return [(int(d.shape[0]), int(d.shape[1])) for d in levels]


@dataclass(eq=False)
class _Session:
    """One slide's ROI layers and the file they are saved to."""

    key: str
    name: str
    slide_path: Path | None
    frame: tuple[tuple[float, float], tuple[float, float]]
    level_shapes: list[tuple[int, int]]
    units: tuple[str, str]
    sidecar: Path
    shapes: Shapes
    labels: Labels | None = None
    #: the read-only layer of a sample slide's answer key (its planted regions)
    answer_key: Shapes | None = None
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
        features = self.shapes.features
        n = len(self.shapes.data)
        labels = list(features[LABEL_FEATURE]) if LABEL_FEATURE in features else [None] * n
        rings = list(features[RINGS_FEATURE]) if RINGS_FEATURE in features else [""] * n
        rings = [r if isinstance(r, str) else "" for r in rings]
        out: list[Annotation] = []
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
            out.extend(
                labels_to_annotations(
                    np.asarray(self.labels.data), self.labels_downsample, self.label_names
                )
            )
        return out


class _CloseWatcher(QObject):
    """Calls ``callback`` when the watched window is about to close."""

    def __init__(self, callback, parent: QObject):
        super().__init__(parent)
        self._callback = callback

    def eventFilter(self, obj, event):
        if event.type() == QEvent.Type.Close:
            self._callback()
        return False


class RoiWidget(Container):
    """Dock widget: ROI shapes and painted ROI labels on a slide, saved beside the slide."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self._sessions: dict[str, _Session] = {}
        self._label_names: list[str] = [DEFAULT_LABEL, EXCLUSION_LABEL]
        self._watched_window = None

        self.slide = ComboBox(label="Slide", choices=self._slide_choices)
        self.label = ComboBox(label="ROI label", choices=self._label_choices, value=DEFAULT_LABEL)
        self.new_label = LineEdit(label="New label")
        self.new_label.native.setPlaceholderText("type a label and press Enter")
        self.load_button = PushButton(text="Load QuPath GeoJSON / ASAP XML…")
        self.paint_level = ComboBox(label="Paint level", choices=self._level_choices)
        self.paint_button = PushButton(text="Paint ROI at a low level")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.extend(
            [
                self.slide,
                self.label,
                self.new_label,
                self.load_button,
                self.paint_level,
                self.paint_button,
                self.status,
            ]
        )

        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(AUTOSAVE_DELAY_MS)
        self._timer.timeout.connect(self.flush)

        self.slide.changed.connect(self._on_slide_changed)
        self.label.changed.connect(self._on_label_changed)
        self.new_label.native.returnPressed.connect(self._on_new_label)
        self.load_button.changed.connect(self._on_load_clicked)
        self.paint_button.changed.connect(self._on_paint_clicked)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        viewer.layers.events.removing.connect(self._on_layer_removing)
        sessions = self._sessions
        self.native.destroyed.connect(lambda *_: _flush_sessions(sessions))
        _widgets.add(self)
        self._on_slide_changed(self.slide.value)
        QTimer.singleShot(0, self._watch_window)  # docked by then

    # ------------------------------------------------------------------ choices

    def _slide_choices(self, _widget=None) -> list[tuple[str, object]]:
        return [(layer.name, _real(layer)) for layer in slide_layers(self._viewer)]

    def _label_choices(self, _widget=None) -> list[str]:
        return list(self._label_names)

    def _level_choices(self, _widget=None) -> list[tuple[str, int]]:
        layer = self.slide.value if hasattr(self, "slide") else None
        if layer is None:
            return []
        shapes = _level_shapes(layer)
        h0 = shapes[0][0]
        return [
            (f"level {k}: {w:,} × {h:,} px (1/{h0 / h:.3g})", k) for k, (h, w) in enumerate(shapes)
        ]

    def _on_layers_changed(self, _event=None) -> None:
        current = self.slide.value
        self.slide.reset_choices()
        if self.slide.value is not current:
            self._on_slide_changed(self.slide.value)

    # ------------------------------------------------------------------ sessions

    @property
    def session(self) -> _Session | None:
        """The ROI session of the selected slide (``None`` without a slide)."""
        layer = self.slide.value
        return None if layer is None else self._sessions.get(self._key(layer))

    @property
    def shapes_layer(self) -> Shapes | None:
        """The selected slide's ``ROI annotations`` layer."""
        session = self.session
        return None if session is None else session.shapes

    @property
    def labels_layer(self) -> Labels | None:
        """The selected slide's ``ROI labels`` layer, once painting was started."""
        session = self.session
        return None if session is None else session.labels

    @staticmethod
    def _key(layer) -> str:
        path = _layer_path(layer)
        return str(path.resolve()) if path is not None else f"layer:{layer.name}"

    def _on_slide_changed(self, layer) -> None:
        self.paint_level.reset_choices()
        if layer is None:
            self.status.value = "Open a slide to annotate it."
            return
        shapes = _level_shapes(layer)
        downsamples = [shapes[0][0] / h for h, _ in shapes]
        self.paint_level.value = nearest_level(downsamples, 16.0)
        try:
            self.activate(layer)
        except ZoominError as exc:
            show_error(str(exc))

    def activate(self, layer) -> _Session:
        """Start (or resume) annotating ``layer``: its ROI layer, loaded from its ROI file."""
        key = self._key(layer)
        session = self._sessions.get(key)
        if session is None:
            session = self._open_session(key, layer)
            self._sessions[key] = session
        self._watch_window()
        self._viewer.layers.selection.active = session.shapes
        self._apply_label(self.label.value, relabel_selection=False)
        return session

    def _open_session(self, key: str, layer) -> _Session:
        path = _layer_path(layer)
        if path is not None and path.exists():
            sidecar, fallback = sidecar_for_saving(path)
        else:
            path = None
            safe = re.sub(r"[^\w.-]+", "_", layer.name) or "image"
            sidecar, fallback = fallback_annotations_dir() / "images" / f"{safe}.geojson", True
        frame = level0_frame(layer)
        units = tuple(str(u) for u in layer.units[-2:])
        session = _Session(
            key=key,
            name=layer.name,
            slide_path=path,
            frame=frame,
            level_shapes=_level_shapes(layer),
            units=units,  # type: ignore[arg-type]
            sidecar=sidecar,
            shapes=self._existing_layer(key, Shapes),  # type: ignore[arg-type]
        )
        session.labels = self._existing_layer(key, Labels)  # type: ignore[assignment]
        if session.labels is not None:
            session.labels_downsample = tuple(session.labels.metadata["downsample"])
            session.label_names = {
                int(k): v for k, v in session.labels.metadata.get("label_names", {}).items()
            }
        answer_key = answer_key_for(path) if path is not None else None
        if answer_key is not None:
            session.answer_key = self._existing_layer(key, Shapes, ANSWER_KEY_METADATA)
            if session.answer_key is None:
                session.answer_key = self._answer_key_layer(layer, answer_key)
        message = f"Annotations are saved to {sidecar}"
        if fallback and path is not None:
            if answer_key is not None:
                message += (
                    f" (the slide's {answer_key.name} is its answer key, shown read-only as "
                    f"'{ANSWER_KEY_LAYER_NAME}')"
                )
            elif in_cache(path):
                message += " (the slide is in the napari-zoomin cache folder)"
            else:
                message += f" (the slide's folder {path.parent} is not writable)"
        if session.shapes is None:
            loaded, note = self._read_existing(path, sidecar, session)
            session.shapes = self._new_shapes_layer(layer, loaded)
            session.remember(loaded, *annotations_to_shapes(loaded))
            message = note or message
        for name in session.shapes.features.get(LABEL_FEATURE, []):
            self._add_label_name(name)
        self._connect(session)
        self.status.value = message + "."
        if fallback:
            show_info(f"napari-zoomin: ROI annotations of {layer.name} are saved to {sidecar}.")
        return session

    def _existing_layer(self, key: str, kind: type, metadata_key: str = ROI_METADATA):
        for lay in self._viewer.layers:
            if isinstance(lay, kind) and lay.metadata.get(metadata_key) == key:
                return _real(lay)
        return None

    def _answer_key_layer(self, slide_layer, path: Path) -> Shapes | None:
        """A read-only shapes layer of a sample's answer key: thin outlines, never saved."""
        try:
            annotations = list(read_annotations(path))
        except ZoominError as exc:
            show_warning(f"napari-zoomin: {exc} The sample's answer key was not shown.")
            return None
        data, types, labels, _ = annotations_to_shapes(annotations)
        layer = Shapes(
            data,
            shape_type=types,
            name=ANSWER_KEY_LAYER_NAME,
            **_on_slide(slide_layer),
            features=pd.DataFrame({LABEL_FEATURE: pd.Series(labels, dtype=object)}),
            edge_color=[_rgba(lab) for lab in labels] if labels else "white",
            face_color="transparent",
            edge_width=_roi_edge_width(slide_layer) / 2,  # thinner than the user's ROIs
            opacity=0.6,
            metadata={ANSWER_KEY_METADATA: self._key(slide_layer), "path": str(path)},
        )
        layer.editable = False
        layer.mode = "pan_zoom"

        def keep_read_only(_event=None) -> None:  # napari re-enables editing on 3D → 2D
            if layer.editable:
                layer.editable = False
                layer.mode = "pan_zoom"

        layer.events.editable.connect(keep_read_only)
        self._viewer.add_layer(layer)
        return layer

    def _read_existing(
        self, slide_path: Path | None, sidecar: Path, session: _Session
    ) -> tuple[list[Annotation], str | None]:
        """The annotations of the slide's existing ROI file, read before anything is saved."""
        found = sidecar if sidecar.is_file() else None
        if found is None and slide_path is not None:
            found = find_annotations(slide_path)
            if found is not None and is_answer_key(found):  # shown read-only, not the user's
                found = None
        if found is None:
            return [], None
        try:
            annotations = list(read_annotations(found))
        except ZoominError as exc:
            if found == sidecar:  # never replace a file we could not read
                session.autosave = False
                show_error(
                    f"napari-zoomin: {exc} The ROI annotations of {session.name} are not saved "
                    "automatically until the file is fixed or moved away."
                )
                return [], f"Autosave is off: {sidecar} could not be read"
            show_warning(f"napari-zoomin: {exc} It was not loaded.")
            return [], None
        note = f"Loaded {len(annotations)} annotation(s) from {found}"
        if found != sidecar:
            note += f"; changes are saved to {sidecar}"
        return annotations, note

    def _new_shapes_layer(self, slide_layer, annotations: list[Annotation]) -> Shapes:
        data, types, labels, rings = annotations_to_shapes(annotations)
        layer = Shapes(
            data,
            shape_type=types,
            name=ROI_LAYER_NAME,
            **_on_slide(slide_layer),
            features=pd.DataFrame(
                {
                    LABEL_FEATURE: pd.Series(labels, dtype=object),
                    RINGS_FEATURE: pd.Series(rings, dtype=object),
                }
            ),
            feature_defaults={LABEL_FEATURE: self.label.value, RINGS_FEATURE: ""},
            edge_color=[_rgba(lab) for lab in labels] if labels else "red",
            face_color="transparent",
            edge_width=_roi_edge_width(slide_layer),
            metadata={ROI_METADATA: self._key(slide_layer)},
        )
        layer.current_edge_color = _rgba(self.label.value)
        layer.current_face_color = "transparent"
        self._viewer.add_layer(layer)
        return layer

    def _connect(self, session: _Session) -> None:
        """Every edit of the session's layers schedules a save."""
        session.shapes.events.data.connect(self._on_layer_edited)
        session.shapes.events.features.connect(self._on_layer_edited)
        if session.labels is not None:
            session.labels.events.paint.connect(self._on_layer_edited)
            session.labels.events.data.connect(self._on_layer_edited)

    def _session_of(self, layer) -> _Session | None:
        for session in self._sessions.values():
            if layer is session.shapes or (layer is not None and layer is session.labels):
                return session
        return None

    def _on_layer_edited(self, event) -> None:
        session = self._session_of(_real(event.source))
        if session is not None:
            self._schedule(session)

    def _on_layer_removing(self, event) -> None:
        """Save before an ROI layer goes; painted regions live on as shapes."""
        layer = _real(self._viewer.layers[event.index])
        session = self._session_of(layer)
        if session is None:
            return
        if layer is session.labels:
            painted = labels_to_annotations(
                np.asarray(session.labels.data), session.labels_downsample, session.label_names
            )
            session.labels = None
            if painted:
                self._add_shapes(session, painted)  # scheduled to be saved
            return
        self._save(session)
        del self._sessions[session.key]
        if session.labels is not None:
            session.labels.metadata.pop(ROI_METADATA, None)

    # ------------------------------------------------------------------ labels

    def _add_label_name(self, name: str) -> None:
        if isinstance(name, str) and name and name not in self._label_names:
            self._label_names.append(name)
            self.label.reset_choices()

    def _on_new_label(self) -> None:
        name = self.new_label.value.strip()
        if not name:
            return
        self._add_label_name(name)
        self.new_label.value = ""
        self.label.value = name

    def _on_label_changed(self, name) -> None:
        self._apply_label(name, relabel_selection=True)

    def _apply_label(self, name: str | None, relabel_selection: bool) -> None:
        """New shapes (and painted pixels) get ``name``; selected shapes are relabelled."""
        session = self.session
        if session is None or not name:
            return
        layer = session.shapes
        layer.feature_defaults = {LABEL_FEATURE: name, RINGS_FEATURE: ""}
        selected = sorted(layer.selected_data) if relabel_selection else []
        if selected:
            features = layer.features.copy()
            features.loc[selected, LABEL_FEATURE] = name
            layer.features = features  # an edit: saved
            self._recolour(layer)
        layer.current_edge_color = _rgba(name)
        if session.labels is not None:
            session.labels.selected_label = self._label_value(session, name)

    @staticmethod
    def _recolour(layer: Shapes) -> None:
        labels = layer.features.get(LABEL_FEATURE, [])
        if len(layer.data):
            layer.edge_color = [
                _rgba(lab if isinstance(lab, str) else DEFAULT_LABEL) for lab in labels
            ]

    def _label_value(self, session: _Session, name: str) -> int:
        """The labels-layer value painting ``name`` (a new value for a new label)."""
        for value, known in session.label_names.items():
            if known == name:
                return value
        value = max(session.label_names, default=0) + 1
        session.label_names[value] = name
        if session.labels is not None:
            session.labels.metadata["label_names"] = dict(session.label_names)
            session.labels.colormap = self._labels_colormap(session)
        return value

    def _labels_colormap(self, session: _Session) -> DirectLabelColormap:
        colours = {None: _TRANSPARENT, 0: _TRANSPARENT}
        colours.update({v: _rgba(n) for v, n in session.label_names.items()})
        return DirectLabelColormap(color_dict=colours)

    # ------------------------------------------------------------------ loading

    def _on_load_clicked(self, *_args) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(
            self.native,
            "Load ROI annotations",
            "",
            "Annotations (*.geojson *.json *.xml);;QuPath GeoJSON (*.geojson *.json);;"
            "ASAP XML (*.xml)",
        )
        if path:
            self.load_annotations(path)

    def load_annotations(self, path: str | Path) -> int:
        """Add the annotations of a QuPath GeoJSON or ASAP XML file to the slide's ROI layer.

        Returns how many were added; a bad file is an error notification.
        """
        session = self.session
        if session is None:
            show_error("napari-zoomin: open a slide before loading ROI annotations.")
            return 0
        try:
            annotations = read_annotations(path)
        except ZoominError as exc:
            show_error(f"napari-zoomin: {exc}")
            return 0
        if annotations.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(annotations.skipped.items()))
            show_info(f"napari-zoomin: {path}: skipped what has no area ({kinds}).")
        self._add_shapes(session, list(annotations))
        self.status.value = f"Loaded {len(annotations)} annotation(s) from {path}."
        return len(annotations)

    def _add_shapes(self, session: _Session, annotations: list[Annotation]) -> None:
        if not annotations:
            return
        layer = session.shapes
        data, types, labels, rings = annotations_to_shapes(annotations)
        session.remember(annotations, data, types, labels, rings)
        for name in labels:
            self._add_label_name(name)
        features = pd.concat(
            [
                layer.features,
                pd.DataFrame(
                    {
                        LABEL_FEATURE: pd.Series(labels, dtype=object),
                        RINGS_FEATURE: pd.Series(rings, dtype=object),
                    }
                ),
            ],
            ignore_index=True,
        )
        layer.add(data, shape_type=types)
        layer.features = features
        self._recolour(layer)
        self._schedule(session)

    # ------------------------------------------------------------------ painting

    def _on_paint_clicked(self, *_args) -> None:
        self.paint_labels()

    def paint_labels(self, level: int | None = None) -> Labels | None:
        """Create (or show) the ``ROI labels`` layer painting one pyramid level of the slide."""
        layer = self.slide.value
        if layer is None:
            show_error("napari-zoomin: open a slide before painting ROI labels.")
            return None
        session = self.activate(layer)
        level = self.paint_level.value if level is None else int(level)
        shape = session.level_shapes[level]
        if session.labels is not None:
            current = tuple(session.labels.data.shape)
            if current != shape:
                show_warning(
                    f"napari-zoomin: {ROI_LABELS_LAYER_NAME} of {session.name} already paints "
                    f"a {current[1]:,} × {current[0]:,} level; delete it to paint another "
                    "(its regions are kept as shapes)."
                )
            self._viewer.layers.selection.active = session.labels
            return session.labels
        if shape[0] * shape[1] > MAX_PAINT_PIXELS:
            show_error(
                f"napari-zoomin: level {level} of {session.name} is {shape[1]:,} × {shape[0]:,} "
                "pixels, too large to paint in memory. Choose a coarser level (about 1/16 of "
                "the slide's resolution)."
            )
            return None
        scale, translate, downsample = roi_labels_placement(
            session.frame, session.level_shapes[0], shape
        )
        labels = Labels(
            np.zeros(shape, dtype=np.uint8),
            name=ROI_LABELS_LAYER_NAME,
            scale=scale,
            translate=translate,
            units=session.units,
            opacity=0.5,
            metadata={ROI_METADATA: session.key, "downsample": list(downsample), "level": level},
        )
        session.labels = labels
        session.labels_downsample = downsample
        value = self._label_value(session, self.label.value)
        labels.colormap = self._labels_colormap(session)
        labels.metadata["label_names"] = dict(session.label_names)
        self._viewer.add_layer(labels)
        labels.selected_label = value
        labels.brush_size = 10
        labels.mode = "paint"
        labels.events.paint.connect(self._on_layer_edited)
        labels.events.data.connect(self._on_layer_edited)
        self.status.value = (
            f"Painting level {level} (1/{downsample[0]:.3g}); regions are saved to "
            f"{session.sidecar} as polygons."
        )
        return labels

    # ------------------------------------------------------------------ saving

    def _schedule(self, session: _Session) -> None:
        session.dirty = True
        self._timer.start()

    def flush(self) -> None:
        """Save every slide with unsaved changes now."""
        self._timer.stop()
        for session in list(self._sessions.values()):
            if session.dirty:
                self._save(session)

    def _save(self, session: _Session) -> Path | None:
        if not session.dirty:
            return None
        session.dirty = False
        if not session.autosave:
            return None
        try:
            annotations = session.annotations()
            session.sidecar.parent.mkdir(parents=True, exist_ok=True)
            path = write_geojson(session.sidecar, annotations)
        except (ZoominError, OSError) as exc:
            show_error(
                f"napari-zoomin: the ROI annotations of {session.name} were not saved: {exc}"
            )
            return None
        with contextlib.suppress(RuntimeError):  # the widget is being deleted; the file is saved
            self.status.value = f"Saved {len(annotations)} annotation(s) to {path}."
        return path

    def _watch_window(self) -> None:
        """Save when the viewer's window closes (once the widget is docked in it)."""
        try:
            window = self.native.window()
        except RuntimeError:  # deleted before it was docked
            return
        if window is self.native or window is self._watched_window:
            return
        self._watched_window = window
        window.installEventFilter(_CloseWatcher(self.flush, self.native))

    def sidecar_of(self, layer) -> Path:
        """Where the ROI annotations of a slide layer are saved."""
        session = self._sessions.get(self._key(layer))
        if session is not None:
            return session.sidecar
        path = _layer_path(layer)
        return sidecar_for_saving(path)[0] if path is not None else Path()


def _flush_sessions(sessions: dict[str, _Session]) -> None:
    """Save unsaved sessions (the widget is going away; its timer with it)."""
    for session in list(sessions.values()):
        if session.dirty and session.autosave:
            session.dirty = False
            try:
                write_geojson(session.sidecar, session.annotations())
            except (ZoominError, OSError, RuntimeError) as exc:
                show_error(
                    f"napari-zoomin: the ROI annotations of {session.name} were not saved: {exc}"
                )
