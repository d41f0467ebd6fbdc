"""``Train classifier``: train an attention-sampling model from napari, off the GUI thread.

The widget collects data and settings and calls the engine
(:func:`napari_zoomin.training.train`); it holds no training logic.  Data come
from a slides folder and a labels CSV (as ``zoomin train``) or from the slides open in
the viewer with a label typed per slide, written to ``<model>.labels.csv`` beside the
checkpoint so the run is reproducible and recorded in it.  ROI masks come from each
slide's ROI file, the one ``ROI annotations`` saves.  Training runs in a napari worker
with a progress bar, a live plot of loss and validation accuracy per epoch and a
Cancel button (effective at the next step; the checkpoints stay).  A run interrupted
with the same settings is resumed.  The trained model becomes selectable in
``Classify slide`` (:mod:`.model_choices`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import threading
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    SpinBox,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, QPointF, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from ..atomic import atomic_open
from ..engine.dataset import SlideDataset, order_classes, read_labels, stratified_split
from ..engine.runtime import available_devices
from ..errors import CheckpointError, TrainingError, ZoominError
from ..paths import user_data_dir
from ..training import (
    EpochStep,
    Pretrained,
    Pretraining,
    Resolution,
    ResumePlan,
    TrainConfig,
    TrainEvent,
    TrainResult,
    Validated,
    Validating,
    read_saved_run,
    resume_plan,
    train,
)
from .model_choices import register_model
from .slide_layers import _layer_path, slide_layers

if TYPE_CHECKING:
    import napari

__all__ = ["MODEL_KINDS", "LossAccuracyPlot", "TrainWidget"]

#: display name → ``TrainConfig.kind``
MODEL_KINDS = {
    "Zoom-In": "zoomin",
    "ATS": "ats",
    "Uniform": "uniform",
    "REINFORCE-ATS": "reinforce-ats",
}
FROM_FOLDER = "Slides folder + labels CSV"
FROM_VIEWER = "Slides open in the viewer"
SPLIT_CHOICES = ("auto", "train", "val", "test")
#: the validation share of "auto" splits (as ``zoomin train``'s default)
VAL_FRACTION = 0.2
_PROGRESS_STEPS = 1000
_DEFAULTS = TrainConfig()


def _fraction_text(value: float) -> str:
    """``0.0625`` → ``"1/16"`` (scales are read the way the papers write them)."""
    f = Fraction(value).limit_denominator(4096)
    return f"{f.numerator}/{f.denominator}" if f.denominator != 1 else f"{f.numerator}"


def _parse_number(text: str, what: str) -> float:
    """A float from ``"1e-4"``, ``"0.0625"`` or ``"1/16"``; ValueError naming the field."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what}: {text!r} is not a number (e.g. 1e-4 or 1/16).") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not a finite number.")
    return value


class LossAccuracyPlot(QWidget):
    """Training loss and validation accuracy per epoch: two polylines, painted with QPainter.

    Loss is drawn against its own range (left), accuracy against [0, 1] (right);
    napari-free and without a plotting library.
    """

    LOSS_COLOUR = QColor(230, 120, 30)
    ACCURACY_COLOUR = QColor(60, 140, 230)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.losses: list[float] = []
        self.accuracies: list[float | None] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("orange: training loss; blue: validation accuracy (0 to 1), per epoch")

    def clear(self) -> None:
        self.losses, self.accuracies = [], []
        self.update()

    def add_epoch(self, loss: float | None, accuracy: float | None) -> None:
        """One point per finished epoch."""
        self.losses.append(float("nan") if loss is None else float(loss))
        self.accuracies.append(accuracy)
        self.update()

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

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        box = (28.0, 8.0, max(w - 56.0, 1.0), max(h - 24.0, 1.0))
        painter.setPen(QPen(self.palette().mid().color(), 1))
        painter.drawRect(int(box[0]), int(box[1]), int(box[2]), int(box[3]))
        text = self.palette().text().color()
        painter.setPen(text)
        painter.drawText(2, h - 4, f"{len(self.losses)} epoch(s)")
        metrics = painter.fontMetrics()
        legend = [("loss", self.LOSS_COLOUR), ("validation accuracy", self.ACCURACY_COLOUR)]
        x = w - sum(metrics.horizontalAdvance(t) + 12 for t, _ in legend)
        for label, colour in legend:
            painter.setPen(colour)
            painter.drawText(int(x), h - 4, label)
            x += metrics.horizontalAdvance(label) + 12
        painter.setPen(text)
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:
            low, high = min(0.0, min(finite)), 1.1 * max(finite)  # headroom: apart from 1.0
            painter.drawText(2, 16, f"{high:.2g}")  # the loss axis's top
            painter.setPen(QPen(self.LOSS_COLOUR, 2))
            painter.drawPolyline(self._polyline(self.losses, low, high, box))
            for p in self._polyline(self.losses, low, high, box):
                painter.drawEllipse(p, 2.0, 2.0)
        if any(a is not None for a in self.accuracies):
            painter.setPen(text)
            painter.drawText(int(w - 26), 16, "1.0")
            painter.setPen(QPen(self.ACCURACY_COLOUR, 2))
            painter.drawPolyline(self._polyline(self.accuracies, 0.0, 1.0, box))
            for p in self._polyline(self.accuracies, 0.0, 1.0, box):
                painter.drawEllipse(p, 2.0, 2.0)
        painter.end()


class _ProgressRelay(QObject):
    """Carries the engine's progress events from the worker thread to the GUI thread."""

    event = Signal(object)


@dataclasses.dataclass
class _Failure:
    """What the worker returns when training raised (a returned exception would be re-raised)."""

    error: Exception


@dataclasses.dataclass
class _Job:
    """Everything one training run needs, gathered in the GUI thread."""

    labels_csv: Path
    slides_dir: Path
    annotations_dir: Path | None
    config: TrainConfig
    out_path: Path
    resume: bool


class TrainWidget(Container):
    """Dock widget: train a Zoom-In (or ATS, Uniform, REINFORCE-ATS) model on labelled slides."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self.worker = None
        self.result: TrainResult | None = None
        self.resumed_from: int | None = None
        self._cancel = threading.Event()
        self._typed: dict[str, tuple[str, str]] = {}
        self._relay = _ProgressRelay(self.native)
        self._relay.event.connect(self._on_progress)
        d = _DEFAULTS

        # -- data
        self.source = RadioButtons(
            label="Data", choices=[FROM_FOLDER, FROM_VIEWER], value=FROM_FOLDER
        )
        self.slides_dir = FileEdit(label="Slides folder", mode="d")
        self.labels_csv = FileEdit(label="Labels CSV", mode="r", filter="*.csv")
        self.annotations_dir = FileEdit(label="ROI folder (optional)", mode="d")
        self.viewer_slides = Container(label="Slides", labels=False)
        self.viewer_note = Label(value="")
        # -- model and settings (defaults: TrainConfig, i.e. 000's Camelyon16 set-up)
        self.kind = ComboBox(label="Model", choices=list(MODEL_KINDS.items()), value=d.kind)
        self.epochs = SpinBox(label="Epochs", min=1, max=100_000, value=d.epochs)
        self.batch_size = SpinBox(label="Batch (slides)", min=1, max=1024, value=d.batch_size)
        self.lr = LineEdit(label="Learning rate", value=f"{d.lr:g}")
        self.n_samples = SpinBox(label="N (samples)", min=1, max=100_000, value=d.n_samples)
        self.view_scale = LineEdit(label="s1 (stage-1 scale)", value=_fraction_text(d.view_scale))
        self.stage2_scale = LineEdit(
            label="s2 (stage-2 scale)", value=_fraction_text(d.stage2_scale)
        )
        self.tile_size = SpinBox(label="Tile (px)", min=2, max=65_536, value=d.tile_size)
        self.subtile_size = SpinBox(label="Sub-tile (px)", min=2, max=65_536, value=d.subtile_size)
        self.subtile_size.tooltip = (
            "level-0 side of a sub-tile, what the feature network reads (every kind)"
        )
        self.entropy_weight = LineEdit(label="λ (entropy)", value=f"{d.entropy_weight:g}")
        self.contrastive = CheckBox(text="Contrastive loss", value=d.contrastive)
        self.warmup = SpinBox(
            label="Contrastive warm-up (epochs)",
            min=0,
            max=100_000,
            value=d.contrastive_warmup_epochs,
        )
        self.pixel_weight = LineEdit(label="Pixel supervision weight", value=f"{d.pixel_weight:g}")
        self.roi_labels = LineEdit(label="ROI labels", value=", ".join(d.roi_labels))
        self.other_settings = LineEdit(label="Other settings (JSON)", value="")
        self.other_settings.native.setPlaceholderText('e.g. {"val_draws": 4, "seed": 1}')
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        # -- output and run
        default_out = user_data_dir("models", "model")
        self.out_path = FileEdit(
            label="Checkpoint",
            mode="w",
            filter="*.safetensors",
            value=default_out.with_suffix(".safetensors"),
        )
        self.resume = CheckBox(text="Resume an interrupted run", value=True)
        self.resume_note = Label(value="")
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=_PROGRESS_STEPS, value=0)
        self.status = Label(value="")
        for note in (self.viewer_note, self.resume_note, self.status):
            note.native.setWordWrap(True)
        self.extend(
            [
                self.source,
                self.slides_dir,
                self.labels_csv,
                self.annotations_dir,
                self.viewer_slides,
                self.viewer_note,
                self.kind,
                self.epochs,
                self.batch_size,
                self.lr,
                self.n_samples,
                self.view_scale,
                self.stage2_scale,
                self.tile_size,
                self.subtile_size,
                self.entropy_weight,
                self.contrastive,
                self.warmup,
                self.pixel_weight,
                self.roi_labels,
                self.other_settings,
                self.device,
                self.out_path,
                self.resume,
                self.resume_note,
                Container(widgets=[self.train_button, self.cancel_button], layout="horizontal"),
                self.progress,
                self.status,
            ]
        )
        self.plot = LossAccuracyPlot()
        self.native.layout().addWidget(self.plot)

        self.source.changed.connect(self._on_source_changed)
        self.out_path.changed.connect(self._update_resume_note)
        self.train_button.changed.connect(self._on_train_clicked)
        self.cancel_button.changed.connect(self._on_cancel_clicked)
        viewer.layers.events.inserted.connect(self._rebuild_viewer_slides)
        viewer.layers.events.removed.connect(self._rebuild_viewer_slides)
        self._on_source_changed(self.source.value)
        self._update_resume_note()

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
                self._typed[key] = (row[1].value.strip(), row[2].value)

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
            label, split = self._typed.get(key, ("", "auto"))
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

    def _write_viewer_csv(self, out_path: Path, seed: int) -> Path:
        """The labels CSV of the viewer slides, beside the checkpoint (absolute slide paths)."""
        rows = [(p, lab, s) for p, lab, s in self.slide_rows() if lab]
        if not rows:
            raise ValueError(
                "no slide has a label. Type a label (e.g. positive or negative) for the open "
                "slides you want to train on."
            )
        classes = order_classes(lab for _, lab, _ in rows)
        index = {c: i for i, c in enumerate(classes)}
        auto = stratified_split([index[lab] for _, lab, _ in rows], VAL_FRACTION, seed)
        csv_path = out_path.with_name(out_path.stem + ".labels.csv")
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["slide", "label", "split"])
            for (path, label, split), auto_split in zip(rows, auto, strict=True):
                writer.writerow([str(path), label, auto_split if split == "auto" else split])
        return csv_path

    # ------------------------------------------------------------------ settings

    def config(self) -> TrainConfig:
        """The settings in the form; ValueError / TrainingError say which one is wrong."""
        values: dict[str, Any] = {
            "kind": self.kind.value,
            "epochs": int(self.epochs.value),
            "batch_size": int(self.batch_size.value),
            "lr": _parse_number(self.lr.value, "Learning rate"),
            "n_samples": int(self.n_samples.value),
            "view_scale": _parse_number(self.view_scale.value, "s1"),
            "stage2_scale": _parse_number(self.stage2_scale.value, "s2"),
            "tile_size": int(self.tile_size.value),
            "subtile_size": int(self.subtile_size.value),
            "entropy_weight": _parse_number(self.entropy_weight.value, "λ (entropy)"),
            "contrastive": bool(self.contrastive.value),
            "contrastive_warmup_epochs": int(self.warmup.value),
            "pixel_weight": _parse_number(self.pixel_weight.value, "Pixel supervision weight"),
            "roi_labels": tuple(s.strip() for s in self.roi_labels.value.split(",") if s.strip()),
            "device": self.device.value,
        }
        text = self.other_settings.value.strip()
        if text:
            try:
                extra = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"Other settings are not valid JSON ({exc}).") from None
            if not isinstance(extra, dict):
                raise ValueError('Other settings must be a JSON object, e.g. {"val_draws": 4}.')
            names = {f.name for f in dataclasses.fields(TrainConfig)}
            unknown = sorted(set(extra) - names)
            if unknown:
                raise ValueError(
                    f"Other settings: unknown setting(s) {', '.join(unknown)}; known: "
                    f"{', '.join(sorted(names))}."
                )
            values.update(extra)
        try:
            config = TrainConfig(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid settings ({exc}).") from None
        config.validate()
        return config

    def _output(self) -> Path:
        """The checkpoint path (``.safetensors`` added); ValueError if there is none."""
        text = self.out_path.line_edit.value.strip()
        if not text:
            raise ValueError("choose where to save the checkpoint (Checkpoint).")
        path = Path(text).expanduser()
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        if path.name.endswith(".last.safetensors"):
            raise ValueError(
                f"{path.name}: a name ending in '.last.safetensors' is the training state's; "
                "choose another checkpoint name."
            )
        return path

    def _folder_data(self) -> tuple[Path, Path, Path | None]:
        """The slides folder, labels CSV and optional ROI folder, checked to exist."""

        def text(edit: FileEdit) -> str:
            return edit.line_edit.value.strip()

        slides, labels, rois = (
            text(self.slides_dir),
            text(self.labels_csv),
            text(self.annotations_dir),
        )
        if not slides:
            raise ValueError("choose the slides folder (Slides folder).")
        if not Path(slides).expanduser().is_dir():
            raise ValueError(
                f"the slides folder {slides} does not exist. Choose the folder that holds the "
                "slides."
            )
        if not labels:
            raise ValueError("choose the labels CSV (columns slide,label[,split]).")
        if not Path(labels).expanduser().is_file():
            raise ValueError(f"the labels CSV {labels} does not exist. Choose the labels CSV.")
        if rois and not Path(rois).expanduser().is_dir():
            raise ValueError(
                f"the ROI folder {rois} does not exist. Choose it, or clear the field to use "
                "the ROI files beside the slides."
            )
        return (
            Path(slides).expanduser(),
            Path(labels).expanduser(),
            Path(rois).expanduser() if rois else None,
        )

    # ------------------------------------------------------------------ resume

    def _update_resume_note(self, *_args) -> None:
        """Say what the training checkpoint beside the chosen model holds."""
        try:
            out = self._output()
        except ValueError:
            self.resume_note.value = ""
            return
        run = read_saved_run(out)
        if run is None:
            self.resume_note.value = ""
            return
        done = run.state.epoch
        if run.finished:
            self.resume_note.value = (
                f"{out.name} holds a finished run ({done} epochs): Train starts over "
                "(raise Epochs to continue it)."
            )
        else:
            epochs = "?" if run.epochs is None else run.epochs
            self.resume_note.value = (
                f"An interrupted run ({done} of {epochs} epochs done) is in "
                f"{run.path.name}: Train resumes it with the same settings "
                "(untick Resume to start over)."
            )

    def _resume_plan(self, out_path: Path, config: TrainConfig) -> ResumePlan:
        """The engine's :func:`~napari_zoomin.training.resume_plan` for this form (its
        settings; the slides are compared when the run starts), a finished run starting
        over; raises :class:`ZoominError` when the run cannot be resumed."""
        plan = resume_plan(out_path, config, resume=self.resume.value, restart_finished=True)
        if plan.action == "refuse":
            raise plan.error()
        return plan

    @staticmethod
    def _resume_text(plan: ResumePlan, out_path: Path) -> str:
        if plan.restarted:
            return f"The run in {out_path.name} had finished; training from the start."
        if not plan.continues or plan.run is None:
            return ""
        state = plan.run.state
        where = f"epoch {state.epoch + 1}" + (f", step {state.step + 1}" if state.step else "")
        return f"Resumed the interrupted run at {where}."

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
            config = self.config()
            out_path = self._output()
            if self.source.value == FROM_FOLDER:
                slides_dir, labels_csv, rois = self._folder_data()
            else:
                labels_csv = self._write_viewer_csv(out_path, config.seed)
                slides_dir, rois = labels_csv.parent, None
        except (ValueError, ZoominError) as exc:
            show_error(f"napari-zoomin: {exc}")
            self.status.value = f"Not started: {exc}"
            return False
        try:
            plan = self._resume_plan(out_path, config)
        except ZoominError as exc:  # a damaged training state, another run's settings
            self._report_error(exc)
            return False
        resume, note, history = plan.continues, self._resume_text(plan, out_path), plan.history
        self.resumed_from = len(history) if resume else None
        job = _Job(labels_csv, slides_dir, rois, config, out_path, resume)

        self._cancel.clear()
        self.result = None
        self.plot.clear()
        for record in history:
            self.plot.add_epoch(record.get("train_loss"), record.get("val_accuracy"))
        self.progress.value = int(_PROGRESS_STEPS * len(history) / max(config.epochs, 1))
        self.status.value = note or "Reading the slides…"
        self._set_running(True)
        workers: list = []  # napari's activity dock cancels by quitting the worker

        def should_stop() -> bool:
            return self._cancel.is_set() or any(w.abort_requested for w in workers)

        self.worker = create_worker(_run_job, job, self._relay, should_stop, _start_thread=False)
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
            self._cancel.set()
            self.status.value = "Cancelling after the current step…"

    def _set_running(self, running: bool) -> None:
        self.train_button.enabled = not running
        self.cancel_button.enabled = running

    def _on_progress(self, event: TrainEvent) -> None:
        prefix = "Resumed; " if self.resumed_from is not None else ""
        if isinstance(event, Resolution):  # the slides are read in pixels: say so, and go on
            show_warning(f"Train classifier: {event.message}")
            return
        if isinstance(event, Pretraining | Pretrained):
            self.status.value = (
                f"{prefix}pre-training on ROI patches ({event.step}/{event.steps} epochs)…"
            )
            return
        epoch, epochs = event.epoch, max(event.epochs, 1)
        if isinstance(event, EpochStep):
            step, steps = event.step, max(event.steps, 1)
            fraction = (epoch - 1 + step / steps) / epochs
            self.status.value = (
                f"{prefix}epoch {epoch}/{epochs}, step {step}/{steps}, loss {event.loss:.4g}"
            )
        elif isinstance(event, Validated):
            fraction = epoch / epochs
            self.plot.add_epoch(event.loss, event.val_accuracy)
            acc = event.val_accuracy
            acc_text = "n/a (no validation slides)" if acc is None else f"{acc:.3f}"
            best = " (best so far)" if event.best else ""
            self.status.value = (
                f"{prefix}epoch {epoch}/{epochs}: loss {event.loss:.4g}, "
                f"validation accuracy {acc_text}{best}"
            )
        elif isinstance(event, Validating):
            fraction = (epoch - 1 + 0.999) / epochs
            steps = max(event.steps, 1)
            self.status.value = (
                f"{prefix}epoch {epoch}/{epochs}: validating ({event.step}/{steps})…"
            )
        else:
            return
        self.progress.value = round(_PROGRESS_STEPS * min(max(fraction, 0.0), 1.0))

    def _on_returned(self, outcome) -> None:
        if isinstance(outcome, _Failure):
            self._report_error(outcome.error)
            return
        result: TrainResult = outcome
        self.result = result
        best = result.checkpoint_path
        if best.is_file():
            register_model(best)
        accuracy = result.best_val_accuracy
        metric = "" if accuracy is None else f", validation accuracy {accuracy:.3f}"
        if result.cancelled:
            done = len(result.history)
            self.status.value = (
                f"Cancelled after {done} epoch(s); the training state is in "
                f"{result.last_checkpoint_path} (Train resumes it)."
            )
            saved = (
                f" The best model so far (epoch {result.best_epoch}{metric}) is {best}; it is "
                "selectable in Classify slide."
                if best.is_file()
                else " No epoch had finished, so there is no model yet."
            )
            show_info(f"napari-zoomin: training cancelled.{saved}")
            return
        self.progress.value = _PROGRESS_STEPS
        early = " (stopped early)" if result.stopped_early else ""
        self.status.value = (
            f"Done{early}: best epoch {result.best_epoch}{metric}. Model: {best}; training "
            f"state: {result.last_checkpoint_path}."
        )
        show_info(
            f"napari-zoomin: trained model saved to {best} (best epoch {result.best_epoch}"
            f"{metric}); it is selectable in Classify slide."
        )

    def _report_error(self, exc: BaseException) -> None:
        if isinstance(exc, ZoominError):
            message = str(exc)
            about_state = exc.path is not None and exc.path.name.endswith(".last.safetensors")
            if isinstance(exc, TrainingError | CheckpointError) and about_state:
                message += " In the widget: untick 'Resume an interrupted run' to start over."
        else:
            message = f"training failed: {type(exc).__name__}: {exc}"
        show_error(f"napari-zoomin: {message}")
        self.status.value = f"Stopped: {message}"

    def _on_finished(self) -> None:
        if self.worker is not None and self.worker.abort_requested and self.result is None:
            self.status.value = "Cancelled; Train resumes the run."
        self.worker = None
        self._set_running(False)
        self._update_resume_note()


def _run_job(job: _Job, relay: _ProgressRelay, should_stop: Callable[[], bool]):
    """The worker: read the labels, train; returns the TrainResult or a :class:`_Failure`."""
    try:
        records, classes = read_labels(
            job.labels_csv,
            job.slides_dir,
            job.annotations_dir,
            val_fraction=VAL_FRACTION,
            seed=job.config.seed,
        )
        dataset = SlideDataset(
            records,
            classes,
            roi_labels=job.config.roi_labels,
            workers=job.config.num_workers,
            labels_csv=job.labels_csv,
        )
        try:
            return train(
                dataset,
                job.config,
                job.out_path,
                progress=relay.event.emit,
                cancel=should_stop,
                resume=job.resume,
            )
        finally:
            dataset.close()
    except Exception as exc:  # shown as a notification by the widget, never a traceback
        return _Failure(exc)
