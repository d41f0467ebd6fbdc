"""Training an attention-sampling model on labelled slides (000 §2, A.5).

:func:`train` runs Adam on ``model.loss`` (eq. 10, plus eq. 11 for annotated slides)
over seeded, class-stratified mini-batches, validates every epoch with sampled
predictions, keeps the best model by validation accuracy (ties: lower validation
loss) in ``out_path`` and a resumable training checkpoint beside it
(``<out>.last.safetensors``), stops early when validation stops improving, reports
progress through a callback and can be cancelled between steps.

Determinism: the model's initial weights come from ``seed``; every epoch draws its
batch order, its samples (tiles, sub-tiles) and any dropout from generators seeded
by ``(seed, epoch)``, and validation from a generator seeded by ``seed`` alone.  An
epoch therefore depends only on the weights and optimizer state at its start (plus,
when cancelled mid-epoch, the generator states saved with them), so a run that is
interrupted and resumed ends with the same weights as one that was not — bit for
bit on the CPU (on CUDA, mixed precision and non-deterministic kernels may differ).

Checkpoints are safetensors files written atomically (:mod:`.checkpoints`): an
interruption at any moment leaves the previous ones intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import TrainingError
from ..models import AttentionSamplingModel, grad_scaler, pretrain_tile_classifiers, select_device
from ..models.networks import class_probabilities
from ..models.pretrain import POOLINGS
from ..models.source import full_region, read_roi
from .checkpoints import MODEL_KINDS, build_model, load_checkpoint, save_checkpoint
from .dataset import DEFAULT_ROI_LABELS, SlideDataset, SlideRecord
from .trust import training_profile

__all__ = [
    "ProgressCallback",
    "TrainConfig",
    "TrainResult",
    "last_checkpoint_path",
    "model_settings",
    "stratified_batches",
    "train",
]

ProgressCallback = Callable[[dict[str, Any]], None]

# Settings that may change between an interrupted run and its resumption: they do
# not change the weights an epoch produces (epochs and patience only say when to stop).
_RESUMABLE_CHANGES = ("epochs", "early_stopping_patience", "device", "num_workers", "val_draws")


@dataclass
class TrainConfig:
    """How to train (defaults: 000's Camelyon16 set-up, A.5 and §4, for whole slides).

    Optimisation:
        kind: model architecture (``"zoomin"``, ``"ats"``, ``"uniform"``, ``"reinforce-ats"``).
        epochs: maximum epochs (000 Camelyon16: 200).
        batch_size: slides per step (000: 5).
        lr: Adam learning rate (000: 1e-4 for NeedleCamelyon and Camelyon16, 1e-3 for the
            small colon-cancer images); β = (0.9, 0.999) as in 000.
        attention_lr: learning rate of the attention network(s) ``a`` (and ``b``);
            ``None`` = ``lr``.  Attention logits must move by about ``log(cells)`` (≈ 10
            on a slide) to concentrate, which takes many steps at a rate that suits
            ``f`` and ``g``.
        weight_decay: Adam L2 penalty (000: none).
        seed: initial weights, batch order, sampling (see the module docstring).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:1"``, ...
        early_stopping_patience: stop after this many epochs without a better
            validation result (0 = never; 000 trains a fixed number of epochs).
        val_draws: sampled estimates per validation slide (mean probability).
        balanced_batches: spread the classes evenly over the batches of an epoch (a
            stratified shuffle).  With one informative sub-tile among N, unbalanced
            batches let a label-prior term dominate the gradient early on.

    Model (see :class:`~napari_zoomin.models.ZoomInConfig`):
        view_scale: ``s1`` (000 Camelyon16: 0.0625 = 1/16).
        stage2_scale: ``s2``, relative to the full-resolution tile (000: 0.125).
        tile_size: level-0 side of a stage-1 tile (000 does not give it for Camelyon16;
            256 > 1/s1 covers the slide and gives a 32×32 stage-2 view at s2 = 1/8).
        subtile_size: level-0 side of a sub-tile, the feature network's input (000: 50).
        n_samples: ``N`` (000 Camelyon16: 100; use 10-30 on a CPU).
        feature_dim, feature_hidden, feature_channels: the LeNet ``f`` (Ilse et al. sizes).
        entropy_weight: ``λ`` (000: 1e-5).
        contrastive, contrastive_warmup_epochs: in-sample contrastive loss after a
            warm-up (000: on, after 10 epochs).
        pixel_weight: weight of the attention-map MSE on annotated slides (eq. 11).
        roi_attention_weight: weight of an extra stage-1 term on slides with ROI
            pixels: ``KL(M̃ ‖ α)``, the cross-entropy of ``α`` against the ROI mask at the
            view normalised to a distribution (:func:`~..models.losses.mask_target`),
            minus the target's entropy.  0 (off) by default, as in 000.  Eq. (11)'s MSE
            has a gradient proportional to ``α`` itself, which vanishes on slide-sized
            attention maps (tens of thousands of tissue cells: ``α ≈ 2·10⁻⁵``); the
            cross-entropy's gradient on the logits is ``α − M̃``, so the attention finds
            small annotated regions in tens of steps (measured on the sample slides).
        model_options: any other setting of the kind's config (``uniform_mix``,
            ``attention_norm``, ...), applied last.

    Pixel-level annotations (000 §2.5):
        pretrain_epochs: epochs of tile-classifier pre-training of ``a``, ``b`` and ``f``
            when training slides carry ROI annotations (0 = off).
        pretrain_patches: patches per annotated slide and network for pre-training.
        pretrain_pooling: how a pre-trained attention map becomes one patch logit:
            ``"mean"`` (000's global average pooling) or ``"max"``, for ROIs that fill a
            small part of a patch (a few tumour cells in a 16-cell view patch).
        roi_labels: annotation labels that are ROI (e.g. ``("Tumor",)``).

    Starting point:
        init_from: start from the weights of this checkpoint (a path or ``"demo"``)
            instead of a random initialisation: fine-tuning a model on new slides, or
            a second training phase with other settings. Its kind and architecture
            must be those of these settings.

    Data:
        num_workers: threads decoding the regions of one read.
    """

    kind: str = "zoomin"
    epochs: int = 200
    batch_size: int = 5
    lr: float = 1e-4
    attention_lr: float | None = None
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    early_stopping_patience: int = 20
    val_draws: int = 8
    balanced_batches: bool = True
    view_scale: float = 0.0625
    stage2_scale: float = 0.125
    tile_size: int = 256
    subtile_size: int = 50
    n_samples: int = 100
    feature_dim: int = 512
    feature_hidden: int = 512
    feature_channels: tuple[int, int] = (36, 48)
    entropy_weight: float = 1e-5
    contrastive: bool = True
    contrastive_warmup_epochs: int = 10
    pixel_weight: float = 1.0
    roi_attention_weight: float = 0.0
    model_options: dict[str, Any] = field(default_factory=dict)
    pretrain_epochs: int = 5
    pretrain_patches: int = 32
    pretrain_pooling: str = "mean"
    roi_labels: tuple[str, ...] = DEFAULT_ROI_LABELS
    init_from: str | None = None
    num_workers: int = 4

    def __post_init__(self) -> None:
        self.feature_channels = tuple(int(c) for c in self.feature_channels)  # type: ignore[assignment]
        self.roi_labels = tuple(self.roi_labels)
        self.model_options = dict(self.model_options)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (stored in checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        """Raise :class:`TrainingError` for settings that cannot train."""
        problems = []
        if self.kind not in MODEL_KINDS:
            problems.append(f"unknown model kind {self.kind!r} (choose {', '.join(MODEL_KINDS)})")
        for name in ("epochs", "batch_size", "val_draws", "n_samples", "tile_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "attention_lr"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                problems.append(f"{name} must be a positive number, got {value}")
        for name in ("view_scale", "stage2_scale"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in (
            "early_stopping_patience",
            "pretrain_epochs",
            "weight_decay",
            "roi_attention_weight",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.seed < 0:
            problems.append(f"seed must not be negative, got {self.seed}")
        if self.pretrain_pooling not in POOLINGS:
            problems.append(
                f"pretrain_pooling must be 'mean' or 'max', got {self.pretrain_pooling!r}"
            )
        if problems:
            raise TrainingError(None, "invalid training settings: " + "; ".join(problems) + ".")


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        history: one dict per finished epoch (``epoch``, ``train_loss``,
            ``train_accuracy``, ``val_loss``, ``val_accuracy``, loss terms, ``seconds``).
        best_epoch: the epoch (1-based) saved in ``checkpoint_path``, or ``None``.
        best_val_accuracy: its validation accuracy (``None`` without validation slides).
        checkpoint_path: the best model (``load_checkpoint`` / ``--model``).
        last_checkpoint_path: the resumable training checkpoint.
        cancelled: stopped by ``cancel()``; resume to continue.
        stopped_early: stopped by early stopping.
        seconds: wall time of this call.
    """

    history: list[dict[str, Any]]
    best_epoch: int | None
    best_val_accuracy: float | None
    checkpoint_path: Path
    last_checkpoint_path: Path
    cancelled: bool = False
    stopped_early: bool = False
    seconds: float = 0.0


def last_checkpoint_path(out_path: str | Path) -> Path:
    """The training checkpoint beside ``out_path``: ``m.safetensors`` → ``m.last.safetensors``."""
    return Path(out_path).with_suffix(".last.safetensors")


def model_settings(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The model config dict of ``config.kind`` for ``num_classes`` classes."""
    settings: dict[str, Any] = {
        "num_classes": num_classes,
        "view_scale": config.view_scale,
        "n_samples": config.n_samples,
        "feature_dim": config.feature_dim,
        "feature_hidden": config.feature_hidden,
        "feature_channels": tuple(config.feature_channels),
        "entropy_weight": config.entropy_weight,
        "pixel_weight": config.pixel_weight,
    }
    if config.kind == "zoomin":
        settings.update(
            stage2_scale=config.stage2_scale,
            tile_size=(config.tile_size, config.tile_size),
            subtile_size=(config.subtile_size, config.subtile_size),
            contrastive=config.contrastive,
            contrastive_warmup_epochs=config.contrastive_warmup_epochs,
        )
    else:
        settings["patch_size"] = (config.subtile_size, config.subtile_size)
    settings.update(config.model_options)
    return settings


def _seed(*keys: int) -> int:
    """A 63-bit seed derived from integers (``SeedSequence``: unrelated streams per key)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def stratified_batches(
    labels: Sequence[int], batch_size: int, generator: torch.Generator, balanced: bool = True
) -> list[list[int]]:
    """One epoch of mini-batches of positions into ``labels``, every item once.

    ``balanced``: each class is shuffled and its items are spread evenly over the
    epoch (item k of a class of n sits at ``(k + u)/n``, ``u ~ U(0, 1)``), so every
    batch holds the classes in about their overall proportion.  Otherwise a plain
    shuffle.
    """
    n = len(labels)
    if not balanced:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        keys = torch.empty(n, dtype=torch.float64)
        for cls in sorted(set(labels)):
            members = torch.tensor([i for i, y in enumerate(labels) if y == cls])
            members = members[torch.randperm(len(members), generator=generator)]
            jitter = torch.rand(len(members), generator=generator, dtype=torch.float64)
            keys[members] = (torch.arange(len(members), dtype=torch.float64) + jitter) / len(
                members
            )
        order = torch.argsort(keys, stable=True).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _oom_error(path: Path, device: torch.device, where: str, config: TrainConfig) -> TrainingError:
    return TrainingError(
        path,
        f"ran out of memory on {device} {where}.",
        f"Use fewer samples (N = {config.n_samples}, --n-samples), smaller tiles or sub-tiles "
        f"({config.tile_size}/{config.subtile_size} px, --tile-size/--subtile-size) or a "
        f"smaller batch ({config.batch_size}, --batch-size).",
    )


class _LazySource:
    """A slide of the dataset opened on every access (for pre-training over many slides)."""

    def __init__(self, dataset: SlideDataset, index: int):
        self.dataset, self.index = dataset, index
        self.shape = dataset[index].shape

    def read(self, regions, scale):
        return self.dataset[self.index].read(regions, scale)

    def tissue_mask(self, scale):
        return self.dataset[self.index].tissue_mask(scale)

    def read_roi(self, regions, scale):
        return self.dataset[self.index].read_roi(regions, scale)


@dataclass
class _State:
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


def _versions() -> dict[str, str]:
    return {
        "napari_zoomin": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _as_dataset(data, classes, config: TrainConfig) -> SlideDataset:
    if isinstance(data, SlideDataset):
        return data
    records = list(data)
    if not records or not all(isinstance(r, SlideRecord) for r in records):
        raise TrainingError(None, "train() needs a SlideDataset or a list of SlideRecords.")
    if classes is None:
        names: dict[int, str] = {}
        for r in records:
            names.setdefault(r.label_index, r.label)
        if sorted(names) != list(range(len(names))):
            raise TrainingError(None, "the records' label indices are not 0..C-1; pass classes.")
        classes = [names[i] for i in range(len(names))]
    return SlideDataset(records, classes, roi_labels=config.roi_labels, workers=config.num_workers)


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in _RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{key}: {a!r} → {b!r}")
    return out


def train(
    data: SlideDataset | Sequence[SlideRecord],
    config: TrainConfig | None = None,
    out_path: str | Path = "model.safetensors",
    *,
    classes: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train a model on labelled slides; see the module docstring.

    Args:
        data: a :class:`SlideDataset`, or records from :func:`~.dataset.read_labels`
            (records with split ``"train"`` train, ``"val"`` validate, ``"test"`` are
            ignored).
        config: the settings (:class:`TrainConfig` defaults when ``None``).
        out_path: the best model's checkpoint; the training checkpoint goes to
            :func:`last_checkpoint_path` beside it.
        classes: class names when ``data`` is records (default: from the records).
        progress: called with a dict after every step (``stage="train"``), after
            validation (``stage="validate"``, with ``val_accuracy``, ``val_loss``,
            ``best``) and around pre-training (``stage="pretrain"``).
        cancel: polled before every step; when it returns True, the position is saved
            in the training checkpoint and :func:`train` returns with ``cancelled``.
        resume: continue from the training checkpoint if there is one (it must come
            from the same settings and data); ``False`` starts over.

    Raises:
        TrainingError: invalid settings, no training slides, a non-finite loss (the
            checkpoints of the last good epoch stay on disk), out of memory, or a
            training checkpoint from other settings or data.
        CheckpointError: the training checkpoint exists but is damaged or foreign.
        SlideError, AnnotationError: a slide or annotation file cannot be read.
    """
    t_start = time.perf_counter()
    config = config or TrainConfig()
    config.validate()
    out_path = Path(out_path)
    last_path = last_checkpoint_path(out_path)
    if out_path.name.endswith(".last.safetensors"):
        raise TrainingError(out_path, "the model file cannot end in '.last.safetensors'.")
    dataset = _as_dataset(data, classes, config)
    classes = list(dataset.classes)
    train_idx, val_idx = dataset.indices("train"), dataset.indices("val")
    if not train_idx:
        raise TrainingError(None, "no training slides (split 'train').", "Check the labels CSV.")
    labels = dataset.labels
    try:
        device = select_device(config.device)
    except (RuntimeError, ValueError) as exc:
        raise TrainingError(None, f"{exc}.", "Use --device cpu or auto.") from None
    settings = model_settings(config, len(classes))
    summary = dataset.summary()
    summary["classes"] = classes
    emit = progress or (lambda event: None)
    should_stop = cancel or (lambda: False)

    # -- the model, fresh or resumed -------------------------------------------------
    state = _State()
    optimizer_state = None
    rng_state: dict[str, torch.Tensor] = {}
    model: AttentionSamplingModel | None = None
    own_mpp: float | None = None  # the pixel size of a resumed run or of init_from
    resumed = False
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path, device)
        trainer_info = ckpt.info.get("info", {}).get("trainer", {})
        if not trainer_info or "state" not in trainer_info:
            raise TrainingError(
                last_path,
                "is a model checkpoint, not a training checkpoint (no trainer state).",
                "Delete it or pass resume=False (CLI: --no-resume) to start over.",
            )
        diffs = _differences(trainer_info.get("config", {}), config.to_dict())
        if ckpt.kind != config.kind or _plain(ckpt.config) != _plain(
            _model_config_dict(config.kind, settings)
        ):
            diffs.append("model architecture")
        if trainer_info.get("data", {}).get("fingerprint") != summary["fingerprint"]:
            diffs.append("training data (slides, labels, splits or annotations)")
        if list(ckpt.classes) != classes:
            diffs.append(f"classes: {ckpt.classes} → {classes}")
        if diffs:
            raise TrainingError(
                last_path,
                "was written by a training run with other settings or data ("
                + "; ".join(diffs[:6])
                + ").",
                "Use the same settings to resume, or pass resume=False (CLI: --no-resume) "
                "to start over.",
            )
        model = ckpt.model
        resumed = True
        own_mpp = trainer_info.get("data", {}).get("mpp")
        state = _State(**trainer_info["state"])
        optimizer_state = ckpt.optimizer_state
        rng_state = ckpt.rng_state
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(config.seed, 0))
            try:
                model = build_model(config.kind, settings)
            except (ValueError, TypeError) as exc:
                raise TrainingError(None, f"cannot build the {config.kind} model: {exc}.") from None
        if config.init_from:
            own_mpp = _initialise_from(model, config, settings, len(classes))
    model.to(device)

    # -- the pixel size every training input is read at ------------------------------
    mpp, mpp_message = _choose_mpp(dataset, train_idx, val_idx, own_mpp, resumed)
    dataset.model_mpp = mpp
    summary["mpp"] = mpp
    # what the model will know: checked against every slide it classifies (trust.py)
    summary["profile"] = training_profile([dataset.profile(i) for i in train_idx], mpp)
    if mpp_message:
        logging.getLogger(__name__).warning(mpp_message)
        emit(
            {
                "stage": "resolution",
                "epoch": state.epoch,
                "epochs": config.epochs,
                "mpp": mpp,
                "message": mpp_message,
            }
        )

    def info(final: bool = False) -> dict[str, Any]:
        return {
            "trainer": {
                "config": config.to_dict(),
                "data": summary,
                "state": state.to_dict(),
                "finished": final,
            },
            "classes": classes,
            "data": {**summary, "labels_csv": _csv_of(dataset)},
            "metrics": {
                "best_epoch": state.best_epoch,
                "best_val_accuracy": state.best_val_accuracy,
                "best_val_loss": state.best_val_loss,
                "epochs_run": state.epoch,
            },
            "history": state.history,
            "seconds": round(state.seconds, 3),
            "versions": _versions(),
        }

    optimizer = torch.optim.Adam(
        _parameter_groups(model, config),
        lr=config.lr,
        betas=(0.9, 0.999),
        weight_decay=config.weight_decay,
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scaler = grad_scaler(device)
    clock = [time.perf_counter()]  # start of the time not yet added to state.seconds

    def save_last(final: bool = False, rng: dict[str, torch.Tensor] | None = None) -> None:
        state.seconds += time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()
        save_checkpoint(
            last_path, model, classes, info=info(final), optimizer=optimizer, rng_state=rng or {}
        )

    def result(cancelled: bool = False) -> TrainResult:
        return TrainResult(
            history=list(state.history),
            best_epoch=state.best_epoch,
            best_val_accuracy=state.best_val_accuracy,
            checkpoint_path=out_path,
            last_checkpoint_path=last_path,
            cancelled=cancelled,
            stopped_early=state.stopped_early,
            seconds=time.perf_counter() - t_start,
        )

    if state.stopped_early or state.epoch >= config.epochs:
        return result()

    # -- pre-training from ROI masks (000 §2.5) --------------------------------------
    annotated = [i for i in train_idx if dataset.records[i].annotations is not None]
    if state.epoch == 0 and state.step == 0 and state.pretrained is None:
        if config.pretrain_epochs and annotated and should_stop():
            return result(cancelled=True)
        state.pretrained = {}
        if config.pretrain_epochs and annotated:
            emit(
                {
                    "stage": "pretrain",
                    "epoch": 0,
                    "epochs": config.epochs,
                    "step": 0,
                    "steps": config.pretrain_epochs,
                    "slides": len(annotated),
                }
            )
            sources = [_LazySource(dataset, i) for i in annotated]
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed(config.seed, 1))
                    state.pretrained = pretrain_tile_classifiers(
                        model,
                        sources,
                        epochs=config.pretrain_epochs,
                        patches_per_image=config.pretrain_patches,
                        pooling=config.pretrain_pooling,
                        generator=torch.Generator().manual_seed(_seed(config.seed, 2)),
                    )
            except Exception as exc:
                if _is_oom(exc):
                    raise _oom_error(out_path, device, "while pre-training", config) from exc
                raise
            finals = {k: v[-1] for k, v in state.pretrained.items() if v}
            emit(
                {
                    "stage": "pretrain",
                    "epoch": 0,
                    "epochs": config.epochs,
                    "step": config.pretrain_epochs,
                    "steps": config.pretrain_epochs,
                    "loss": float(np.mean(list(finals.values()))) if finals else None,
                    "losses": finals,
                }
            )
        save_last()

    # -- epochs ----------------------------------------------------------------------
    train_labels = [int(labels[i]) for i in train_idx]
    val_generator_seed = _seed(config.seed, 3)
    cancelled = False
    with torch.random.fork_rng(devices=[]):
        while state.epoch < config.epochs:
            epoch = state.epoch
            order_gen = torch.Generator().manual_seed(_seed(config.seed, 4, epoch))
            batches = stratified_batches(
                train_labels, config.batch_size, order_gen, config.balanced_batches
            )
            sampler = torch.Generator().manual_seed(_seed(config.seed, 5, epoch))
            torch.manual_seed(_seed(config.seed, 6, epoch))  # dropout, if any
            if state.step:
                sampler.set_state(rng_state["sampler"])
                torch.set_rng_state(rng_state["torch"])
            sums = dict(state.partial) if state.step else {}
            model.train()
            for step in range(state.step, len(batches)):
                if should_stop():
                    state.step, state.partial = step, sums
                    save_last(rng={"sampler": sampler.get_state(), "torch": torch.get_rng_state()})
                    cancelled = True
                    break
                batch = [train_idx[k] for k in batches[step]]
                sources = dataset.sources(batch)
                batch_labels = labels[batch]
                try:
                    terms = model.loss(sources, batch_labels, epoch=epoch, generator=sampler)
                    loss = terms.total
                    if config.roi_attention_weight:
                        roi_kl = roi_attention_loss(model, sources)
                        loss = loss + config.roi_attention_weight * roi_kl
                        sums["roi_attention"] = sums.get("roi_attention", 0.0) + float(
                            roi_kl.detach()
                        ) * len(batch)
                    if not bool(torch.isfinite(loss.detach())):
                        raise TrainingError(
                            out_path,
                            f"the training loss became {float(loss.detach())} at epoch "
                            f"{epoch + 1}, step {step + 1} (terms: {terms.as_floats()}).",
                            f"Lower the learning rate (now {config.lr:g}, --lr). The checkpoints "
                            f"of the last good epoch ({state.epoch}) are kept.",
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                except TrainingError:
                    raise
                except Exception as exc:
                    if _is_oom(exc):
                        where = f"at epoch {epoch + 1}, step {step + 1}"
                        raise _oom_error(out_path, device, where, config) from exc
                    raise
                n = len(batch)
                probs = class_probabilities(terms.logits.detach().float())
                correct = int((probs.argmax(1).cpu() == terms.labels.cpu()).sum())
                for key, value in {**terms.as_floats(), "total": float(loss.detach())}.items():
                    sums[key] = sums.get(key, 0.0) + value * n
                sums["correct"] = sums.get("correct", 0.0) + correct
                sums["n"] = sums.get("n", 0.0) + n
                emit(
                    {
                        "stage": "train",
                        "epoch": epoch + 1,
                        "epochs": config.epochs,
                        "step": step + 1,
                        "steps": len(batches),
                        "loss": float(loss.detach()),
                        "accuracy": correct / n,
                    }
                )
            if cancelled:
                break
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise TrainingError(
                    out_path,
                    f"the weights became non-finite in epoch {epoch + 1}.",
                    f"Lower the learning rate (now {config.lr:g}, --lr). The checkpoints of "
                    f"the last good epoch ({state.epoch}) are kept.",
                )

            # validation
            val_acc = val_loss = None
            if val_idx:
                val_acc, val_loss = _validate(
                    model,
                    dataset,
                    val_idx,
                    config,
                    val_generator_seed,
                    emit,
                    epoch,
                    out_path,
                    device,
                )
            n = max(sums.get("n", 0.0), 1.0)
            record = {
                "epoch": epoch + 1,
                "train_loss": sums.get("total", 0.0) / n,
                "train_accuracy": sums.get("correct", 0.0) / n,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                **{
                    f"train_{k}": sums.get(k, 0.0) / n
                    for k in (
                        "classification",
                        "contrastive",
                        "entropy",
                        "pixel",
                        "policy",
                        "roi_attention",
                    )
                },
            }
            improved = (
                val_acc is None
                or state.best_val_accuracy is None
                or val_acc > state.best_val_accuracy
                or (val_acc == state.best_val_accuracy and val_loss < state.best_val_loss)
            )
            state.epoch, state.step, state.partial = epoch + 1, 0, {}
            if improved:
                state.best_epoch = epoch + 1
                state.best_val_accuracy, state.best_val_loss = val_acc, val_loss
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            record["seconds"] = round(state.seconds + time.perf_counter() - clock[0], 3)
            state.history.append(record)
            patience = config.early_stopping_patience
            state.stopped_early = bool(
                patience
                and state.epochs_without_improvement >= patience
                and state.epoch < config.epochs
            )
            final = state.stopped_early or state.epoch >= config.epochs
            if improved:
                best_info = info(final)
                best_info.pop("trainer")
                best_info["trainer_config"] = config.to_dict()
                save_checkpoint(out_path, model, classes, info=best_info)
            save_last(final)
            emit(
                {
                    "stage": "validate",
                    "epoch": epoch + 1,
                    "epochs": config.epochs,
                    "step": len(batches),
                    "steps": len(batches),
                    "loss": record["train_loss"],
                    "accuracy": record["train_accuracy"],
                    "val_accuracy": val_acc,
                    "val_loss": val_loss,
                    "best": improved,
                    "best_epoch": state.best_epoch,
                    "stopped_early": state.stopped_early,
                }
            )
            if state.stopped_early:
                break
    return result(cancelled=cancelled)


def _choose_mpp(
    dataset: SlideDataset,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    own: float | None,
    resumed: bool,
) -> tuple[float | None, str | None]:
    """The training pixel size (µm) and, when something is read in pixels, why.

    A resumed run keeps its own; a fine-tuned model (``init_from``) its own when it
    records one; otherwise the median pixel size of the training slides (for an even
    count the higher of the two middle ones, a pixel size a training slide has, so
    fewer slides are upsampled) when every training and validation slide has one,
    else ``None`` (slides are read in their own pixels).
    """
    used = list(train_idx) + list(val_idx)
    mpps = {i: dataset.slide_mpp(i) for i in used}
    missing = [dataset.records[i].path.name for i in used if mpps[i] is None]
    listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    if resumed or own is not None:
        if own is None:
            return None, (
                "training in pixels, not micrometres: the resumed run was started without a "
                "pixel size, so the model will not record its training resolution."
            )
        if missing:
            return own, (
                f"{len(missing)} of {len(used)} slides record no pixel size ({listed}): they "
                f"are read in their own pixels, the others at {own:.3g} µm/pixel."
            )
        return own, None
    if missing:
        return None, (
            f"training in pixels, not micrometres: {len(missing)} of {len(used)} slides "
            f"record no pixel size ({listed}), so the model will not record its training "
            "resolution and classify cannot match other scanners' slides to it. Give every "
            "slide a pixel size (e.g. a pyramidal TIFF with resolution tags) to train in "
            "micrometres."
        )
    values = sorted((mpps[i][0] + mpps[i][1]) / 2 for i in train_idx)
    return float(statistics.median_high(values)), None


def _initialise_from(model, config: TrainConfig, settings: dict, num_classes: int):
    """Copy the weights of ``config.init_from`` into a freshly built ``model``.

    Returns the checkpoint's training pixel size (``None`` when it records none).
    """
    from .checkpoints import load_model, training_mpp

    start = load_model(config.init_from)
    theirs = _plain(start.config)
    ours = _plain(_model_config_dict(config.kind, settings))
    if start.kind != config.kind or theirs != ours or len(start.classes) != num_classes:
        what = [f"kind {start.kind} vs {config.kind}"] if start.kind != config.kind else []
        if isinstance(theirs, dict) and isinstance(ours, dict):
            what += [
                f"{k}: {theirs.get(k)!r} vs {ours.get(k)!r}"
                for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)
            ]
        if len(start.classes) != num_classes:
            what.append(f"{len(start.classes)} classes vs {num_classes}")
        raise TrainingError(
            start.path,
            "cannot initialise from it: another architecture (" + "; ".join(what[:6]) + ").",
            "Use the same model settings as that checkpoint, or drop init_from.",
        )
    model.load_state_dict(start.model.state_dict())
    return training_mpp(start)


def _parameter_groups(model: AttentionSamplingModel, config: TrainConfig) -> list[dict]:
    """Adam parameter groups: the attention network(s) at ``attention_lr``, the rest at ``lr``."""
    if config.attention_lr is None:
        return [{"params": list(model.parameters())}]
    attention = [
        p
        for name, p in model.named_parameters()
        if name.startswith(("attention.", "stage2_attention."))
    ]
    ids = {id(p) for p in attention}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest}, {"params": attention, "lr": config.attention_lr}]
    return [g for g in groups if g["params"]]


def roi_attention_loss(
    model: AttentionSamplingModel, sources: Sequence, stage1: Sequence | None = None
) -> torch.Tensor:
    """``KL(M̃ ‖ α)`` averaged over ``sources`` (see ``TrainConfig.roi_attention_weight``).

    ``M̃`` is the source's ROI fraction at the stage-1 view, sampled at the cells and
    restricted to tissue cells, normalised to sum to 1.  Sources without an ROI mask,
    or whose mask has no ROI pixel on tissue (annotated negatives), contribute 0: at
    the stage-1 scale a look-alike of the ROI may be indistinguishable from it, and
    attending to it on a negative slide is what lets ``f`` tell them apart.
    ``stage1``: the sources' stage-1 attention when already computed (one view read).
    """
    total = torch.zeros((), device=model.device)
    if stage1 is None:
        stage1 = model.stage1(sources)
    for src, st in zip(sources, stage1, strict=True):
        roi = read_roi(src, full_region(src), model.config.view_scale)
        if roi is None:
            continue
        cells = st.grid.cell_values(roi[0].float().cpu()).reshape(-1).clamp(min=0)
        if st.mask is not None:
            cells = cells * st.mask.cpu().to(cells.dtype)
        mass = float(cells.sum())
        if mass <= 0:
            continue
        sel = torch.nonzero(cells > 0)[:, 0]
        target = (cells[sel] / mass).to(model.device)
        alpha = st.attention.float()[sel.to(model.device)].clamp(min=1e-30)
        total = total + (target * (torch.log(target) - torch.log(alpha))).sum()
    return total / max(len(sources), 1)


def _csv_of(dataset: SlideDataset) -> str | None:
    return None if dataset.labels_csv is None else str(dataset.labels_csv)


def _plain(value: Any) -> Any:
    """JSON round trip: tuples become lists, as in a checkpoint's description."""
    return json.loads(json.dumps(value))


def _model_config_dict(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    try:
        return MODEL_KINDS[kind][1](**settings).to_dict()
    except TypeError as exc:
        raise TrainingError(None, f"invalid {kind} model settings: {exc}.") from None


def _validate(model, dataset, val_idx, config, seed, emit, epoch, out_path, device):
    """Accuracy and mean cross-entropy of the mean sampled probability on ``val_idx``."""
    generator = torch.Generator().manual_seed(seed)
    correct, nll = 0, 0.0
    chunks = [val_idx[i : i + config.batch_size] for i in range(0, len(val_idx), config.batch_size)]
    for k, chunk in enumerate(chunks):
        try:
            predictions = model.predict(
                dataset.sources(chunk),
                mode="sample",
                n_draws=config.val_draws,
                generator=generator,
            )
        except Exception as exc:
            if _is_oom(exc):
                raise _oom_error(out_path, device, f"validating epoch {epoch + 1}", config) from exc
            raise
        for i, p in zip(chunk, predictions, strict=True):
            y = int(dataset.records[i].label_index)
            correct += int(p.label == y)
            nll -= math.log(max(float(p.probabilities[y]), 1e-12))
        emit(
            {
                "stage": "validate",
                "epoch": epoch + 1,
                "epochs": config.epochs,
                "step": k + 1,
                "steps": len(chunks),
            }
        )
    return correct / len(val_idx), nll / len(val_idx)
