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

Where a slide's ROIs are saved, what an existing file gives, which slides have unsaved
changes and the saving itself are :class:`~.roi_controller.RoiController`'s (Qt-free);
this module binds it to the viewer's layers, a save timer and the window's close.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton
from napari.layers import Labels, Shapes
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QTimer

from ..annotations import DEFAULT_LABEL, Annotation, label_colour, read_annotations
from ..errors import ZoominError
from .roi_controller import RoiController, RoiSession, Saved, destination, slide_key
from .roi_shapes import (
    ANSWER_KEY_LAYER_NAME,
    LABEL_FEATURE,
    RINGS_FEATURE,
    ROI_LABELS_LAYER_NAME,
    ROI_LAYER_NAME,
    annotations_to_shapes,
    nearest_level,
    roi_labels_placement,
    roi_shapes_placement,
)
from .slide_layers import _layer_path, level0_frame, slide_layers
from .zoom_follow import SCREEN_WIDTH_KEY, ZoomFollower

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
#: outline width of the user's ROIs on screen (pixels, at every zoom); the answer key's
#: outlines are half as wide
ROI_OUTLINE_PX = 2.0

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


def _same(a, b) -> bool:
    """Whether ``a`` and ``b`` are the same layer.  A plugin widget gets napari's
    public-only proxy of the viewer, whose layers are proxies (a new one per access) of
    the real layers that events carry, so identity says nothing: the layers'
    ``unique_id`` does."""
    if a is None or b is None:
        return a is b
    return a is b or a.unique_id == b.unique_id


def _on_slide(slide_layer) -> dict:
    """Shapes-layer placement on a slide layer: scale, translate and units (level-0 px)."""
    scale, translate = roi_shapes_placement(level0_frame(slide_layer))
    units = tuple(str(u) for u in slide_layer.units[-2:])
    return {"scale": scale, "translate": translate, "units": units}


def _roi_edge_width(slide_layer) -> float:
    """Start ROI outline width in data units (level-0 px), until :class:`ZoomFollower`
    keeps it :data:`ROI_OUTLINE_PX` screen pixels wide."""
    h0, w0 = _level_shapes(slide_layer)[0]
    return max(2.0, max(h0, w0) / 4000.0)


def _level_shapes(layer) -> list[tuple[int, int]]:
    levels = layer.data if layer.multiscale else [layer.data]
    return [(int(d.shape[0]), int(d.shape[1])) for d in levels]


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
        self.controller = RoiController()
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
        controller = self.controller
        self._outlines = outlines = ZoomFollower(viewer)  # thin outlines at every zoom
        self.native.destroyed.connect(lambda *_: (_flush_sessions(controller), outlines.close()))
        _widgets.add(self)
        self._on_slide_changed(self.slide.value)
        QTimer.singleShot(0, self._watch_window)  # docked by then

    # ------------------------------------------------------------------ choices

    def _slide_choices(self, _widget=None) -> list[tuple[str, object]]:
        return [(layer.name, layer) for layer in slide_layers(self._viewer)]

    def _label_choices(self, _widget=None) -> list[str]:
        return list(self.controller.label_names)

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
        if not _same(self.slide.value, current):
            self._on_slide_changed(self.slide.value)

    # ------------------------------------------------------------------ sessions

    @property
    def _sessions(self) -> dict[str, RoiSession]:
        return self.controller.sessions

    @property
    def session(self) -> RoiSession | None:
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
        return slide_key(_layer_path(layer), layer.name)

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

    def activate(self, layer) -> RoiSession:
        """Start (or resume) annotating ``layer``: its ROI layer, loaded from its ROI file."""
        session = self._sessions.get(self._key(layer))
        if session is None:
            session = self._open_session(layer)
        self._watch_window()
        self._viewer.layers.selection.active = session.shapes
        self._apply_label(self.label.value, relabel_selection=False)
        return session

    def _open_session(self, layer) -> RoiSession:
        session = self.controller.open(
            layer.name,
            _layer_path(layer),
            level0_frame(layer),
            _level_shapes(layer),
            tuple(str(u) for u in layer.units[-2:]),
        )
        key = session.key
        session.shapes = self._existing_layer(key, Shapes)
        session.labels = self._existing_layer(key, Labels)
        if session.labels is not None:
            session.labels_downsample = tuple(session.labels.metadata["downsample"])
            session.label_names = {
                int(k): v for k, v in session.labels.metadata.get("label_names", {}).items()
            }
        if session.answer_key_path is not None:
            session.answer_key = self._existing_layer(key, Shapes, ANSWER_KEY_METADATA)
            if session.answer_key is None:
                session.answer_key = self._answer_key_layer(layer, session.answer_key_path)
        message = session.where()
        if session.shapes is None:
            existing = self.controller.read_existing(session)
            if existing.error is not None:
                show_error(existing.error)
            if existing.warning is not None:
                show_warning(existing.warning)
            loaded = existing.annotations
            session.shapes = self._new_shapes_layer(layer, loaded)
            session.remember(loaded, *annotations_to_shapes(loaded))
            message = message if existing.note is None else existing.note + "."
        for name in session.shapes.features.get(LABEL_FEATURE, []):
            self._add_label_name(name)
        self._connect(session)
        self.status.value = message
        if session.fallback:
            show_info(
                f"napari-zoomin: ROI annotations of {layer.name} are saved to {session.sidecar}."
            )
        return session

    def _existing_layer(self, key: str, kind: type, metadata_key: str = ROI_METADATA):
        for lay in self._viewer.layers:
            if isinstance(lay, kind) and lay.metadata.get(metadata_key) == key:
                return lay
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
            metadata={
                ANSWER_KEY_METADATA: self._key(slide_layer),
                "path": str(path),
                SCREEN_WIDTH_KEY: ROI_OUTLINE_PX / 2,  # thinner than the user's ROIs
            },
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
            metadata={ROI_METADATA: self._key(slide_layer), SCREEN_WIDTH_KEY: ROI_OUTLINE_PX},
        )
        layer.current_edge_color = _rgba(self.label.value)
        layer.current_face_color = "transparent"
        self._viewer.add_layer(layer)
        return layer

    def _connect(self, session: RoiSession) -> None:
        """Every edit of the session's layers schedules a save."""
        session.shapes.events.data.connect(self._on_layer_edited)
        session.shapes.events.features.connect(self._on_layer_edited)
        if session.labels is not None:
            session.labels.events.paint.connect(self._on_layer_edited)
            session.labels.events.data.connect(self._on_layer_edited)

    def _session_of(self, layer) -> RoiSession | None:
        return self.controller.session_of(layer, _same)

    def _on_layer_edited(self, event) -> None:
        session = self._session_of(event.source)
        if session is not None:
            self._schedule(session)

    def _on_layer_removing(self, event) -> None:
        """Save before an ROI layer goes; painted regions live on as shapes."""
        layer = self._viewer.layers[event.index]
        session = self._session_of(layer)
        if session is None:
            return
        if _same(layer, session.labels):
            painted = session.painted()
            session.labels = None
            if painted:
                self._add_shapes(session, painted)  # scheduled to be saved
            return
        self._save(session)
        self.controller.close(session)
        if session.labels is not None:
            session.labels.metadata.pop(ROI_METADATA, None)

    # ------------------------------------------------------------------ labels

    def _add_label_name(self, name: str) -> None:
        if self.controller.add_label_name(name):
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

    def _label_value(self, session: RoiSession, name: str) -> int:
        """The labels-layer value painting ``name`` (a new value for a new label)."""
        value, new = self.controller.label_value(session, name)
        if new and session.labels is not None:
            session.labels.metadata["label_names"] = dict(session.label_names)
            session.labels.colormap = self._labels_colormap(session)
        return value

    def _labels_colormap(self, session: RoiSession) -> DirectLabelColormap:
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

    def _add_shapes(self, session: RoiSession, annotations: list[Annotation]) -> None:
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

    def _schedule(self, session: RoiSession) -> None:
        self.controller.mark(session)
        self._timer.start()

    def flush(self) -> None:
        """Save every slide with unsaved changes now."""
        self._timer.stop()
        for session in self.controller.pending():
            self._save(session)

    def _save(self, session: RoiSession) -> Path | None:
        saved = self.controller.save(session)
        _show_saved(saved)
        if saved.status is not None:
            with contextlib.suppress(RuntimeError):  # the widget is being deleted; it saved
                self.status.value = saved.status
        return saved.path

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
        return destination(_layer_path(layer), layer.name)[0]


def _show_saved(saved: Saved) -> None:
    if saved.error is not None:
        show_error(saved.error)


def _flush_sessions(controller: RoiController) -> None:
    """Save unsaved sessions (the widget is going away; its timer with it)."""
    for session in controller.pending():
        _show_saved(controller.save(session))
