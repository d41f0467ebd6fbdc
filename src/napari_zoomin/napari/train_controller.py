"""The ``Train classifier`` widget's state and logic, without Qt or napari.

:class:`TrainController` holds what the widget knows between clicks — the labels typed
per viewer slide, the progress bar's value, the plot's points, whether the run resumed
— and answers what the widget shows: the :class:`~napari_zoomin.training.TrainConfig`
of the form (:func:`config_from_form`), the data of a run (a slides folder and labels
CSV, or the viewer's slides written to a labels CSV), the resume plan and its words,
each progress event as a bar value and a message (:meth:`TrainController.progress`),
the split note, the end of a run (:meth:`TrainController.finish`) and the worker's
body (:func:`run_job`).  The form's labels, tooltips and ranges come from
:data:`~napari_zoomin.train_settings.TRAIN_SETTINGS`; the widget
(:mod:`.train_widget`) only binds all this to magicgui and the viewer.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..atomic import atomic_open
from ..engine.checkpoints import MODEL_KINDS as KIND_CONFIGS
from ..engine.dataset import SlideDataset, order_classes, read_labels, stratified_split
from ..errors import CheckpointError, TrainingError, ZoominError
from ..train_settings import TRAIN_SETTINGS, parse_names, setting_name
from ..training import (
    EpochStep,
    Pretrained,
    Pretraining,
    PretrainProgress,
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
from ..training.config import KIND_DEFAULTS, MODEL_SETTINGS

__all__ = [
    "ADVANCED_SETTINGS",
    "FROM_FOLDER",
    "FROM_VIEWER",
    "MAIN_SETTINGS",
    "MODEL_KINDS",
    "PROGRESS_STEPS",
    "Failure",
    "Finished",
    "Form",
    "Job",
    "PlotPoint",
    "Shown",
    "Split",
    "TrainController",
    "config_from_form",
    "folder_data",
    "form_value",
    "kind_switch",
    "output_path",
    "run_job",
    "saved_run_note",
    "unused_settings",
    "write_labels_csv",
]

#: display name → ``TrainConfig.kind``
MODEL_KINDS = {
    "Zoom-In": "zoomin",
    "ATS": "ats",
    "Uniform": "uniform",
    "REINFORCE-ATS": "reinforce-ats",
    "MagNet": "magnet",
}
FROM_FOLDER = "Slides folder + labels CSV"
FROM_VIEWER = "Slides open in the viewer"
SPLIT_CHOICES = ("auto", "train", "val", "test")
#: the validation share of "auto" splits (as ``zoomin train``'s default)
VAL_FRACTION = 0.2
#: the progress bar's steps (its maximum)
PROGRESS_STEPS = 1000
#: the settings the form always shows, and those folded under "Advanced settings"
#: (with "Other settings (JSON)" last), in the form's order
MAIN_SETTINGS = ("kind", "epochs", "n_samples", "device")
ADVANCED_SETTINGS = (
    "batch_size",
    "lr",
    "view_scale",
    "stage2_scale",
    "tile_size",
    "subtile_size",
    "entropy_weight",
    "contrastive",
    "contrastive_warmup_epochs",
    "pixel_weight",
    "roi_labels",
    "lookalike_labels",
)
OTHER_SETTINGS_TOOLTIP = (
    'Any other training setting, as JSON, e.g. {"val_draws": 4, "seed": 1} '
    'or {"pretrain_epochs": 0} to skip ROI pre-training; docs/training.md lists '
    "them."
)
#: the pre-trained networks in the user's words (PretrainProgress.network)
NETWORK_NAMES = {
    "stage1_attention": "stage-1 attention network",
    "stage2_attention": "stage-2 attention network",
    "feature": "feature network",
}
_DEFAULTS = TrainConfig()


# ---------------------------------------------------------------------- the form


def fraction_text(value: float) -> str:
    """``0.0625`` → ``"1/16"`` (scales are read the way the papers write them)."""
    f = Fraction(value).limit_denominator(4096)
    return f"{f.numerator}/{f.denominator}" if f.denominator != 1 else f"{f.numerator}"


def parse_number(text: str, what: str) -> float:
    """A float from ``"1e-4"``, ``"0.0625"`` or ``"1/16"``; ValueError naming the field."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what}: {text!r} is not a number (e.g. 1e-4 or 1/16).") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not a finite number.")
    return value


def form_value(name: str, value: Any = dataclasses.MISSING) -> Any:
    """What the form shows for a setting (default: ``TrainConfig``'s): typed settings
    as their text (``1e-4``, ``1/16``, ``Tumor, Stroma``), the rest as they are."""
    if value is dataclasses.MISSING:
        value = getattr(_DEFAULTS, name)
    entry = TRAIN_SETTINGS[name].entry
    if entry == "number":
        return f"{value:g}"
    if entry == "fraction":
        return fraction_text(value)
    if entry == "names":
        return ", ".join(value)
    return value


def _from_form(name: str, value: Any) -> Any:
    """The ``TrainConfig`` value of what the form holds for ``name``, range-checked."""
    setting = TRAIN_SETTINGS[name]
    if setting.entry in ("number", "fraction"):
        value = parse_number(str(value), setting.label)
    elif setting.entry == "names":
        return parse_names(value)
    elif setting.entry == "spin":
        value = int(value)
    elif setting.entry == "check":
        return bool(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        problem = setting.problem(value)
        if problem is not None:
            raise ValueError(f"{setting.label} {problem}, got {value:g}.")
    return value


def _relabel(message: str) -> str:
    """A ``TrainConfig`` message with each problem's setting named as the form names it."""
    names = "|".join(re.escape(n) for n in sorted(TRAIN_SETTINGS, key=len, reverse=True))
    return re.sub(rf"(^|: |; )({names})\b(?! \()", lambda m: m[1] + setting_name(m[2]), message)


def _kind_default(kind: str, name: str) -> Any:
    """A setting's default for a model kind: its paper's (``KIND_DEFAULTS``, as
    ``zoomin train --kind``), else ``TrainConfig``'s."""
    return KIND_DEFAULTS.get(kind, {}).get(name, getattr(_DEFAULTS, name))


def _same(name: str, a: Any, b: Any) -> bool:
    """Whether two form values of a setting mean the same (``1e-4`` = ``0.0001``)."""
    if TRAIN_SETTINGS[name].entry in ("number", "fraction"):
        try:
            return parse_number(str(a), name) == parse_number(str(b), name)
        except ValueError:
            return False
    return a == b


def kind_switch(old: str, new: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The form values to change when the Model goes from kind ``old`` to ``new``:
    each setting whose default differs between the two (MagNet: learning rate 3e-5,
    batch 16, ``KIND_DEFAULTS``) gets ``new``'s default, unless the user changed it
    from ``old``'s (then it is theirs and stays)."""
    changes = {}
    for name in sorted(set(KIND_DEFAULTS.get(old, {})) | set(KIND_DEFAULTS.get(new, {}))):
        if name not in values or name not in TRAIN_SETTINGS:
            continue  # not on the form: config_from_form applies it
        before = form_value(name, _kind_default(old, name))
        if _same(name, values[name], before):
            changes[name] = form_value(name, _kind_default(new, name))
    return changes


def unused_settings(kind: str) -> tuple[str, ...]:
    """The form's model settings that ``kind``'s model does not have (the form greys
    them out): :func:`~napari_zoomin.training.config.model_settings` passes only the
    fields the kind's config has, so these change nothing (a MagNet: the tile, scale,
    ``N`` and attention-loss settings)."""
    if kind not in KIND_CONFIGS:
        return ()
    fields = {f.name for f in dataclasses.fields(KIND_CONFIGS[kind][1])}
    form = (*MAIN_SETTINGS, *ADVANCED_SETTINGS)
    return tuple(n for n in form if n in MODEL_SETTINGS and n not in fields)


def config_from_form(values: Mapping[str, Any], other_settings: str = "") -> TrainConfig:
    """The ``TrainConfig`` of the form: ``values`` maps field names to what the form
    holds (text for typed numbers, fractions and names); ``other_settings`` is the
    JSON of any other setting.  A ValueError or TrainingError names the setting.

    The kind's paper settings that are not on the form (MagNet: cosine annealing, no
    ROI pre-training; ``KIND_DEFAULTS``) apply unless ``other_settings`` gives them,
    as ``zoomin train --kind`` does."""
    config: dict[str, Any] = {name: _from_form(name, v) for name, v in values.items()}
    kind = config.get("kind", _DEFAULTS.kind)
    hidden = {k: v for k, v in KIND_DEFAULTS.get(kind, {}).items() if k not in config}
    config = {**hidden, **config}
    text = other_settings.strip()
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
        config.update(extra)
    try:
        return TrainConfig(**config)
    except TrainingError as exc:
        raise TrainingError(None, _relabel(exc.problem), exc.fix) from None


def output_path(text: str) -> Path:
    """The checkpoint path (``.safetensors`` added); ValueError if there is none."""
    text = text.strip()
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


# ---------------------------------------------------------------------- the data


def folder_data(slides: str, labels: str, rois: str = "") -> tuple[Path, Path, Path | None]:
    """The slides folder, labels CSV and optional ROI folder, checked to exist."""
    slides, labels, rois = slides.strip(), labels.strip(), rois.strip()
    if not slides:
        raise ValueError("choose the slides folder (Slides folder).")
    if not Path(slides).expanduser().is_dir():
        raise ValueError(
            f"the slides folder {slides} does not exist. Choose the folder that holds the slides."
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


def write_labels_csv(
    rows: Iterable[tuple[Path, str, str]], out_path: Path, seed: int
) -> tuple[Path, Path]:
    """The labels CSV of ``(slide path, label, split)`` rows, beside the checkpoint
    (``<model>.labels.csv``), and its slides folder.

    Rows without a label are left out; an ``"auto"`` split is a seeded
    :data:`VAL_FRACTION` of each class for validation.  The slides folder is the
    deepest folder that holds every slide, and the CSV names them relative to it: the
    one rule of labels files (slides lie inside the slides folder,
    :func:`~napari_zoomin.engine.dataset.read_labels`) holds for this file too, and
    ``zoomin train --slides <folder>`` reads it as it is."""
    rows = [(p, lab, s) for p, lab, s in rows if lab]
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
    paths = [Path(p).resolve() for p, _, _ in rows]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    with atomic_open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "split"])
        for path, (_, label, split), auto_split in zip(paths, rows, auto, strict=True):
            name = path.relative_to(root).as_posix()
            writer.writerow([name, label, auto_split if split == "auto" else split])
    return csv_path, root


@dataclass
class Form:
    """What the form holds when Train is clicked (plain values, read from its widgets).

    ``settings`` maps ``TrainConfig`` field names to the form's values (text for typed
    numbers); ``viewer_slides`` are ``(slide path, typed label, split)`` rows."""

    settings: dict[str, Any]
    out_path: str
    other_settings: str = ""
    source: str = FROM_FOLDER
    slides_dir: str = ""
    labels_csv: str = ""
    annotations_dir: str = ""
    viewer_slides: Sequence[tuple[Path, str, str]] = ()
    resume: bool = True


@dataclass
class Job:
    """Everything one training run needs, gathered in the GUI thread."""

    labels_csv: Path
    slides_dir: Path
    annotations_dir: Path | None
    config: TrainConfig
    out_path: Path
    resume: bool


@dataclass
class Failure:
    """What the worker returns when training raised (a returned exception would be re-raised)."""

    error: Exception


@dataclass(frozen=True)
class Split:
    """The worker's first report: how many slides train, validate and are left out."""

    train: int
    val: int
    test: int

    @property
    def warning(self) -> str | None:
        """What no validation slide means (``None`` when there is one)."""
        if self.val:
            return None
        return (
            "No validation slide: validation accuracy will not be measured, early "
            "stopping is off and the last epoch's model is kept. Mark some slides 'val' "
            "(the split column or choice) to measure it."
        )

    @property
    def text(self) -> str:
        """Which slides train and which validate, and the warning if there is one."""
        slides = "slide" if self.train == 1 else "slides"
        text = f"Split: {self.train} {slides} for training, {self.val} for validation"
        if self.test:
            text += f" ({self.test} test slide(s) not used)"
        text += "."
        return text if self.warning is None else f"{text} {self.warning}"


def run_job(job: Job, emit: Callable[[Any], None], should_stop: Callable[[], bool]):
    """The worker's body: read the labels, say the :class:`Split`, train; returns the
    TrainResult or a :class:`Failure` (never raises: the widget shows the message)."""
    try:
        records, classes = read_labels(
            job.labels_csv,
            job.slides_dir,
            job.annotations_dir,
            val_fraction=VAL_FRACTION,
            seed=job.config.seed,
        )
        splits = [r.split for r in records]
        emit(Split(splits.count("train"), splits.count("val"), splits.count("test")))
        dataset = SlideDataset(
            records,
            classes,
            roi_labels=job.config.roi_labels,
            lookalike_labels=job.config.lookalike_labels,
            workers=job.config.num_workers,
            labels_csv=job.labels_csv,
        )
        try:
            return train(
                dataset,
                job.config,
                job.out_path,
                progress=emit,
                cancel=should_stop,
                resume=job.resume,
            )
        finally:
            dataset.close()
    except Exception as exc:  # shown as a notification by the widget, never a traceback
        return Failure(exc)


# ---------------------------------------------------------------------- resuming


def saved_run_note(out: Path) -> str:
    """What the training checkpoint beside ``out`` holds, and what Train will do."""
    run = read_saved_run(out)
    if run is None:
        return ""
    done = run.state.epoch
    if run.finished:
        return (
            f"{out.name} holds a finished run ({done} epochs): Train starts over "
            "(raise Epochs to continue it)."
        )
    epochs = "?" if run.epochs is None else run.epochs
    return (
        f"An interrupted run ({done} of {epochs} epochs done) is in "
        f"{run.path.name}: Train resumes it with the same settings "
        "(untick Resume to start over)."
    )


def resume_text(plan: ResumePlan, out_path: Path) -> str:
    """What the status says when a run starts: resumed where, or started over."""
    if plan.restarted:
        return f"The run in {out_path.name} had finished; training from the start."
    if not plan.continues or plan.run is None:
        return ""
    state = plan.run.state
    where = f"epoch {state.epoch + 1}" + (f", step {state.step + 1}" if state.step else "")
    return f"Resumed the interrupted run at {where}."


# ---------------------------------------------------------------------- showing


@dataclass(frozen=True)
class PlotPoint:
    """One epoch on the plot: the training loss, the validation accuracy and the mean
    shares of stage-1 and stage-2 attention on the ROIs (the history's
    ``val_roi_attention_stage1``/``_stage2``, or ``train_...`` without validation
    slides); ``None``: not measured (no validation slides, no ROIs, no such stage)."""

    loss: float | None
    accuracy: float | None
    roi_stage1: float | None = None
    roi_stage2: float | None = None

    @classmethod
    def of_record(cls, record: Mapping[str, Any]) -> PlotPoint:
        """The point of one epoch of a training history (an interrupted run's)."""

        def roi(stage: int) -> float | None:
            value = record.get(f"val_roi_attention_stage{stage}")
            return record.get(f"train_roi_attention_stage{stage}") if value is None else value

        return cls(record.get("train_loss"), record.get("val_accuracy"), roi(1), roi(2))


@dataclass(frozen=True)
class Shown:
    """What one progress event changes in the widget (``None``: unchanged).

    ``busy``: the bar moves without a percentage (True) or counts (False) with
    ``bar_text`` on it (Qt's ``%p%`` is the percentage); ``bar``: its new value, out of
    :data:`PROGRESS_STEPS`; ``plot``: an epoch's :class:`PlotPoint` to add;
    ``warning``: a notification to show."""

    status: str | None = None
    busy: bool | None = None
    bar_text: str | None = None
    bar: int | None = None
    plot: PlotPoint | None = None
    split_note: str | None = None
    warning: str | None = None


@dataclass(frozen=True)
class Finished:
    """The end of a run as the widget says it: the status line, a notification (info or
    error), the model to offer in ``Classify slide`` and whether the bar is full."""

    status: str
    info: str | None = None
    error: str | None = None
    model: Path | None = None
    full: bool = False


class TrainController:
    """The state of one ``Train classifier`` widget (see the module docstring)."""

    def __init__(self) -> None:
        self.cancel_event = threading.Event()
        #: the label and split typed per viewer slide (its resolved path), kept while
        #: the slide list is rebuilt
        self.typed: dict[str, tuple[str, str]] = {}
        #: the progress bar's value (0 to PROGRESS_STEPS): never backwards within a run
        self.bar = 0
        #: the share of an epoch's bar for its training steps (the rest: validation)
        self.train_share = 1.0
        #: the epochs of the run this one resumes (None: a fresh run)
        self.resumed_from: int | None = None
        #: the plot's points, one per epoch
        self.points: list[PlotPoint] = []

    @property
    def losses(self) -> list[float | None]:
        """The training loss of every epoch on the plot."""
        return [p.loss for p in self.points]

    @property
    def accuracies(self) -> list[float | None]:
        """The validation accuracy of every epoch on the plot."""
        return [p.accuracy for p in self.points]

    # ------------------------------------------------------------------ starting
    def prepare(self, form: Form) -> tuple[Job, str]:
        """The job of a Train click and the status to show as it starts.

        Checks the form (ValueError), writes the viewer slides' labels CSV, plans the
        resume (a ZoominError when the run cannot be resumed: a damaged training state,
        another run's settings), and resets the bar, split and plot to the run (an
        interrupted run's epochs are plotted again)."""
        config = config_from_form(form.settings, form.other_settings)
        out = output_path(form.out_path)
        if form.source == FROM_FOLDER:
            slides, labels, rois = folder_data(
                form.slides_dir, form.labels_csv, form.annotations_dir
            )
        else:
            labels, slides = write_labels_csv(form.viewer_slides, out, config.seed)
            rois = None
        plan = resume_plan(out, config, resume=form.resume, restart_finished=True)
        if plan.action == "refuse":
            raise plan.error()
        history = plan.history
        self.resumed_from = len(history) if plan.continues else None
        self.cancel_event.clear()
        self.train_share = 1.0
        self.bar = int(PROGRESS_STEPS * len(history) / max(config.epochs, 1))
        self.points = [PlotPoint.of_record(r) for r in history]
        job = Job(labels, slides, rois, config, out, plan.continues)
        return job, resume_text(plan, out) or "Reading the slides…"

    # ------------------------------------------------------------------ progress
    def progress(self, event: TrainEvent | Split) -> Shown | None:
        """What a progress event (or the :class:`Split`) changes in the widget."""
        prefix = "Resumed; " if self.resumed_from is not None else ""
        if isinstance(event, Split):
            self.train_share = event.train / max(event.train + event.val, 1)
            warning = event.warning
            return Shown(
                split_note=event.text,
                warning=None if warning is None else f"Train classifier: {warning}",
            )
        if isinstance(event, Resolution):  # the slides are read in pixels: say so, and go on
            return Shown(warning=f"Train classifier: {event.message}")
        if isinstance(event, Pretraining):
            # reading the ROI patches is not counted out: the bar moves without a
            # percentage until the first pre-training epoch is done
            return Shown(
                status=f"{prefix}pre-training on ROI patches before epoch 1 ({event.steps} "
                f"epochs, {event.slides} annotated slide(s))…",
                busy=True,
                bar_text="pre-training…",
            )
        if isinstance(event, PretrainProgress):
            self.bar = round(PROGRESS_STEPS * event.step / max(event.steps, 1))
            network = NETWORK_NAMES.get(event.network, event.network)
            return Shown(
                status=f"{prefix}pre-training the {network} on ROI patches: epoch "
                f"{event.network_epoch}/{event.network_epochs} (step {event.step}/"
                f"{event.steps}), loss {event.loss:.4g}",
                busy=False,
                bar_text="pre-training: %p%",
                bar=self.bar,
            )
        if isinstance(event, Pretrained):
            self.bar = 0  # the bar now counts the training epochs
            loss = "" if event.loss is None else f" (loss {event.loss:.4g})"
            return Shown(
                status=f"{prefix}pre-training done{loss}; training epoch 1…",
                busy=False,
                bar_text="%p%",
                bar=0,
            )
        epoch, epochs = event.epoch, max(event.epochs, 1)
        share = self.train_share
        plot = None
        if isinstance(event, EpochStep):
            step, steps = event.step, max(event.steps, 1)
            fraction = (epoch - 1 + share * step / steps) / epochs
            status = f"{prefix}epoch {epoch}/{epochs}, step {step}/{steps}, loss {event.loss:.4g}"
        elif isinstance(event, Validated):
            fraction = epoch / epochs
            plot = PlotPoint(
                event.loss,
                event.val_accuracy,
                event.roi_attention_stage1,
                event.roi_attention_stage2,
            )
            self.points.append(plot)
            acc = event.val_accuracy
            acc_text = "n/a (no validation slides)" if acc is None else f"{acc:.3f}"
            best = " (best so far)" if event.best else ""
            shares = [
                f"stage {n} {v:.2f}"
                for n, v in ((1, plot.roi_stage1), (2, plot.roi_stage2))
                if v is not None
            ]
            roi = f", attention on ROIs: {', '.join(shares)}" if shares else ""
            status = (
                f"{prefix}epoch {epoch}/{epochs}: loss {event.loss:.4g}, "
                f"validation accuracy {acc_text}{best}{roi}"
            )
        elif isinstance(event, Validating):
            steps = max(event.steps, 1)
            fraction = (epoch - 1 + share + (1 - share) * event.step / steps) / epochs
            status = f"{prefix}epoch {epoch}/{epochs}: validating ({event.step}/{steps})…"
        else:
            return None
        # never backwards (a resumed epoch's first event)
        self.bar = max(round(PROGRESS_STEPS * min(max(fraction, 0.0), 1.0)), self.bar)
        return Shown(
            status=status,
            busy=False,
            bar_text=f"epoch {epoch}/{epochs}: %p%",
            bar=self.bar,
            plot=plot,
        )

    # ------------------------------------------------------------------ the end
    def finish(self, outcome: TrainResult | Failure) -> Finished:
        """What the widget says when the worker returned."""
        if isinstance(outcome, Failure):
            return self.failed(outcome.error)
        result = outcome
        best = result.checkpoint_path
        model = best if best.is_file() else None
        accuracy = result.best_val_accuracy
        metric = "" if accuracy is None else f", validation accuracy {accuracy:.3f}"
        if result.cancelled:
            saved = (
                f" The best model so far (epoch {result.best_epoch}{metric}) is {best}; it is "
                "selectable in Classify slide."
                if model is not None
                else " No epoch had finished, so there is no model yet."
            )
            return Finished(
                status=f"Cancelled after {len(result.history)} epoch(s); the training state "
                f"is in {result.last_checkpoint_path} (Train resumes it).",
                info=f"napari-zoomin: training cancelled.{saved}",
                model=model,
            )
        self.bar = PROGRESS_STEPS
        early = " (stopped early)" if result.stopped_early else ""
        return Finished(
            status=f"Done{early}: best epoch {result.best_epoch}{metric}. Model: {best}; "
            f"training state: {result.last_checkpoint_path}.",
            info=f"napari-zoomin: trained model saved to {best} (best epoch "
            f"{result.best_epoch}{metric}); it is selectable in Classify slide.",
            model=model,
            full=True,
        )

    @staticmethod
    def failed(exc: BaseException) -> Finished:
        """A run that could not start or stopped with an error: its message, and how to
        start over when the training state is the problem."""
        if isinstance(exc, ZoominError):
            message = str(exc)
            about_state = exc.path is not None and exc.path.name.endswith(".last.safetensors")
            if isinstance(exc, TrainingError | CheckpointError) and about_state:
                message += " In the widget: untick 'Resume an interrupted run' to start over."
        else:
            message = f"training failed: {type(exc).__name__}: {exc}"
        return Finished(status=f"Stopped: {message}", error=f"napari-zoomin: {message}")
