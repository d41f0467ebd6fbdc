"""``Train classifier``: train an attention-sampling model from napari, off the GUI thread.

The widget binds the form to :class:`~.train_controller.TrainController`, which holds
the state and logic (the settings → ``TrainConfig`` rule, the data, the resume plan,
what each progress event shows, the worker's body) and calls the engine
(:func:`napari_zoomin.training.train`).  Data come from a slides folder and a labels
CSV (as ``zoomin train``) or from the slides open in the viewer with a label typed per
slide, written to ``<model>.labels.csv`` beside the checkpoint so the run is
reproducible and recorded in it.  ROI masks come from each slide's ROI file, the one
``ROI annotations`` saves.  Training runs in a napari worker with a progress bar, a
live plot of loss and validation accuracy per epoch and a Cancel button (effective at
the next step; the checkpoints stay).  A run interrupted with the same settings is
resumed.  The trained model becomes selectable in ``Classify slide``
(:mod:`.model_choices`).

The settings' widgets are made by magicgui from ``TrainConfig``'s fields (type and
default) and :data:`~napari_zoomin.train_settings.TRAIN_SETTINGS` (label, tooltip,
range), so the form, ``zoomin train`` and the config's checks share one table.
Layout: the form scrolls (napari's dock area does not), its rarely changed settings
folded under "Advanced settings", with Train, Cancel and the progress bar pinned below
it, so the dock fits a 1600 x 1000 screen beside ``Classify slide``.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    RadioButtons,
    Widget,
    create_widget,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, QPointF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy, QWidget

from ..engine.runtime import available_devices
from ..errors import ZoominError
from ..paths import user_data_dir
from ..train_settings import TRAIN_SETTINGS
from ..training import TrainConfig, TrainEvent, TrainResult
from .model_choices import register_model
from .slide_layers import _layer_path, slide_layers
from .train_controller import (
    ADVANCED_SETTINGS,
    FROM_FOLDER,
    FROM_VIEWER,
    MAIN_SETTINGS,
    MODEL_KINDS,
    OTHER_SETTINGS_TOOLTIP,
    PROGRESS_STEPS,
    SPLIT_CHOICES,
    VAL_FRACTION,
    Failure,
    Finished,
    Form,
    PlotPoint,
    Shown,
    Split,
    TrainController,
    config_from_form,
    form_value,
    kind_switch,
    output_path,
    run_job,
    saved_run_note,
    unused_settings,
)

if TYPE_CHECKING:
    import napari

__all__ = ["FROM_FOLDER", "FROM_VIEWER", "MODEL_KINDS", "LossAccuracyPlot", "TrainWidget"]

_Split = Split  # the worker's first report (tests feed it to _on_progress)
#: the least height of the scrolling part (the form): with Train and the progress bar
#: below it, the dock fits a 1000-px-high screen beside Classify slide
_SCROLL_MIN_HEIGHT = 220
#: the form's attribute of each setting whose name differs from its field's
_ATTRIBUTES = {"contrastive_warmup_epochs": "warmup"}
_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def setting_widget(name: str, choices=None) -> Widget:
    """The magicgui widget of a ``TrainConfig`` field: its type and default from the
    dataclass, its label, tooltip and range from ``TRAIN_SETTINGS``."""
    setting = TRAIN_SETTINGS[name]
    value = form_value(name)
    options: dict = {"tooltip": setting.tooltip}
    if setting.entry == "spin":
        options.update(min=int(setting.low), max=int(setting.high))
        return create_widget(
            value, annotation=_FIELD_TYPES[name], name=name, label=setting.label, options=options
        )
    if setting.entry == "check":
        widget = create_widget(
            value,
            annotation=_FIELD_TYPES[name],
            name=name,
            options={**options, "text": setting.label},
        )
        widget.label = ""  # the box says it
        return widget
    if setting.entry == "choice":
        options["choices"] = choices
        return create_widget(
            value, name=name, label=setting.label, widget_type="ComboBox", options=options
        )
    return create_widget(
        value,
        annotation=str,
        name=name,
        label=setting.label,
        widget_type="LineEdit",
        options=options,
    )


class LossAccuracyPlot(QWidget):
    """Training loss, validation accuracy and, where ROIs are known, the shares of stage-1
    and stage-2 attention on them, per epoch: polylines painted with QPainter.

    Loss is drawn against its own range (left); accuracy and the two shares against
    [0, 1] (right), the shares dashed, with a second legend row once there are any.
    napari-free and without a plotting library.
    """

    LOSS_COLOUR = QColor(230, 120, 30)
    ACCURACY_COLOUR = QColor(60, 140, 230)
    ROI_STAGE1_COLOUR = QColor(40, 170, 90)
    ROI_STAGE2_COLOUR = QColor(170, 60, 200)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.losses: list[float] = []
        self.accuracies: list[float | None] = []
        self.roi_stage1: list[float | None] = []
        self.roi_stage2: list[float | None] = []
        self.setMinimumHeight(124)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip(
            "orange: training loss; blue: validation accuracy (0 to 1); green and purple, "
            "dashed: the share of stage-1 and stage-2 attention on the ROIs (0 to 1; on the "
            "validation slides, or the training slides without any), per epoch"
        )

    def clear(self) -> None:
        self.losses, self.accuracies, self.roi_stage1, self.roi_stage2 = [], [], [], []
        self.update()

    def add_epoch(
        self,
        loss: float | None,
        accuracy: float | None,
        roi_stage1: float | None = None,
        roi_stage2: float | None = None,
    ) -> None:
        """One point per finished epoch (``None``: no point for that curve)."""
        self.losses.append(float("nan") if loss is None else float(loss))
        self.accuracies.append(accuracy)
        self.roi_stage1.append(roi_stage1)
        self.roi_stage2.append(roi_stage2)
        self.update()

    def curves(self) -> list[tuple[str, QColor, list[float | None]]]:
        """The curves on the [0, 1] axis that have a point: (legend, colour, values)."""
        curves = [
            ("validation accuracy", self.ACCURACY_COLOUR, self.accuracies),
            ("ROI attention, stage 1", self.ROI_STAGE1_COLOUR, self.roi_stage1),
            ("stage 2", self.ROI_STAGE2_COLOUR, self.roi_stage2),
        ]
        return [c for c in curves if any(v is not None for v in c[2])]

    def _polyline(self, values: list[float | None], low: float, high: float, box) -> QPolygonF:
        left, top, width, height = box
        n = len(values)
        points = QPolygonF()
        for i, v in enumerate(values):
            if v is None or not math.isfinite(v):
                continue
            x = left + (width * i / (n - 1) if n > 1 else width / 2)
            frac = 0.5 if high <= low else (v - low) / (high - low)
            points.append(QPointF(x, top + height * (1.0 - frac)))
        return points

    def _draw(self, painter, values, low, high, box, colour, dashed=False) -> None:
        pen = QPen(colour, 2)
        if dashed:
            pen.setStyle(Qt.PenStyle.DashLine)
        painter.setPen(pen)
        line = self._polyline(values, low, high, box)
        painter.drawPolyline(line)
        painter.setPen(QPen(colour, 2))
        for p in line:
            painter.drawEllipse(p, 2.0, 2.0)

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        curves = self.curves()
        roi = [(label, colour) for label, colour, _ in curves if colour != self.ACCURACY_COLOUR]
        rows = 2 if roi else 1  # the ROI curves' legend: a row of its own
        box = (28.0, 8.0, max(w - 56.0, 1.0), max(h - 10.0 - 14.0 * rows, 1.0))
        painter.setPen(QPen(self.palette().mid().color(), 1))
        painter.drawRect(int(box[0]), int(box[1]), int(box[2]), int(box[3]))
        text = self.palette().text().color()
        painter.setPen(text)
        painter.drawText(2, h - 4 - 14 * (rows - 1), f"{len(self.losses)} epoch(s)")
        metrics = painter.fontMetrics()
        legend = [[("loss", self.LOSS_COLOUR), ("validation accuracy", self.ACCURACY_COLOUR)], roi]
        for row, entries in enumerate(legend[:rows]):
            x = w - sum(metrics.horizontalAdvance(t) + 12 for t, _ in entries)
            for label, colour in entries:
                painter.setPen(colour)
                painter.drawText(int(x), h - 4 - 14 * (rows - 1 - row), label)
                x += metrics.horizontalAdvance(label) + 12
        painter.setPen(text)
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:
            low, high = min(0.0, min(finite)), 1.1 * max(finite)  # headroom: apart from 1.0
            painter.drawText(2, 16, f"{high:.2g}")  # the loss axis's top
            self._draw(painter, self.losses, low, high, box, self.LOSS_COLOUR)
        if curves:
            painter.setPen(text)
            painter.drawText(int(w - 26), 16, "1.0")
            for _, colour, values in curves:
                dashed = colour != self.ACCURACY_COLOUR
                self._draw(painter, values, 0.0, 1.0, box, colour, dashed)
        painter.end()


class _ProgressRelay(QObject):
    """Carries the engine's progress events from the worker thread to the GUI thread."""

    event = Signal(object)


class TrainWidget(Container):
    """Dock widget: train a Zoom-In (or ATS, Uniform, REINFORCE-ATS, MagNet) model on
    labelled slides."""

    def __init__(self, viewer: napari.viewer.Viewer):
        # The dock holds one scroll area (so a laptop screen fits it beside other docks:
        # napari's dock area does not scroll) around ``form``, the labelled settings.
        super().__init__(labels=False)
        self._viewer = viewer
        self.controller = TrainController()
        self.worker = None
        self.result: TrainResult | None = None
        self._relay = _ProgressRelay(self.native)
        self._relay.event.connect(self._on_progress)

        # -- data
        self.source = RadioButtons(
            label="Data",
            choices=[FROM_FOLDER, FROM_VIEWER],
            value=FROM_FOLDER,
            tooltip="Where the training slides and their labels come from: a folder of slides "
            "with a CSV of labels (as 'zoomin train'), or the slides open in napari with a "
            "label typed for each.",
        )
        self.slides_dir = FileEdit(
            label="Slides folder",
            mode="d",
            tooltip="The folder that holds the slides named in the labels CSV.",
        )
        self.labels_csv = FileEdit(
            label="Labels CSV",
            mode="r",
            filter="*.csv",
            tooltip="A CSV with the columns slide,label[,split]: one row per slide, its class "
            "(e.g. positive / negative) and optionally train, val or test. Without a split "
            f"column, {VAL_FRACTION:.0%} of each class is kept for validation.",
        )
        self.annotations_dir = FileEdit(
            label="ROI folder (optional)",
            mode="d",
            tooltip="A folder with the slides' ROI outline files (GeoJSON or ASAP XML). Leave "
            "empty to use the ROI files beside the slides (those ROI annotations saves).",
        )
        self.viewer_slides = Container(label="Slides", labels=False)
        self.viewer_note = Label(value="")
        # -- the settings (TrainConfig's fields; defaults: 000's Camelyon16 set-up), the
        # rarely changed ones folded under "Advanced settings"
        choices = {"kind": list(MODEL_KINDS.items()), "device": available_devices()}
        self.settings: dict[str, Widget] = {
            name: setting_widget(name, choices.get(name))
            for name in (*MAIN_SETTINGS, *ADVANCED_SETTINGS)
        }
        for name, widget in self.settings.items():
            setattr(self, _ATTRIBUTES.get(name, name), widget)
        self.other_settings = LineEdit(
            label="Other settings (JSON)", value="", tooltip=OTHER_SETTINGS_TOOLTIP
        )
        self.other_settings.native.setPlaceholderText('e.g. {"val_draws": 4, "seed": 1}')
        self.advanced = [*(self.settings[n] for n in ADVANCED_SETTINGS), self.other_settings]
        self.advanced_button = PushButton(
            text="",
            tooltip="Show or hide the rarely changed settings: batch, learning rate, scales, "
            "tile sizes, loss weights, ROI labels and any other setting.",
        )
        # -- output and run
        default_out = user_data_dir("models", "model")
        self.out_path = FileEdit(
            label="Checkpoint",
            mode="w",
            filter="*.safetensors",
            value=default_out.with_suffix(".safetensors"),
            tooltip="Where the trained model is saved (the best epoch's); the training state "
            "for resuming goes beside it as <name>.last.safetensors.",
        )
        self.resume = CheckBox(
            text="Resume an interrupted run",
            value=True,
            tooltip="If a run with the same settings and data was interrupted, continue it "
            "where it stopped instead of starting over.",
        )
        self.resume_note = Label(value="")
        self.train_button = PushButton(text="Train", tooltip="Start training.")
        self.cancel_button = PushButton(
            text="Cancel",
            enabled=False,
            tooltip="Stop after the current step; the checkpoints written so far stay and Train "
            "resumes the run.",
        )
        self.progress = ProgressBar(min=0, max=PROGRESS_STEPS, value=0)
        self.progress.tooltip = "How far the run is: per training step and validation."
        self.status = Label(value="")
        self.split_note = Label(value="")
        for note in (self.viewer_note, self.resume_note, self.status, self.split_note):
            note.native.setWordWrap(True)
        self.form = Container(
            labels=True,
            widgets=[
                self.source,
                self.slides_dir,
                self.labels_csv,
                self.annotations_dir,
                self.viewer_slides,
                self.viewer_note,
                *(self.settings[n] for n in MAIN_SETTINGS),
                self.out_path,
                self.resume,
                self.resume_note,
                self.advanced_button,
                *self.advanced,
            ],
        )
        # the run's status and split use the dock's full width (not the field column)
        self.notes = Container(labels=False, widgets=[self.status, self.split_note])
        for note in (self.status, self.split_note):  # wrap to the dock's width, never clip
            note.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
            note.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
        self.form.native.layout().addWidget(self.notes.native)
        self.plot = LossAccuracyPlot()
        self.form.native.layout().addWidget(self.plot)
        self.form.native.layout().addStretch(1)
        # what scrolls: the form, the status and the plot; what stays: Train, Cancel and
        # the progress bar, at the bottom of the dock
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(self.form.native)
        self.scroll.setMinimumHeight(_SCROLL_MIN_HEIGHT)
        self.append(
            Container(
                labels=False,
                widgets=[
                    Container(widgets=[self.train_button, self.cancel_button], layout="horizontal"),
                    self.progress,
                ],
            )
        )
        self.native.layout().insertWidget(0, self.scroll)
        self.native.layout().setContentsMargins(0, 0, 0, 0)

        self.source.changed.connect(self._on_source_changed)
        self._kind_shown = self.kind.value
        self.kind.changed.connect(self._on_kind_changed)
        self.out_path.changed.connect(self._update_resume_note)
        self.advanced_button.changed.connect(self._on_advanced_clicked)
        self.train_button.changed.connect(self._on_train_clicked)
        self.cancel_button.changed.connect(self._on_cancel_clicked)
        viewer.layers.events.inserted.connect(self._rebuild_viewer_slides)
        viewer.layers.events.removed.connect(self._rebuild_viewer_slides)
        self._on_source_changed(self.source.value)
        self.show_advanced(False)
        self._update_resume_note()

    @property
    def resumed_from(self) -> int | None:
        """The epochs of the interrupted run this one resumed (``None``: a fresh run)."""
        return self.controller.resumed_from

    # ------------------------------------------------------------------ layout

    def _on_advanced_clicked(self, *_args) -> None:
        self.show_advanced(not self.advanced_shown)

    @property
    def advanced_shown(self) -> bool:
        """Whether the Advanced settings are unfolded."""
        return self._advanced_shown

    def show_advanced(self, shown: bool) -> None:
        """Unfold (or fold) the rarely changed settings."""
        self._advanced_shown = shown
        for w in self.advanced:
            w.visible = shown
        arrow = "▾" if shown else "▸"
        self.advanced_button.text = f"{arrow} Advanced settings ({len(self.advanced)})"
        self._fit_width()

    def _fit_width(self) -> None:
        """The scroll area scrolls up and down only: it is as wide as the form needs."""
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        self.scroll.setMinimumWidth(self.form.native.minimumSizeHint().width() + bar)

    # ------------------------------------------------------------------ data

    def _on_source_changed(self, source) -> None:
        from_folder = source == FROM_FOLDER
        for w in (self.slides_dir, self.labels_csv, self.annotations_dir):
            w.visible = from_folder
        self.viewer_slides.visible = self.viewer_note.visible = not from_folder
        if not from_folder:
            self._rebuild_viewer_slides()

    def _remember_typed(self) -> None:
        for row in self.viewer_slides:
            key = row.native.property("slide_path")
            if key:
                self.controller.typed[key] = (row[1].value.strip(), row[2].value)

    def _rebuild_viewer_slides(self, _event=None) -> None:
        """One row per slide layer with a file: its name, a label to type, its split."""
        self._remember_typed()
        self.viewer_slides.clear()
        without_file, listed = [], set()
        for layer in slide_layers(self._viewer):
            path = _layer_path(layer)
            if path is None or not path.is_file():
                without_file.append(layer.name)
                continue
            key = str(path.resolve())
            if key in listed:  # the same file in two layers: one row
                continue
            listed.add(key)
            label, split = self.controller.typed.get(key, ("", "auto"))
            row = Container(
                layout="horizontal",
                labels=False,
                widgets=[
                    Label(value=layer.name),
                    LineEdit(value=label),
                    ComboBox(choices=list(SPLIT_CHOICES), value=split),
                ],
            )
            row[1].native.setPlaceholderText("label (empty: not used)")
            row.native.setProperty("slide_path", key)
            self.viewer_slides.append(row)
        notes = []
        if not len(self.viewer_slides):
            notes.append("Open slides with napari-zoomin's reader, then type a label per slide.")
        else:
            notes.append(
                "Type a label per slide (e.g. positive / negative); slides left empty are not "
                "used. ROI masks come from each slide's ROI file (ROI annotations widget)."
            )
        if without_file:
            notes.append(f"Not listed (no file behind the layer): {', '.join(without_file)}.")
        self.viewer_note.value = " ".join(notes)

    def slide_rows(self) -> list[tuple[Path, str, str]]:
        """``(slide path, typed label, split)`` of every listed viewer slide."""
        self._remember_typed()
        rows = []
        for row in self.viewer_slides:
            key = row.native.property("slide_path")
            rows.append((Path(key), row[1].value.strip(), row[2].value))
        return rows

    def set_slide_label(self, layer_name: str, label: str, split: str = "auto") -> None:
        """Type ``label`` (and choose ``split``) for the slide layer named ``layer_name``."""
        path = _layer_path(self._viewer.layers[layer_name])
        key = None if path is None else str(path.resolve())
        for row in self.viewer_slides:
            if row.native.property("slide_path") == key:
                row[1].value, row[2].value = label, split
                return
        raise KeyError(f"slide layer {layer_name!r} is not listed (it has no file behind it)")

    # ------------------------------------------------------------------ settings

    def _on_kind_changed(self, kind) -> None:
        """Another model kind: its paper's learning rate and batch where the user kept
        the previous kind's (:func:`~.train_controller.kind_switch`), and the settings
        its model does not have greyed out."""
        values = {name: w.value for name, w in self.settings.items()}
        for name, value in kind_switch(self._kind_shown, kind, values).items():
            self.settings[name].value = value
        self._kind_shown = kind
        unused = unused_settings(kind)
        for name, widget in self.settings.items():
            widget.enabled = name not in unused

    def config(self) -> TrainConfig:
        """The settings in the form; ValueError / TrainingError say which one is wrong."""
        return config_from_form(
            {name: w.value for name, w in self.settings.items()}, self.other_settings.value
        )

    def form_state(self) -> Form:
        """What the form holds, as plain values (:class:`~.train_controller.Form`)."""
        from_folder = self.source.value == FROM_FOLDER
        return Form(
            settings={name: w.value for name, w in self.settings.items()},
            out_path=self.out_path.line_edit.value,
            other_settings=self.other_settings.value,
            source=self.source.value,
            slides_dir=self.slides_dir.line_edit.value,
            labels_csv=self.labels_csv.line_edit.value,
            annotations_dir=self.annotations_dir.line_edit.value,
            viewer_slides=[] if from_folder else self.slide_rows(),
            resume=bool(self.resume.value),
        )

    def _update_resume_note(self, *_args) -> None:
        """Say what the training checkpoint beside the chosen model holds."""
        try:
            out = output_path(self.out_path.line_edit.value)
        except ValueError:
            self.resume_note.value = ""
            return
        self.resume_note.value = saved_run_note(out)

    # ------------------------------------------------------------------ running

    def _on_train_clicked(self, *_args) -> None:
        self.start()

    def start(self) -> bool:
        """Check the form, then train in a worker thread; False (and a message) if it cannot."""
        if self.worker is not None:
            return False
        from .roi_widget import flush_pending_saves

        flush_pending_saves()  # ROI edits of the last second are in the ROI files
        try:
            job, note = self.controller.prepare(self.form_state())
        except (ValueError, ZoominError) as exc:
            if isinstance(exc, ValueError) or exc.path is None:  # the form: say which field
                show_error(f"napari-zoomin: {exc}")
                self.status.value = f"Not started: {exc}"
            else:  # a damaged training state, another run's settings
                self._show_finished(self.controller.failed(exc))
            return False

        self.result = None
        self.plot.clear()
        for point in self.controller.points:  # a resumed run's earlier epochs
            self._plot(point)
        self._set_busy(False)
        self.split_note.value = ""
        self.progress.value = self.controller.bar
        self.status.value = note
        self.scroll.ensureWidgetVisible(self.status.native)
        self._set_running(True)
        workers: list = []  # napari's activity dock cancels by quitting the worker
        cancel = self.controller.cancel_event

        def should_stop() -> bool:
            return cancel.is_set() or any(w.abort_requested for w in workers)

        self.worker = create_worker(
            run_job, job, self._relay.event.emit, should_stop, _start_thread=False
        )
        workers.append(self.worker)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()
        return True

    def _on_cancel_clicked(self, *_args) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop at the next training step; the checkpoints written so far stay."""
        if self.worker is not None:
            self.controller.cancel_event.set()
            self.status.value = "Cancelling after the current step…"

    def _set_running(self, running: bool) -> None:
        self.train_button.enabled = not running
        self.cancel_button.enabled = running

    def _set_busy(self, busy: bool, text: str = "%p%") -> None:
        """A moving bar without a percentage (work the engine does not count out), or
        back to the percentage bar with ``text`` on it."""
        bar = self.progress.native
        bar.setRange(0, 0 if busy else PROGRESS_STEPS)
        bar.setFormat(text)
        if not busy and bar.value() < 0:  # reset by the busy range
            bar.setValue(0)

    def _on_progress(self, event: TrainEvent | Split) -> None:
        shown = self.controller.progress(event)
        if shown is not None:
            self._show(shown)

    def _plot(self, point: PlotPoint) -> None:
        self.plot.add_epoch(point.loss, point.accuracy, point.roi_stage1, point.roi_stage2)

    def _show(self, shown: Shown) -> None:
        """Put what an event changes (:class:`~.train_controller.Shown`) on screen."""
        if shown.warning is not None:
            show_warning(shown.warning)
        if shown.split_note is not None:
            self.split_note.value = shown.split_note
        if shown.busy is not None:
            self._set_busy(shown.busy, shown.bar_text or "%p%")
        if shown.bar is not None:
            self.progress.value = shown.bar
        if shown.plot is not None:
            self._plot(shown.plot)
        if shown.status is not None:
            self.status.value = shown.status

    def _on_returned(self, outcome: TrainResult | Failure) -> None:
        if not isinstance(outcome, Failure):
            self.result = outcome
        self._show_finished(self.controller.finish(outcome))

    def _show_finished(self, finished: Finished) -> None:
        if finished.model is not None:
            register_model(finished.model)
        if finished.full:
            self.progress.value = PROGRESS_STEPS
        self.status.value = finished.status
        if finished.error is not None:
            show_error(finished.error)
        if finished.info is not None:
            show_info(finished.info)

    def _on_finished(self) -> None:
        self._set_busy(False)  # e.g. cancelled or failed while pre-training
        if self.worker is not None and self.worker.abort_requested and self.result is None:
            self.status.value = "Cancelled; Train resumes the run."
        self.worker = None
        self._set_running(False)
        self._update_resume_note()
