"""Whether a training run starts fresh, resumes an interrupted run, or is refused.

A run keeps its training checkpoint beside the model (:func:`last_checkpoint_path`:
``model.safetensors`` → ``model.last.safetensors``) with the trainer's settings,
data summary and :class:`TrainingState`.  :func:`resume_plan` is the one rule that
reads it, used by :func:`~napari_zoomin.training.train` (with the data and the
device: it also loads the weights) and by the Train classifier widget (settings
only, before the slides are read, to say what Train will do):

* ``"fresh"``: nothing to resume (no training checkpoint, ``resume=False``), or a
  finished run that the caller restarts (``restart_finished``, the widget);
* ``"resume"``: an interrupted run with the same settings and data continues where
  it stopped (epoch, step, generator states);
* ``"finished"``: that run had already finished (its epochs, or early stopping):
  :func:`~napari_zoomin.training.train` returns its result without training;
* ``"refuse"``: the file is no training checkpoint, or another run's (other settings,
  architecture, data or classes); :meth:`ResumePlan.error` says which, and how to
  start over.

Settings that do not change what an epoch computes may differ
(:data:`RESUMABLE_CHANGES`: ``epochs``, patience, device, workers, validation draws,
the view cache).
A damaged or foreign file raises :class:`~napari_zoomin.errors.CheckpointError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..engine.checkpoints import (
    Checkpoint,
    complete_config,
    load_checkpoint,
    read_checkpoint_info,
)
from ..errors import TrainingError
from .config import TrainConfig, model_config_dict, model_settings, plain, saved_config

if TYPE_CHECKING:
    import torch

    from ..engine.dataset import SlideDataset

__all__ = [
    "RESUMABLE_CHANGES",
    "ResumePlan",
    "SavedRun",
    "TrainingState",
    "last_checkpoint_path",
    "read_saved_run",
    "resume_plan",
]

#: settings that may change between an interrupted run and its resumption: they do not
#: change the weights an epoch produces (epochs and patience only say when to stop)
RESUMABLE_CHANGES = (
    "epochs",
    "early_stopping_patience",
    "device",
    "num_workers",
    "val_draws",
    "cache_views",
)

_START_OVER = "pass resume=False (CLI: --no-resume) to start over"


def last_checkpoint_path(out_path: str | Path) -> Path:
    """The training checkpoint beside ``out_path``: ``m.safetensors`` → ``m.last.safetensors``."""
    return Path(out_path).with_suffix(".last.safetensors")


@dataclass
class TrainingState:
    """Everything that continues from one epoch (or step) to the next."""

    epoch: int = 0  # finished epochs
    step: int = 0  # finished steps of epoch ``epoch`` (mid-epoch cancel)
    partial: dict[str, float] = field(default_factory=dict)  # running sums of that epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_accuracy: float | None = None
    best_val_loss: float | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    pretrained: dict[str, list[float]] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def finished(self, epochs: int) -> bool:
        """Nothing left to do in a run of ``epochs`` epochs."""
        return self.stopped_early or self.epoch >= epochs


@dataclass(frozen=True)
class SavedRun:
    """What a training checkpoint says about its run (read from its description).

    Attributes:
        path: the training checkpoint.
        config: the run's trainer settings (:func:`~.config.saved_config`: today's names).
        data: the trainer's data summary (``fingerprint``, ``mpp``, ...).
        state: where the run stands.
        kind, model_config, classes: the checkpoint's model description.
    """

    path: Path
    config: dict[str, Any]
    data: dict[str, Any]
    state: TrainingState
    kind: str
    model_config: dict[str, Any]
    classes: list[str]

    @property
    def epochs(self) -> int | None:
        """The run's own maximum of epochs (``None`` when not recorded)."""
        epochs = self.config.get("epochs")
        return epochs if isinstance(epochs, int) else None

    @property
    def finished(self) -> bool:
        """Finished by its own settings (its epochs, or early stopping)."""
        return self.state.stopped_early or (
            self.epochs is not None and self.state.epoch >= self.epochs
        )


def _saved_run(path: Path, document: dict[str, Any]) -> SavedRun | None:
    """The run of a checkpoint description; ``None`` when it holds no trainer state."""
    info = document.get("info")
    trainer = info.get("trainer") if isinstance(info, dict) else None
    if not isinstance(trainer, dict) or not isinstance(trainer.get("state"), dict):
        return None
    try:
        state = TrainingState(**trainer["state"])
    except TypeError:
        return None
    return SavedRun(
        path=path,
        config=saved_config(trainer.get("config") or {}),
        data=dict(trainer.get("data") or {}),
        state=state,
        kind=str(document.get("kind")),
        model_config=complete_config(str(document.get("kind")), document.get("config") or {}),
        classes=list(document.get("classes") or []),
    )


def read_saved_run(out_path: str | Path) -> SavedRun | None:
    """The run in the training checkpoint beside ``out_path``, without building its model.

    ``None`` when there is none, or when the file is damaged or no training checkpoint
    (:func:`resume_plan` says why).
    """
    from ..errors import CheckpointError

    last = last_checkpoint_path(out_path)
    if not last.is_file():
        return None
    try:
        return _saved_run(last, read_checkpoint_info(last))
    except CheckpointError:
        return None


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`resume_plan` decided.

    Attributes:
        action: ``"fresh"``, ``"resume"``, ``"finished"`` or ``"refuse"`` (module docstring).
        last_path: the training checkpoint.
        run: the run it holds (``None`` when there is none or it holds no state).
        reasons: why it is refused (what differs, or that it is no training checkpoint).
        checkpoint: the loaded training checkpoint (weights, optimizer and generator
            states), when the plan was made with a ``device`` and continues the run.
        restarted: a finished run that this plan starts over (``restart_finished``).
    """

    action: Literal["fresh", "resume", "finished", "refuse"]
    last_path: Path
    run: SavedRun | None = None
    reasons: tuple[str, ...] = ()
    checkpoint: Checkpoint | None = None
    restarted: bool = False

    @property
    def continues(self) -> bool:
        """The run goes on from the saved state (``"resume"`` or ``"finished"``)."""
        return self.action in ("resume", "finished")

    @property
    def history(self) -> list[dict[str, Any]]:
        """The epochs the continued run has done (empty when it starts fresh)."""
        return list(self.run.state.history) if self.continues and self.run else []

    def error(self) -> TrainingError:
        """The :class:`TrainingError` of a refused plan (what differs, how to start over)."""
        if self.run is None:
            return TrainingError(
                self.last_path,
                "is a model checkpoint, not a training checkpoint (no trainer state).",
                f"Delete it or {_START_OVER}.",
            )
        return TrainingError(
            self.last_path,
            "was written by a training run with other settings or data ("
            + "; ".join(self.reasons[:6])
            + ").",
            f"Use the same settings to resume, or {_START_OVER}.",
        )


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{key}: {a!r} → {b!r}")
    return out


def resume_plan(
    out_path: str | Path,
    config: TrainConfig,
    dataset: SlideDataset | None = None,
    *,
    resume: bool = True,
    restart_finished: bool = False,
    device: str | torch.device | None = None,
) -> ResumePlan:
    """Decide how a run of ``config`` writing ``out_path`` starts (module docstring).

    Args:
        out_path: the model checkpoint; the training checkpoint is beside it.
        config: the settings of the new run.
        dataset: its data, compared with the run's (fingerprint, classes); ``None``
            compares the settings only (the classes' count is then the run's).
        resume: ``False`` always starts fresh.
        restart_finished: a finished run starts fresh instead of ``"finished"``.
        device: load the training checkpoint (weights verified) onto this device, for
            a plan that continues the run; ``None`` reads its description only.

    Raises:
        CheckpointError: the training checkpoint is damaged, foreign, or its weights
            do not fit its description (checked when ``device`` is given).
        TrainingError: the new settings give no valid model config.
    """
    last = last_checkpoint_path(out_path)
    if not resume or not last.exists():
        return ResumePlan("fresh", last)
    checkpoint = None
    if device is not None:
        checkpoint = load_checkpoint(last, device)
        document = checkpoint.info
    else:
        document = read_checkpoint_info(last)
    run = _saved_run(last, document)
    if run is None:
        return ResumePlan("refuse", last, reasons=("not a training checkpoint",))
    if restart_finished and run.state.finished(config.epochs):
        return ResumePlan("fresh", last, run, restarted=True)
    reasons = _differences(run.config, config.to_dict())
    num_classes = len(dataset.classes) if dataset is not None else len(run.classes)
    ours = model_config_dict(config.kind, model_settings(config, num_classes, run.model_config))
    if run.kind != config.kind or plain(run.model_config) != ours:
        reasons.append("model architecture")
    if dataset is not None:
        if run.data.get("fingerprint") != dataset.summary()["fingerprint"]:
            reasons.append("training data (slides, labels, splits or annotations)")
        if list(run.classes) != list(dataset.classes):
            reasons.append(f"classes: {run.classes} → {list(dataset.classes)}")
    if reasons:
        return ResumePlan("refuse", last, run, tuple(reasons))
    action = "finished" if run.state.finished(config.epochs) else "resume"
    return ResumePlan(action, last, run, checkpoint=checkpoint)
