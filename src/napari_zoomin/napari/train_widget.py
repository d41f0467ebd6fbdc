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

Layout: the form scrolls (napari's dock area does not), its rarely changed settings
folded under "Advanced settings", with Train, Cancel and the progress bar pinned below
it, so the dock fits a 1600 x 1000 screen beside ``Classify slide``.  Before training,
the worker reports the train/validation split (:class:`_Split`), said in the form.
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
from qtpy.QtCore import QObject, QPointF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy, QWidget

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
#: the least height of the scrolling part (the form): with Train and the progress bar
#: below it, the dock fits a 1000-px-high screen beside Classify slide
_SCROLL_MIN_HEIGHT = 220
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


@dataclasses.dataclass(frozen=True)
class _Split:
    """The worker's first report: how many slides train, validate and are left out."""

    train: int
    val: int
    test: int


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
        # The dock holds one scroll area (so a laptop screen fits it beside other docks:
        # napari's dock area does not scroll) around ``form``, the labelled settings.
        super().__init__(labels=False)
        self._viewer = viewer
        self.worker = None
        self.result: TrainResult | None = None
        self.resumed_from: int | None = None
        self._cancel = threading.Event()
        self._typed: dict[str, tuple[str, str]] = {}
        self._relay = _ProgressRelay(self.native)
        self._relay.event.connect(self._on_progress)
        #: the share of an epoch's bar for its training steps (the rest: validation)
        self._train_share = 1.0
        d = _DEFAULTS

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
        # -- the settings most runs change (defaults: TrainConfig, 000's Camelyon16 set-up)
        self.kind = ComboBox(
            label="Model",
            choices=list(MODEL_KINDS.items()),
            value=d.kind,
            tooltip="Zoom-In: looks at a shrunk slide, then zooms into the tiles it finds "
            "interesting (two stages; the default). ATS: one stage. Uniform: ATS that picks "
            "tiles at random (a baseline). REINFORCE-ATS: ATS trained by policy gradient.",
        )
        self.epochs = SpinBox(
            label="Epochs",
            min=1,
            max=100_000,
            value=d.epochs,
            tooltip="How many times training goes through all training slides. Typical: "
            "50-200 for real data; 1-5 to try the set-up.",
        )
        self.n_samples = SpinBox(
            label="Tiles per slide",
            min=1,
            max=100_000,
            value=d.n_samples,
            tooltip="N: how many tiles the model reads at full resolution per slide and step. "
            "More reads more pixels and is slower: 100 in the paper on a GPU, 10-30 are "
            "practical on a CPU.",
        )
        self.device = ComboBox(
            label="Device",
            choices=available_devices(),
            value="auto",
            tooltip="Where training runs: auto (a GPU when there is one, else the CPU), cpu, "
            "or a named GPU.",
        )
        # -- advanced: the optimisation and the method's settings, folded by default
        self.batch_size = SpinBox(
            label="Batch (slides)",
            min=1,
            max=1024,
            value=d.batch_size,
            tooltip="Slides per optimisation step. Larger is steadier but needs more memory; "
            "the paper uses 5.",
        )
        self.lr = LineEdit(
            label="Learning rate",
            value=f"{d.lr:g}",
            tooltip="How big a step the optimiser (Adam) takes. Typical: 1e-4 (the paper) to "
            "1e-3 for small models; lower it if the loss becomes NaN.",
        )
        self.view_scale = LineEdit(
            label="Stage-1 scale (s1)",
            value=_fraction_text(d.view_scale),
            tooltip="Stage-1 view scale (s1): the model first looks at the whole slide "
            "shrunk by this factor (1/16 = 16x smaller) to choose where to look. Type 1/16 or "
            "0.0625.",
        )
        self.stage2_scale = LineEdit(
            label="Stage-2 scale (s2)",
            value=_fraction_text(d.stage2_scale),
            tooltip="Stage-2 view scale (s2; Zoom-In only): a chosen tile is looked at "
            "shrunk by this factor, relative to full resolution, to choose its sub-tiles "
            "(1/8 = 8x smaller).",
        )
        self.tile_size = SpinBox(
            label="Tile (px)",
            min=2,
            max=65_536,
            value=d.tile_size,
            tooltip="Side of a tile, the region the model picks, in full-resolution (level-0) "
            "pixels. Typical: 256-1024.",
        )
        self.subtile_size = SpinBox(
            label="Sub-tile (px)",
            min=2,
            max=65_536,
            value=d.subtile_size,
            tooltip="Side of a sub-tile, what the feature network reads at full resolution, in "
            "level-0 pixels (every model kind). Typical: 32-100.",
        )
        self.entropy_weight = LineEdit(
            label="Entropy weight (λ)",
            value=f"{d.entropy_weight:g}",
            tooltip="Entropy weight (λ): how strongly the attention is kept spread out "
            "rather than fixed on a few places. 0 turns it off; the paper uses 1e-5.",
        )
        self.contrastive = CheckBox(
            text="Contrastive loss",
            value=d.contrastive,
            tooltip="Also train the model to tell the tiles it picks from random ones (the "
            "paper's in-sample contrastive loss).",
        )
        self.warmup = SpinBox(
            label="Contrastive warm-up (epochs)",
            min=0,
            max=100_000,
            value=d.contrastive_warmup_epochs,
            tooltip="Epochs of training before the contrastive loss is switched on (the paper: "
            "10).",
        )
        self.pixel_weight = LineEdit(
            label="Pixel supervision weight",
            value=f"{d.pixel_weight:g}",
            tooltip="How strongly the attention is pulled towards the ROI outlines on slides "
            "that have them (0: not at all; default 1).",
        )
        self.roi_labels = LineEdit(
            label="ROI labels",
            value=", ".join(d.roi_labels),
            tooltip="Which outline labels in the ROI files count as a region of interest, "
            "comma-separated (default: Tumor).",
        )
        self.other_settings = LineEdit(
            label="Other settings (JSON)",
            value="",
            tooltip='Any other training setting, as JSON, e.g. {"val_draws": 4, "seed": 1} '
            'or {"pretrain_epochs": 0} to skip ROI pre-training; docs/training.md lists '
            "them.",
        )
        self.other_settings.native.setPlaceholderText('e.g. {"val_draws": 4, "seed": 1}')
        self.advanced = [
            self.batch_size,
            self.lr,
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
        ]
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
        self.progress = ProgressBar(min=0, max=_PROGRESS_STEPS, value=0)
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
                self.kind,
                self.epochs,
                self.n_samples,
                self.device,
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
        self.out_path.changed.connect(self._update_resume_note)
        self.advanced_button.changed.connect(self._on_advanced_clicked)
        self.train_button.changed.connect(self._on_train_clicked)
        self.cancel_button.changed.connect(self._on_cancel_clicked)
        viewer.layers.events.inserted.connect(self._rebuild_viewer_slides)
        viewer.layers.events.removed.connect(self._rebuild_viewer_slides)
        self._on_source_changed(self.source.value)
        self.show_advanced(False)
        self._update_resume_note()

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
            "view_scale": _parse_number(self.view_scale.value, "Stage-1 scale (s1)"),
            "stage2_scale": _parse_number(self.stage2_scale.value, "Stage-2 scale (s2)"),
            "tile_size": int(self.tile_size.value),
            "subtile_size": int(self.subtile_size.value),
            "entropy_weight": _parse_number(self.entropy_weight.value, "Entropy weight (λ)"),
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
        self._set_busy(False)
        self._train_share = 1.0
        self.split_note.value = ""
        self.progress.value = int(_PROGRESS_STEPS * len(history) / max(config.epochs, 1))
        self.status.value = note or "Reading the slides…"
        self.scroll.ensureWidgetVisible(self.status.native)
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

    def _set_busy(self, busy: bool, text: str = "%p%") -> None:
        """A moving bar without a percentage (work the engine does not count out), or
        back to the percentage bar with ``text`` on it."""
        bar = self.progress.native
        bar.setRange(0, 0 if busy else _PROGRESS_STEPS)
        bar.setFormat(text)
        if not busy and bar.value() < 0:  # reset by the busy range
            bar.setValue(0)

    def _show_split(self, split: _Split) -> None:
        """Say which slides train and which validate, and what no validation slide means."""
        slides = "slide" if split.train == 1 else "slides"
        text = f"Split: {split.train} {slides} for training, {split.val} for validation"
        if split.test:
            text += f" ({split.test} test slide(s) not used)"
        text += "."
        if not split.val:
            warning = (
                "No validation slide: validation accuracy will not be measured, early "
                "stopping is off and the last epoch's model is kept. Mark some slides 'val' "
                "(the split column or choice) to measure it."
            )
            text += " " + warning
            show_warning(f"Train classifier: {warning}")
        self.split_note.value = text
        self._train_share = split.train / max(split.train + split.val, 1)

    def _on_progress(self, event: TrainEvent | _Split) -> None:
        prefix = "Resumed; " if self.resumed_from is not None else ""
        if isinstance(event, _Split):
            self._show_split(event)
            return
        if isinstance(event, Resolution):  # the slides are read in pixels: say so, and go on
            show_warning(f"Train classifier: {event.message}")
            return
        if isinstance(event, Pretraining):
            # the engine reports its start and end only: the bar moves without a percentage
            self._set_busy(True, "pre-training…")
            self.status.value = (
                f"{prefix}pre-training on ROI patches before epoch 1 ({event.steps} epochs, "
                f"{event.slides} annotated slide(s))…"
            )
            return
        if isinstance(event, Pretrained):
            self._set_busy(False)
            loss = "" if event.loss is None else f" (loss {event.loss:.4g})"
            self.status.value = f"{prefix}pre-training done{loss}; training epoch 1…"
            return
        epoch, epochs = event.epoch, max(event.epochs, 1)
        share = self._train_share
        if isinstance(event, EpochStep):
            step, steps = event.step, max(event.steps, 1)
            fraction = (epoch - 1 + share * step / steps) / epochs
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
            steps = max(event.steps, 1)
            fraction = (epoch - 1 + share + (1 - share) * event.step / steps) / epochs
            self.status.value = (
                f"{prefix}epoch {epoch}/{epochs}: validating ({event.step}/{steps})…"
            )
        else:
            return
        self._set_busy(False, f"epoch {epoch}/{epochs}: %p%")
        # never backwards (a resumed epoch's first event)
        value = round(_PROGRESS_STEPS * min(max(fraction, 0.0), 1.0))
        self.progress.value = max(value, self.progress.value)

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
        self._set_busy(False)  # e.g. cancelled or failed while pre-training
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
        splits = [r.split for r in records]
        relay.event.emit(_Split(splits.count("train"), splits.count("val"), splits.count("test")))
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
