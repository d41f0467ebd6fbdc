"""What :func:`~napari_zoomin.training.train` reports while it runs: typed progress events.

``progress(event)`` receives one of these small, frozen dataclasses; consumers tell
them apart by type (``isinstance(event, EpochStep)``) and read their attributes.
Every event has ``epoch`` (1-based; 0 before the first) and ``epochs`` (the run's
maximum), and ``stage``, the name of its kind of work (``"resolution"``,
``"pretrain"``, ``"train"``, ``"validate"``).  :meth:`TrainEvent.to_dict` gives
the plain dict (with ``stage``) for logs and JSON.

In the order a run emits them:

* :class:`Resolution`: once, when the slides are not all read at one physical pixel
  size (training in pixels, or some slides in their own pixels); ``message`` says so.
* :class:`Pretraining`, :class:`Pretrained`: before and after the tile-classifier
  pre-training on annotated slides (000 §2.5), with a :class:`PretrainProgress`
  after every pre-training epoch of every network between them.
* :class:`EpochStep`: after every optimisation step.
* :class:`Validating`: after every chunk of validation slides.
* :class:`Validated`: once per finished epoch, with the epoch's means, the validation
  result, the share of attention on the ROIs and whether it is the best so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

__all__ = [
    "EpochStep",
    "PretrainProgress",
    "Pretrained",
    "Pretraining",
    "ProgressCallback",
    "Resolution",
    "TrainEvent",
    "Validated",
    "Validating",
]


@dataclass(frozen=True)
class TrainEvent:
    """What every progress event has.

    Attributes:
        epoch: the epoch it belongs to (1-based; 0 before the first epoch).
        epochs: the run's maximum number of epochs.
    """

    stage: ClassVar[str] = ""
    epoch: int
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        """``{"stage": ..., **fields}``: the event as plain data (for logs, JSON)."""
        return {"stage": self.stage, **asdict(self)}


@dataclass(frozen=True)
class Resolution(TrainEvent):
    """The training inputs are not all read at one physical pixel size (said once).

    Attributes:
        mpp: the training pixel size (µm/pixel), ``None`` when training in pixels.
        message: what happens and why, for the user.
    """

    stage: ClassVar[str] = "resolution"
    mpp: float | None
    message: str


@dataclass(frozen=True)
class Pretraining(TrainEvent):
    """Tile-classifier pre-training starts.

    Attributes:
        step, steps: 0 and the pre-training epochs.
        slides: the annotated training slides it uses.
    """

    stage: ClassVar[str] = "pretrain"
    step: int
    steps: int
    slides: int


@dataclass(frozen=True)
class PretrainProgress(TrainEvent):
    """One pre-training epoch of one network done.

    The networks are pre-trained one after the other, each for the pre-training
    epochs; ``step`` counts the epochs done over all of them.

    Attributes:
        step, steps: epochs done (1-based) and in all (pre-training epochs × networks).
        network: the network this epoch trained (``"stage1_attention"``,
            ``"stage2_attention"`` or ``"feature"``).
        network_epoch, network_epochs: this network's epoch (1-based) and its epochs.
        loss: the epoch's mean binary cross-entropy.
    """

    stage: ClassVar[str] = "pretrain"
    step: int
    steps: int
    network: str
    network_epoch: int
    network_epochs: int
    loss: float


@dataclass(frozen=True)
class Pretrained(TrainEvent):
    """Tile-classifier pre-training finished.

    Attributes:
        step, steps: both the pre-training epochs.
        loss: mean of the networks' final losses (``None`` when none was recorded).
        losses: each pre-trained network's final loss.
    """

    stage: ClassVar[str] = "pretrain"
    step: int
    steps: int
    loss: float | None
    losses: dict[str, float]


@dataclass(frozen=True)
class EpochStep(TrainEvent):
    """One optimisation step done.

    Attributes:
        step, steps: this step (1-based) and the steps of the epoch.
        loss: the step's total loss.
        accuracy: the share of the step's slides classified right.
    """

    stage: ClassVar[str] = "train"
    step: int
    steps: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class Validating(TrainEvent):
    """A chunk of validation slides predicted.

    Attributes:
        step, steps: chunks done (1-based) and in all.
    """

    stage: ClassVar[str] = "validate"
    step: int
    steps: int


@dataclass(frozen=True)
class Validated(TrainEvent):
    """An epoch finished and was validated (its checkpoints are written).

    Attributes:
        step, steps: both the epoch's steps.
        loss, accuracy: the epoch's mean training loss and accuracy.
        val_accuracy, val_loss: the validation result (``None`` without validation
            slides).
        best: this epoch is the best so far (it is in the model checkpoint).
        best_epoch: the best epoch so far.
        stopped_early: early stopping ends the run here.
        terms: the epoch's mean of each loss term the model reported
            (``"classification"``, ..., a MagNet's ``"auxiliary"`` and
            ``"paradoxical"``), as ``train_<term>`` in the history.
        roi_attention_stage1, roi_attention_stage2: the mean share of the stage-1 and
            stage-2 attention on the ROI of the slides that have one
            (:func:`~.history.roi_attention_shares`), ``None`` where no slide has one
            (or the model has no such stage).
        roi_attention_split: the slides they were measured on: ``"val"`` (the
            validation predictions) or ``"train"`` (no validation slides); ``None``
            when neither was measured.
        slides_per_minute: training slides per minute of the epoch's wall time
            (validation included), as in the history.
    """

    stage: ClassVar[str] = "validate"
    step: int
    steps: int
    loss: float
    accuracy: float
    val_accuracy: float | None
    val_loss: float | None
    best: bool
    best_epoch: int | None
    stopped_early: bool
    terms: dict[str, float] = field(default_factory=dict)
    roi_attention_stage1: float | None = None
    roi_attention_stage2: float | None = None
    roi_attention_split: str | None = None
    slides_per_minute: float | None = None


ProgressCallback = Callable[[TrainEvent], None]
