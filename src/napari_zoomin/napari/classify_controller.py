"""The ``Classify slide`` widget's state and logic, without Qt or napari.

:class:`ClassifyController` holds what the widget knows between clicks — the loaded
checkpoints, the cancel flag, each slide's shown result — and answers what the widget
shows: the worker's body (:meth:`~ClassifyController.run`), the summary, the places
table, the camera for a place.  Slide and result *layers* are opaque objects here
(compared by identity, named through :func:`~.result_layers.result_layer_name`), so a
test drives the controller with plain objects and a real slide, without a viewer; the
widget (:mod:`.classify_widget`) only binds it to Qt and the viewer.

A MagNet (002) draws nothing: its summary says "one pass" and what it magnified, in
the words of :meth:`~napari_zoomin.engine.results.Result.summary`
(:func:`summary_lines`), and its table lists the patches the classifier read, in
order, with the predicted class's probability after each (the trace, 002 figure 5)
instead of places.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ZoominError
from .model_choices import DEMO
from .result_layers import (
    LAYER_KEY,
    MAX_PLACES,
    OUTLINE_WIDTH_PX,
    PLACE_HIGHLIGHT,
    LayerData,
    magnified_legend,
    patch_indices,
    place_rows,
    place_view,
    result_layer_data,
    result_layer_name,
    tissue_mask_from_labels,
    tissue_words,
    warning_lines,
)
from .result_layers import summary_lines as sampling_summary_lines

if TYPE_CHECKING:
    from ..engine.checkpoints import Checkpoint
    from ..engine.places import Place
    from ..engine.results import Result
    from ..slide import Slide

__all__ = [
    "ClassifyController",
    "Job",
    "Outcome",
    "ResultSet",
    "ResultText",
    "TableView",
    "magnified_words",
    "summary_lines",
    "trace_values",
]

log = logging.getLogger(__name__)

Frame = tuple[tuple[float, float], tuple[float, float]]


@dataclass
class Job:
    """Everything a classification needs, captured on the GUI thread when it starts."""

    slide: Any  # the slide layer (opaque here)
    open_slide: Callable[[], Slide]  # opens the slide behind it (called in the worker)
    frame: Frame
    model: str
    device: str
    draws: int
    seed: int
    tissue: np.ndarray | None = None  # an edited tissue mask (copy), or None for "auto"


@dataclass
class Outcome:
    """What the worker returns: a result and its layer data, or why there is none."""

    result: Result | None = None
    layer_data: list[LayerData] | None = None
    layers: list | None = None  # the front end's layers made from layer_data
    cancelled: bool = False
    error: str | None = None


@dataclass
class ResultSet:
    """One slide's shown result: the slide layer, the Result, and its layers."""

    slide: Any
    result: Result
    frame: Frame
    layers: list = field(default_factory=list)  # bottom to top; removed layers are dropped


@dataclass(frozen=True)
class ResultText:
    """The summary the widget shows: the prediction first, then why to doubt it, then
    probabilities, cost and what was looked at."""

    prediction: str
    warnings: str
    details: str


@dataclass(frozen=True)
class TableView:
    """The places table: column headers, rows of text, and each row's place (a
    :class:`~napari_zoomin.engine.places.Place`, or for a MagNet's patches the level-0
    ``[top, left, h, w]`` box)."""

    columns: list[str]
    rows: list[list[Any]]
    places: list[Place | list[float]]
    #: what a row is: "places" (where the evidence is) or "patches" (a MagNet's, in order)
    kind: str = "places"


def table_columns(unit: str) -> list[str]:
    return ["rank", "share", "score", "sub-tiles", f"x ({unit})", f"y ({unit})", f"size ({unit})"]


def _score_text(score: float | None) -> str:
    """A place's score as the table shows it: two decimals, "–" where there is none."""
    return "–" if score is None or not math.isfinite(score) else f"{score:.2f}"


def patch_columns(label: str, unit: str) -> list[str]:
    return ["patch", f"p {label}", "change", "zoom", f"x ({unit})", f"y ({unit})", f"size ({unit})"]


def magnified_words(result: Result) -> str:
    """What a MagNet did (:meth:`~napari_zoomin.engine.results.Result.magnified_words`)."""
    return result.magnified_words()


def trace_values(result: Result) -> list[float]:
    """A MagNet's probability of the predicted class after each patch it read, in
    reading order (002 figure 5); empty for the other kinds."""
    if result.magnified is None:
        return []
    return [float(row[result.label]) for row in result.magnified.get("trace") or []]


def _change(delta: float) -> str:
    """A probability change as the table shows it: signed, 3 decimals, 0 unsigned."""
    text = f"{delta:+.3f}"
    return "0.000" if text in ("+0.000", "-0.000") else text


def summary_lines(result: Result) -> list[str]:
    """The widget's summary lines: prediction, probabilities, time, pixels, what was
    looked at.  A MagNet (``mode == "magnify"``) made one deterministic pass: no
    spread, no draws (``Draws (K)`` does not apply), and what it magnified instead of
    tiles and sub-tiles; the other kinds': :func:`~.result_layers.summary_lines`."""
    if result.mode != "magnify" or result.magnified is None or not result.magnified["boxes"]:
        return sampling_summary_lines(result)
    lines = sampling_summary_lines(result)
    probs = ", ".join(f"{c} {result.probabilities[c]:.3f}" for c in result.classes)
    n_patches = len(patch_indices(result))
    trace = trace_values(result)
    first = f"; p {result.label} {trace[0]:.3f} after the first patch" if trace else ""
    return [
        f"Prediction: {result.label} (p = {result.probability:.3f}, one pass)",
        f"Probabilities (one deterministic pass; Draws (K) does not apply): {probs}",
        lines[2],  # time
        lines[3],  # pixels decoded
        f"Looked at {magnified_words(result)}; read {n_patches} patch"
        f"{'es' * (n_patches != 1)} in order{first}; tissue: {tissue_words(result)}",
    ]


EMPTY_TABLE = TableView(table_columns("µm"), [], [])


class ClassifyController:
    """The state of one ``Classify slide`` widget (see the module docstring)."""

    def __init__(self) -> None:
        self.sets: list[ResultSet] = []  # every slide's shown result, oldest first
        self.shown: ResultSet | None = None  # the result the summary and table show
        self.busy = False
        self.cancel_event = threading.Event()
        self._checkpoints: dict[tuple, Checkpoint] = {}
        self._checkpoint_lock = threading.Lock()
        self._warmed: set[tuple] = set()  # cache keys of the checkpoints warmed up
        self._warm_lock = threading.Lock()

    # ------------------------------------------------------------------ models
    def checkpoint(self, model: str, device: str) -> Checkpoint:
        """The loaded checkpoint, cached per (model, file version, device)."""
        return self._cached(model, device)[1]

    def _cached(self, model: str, device: str) -> tuple[tuple, Checkpoint]:
        """The cache key and the checkpoint of :meth:`checkpoint`.  Warm-ups are
        remembered by key, not by ``id``: a replaced checkpoint's address can be
        reused by a new object that was never warmed."""
        from ..engine.checkpoints import DEMO_MODEL, load_model
        from ..engine.runtime import resolve_device

        dev = resolve_device(device, fix="Choose cpu or auto.")
        file = DEMO_MODEL if model == DEMO else Path(model)
        try:
            stat = file.stat()
            version = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            version = None  # load_model says what is wrong with the path
        key = (model, version, str(dev))
        with self._checkpoint_lock:
            if key not in self._checkpoints:
                checkpoint = load_model(model, dev)
                for old in [k for k in self._checkpoints if k[0] == model and k[2] == key[2]]:
                    del self._checkpoints[old]  # an older version of the same file
                    self._warmed.discard(old)
                self._checkpoints[key] = checkpoint
            return key, self._checkpoints[key]

    def warm(self, model: str, device: str) -> bool:
        """Load a model and warm it up (:func:`~..engine.inference.warm_up`: a small
        synthetic slide classified once), in a background thread before the first
        click, so the first slide costs what the next ones do (0.4 s less on a
        100,000² slide).  Never raises: the click says what is wrong with the model.
        True once this model is warm."""
        from ..engine.inference import warm_up

        try:
            key, ckpt = self._cached(model, device)
            with self._warm_lock:  # one warm-up per model, however often it is asked
                if key not in self._warmed:
                    warm_up(ckpt)
                    self._warmed.add(key)
            return True
        except Exception:  # the click reports it, in words, when the user asks
            log.info("warming up model %r on %r failed", model, device, exc_info=True)
            return False

    def is_warm(self, model: str, device: str) -> bool:
        """Whether :meth:`warm` has warmed this model (loaded, on this device)."""
        from ..engine.runtime import resolve_device

        dev = str(resolve_device(device))
        with self._checkpoint_lock:
            cached = [k for k in self._checkpoints if k[0] == model and k[2] == dev]
        return any(k in self._warmed for k in cached)

    # ------------------------------------------------------------------ running
    def run(self, job: Job, progress: Callable[[float, str], None]) -> Outcome:
        """The worker's body: load the (cached) model, open the slide, classify, build
        the result layer data.  Never raises: a cancel, a user error (its message) or a
        bug (said plainly, traceback in the log) comes back in the :class:`Outcome`."""
        from ..engine.inference import Cancelled, classify

        try:
            ckpt = self.checkpoint(job.model, job.device)
            with job.open_slide() as slide:
                tissue: Any = "auto"
                if job.tissue is not None:
                    tissue = tissue_mask_from_labels(job.tissue, slide.shape)
                result = classify(
                    slide,
                    ckpt,
                    draws=job.draws,
                    seed=job.seed,
                    device=job.device,
                    tissue=tissue,
                    progress=progress,
                    cancel=self.cancel_event.is_set,
                    threads="auto",  # a busy laptop: fewer threads are faster
                )
            return Outcome(result=result, layer_data=result_layer_data(result, job.frame))
        except Cancelled:
            return Outcome(cancelled=True)
        except ZoominError as exc:
            return Outcome(error=str(exc))
        except Exception as exc:  # a bug: say so plainly, keep the traceback in the log
            log.exception("classification failed")
            return Outcome(
                error=f"classification failed unexpectedly ({type(exc).__name__}: {exc}). "
                "Please report this with the log."
            )

    # ------------------------------------------------------------------ results
    def set_of(self, layer) -> ResultSet | None:
        """The result set of a slide layer, or of one of its result layers."""
        for rs in self.sets:
            if rs.slide is layer or any(lay is layer for lay in rs.layers):
                return rs
        return None

    def slide_of(self, layer):
        """The slide a layer belongs to: its result set's slide, else the layer itself."""
        rs = self.set_of(layer)
        return rs.slide if rs is not None and rs.slide is not layer else layer

    def forget(self, layer) -> bool:
        """A layer went away: drop it (a slide takes its results along).  True when the
        shown result is gone with it."""
        for rs in list(self.sets):
            rs.layers = [lay for lay in rs.layers if lay is not layer]
            if not rs.layers or rs.slide is layer:
                self.sets.remove(rs)
        return self.shown is not None and self.shown not in self.sets

    def replace(self, slide, result: Result, frame: Frame) -> tuple[ResultSet | None, ResultSet]:
        """A new result of ``slide``: its old set (whose layers the widget removes) and
        the new one (shown).  Other slides' bare-named layers get their slide's name."""
        old = self.set_of(slide)
        if old is not None and old.slide is slide:
            self.sets.remove(old)
        else:
            old = None
        for rs in self.sets:
            for lay in rs.layers:
                base = lay.metadata.get(LAYER_KEY)
                if base is not None and lay.name == base:
                    lay.name = result_layer_name(base, rs.slide.name)
        new = ResultSet(slide=slide, result=result, frame=frame)
        self.sets.append(new)
        self.shown = new
        return old, new

    # ------------------------------------------------------------------ showing
    @staticmethod
    def text(result: Result) -> ResultText:
        lines = summary_lines(result)
        return ResultText(lines[0], "\n".join(warning_lines(result)), "\n".join(lines[1:]))

    @staticmethod
    def table(result: Result, n: int = MAX_PLACES) -> TableView:
        """The ``n`` places with most evidence as rows: share in %, score (what the
        classifier saw there, :attr:`~napari_zoomin.engine.places.Place.score`), centre and size in
        µm (pixels, and said so, when the slide has no pixel size).  A MagNet's: every
        patch it read (:meth:`patch_table`)."""
        if patch_indices(result):
            return ClassifyController.patch_table(result)
        rows = place_rows(result, n)
        unit = rows[0]["unit"] if rows else ("µm" if result.slide.get("mpp") else "px")
        digits = ".0f" if unit == "px" else ".1f"
        data = [
            [
                r["rank"],
                f"{r['share']:.1f} %" if r["share"] >= 0.05 else "< 0.1 %",
                _score_text(r["score"]),
                r["subtiles"],
                f"{r['x']:{digits}}",
                f"{r['y']:{digits}}",
                f"{r['w']:{digits}} x {r['h']:{digits}}",
            ]
            for r in rows
        ]
        return TableView(table_columns(unit), data, [r["place"] for r in rows])

    @staticmethod
    def patch_table(result: Result) -> TableView:
        """A MagNet's patches in reading order: the predicted class's probability once
        read, its change from the previous patch, the zoom, and centre and size in µm
        (pixels, and said so, when the slide has no pixel size)."""
        boxes = result.magnified["boxes"]
        mpp = result.slide.get("mpp")
        per_px = (1.0, 1.0) if mpp is None else (float(mpp[0]), float(mpp[1]))
        unit, digits = ("px", ".0f") if mpp is None else ("µm", ".1f")
        trace = trace_values(result)
        rows, found = [], []
        for k, m in enumerate(patch_indices(result)):
            top, left, h, w = (float(v) for v in boxes[m]["box"])
            p = trace[k] if k < len(trace) else float("nan")
            change = "–" if k == 0 or k >= len(trace) else _change(p - trace[k - 1])
            rows.append(
                [
                    k + 1,
                    f"{p:.3f}",
                    change,
                    f"{float(boxes[m]['zoom']):.3g}x",
                    f"{(left + w / 2) * per_px[1]:{digits}}",
                    f"{(top + h / 2) * per_px[0]:{digits}}",
                    f"{w * per_px[1]:{digits}} x {h * per_px[0]:{digits}}",
                ]
            )
            found.append([top, left, h, w])
        return TableView(patch_columns(result.label, unit), rows, found, kind="patches")

    @staticmethod
    def legend(result: Result) -> list[tuple[str, str]]:
        """``(words, colour)`` of the ``magnified regions`` layer's depths (a MagNet's)."""
        return magnified_legend(result)

    def place_camera(
        self, place: Place | list[float], canvas_size: tuple[int, int]
    ) -> tuple[tuple[float, float], float]:
        """Camera ``(centre, zoom)`` showing a place of the shown result, never past full
        resolution (:func:`~.result_layers.place_view`)."""
        if self.shown is None:
            raise ValueError("no result is shown")
        return place_view(place, self.shown.frame, canvas_size)

    @staticmethod
    def highlight_widths(ranks, rank: int) -> list[float]:
        """Screen widths of the places' outlines with the place of ``rank`` selected."""
        return [OUTLINE_WIDTH_PX * (PLACE_HIGHLIGHT if r == rank else 1.0) for r in ranks]
