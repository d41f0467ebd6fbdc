"""``Classify slide``: run the engine on a slide layer and show where the model looked.

The widget holds no model logic and little state: :class:`~.classify_controller.
ClassifyController` (Qt-free) keeps the loaded checkpoints, each slide's result and the
cancel flag, and says what to show; the widget gathers the inputs, runs the controller's
:meth:`~.classify_controller.ClassifyController.run` in a napari worker (progress bar, Cancel),
and renders the returned :class:`~napari_zoomin.engine.results.Result` with
:mod:`.result_layers` (seven layers on the slide; three for a MagNet), a summary and a
table of the places the evidence came from (:func:`napari_zoomin.engine.places.places`):
selecting one zooms there and thickens its outline.  Export writes the engine's files
(:func:`~napari_zoomin.engine.results.write_outputs`) and the ``ROI annotations`` layer
as QuPath GeoJSON.

Several slides.  Results are kept per slide: each slide's result layers sit directly
above it in the layer list, on its scale and translate; classifying another slide
leaves them in place, re-classifying a slide replaces only its own.  The latest
result's layers have the bare names (``stage-1 attention``, …), an earlier result of
another slide has its slide's name appended (``stage-1 attention [slide-a]``,
:func:`~.result_layers.result_layer_name`).  The Slide list follows the active layer
(a slide, or one of its result layers), and the summary, table and Export follow the
chosen slide.  "Edit tissue
mask" shows the engine's tissue mask as a labels layer; while that layer exists, its
(possibly edited) pixels are the sampling mask of the next classification.

MagNets (002).  A MagNet's result gets the ``magnified regions`` layer (its boxes,
coloured by depth, with a colour legend under the summary), and instead of places the
table lists the patches its classifier read, in order, above a small plot of the
predicted class's probability after each patch (:class:`ProbabilityTracePlot`, 002
figure 5); choosing a patch in either zooms to it and thickens its outline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from qtpy.QtCore import QObject, QPointF, Qt, Signal, Slot
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from ..errors import ZoominError
from .classify_controller import (
    EMPTY_TABLE,
    ClassifyController,
    Job,
    Outcome,
    ResultSet,
    TableView,
    trace_values,
)
from .model_choices import DEMO, known_models, on_models_changed
from .result_layers import (
    LAYER_KEY,
    MAGNIFIED_LAYER,
    MAX_PLACES,
    PATCH_COLOR,
    PLACES_LAYER,
    RESULT_KEY,
    TISSUE_LAYER,
    tissue_layer_data,
)
from .slide_layers import layer_slide, level0_frame, slide_layers
from .zoom_follow import ZoomFollower, set_screen_width

if TYPE_CHECKING:
    import napari

    from ..engine.results import Result

__all__ = ["ClassifyWidget", "ProbabilityTracePlot"]

log = logging.getLogger(__name__)

#: rows of the "where the evidence is" table: every place, up to this many
TOP_PLACES = MAX_PLACES
ROI_EXPORT_NAME = "roi_annotations.geojson"
PLACES_HEADING = "Where the evidence is (select one to go there):"
PATCHES_HEADING = "Patches in the order the classifier read them (select one to go there):"


def _model_label(model: str) -> str:
    if model == DEMO:
        return "demo (packaged)"
    path = Path(model)
    return f"{path.name} ({path.parent})"


def _level0_shape(layer) -> tuple[int, int]:
    data = layer.data[0] if layer.multiscale else layer.data
    return int(data.shape[0]), int(data.shape[1])


class _Relay(QObject):
    """Carries calls from worker threads (and model registrations) to the GUI thread.

    It lives in the GUI thread, so a signal emitted anywhere is delivered there (queued).
    """

    progressed = Signal(float, str)
    models_changed = Signal()

    def __init__(self, on_progress, on_models_changed):
        super().__init__()
        self._on_progress = on_progress
        self._on_models_changed = on_models_changed
        self.progressed.connect(self._deliver_progress)
        self.models_changed.connect(self._deliver_models)

    @Slot(float, str)
    def _deliver_progress(self, fraction: float, message: str) -> None:
        self._on_progress(fraction, message)

    @Slot()
    def _deliver_models(self) -> None:
        self._on_models_changed()


class ProbabilityTracePlot(QWidget):
    """A MagNet's probability of the predicted class after each patch it read (002
    figure 5): one dot per patch on a [0, 1] axis, painted with QPainter as the Train
    widget's plot; the chosen patch is ringed, and a click on a dot calls
    ``on_pick(index)``."""

    LINE_COLOUR = QColor(PATCH_COLOR)

    def __init__(self, on_pick=None, parent: QWidget | None = None):
        super().__init__(parent)
        self.values: list[float] = []
        self.label = ""
        self.selected: int | None = None
        self._on_pick = on_pick
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_trace(self, values: list[float], label: str) -> None:
        self.values, self.label, self.selected = [float(v) for v in values], label, None
        self.setToolTip(
            f"p {label} after each patch the classifier read (left: after the first; "
            "right: the prediction). Click a dot to go to its patch."
        )
        self.update()

    def select(self, index: int | None) -> None:
        self.selected = index
        self.update()

    def _box(self) -> tuple[float, float, float, float]:
        return 30.0, 6.0, max(self.width() - 40.0, 1.0), max(self.height() - 24.0, 1.0)

    def point(self, index: int) -> QPointF:
        """Where the dot of patch ``index`` is drawn (widget pixels)."""
        left, top, width, height = self._box()
        n = len(self.values)
        x = left + (width * index / (n - 1) if n > 1 else width / 2)
        v = min(max(self.values[index], 0.0), 1.0)
        return QPointF(x, top + height * (1.0 - v))

    def mousePressEvent(self, event) -> None:
        if not self.values or self._on_pick is None:
            return
        x = event.position().x() if hasattr(event, "position") else event.x()
        nearest = min(range(len(self.values)), key=lambda i: abs(self.point(i).x() - x))
        self._on_pick(nearest)

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        left, top, width, height = self._box()
        painter.setPen(QPen(self.palette().mid().color(), 1))
        painter.drawRect(int(left), int(top), int(width), int(height))
        half = QPen(self.palette().mid().color(), 1)
        half.setStyle(Qt.PenStyle.DashLine)
        painter.setPen(half)
        painter.drawLine(QPointF(left, top + height / 2), QPointF(left + width, top + height / 2))
        text = self.palette().text().color()
        painter.setPen(text)
        painter.drawText(4, int(top + 10), "1")
        painter.drawText(4, int(top + height), "0")
        n = len(self.values)
        painter.drawText(int(left), self.height() - 4, f"p {self.label} after each of {n} patches")
        if n:
            points = QPolygonF([self.point(i) for i in range(n)])
            painter.setPen(QPen(self.LINE_COLOUR, 2))
            painter.drawPolyline(points)
            painter.setBrush(self.LINE_COLOUR)  # solid dots
            for i in range(n):
                painter.drawEllipse(self.point(i), 2.5, 2.5)
            painter.setBrush(Qt.BrushStyle.NoBrush)
            if self.selected is not None and 0 <= self.selected < n:
                painter.setPen(QPen(text, 2))
                painter.drawEllipse(self.point(self.selected), 6.0, 6.0)
        painter.end()


class ClassifyWidget(Container):
    """Dock widget: inputs, Classify/Cancel, progress, result summary, places table."""

    def __init__(self, viewer: napari.viewer.Viewer):
        from ..engine.runtime import available_devices  # torch, once the widget is made

        super().__init__(labels=False)
        self.viewer = viewer
        self.controller = ClassifyController()  # state and logic; this class binds Qt
        self._worker = None
        self._browsed: list[str] = []
        self._relay = _Relay(self._on_progress, self._refresh_models)

        self.slide_choice = ComboBox(label="Slide", choices=self._slide_choices)
        self.model_choice = ComboBox(label="Model", choices=self._model_choices, value=DEMO)
        self.browse_button = PushButton(text="Choose checkpoint…")
        self.draws = SpinBox(label="Draws (K)", value=16, min=1, max=1024)
        self.seed = SpinBox(label="Seed", value=0, min=0, max=2**31 - 1)
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.classify_button = PushButton(text="Classify slide")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(min=0, max=100, value=0)
        self.status = Label(value="")
        self.summary = Label(value="")  # the prediction, first
        self.warnings = Label(value="")  # reasons to doubt it, right below (Result.warnings)
        self.details = Label(value="")  # probabilities, cost, what was looked at
        self.legend = Label(value="")  # a MagNet's: the magnified regions' colours
        self.trace_plot = ProbabilityTracePlot(on_pick=self.select_row)
        self.table_heading = Label(value=PLACES_HEADING)
        self._places: list = []  # the table's rows' places (engine.places.Place) or boxes
        self._table_kind = "places"
        self.place_table = Table(value={"data": [], "index": [], "columns": EMPTY_TABLE.columns})
        self.export_button = PushButton(text="Export…", enabled=False)
        self.tissue_button = PushButton(text="Edit tissue mask")

        form = Container(
            widgets=[self.slide_choice, self.model_choice, self.draws, self.seed, self.device],
            labels=True,
        )
        self.extend(
            [
                form,
                self.browse_button,
                Container(
                    widgets=[self.classify_button, self.cancel_button],
                    layout="horizontal",
                    labels=False,
                ),
                self.progress,
                self.status,
                self.summary,
                self.warnings,
                self.details,
                self.legend,
                self.table_heading,
                self.place_table,
                Container(
                    widgets=[self.export_button, self.tissue_button],
                    layout="horizontal",
                    labels=False,
                ),
            ]
        )
        for label in (self.status, self.summary, self.warnings, self.details, self.legend):
            label.native.setWordWrap(True)  # long paths wrap, never widen the dock
            label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.summary.native.setStyleSheet("font-weight: bold;")
        self.warnings.native.setStyleSheet(f"color: {_warning_colour(viewer)};")
        self.warnings.visible = False
        self.legend.visible = False
        # the trace plot goes right above the table (a MagNet's result only)
        layout = self.native.layout()
        layout.insertWidget(layout.indexOf(self.place_table.native), self.trace_plot)
        self.trace_plot.setVisible(False)
        self._setup_table()

        self.classify_button.changed.connect(self.classify)
        self.cancel_button.changed.connect(self.cancel)
        self.browse_button.changed.connect(self._browse_checkpoint)
        self.export_button.changed.connect(self._export_dialog)
        self.tissue_button.changed.connect(self.edit_tissue_mask)
        for event in (
            viewer.layers.events.inserted,
            viewer.layers.events.removed,
            viewer.layers.events.moved,
        ):
            event.connect(self._refresh_slides)
        viewer.layers.events.removed.connect(self._forget_removed)
        viewer.layers.selection.events.active.connect(self._follow_active)
        self.slide_choice.changed.connect(self._show_chosen)
        self._disconnect_models = on_models_changed(self._models_registered)
        self._outlines = ZoomFollower(viewer)  # thin outlines at every zoom
        disconnect, outlines = self._disconnect_models, self._outlines  # not self: going away
        self.native.destroyed.connect(lambda *_: (disconnect(), outlines.close()))
        self._refresh_slides()
        # load and warm the chosen model while the user opens a slide
        self.model_choice.changed.connect(self._warm_up)
        self.device.changed.connect(self._warm_up)
        self._warm_up()

    def _warm_up(self, _value=None) -> None:
        """Warm the chosen model in a background thread (:meth:`ClassifyController.warm`)."""
        from napari.qt.threading import create_worker

        model, device = self.model_choice.value, self.device.value
        if model is None or device is None:
            return
        create_worker(self.controller.warm, model, device, _start_thread=True)  # never raises

    @property
    def result(self) -> Result | None:
        """The result the summary, table and Export show (the chosen slide's)."""
        shown = self.controller.shown
        return None if shown is None else shown.result

    @property
    def _result_frame(self):
        shown = self.controller.shown
        return None if shown is None else shown.frame

    @property
    def _result_slide(self):
        shown = self.controller.shown
        return None if shown is None else shown.slide

    # ------------------------------------------------------------------ choices
    def _slide_choices(self, _widget=None) -> list[tuple[str, Any]]:
        """Image layers that can be slides: not our own attention maps."""
        return [
            (layer.name, layer)
            for layer in slide_layers(self.viewer)
            if RESULT_KEY not in layer.metadata
        ]

    def _refresh_slides(self, _event=None) -> None:
        """Follow layers added/removed; keep the choice, else the active image, else the first."""
        previous = self.slide_choice.value
        self.slide_choice.reset_choices()
        layers = [layer for _, layer in self._slide_choices()]
        if layers and not any(layer is previous for layer in layers):
            active = self.viewer.layers.selection.active
            self.slide_choice.value = next((lay for lay in layers if lay is active), layers[0])
        self._update_buttons()

    def _follow_active(self, event=None) -> None:
        """Choose the active layer's slide: the layer itself, or its result layers' slide."""
        active = self.viewer.layers.selection.active
        if active is None:
            return
        slide = self.controller.slide_of(active)
        offered = any(layer is slide for _, layer in self._slide_choices())
        if offered and self.slide_choice.value is not slide:
            self.slide_choice.value = slide

    def _forget_removed(self, event) -> None:
        if self.controller.forget(event.value) and not self.running:
            self._show_chosen()

    def _show_chosen(self, _value=None) -> None:
        """Show the chosen slide's result (summary, table, Export), or none."""
        if self.running:
            return
        chosen = self.slide_choice.value
        rs = self.controller.set_of(chosen) if chosen else None
        if rs is not None and rs is self.controller.shown:
            return
        self._display(rs)
        self._update_buttons()

    def _display(self, rs: ResultSet | None) -> None:
        self.controller.shown = rs
        if rs is None:
            for label in (self.summary, self.details, self.warnings):
                label.value = ""
            self.warnings.visible = False
            self._show_magnet(None)
            self._show_table(EMPTY_TABLE)
            return
        text = self.controller.text(rs.result)
        self.summary.value = text.prediction
        self.details.value = text.details
        self.warnings.value = text.warnings
        self.warnings.visible = bool(text.warnings)
        self._show_magnet(rs.result)
        self._show_table(self.controller.table(rs.result, TOP_PLACES))

    def _show_magnet(self, result: Result | None) -> None:
        """A MagNet's colour legend and probability trace; hidden for the other kinds."""
        legend = self.controller.legend(result) if result is not None else []
        self.legend.value = "magnified regions: " + ", ".join(
            f'<span style="color:{colour}">&#9632;</span> {words}' for words, colour in legend
        )
        self.legend.visible = bool(legend)
        values = trace_values(result) if legend else []
        self.trace_plot.set_trace(values, result.label if result is not None else "")
        self.trace_plot.setVisible(bool(values))

    def _model_choices(self, _widget=None) -> list[tuple[str, str]]:
        models = known_models()
        models += [p for p in self._browsed if p not in models]
        return [(_model_label(m), m) for m in models]

    def _models_registered(self, _choices) -> None:
        """Called by :func:`register_model`, possibly from a worker thread: go via Qt."""
        try:
            self._relay.models_changed.emit()
        except RuntimeError:  # the widget is gone
            self._disconnect_models()

    def _refresh_models(self) -> None:
        self.model_choice.reset_choices()

    def choose_checkpoint(self, path: str | Path) -> bool:
        """Add a checkpoint file to the model list and select it, if it loads.

        The file is loaded (and cached) now for the selected device, so a damaged file
        is reported when chosen, not after a click on Classify.
        """
        path = str(Path(path).expanduser().resolve())
        try:
            self.controller.checkpoint(path, self.device.value)
        except ZoominError as exc:
            _show_error(str(exc))
            return False
        if path not in self._browsed:
            self._browsed.append(path)
        self.model_choice.reset_choices()
        self.model_choice.value = path
        return True

    def _browse_checkpoint(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(
            self.native,
            "Choose a napari-zoomin checkpoint",
            "",
            "napari-zoomin checkpoints (*.safetensors);;All files (*)",
        )
        if path:
            self.choose_checkpoint(path)

    # ------------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        """True from Classify until the result is shown (or cancelled, or failed)."""
        return self.controller.busy

    def _update_buttons(self) -> None:
        has_slide = self.slide_choice.value is not None
        self.classify_button.enabled = has_slide and not self.running
        self.tissue_button.enabled = has_slide
        self.cancel_button.enabled = self._worker is not None
        self.export_button.enabled = self.result is not None and not self.running
        if not has_slide and not self.running:
            self.status.value = "Open a slide (File > Open, or File > Open Sample) to classify it."
        elif self.status.value.startswith("Open a slide"):
            self.status.value = ""

    def _tissue_labels_for(self, layer) -> np.ndarray | None:
        """A copy of the ``tissue mask`` layer's pixels if it was made for ``layer``."""
        from napari.layers import Labels

        if TISSUE_LAYER not in self.viewer.layers:
            return None
        tissue = self.viewer.layers[TISSUE_LAYER]
        meta = tissue.metadata.get("napari_zoomin_tissue") if isinstance(tissue, Labels) else None
        if not meta or meta.get("slide_layer") != layer.name:
            return None
        if tuple(meta.get("level0_shape", ())) != _level0_shape(layer):
            return None
        return np.array(tissue.data, copy=True)

    def classify(self) -> None:
        """Start classifying the chosen slide in a worker thread."""
        if self.running:
            return
        layer = self.slide_choice.value
        if layer is None:
            _show_warning("No slide to classify: open a slide (File > Open) first.")
            return
        from napari.qt.threading import create_worker

        job = Job(
            slide=layer,
            open_slide=lambda: layer_slide(layer),
            frame=level0_frame(layer),
            model=self.model_choice.value,
            device=self.device.value,
            draws=int(self.draws.value),
            seed=int(self.seed.value),
            tissue=self._tissue_labels_for(layer),
        )
        self.controller.cancel_event.clear()
        self.progress.value = 0
        mask = " with the edited tissue mask" if job.tissue is not None else ""
        self.status.value = f"Classifying {layer.name}{mask}…"
        worker = create_worker(self._run, job, _start_thread=False)
        worker.returned.connect(lambda outcome: self._finished(outcome, job))
        worker.errored.connect(lambda _exc: self._done())  # only BaseException gets here
        self._worker = worker
        self.controller.busy = True
        self._update_buttons()
        worker.start()

    def cancel(self) -> None:
        """Ask the running classification to stop at its next step."""
        if self._worker is not None:  # not once the result is being shown
            self.controller.cancel_event.set()
            self.status.value = "Cancelling…"

    def _run(self, job: Job) -> Outcome:
        """The worker: the controller's run, then the result layers built here too
        (napari layers are plain Python objects; only adding them needs the GUI thread,
        and building Shapes layers is slow)."""
        from napari.layers import Layer

        outcome = self.controller.run(job, self._relay.progressed.emit)
        if outcome.layer_data is not None:
            units = tuple(job.slide.units[-2:])
            try:
                outcome.layers = [
                    Layer.create(data, {**kwargs, "units": units}, kind)
                    for data, kwargs, kind in outcome.layer_data
                ]
            except Exception as exc:  # a bug: said plainly, traceback in the log
                log.exception("building the result layers failed")
                return Outcome(error=f"showing the result failed ({type(exc).__name__}: {exc}).")
        return outcome

    def _on_progress(self, fraction: float, message: str) -> None:
        if self.running and not self.controller.cancel_event.is_set():
            self.progress.value = round(100 * fraction)
            self.status.value = message

    def _finished(self, outcome: Outcome, job: Job) -> None:
        self._worker = None
        self.cancel_button.enabled = False
        if outcome.cancelled:
            self.progress.value = 0
            self.status.value = "Classification cancelled."
            self._done()
        elif outcome.error is not None:
            self.progress.value = 0
            self.status.value = "Classification failed (see the notification)."
            _show_error(outcome.error)
            self._done()
        else:
            self._show_result(outcome.result, outcome.layers, job)

    def _done(self) -> None:
        self._worker = None
        self.controller.busy = False
        self._update_buttons()

    # ------------------------------------------------------------------ result
    def _show_result(self, result: Result, layers: list, job: Job) -> None:
        """Replace the slide's earlier result layers (keeping their visibility and
        opacity), rename other slides' bare-named layers to carry their slide's name,
        and add these directly above the slide."""
        old, rs = self.controller.replace(job.slide, result, job.frame)
        kept: dict[str, tuple[bool, float]] = {}
        for lay in old.layers if old is not None else []:
            kept[lay.metadata.get(LAYER_KEY, lay.name)] = (lay.visible, lay.opacity)
            if lay in self.viewer.layers:
                self.viewer.layers.remove(lay)
        for new in layers:
            if new.metadata.get(LAYER_KEY) in kept:
                new.visible, new.opacity = kept[new.metadata[LAYER_KEY]]
        self._display(rs)
        self.status.value = "Adding the result layers…"

        def shown() -> None:
            self.progress.value = 100
            self.status.value = f"Classified {job.slide.name}."
            self._done()

        self._add_gradually(list(layers), shown, rs)

    def _add_gradually(self, layers: list, then, rs: ResultSet) -> None:
        """Add one layer per turn of the Qt event loop, then call ``then``: napari spends
        ~0.3 s of GUI time on each new layer, and the viewer should not freeze for all.
        Each goes right above the set's previous layer (the first right above the slide)."""
        from qtpy.QtCore import QTimer

        if not layers:
            then()
            return
        new = layers[0]
        below = rs.layers[-1] if rs.layers else rs.slide
        rs.layers.append(new)  # first: inserting makes it active, and the Slide list follows
        if below in self.viewer.layers:
            self.viewer.layers.insert(self.viewer.layers.index(below) + 1, new)
        else:
            self.viewer.layers.append(new)
        QTimer.singleShot(0, lambda: self._add_gradually(layers[1:], then, rs))

    def _put_layers(self, layers: list) -> None:
        """Add layers, replacing a layer of the same name in place (same position,
        visibility and opacity), so a re-run never stacks duplicates."""
        for new in layers:
            name = new.name
            if name in self.viewer.layers:
                old = self.viewer.layers[name]
                new.visible, new.opacity = old.visible, old.opacity
                index = self.viewer.layers.index(old)
                self.viewer.layers.remove(old)
                self.viewer.layers.insert(index, new)
            else:
                self.viewer.layers.append(new)

    def _setup_table(self) -> None:
        from qtpy.QtWidgets import QAbstractItemView, QStyledItemDelegate

        table = self.place_table.native
        # magicgui's delegate re-formats every number-like cell to 4 decimals
        # ("3058.9000"); the controller already wrote each cell as it should read
        table.setItemDelegate(QStyledItemDelegate(table))
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        table.verticalHeader().setVisible(False)
        table.itemSelectionChanged.connect(self._on_table_selection)

    def _show_table(self, table: TableView) -> None:
        self._places = list(table.places)
        self._table_kind = table.kind
        self.table_heading.value = PATCHES_HEADING if table.kind == "patches" else PLACES_HEADING
        self.place_table.value = {"data": table.rows, "index": [], "columns": table.columns}
        self.place_table.native.resizeColumnsToContents()

    def _on_table_selection(self) -> None:
        rows = self.place_table.native.selectionModel().selectedRows()
        if rows:
            self.show_place(rows[0].row())

    def select_row(self, index: int) -> None:
        """Select row ``index`` of the table (which zooms there: :meth:`show_place`)."""
        if 0 <= index < len(self._places):
            self.place_table.native.selectRow(index)

    def show_place(self, index: int) -> None:
        """Zoom to place ``index`` (0 = most evidence; for a MagNet, patch ``index`` in
        reading order): its box fills most of the canvas, never magnified past full
        resolution; its outline thickens (and the trace marks the patch)."""
        if self.result is None or not 0 <= index < len(self._places):
            return
        place = self._places[index]
        centre, zoom = self.controller.place_camera(place, self.viewer.canvas.size)
        camera = self.viewer.scene.camera
        camera.center = centre
        camera.zoom = zoom
        if self._table_kind == "patches":
            self.trace_plot.select(index)
            self._highlight(index + 1, MAGNIFIED_LAYER, "patch")
        else:
            self._highlight(place.rank, PLACES_LAYER, "rank")

    def _highlight(self, key: int, name: str, feature: str) -> None:
        """Thicken the outline of the shape whose ``feature`` is ``key`` in the layer
        ``name`` (if it is this result's) to :data:`PLACE_HIGHLIGHT` times the others,
        on screen."""
        rs = self.controller.shown
        layer = next(
            (lay for lay in (rs.layers if rs else []) if lay.metadata.get(LAYER_KEY) == name),
            None,
        )
        if layer is None or layer.metadata.get(RESULT_KEY) is not self.result or not layer.nshapes:
            return
        widths = self.controller.highlight_widths(list(layer.features[feature]), key)
        set_screen_width(layer, widths, self.viewer.scene.camera.zoom)

    # ------------------------------------------------------------------ export
    def _export_dialog(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Export the result to a folder")
        if folder:
            self.export(folder)

    def _roi_layer(self):
        """The ROI shapes layer of the classified slide: the one the ``ROI annotations``
        widget tied to it (metadata), else an untied layer named ``ROI annotations``."""
        from napari.layers import Shapes

        from .roi_shapes import ROI_LAYER_NAME
        from .roi_widget import ROI_METADATA

        slide = self._result_slide
        path = slide.metadata.get("path") or getattr(slide.source, "path", None)
        key = str(Path(path).resolve()) if path else f"layer:{slide.name}"
        shapes = [layer for layer in self.viewer.layers if isinstance(layer, Shapes)]
        tied = [layer for layer in shapes if layer.metadata.get(ROI_METADATA) == key]
        untied = [
            layer
            for layer in shapes
            if layer.name == ROI_LAYER_NAME and ROI_METADATA not in layer.metadata
        ]
        return (tied + untied or [None])[0]

    def roi_annotations(self):
        """The classified slide's ROI shapes as annotations in level-0 pixels, if any."""
        from .roi_shapes import LABEL_FEATURE, RINGS_FEATURE, shapes_to_annotations

        layer = self._roi_layer() if self._result_slide is not None else None
        if layer is None or len(layer.data) == 0:
            return []
        features = layer.features
        labels = (
            list(features[LABEL_FEATURE]) if LABEL_FEATURE in features else [""] * len(layer.data)
        )
        rings = list(features[RINGS_FEATURE]) if RINGS_FEATURE in features else None
        annotations, _ = shapes_to_annotations(
            layer.data,
            layer.shape_type,
            labels,
            layer_scale=layer.scale,
            layer_translate=layer.translate,
            frame=self._result_frame,
            rings=rings,
        )
        return annotations

    def export(self, folder: str | Path) -> dict[str, Path]:
        """Write result.json, the attention maps (pyramidal OME-TIFF), sampled.geojson,
        places.geojson and,
        when there is an ``ROI annotations`` layer, roi_annotations.geojson into ``folder``."""
        from ..annotations import write_geojson
        from ..engine.results import write_outputs

        if self.result is None:
            _show_warning("Nothing to export yet: classify a slide first.")
            return {}
        out = Path(folder)
        try:
            out.mkdir(parents=True, exist_ok=True)
            written: dict[str, Path] = {}
            rois = self.roi_annotations()
            if rois:
                written["rois"] = write_geojson(out / ROI_EXPORT_NAME, rois)
            written.update(write_outputs(self.result, out))  # result.json last
        except OSError as exc:
            _show_error(
                f"{out}: cannot write the result there ({exc.strerror or exc}). "
                "Choose a folder you can write to."
            )
            return {}
        from napari.utils.notifications import show_info

        names = ", ".join(p.name for p in written.values())
        show_info(f"Exported {names} to {out}")
        self.status.value = f"Exported to {out}"
        return written

    # ------------------------------------------------------------------ tissue
    def edit_tissue_mask(self) -> None:
        """Show the engine's tissue mask of the chosen slide as a paintable labels layer.

        An existing ``tissue mask`` layer for the same slide is kept (it may hold edits)
        and selected; delete it to start again from the detected mask.
        """
        layer = self.slide_choice.value
        if layer is None:
            _show_warning("No slide: open a slide (File > Open) first.")
            return
        if self._tissue_labels_for(layer) is None:
            from ..engine.tissue import detect_tissue

            try:
                with layer_slide(layer) as slide:
                    mask = detect_tissue(slide)
            except ZoominError as exc:
                _show_error(str(exc))
                return
            from napari.layers import Layer

            data, kwargs, kind = tissue_layer_data(mask, level0_frame(layer), layer.name)
            self._put_layers([Layer.create(data, {**kwargs, "units": layer.units[-2:]}, kind)])
        tissue = self.viewer.layers[TISSUE_LAYER]
        self.viewer.layers.selection.active = tissue
        self.status.value = (
            "Tissue mask: paint (label 1) to add tissue, erase to exclude it. The next "
            "classification of this slide samples only there; delete the layer to go back "
            "to automatic detection."
        )


def _warning_colour(viewer) -> str:
    """The viewer theme's warning colour (amber in napari's themes)."""
    try:
        from napari.utils.theme import get_theme

        return str(get_theme(viewer.theme).warning.as_hex())
    except Exception:  # a theme without one
        return "#e3b617"


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(f"napari-zoomin: {message}")


def _show_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(f"napari-zoomin: {message}")
