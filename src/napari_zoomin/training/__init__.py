"""Training attention-sampling models on labelled slides (napari-free).

* :mod:`.config`: :class:`TrainConfig`, the settings, and :func:`model_settings`,
  the model config they give;
* :mod:`.events`: the typed progress events :func:`train` reports;
* :mod:`.resume`: :func:`resume_plan`, whether a run starts fresh, resumes or is
  refused (used by :func:`train` and the Train classifier widget);
* :mod:`.trainer`: :class:`Trainer`, the steps of a run, and :func:`train`;
* :mod:`.losses`: the stage-1 ROI term :func:`roi_attention_loss`.
* :mod:`.history`: the share of attention on the ROIs per epoch and the history CSV
  beside the checkpoint.
* :mod:`.distributed`: training on several GPUs or machines (``torchrun``):
  :class:`~.distributed.DistributedTrainer`, ``train(..., distributed=True)``.

::

    from napari_zoomin.training import TrainConfig, train

    result = train(dataset, TrainConfig(epochs=50, n_samples=20), "model.safetensors")
"""

from .config import POOLINGS, TrainConfig, model_settings
from .events import (
    EpochStep,
    Pretrained,
    Pretraining,
    PretrainProgress,
    ProgressCallback,
    Resolution,
    TrainEvent,
    Validated,
    Validating,
)
from .losses import roi_attention_loss
from .resume import (
    ResumePlan,
    SavedRun,
    TrainingState,
    last_checkpoint_path,
    read_saved_run,
    resume_plan,
)
from .trainer import Trainer, TrainResult, stratified_batches, train

__all__ = [
    "POOLINGS",
    "EpochStep",
    "PretrainProgress",
    "Pretrained",
    "Pretraining",
    "ProgressCallback",
    "Resolution",
    "ResumePlan",
    "SavedRun",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "Trainer",
    "TrainingState",
    "Validated",
    "Validating",
    "last_checkpoint_path",
    "model_settings",
    "read_saved_run",
    "resume_plan",
    "roi_attention_loss",
    "stratified_batches",
    "train",
]
