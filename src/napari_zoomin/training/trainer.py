"""Training an attention-sampling model on labelled slides (000 §2, A.5).

:func:`train` runs Adam on ``model.loss`` (eq. 10, plus eq. 11 for annotated slides)
over seeded, class-stratified mini-batches, validates every epoch with sampled
predictions, keeps the best model by validation accuracy (ties: lower validation
loss) in ``out_path`` and a resumable training checkpoint beside it
(``<out>.last.safetensors``) and the per-epoch history as a CSV
(``<out stem>.history.csv``, :mod:`.history`), stops early when validation stops
improving, reports
progress through a callback (:mod:`.events`) and can be cancelled between steps.

:class:`Trainer` holds one run; its methods are the steps, in this order:

1. :meth:`Trainer.start`: a fresh model (seeded; ``init_from`` weights), or the
   interrupted run's (:func:`~.resume.resume_plan`), the pixel size the slides are
   read at, the optimizer;
2. :meth:`Trainer.pretrain`: tile-classifier pre-training on annotated slides;
3. :meth:`Trainer.run_epochs`: :meth:`Trainer.run_epoch` until the last epoch, early
   stopping or a cancel; an epoch is :meth:`Trainer.train_step` per batch, then
   :meth:`Trainer.validate` and :meth:`Trainer.end_epoch` (best model, early
   stopping, :meth:`Trainer.save_best`, :meth:`Trainer.save_last`).

Determinism: the model's initial weights come from ``seed``; every epoch draws its
batch order, its samples (tiles, sub-tiles) and any dropout from generators seeded
by ``(seed, epoch)``, and validation from a generator seeded by ``seed`` alone.  An
epoch therefore depends only on the weights and optimizer state at its start (plus,
when cancelled mid-epoch, the generator states saved with them), so a run that is
interrupted and resumed ends with the same weights as one that was not — bit for
bit on the CPU (on CUDA, mixed precision and non-deterministic kernels may differ).

Checkpoints are safetensors files written atomically
(:mod:`~napari_zoomin.engine.checkpoints`): an interruption at any moment leaves the
previous ones intact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import runtime
from ..engine.checkpoints import build_model, save_checkpoint
from ..engine.dataset import SlideDataset, SlideRecord
from ..engine.trust import training_profile
from ..engine.view_cache import ViewCache, view_cache_folder
from ..errors import CheckpointError, TrainingError, ZoominError
from ..models import AttentionSamplingModel, grad_scaler, pretrain_tile_classifiers
from ..models.networks import class_probabilities
from .config import TrainConfig, model_config_dict, model_settings
from .events import (
    EpochStep,
    Pretrained,
    Pretraining,
    PretrainProgress,
    ProgressCallback,
    Resolution,
    Validated,
    Validating,
)
from .history import RoiAttention, history_columns, history_csv_path, write_history_csv
from .losses import roi_attention_loss
from .resume import ResumePlan, TrainingState, last_checkpoint_path, resume_plan

__all__ = ["TrainResult", "Trainer", "stratified_batches", "train"]

#: the loss terms whose epoch means go into the history (``train_<term>``); MagNets
#: add their auxiliary and paradoxical losses (002 §3.3), 0 for the other kinds
_TERMS = (
    "classification",
    "contrastive",
    "entropy",
    "pixel",
    "policy",
    "roi_attention",
    "auxiliary",
    "paradoxical",
)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiple of the base learning rates that epoch ``epoch`` (0-based) of
    ``epochs`` runs at: 1, or cosine annealing ``(1 + cos(π·epoch/epochs))/2``
    (:attr:`TrainConfig.lr_schedule`)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(int(epochs), 1)))
    return 1.0


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        history: one dict per finished epoch (``epoch``, ``train_loss``,
            ``train_accuracy``, ``val_loss``, ``val_accuracy``, loss terms, the ROI
            attention shares ``val_roi_attention_stage1``/``_stage2`` (``train_...``
            without validation slides; ``None`` without ROIs), ``lr``, ``seconds``).
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


def train(
    data: SlideDataset | Sequence[SlideRecord],
    config: TrainConfig | None = None,
    out_path: str | Path = "model.safetensors",
    *,
    classes: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    resume: bool = True,
    distributed: bool = False,
) -> TrainResult:
    """Train a model on labelled slides; see the module docstring.

    Args:
        data: a :class:`SlideDataset`, or records from
            :func:`~napari_zoomin.engine.dataset.read_labels` (records with split
            ``"train"`` train, ``"val"`` validate, ``"test"`` are ignored).
        config: the settings (:class:`TrainConfig` defaults when ``None``).
        out_path: the best model's checkpoint; the training checkpoint goes to
            :func:`~.resume.last_checkpoint_path` beside it.
        classes: class names when ``data`` is records (default: from the records).
        progress: called with a typed event (:mod:`.events`) after every step
            (:class:`~.events.EpochStep`), during and after validation
            (:class:`~.events.Validating`, :class:`~.events.Validated`), around
            pre-training (:class:`~.events.Pretraining`, :class:`~.events.Pretrained`)
            and once when the slides are not read at one pixel size
            (:class:`~.events.Resolution`).
        cancel: polled before every step; when it returns True, the position is saved
            in the training checkpoint and :func:`train` returns with ``cancelled``.
        resume: continue from the training checkpoint if there is one (it must come
            from the same settings and data: :func:`~.resume.resume_plan`); ``False``
            starts over.
        distributed: train as one process of a ``torch.distributed`` group
            (:class:`~.distributed.DistributedTrainer`; start the group with
            :func:`~.distributed.start`), or as a group of one without one.

    Raises:
        TrainingError: invalid settings, no training slides, a non-finite loss (the
            checkpoints of the last good epoch stay on disk), out of memory, or a
            training checkpoint from other settings or data.
        CheckpointError: the training checkpoint exists but is damaged or foreign.
        SlideError, AnnotationError: a slide or annotation file cannot be read.
    """
    config = config or TrainConfig()
    _check_run(config, Path(out_path))
    dataset = _as_dataset(data, classes, config)
    kind = Trainer
    if distributed:
        from .distributed import DistributedTrainer as kind
    trainer = kind(dataset, config, out_path, progress=progress, cancel=cancel)
    return trainer.run(resume=resume)


class Trainer:
    """One training run of ``config`` on ``dataset``, writing ``out_path`` (module docstring).

    ``Trainer(...).run(resume)`` is :func:`train` on a :class:`SlideDataset`.
    """

    def __init__(
        self,
        dataset: SlideDataset,
        config: TrainConfig,
        out_path: str | Path,
        *,
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ):
        self.t_start = time.perf_counter()
        self.config = config
        self.out_path = Path(out_path)
        _check_run(config, self.out_path)
        self.last_path = last_checkpoint_path(self.out_path)
        self.history_path = history_csv_path(self.out_path)
        self.dataset = dataset
        self.classes = list(dataset.classes)
        self.train_idx, self.val_idx = dataset.indices("train"), dataset.indices("val")
        if not self.train_idx:
            raise TrainingError(
                None, "no training slides (split 'train').", "Check the labels CSV."
            )
        self.labels = dataset.labels
        # the ROI attention shares are measured on the validation slides, else on the
        # training slides; the history file's columns are fixed here, at the run's start
        self.roi_split = "val" if self.val_idx else "train"
        self.history_columns = history_columns(_TERMS, self.roi_split)
        self.roi_attention = RoiAttention()
        try:
            self.device = runtime.resolve_device(config.device)
        except ZoominError as exc:  # meta, mps or cuda where there is none, ...
            raise TrainingError(None, exc.problem, exc.fix) from None
        self.settings = model_settings(config, len(self.classes))
        self.summary: dict[str, Any] = {**dataset.summary(), "classes": self.classes}
        self.emit: ProgressCallback = progress or (lambda event: None)
        self.should_stop: Callable[[], bool] = cancel or (lambda: False)
        self.state = TrainingState()
        self.model: AttentionSamplingModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.rng_state: dict[str, torch.Tensor] = {}  # generators of a mid-epoch cancel
        self.resumed = False
        self._clock = time.perf_counter()  # start of the time not yet in state.seconds

    # -- the run -----------------------------------------------------------------------

    def run(self, resume: bool = True) -> TrainResult:
        """Start (or resume), pre-train, run the epochs; the :class:`TrainResult`."""
        self.start(resume)
        if self.state.finished(self.config.epochs):
            return self.result()
        if not self.pretrain():
            return self.result(cancelled=True)
        return self.result(cancelled=self.run_epochs())

    def result(self, cancelled: bool = False) -> TrainResult:
        return TrainResult(
            history=list(self.state.history),
            best_epoch=self.state.best_epoch,
            best_val_accuracy=self.state.best_val_accuracy,
            checkpoint_path=self.out_path,
            last_checkpoint_path=self.last_path,
            cancelled=cancelled,
            stopped_early=self.state.stopped_early,
            seconds=time.perf_counter() - self.t_start,
        )

    # -- 1. the model, fresh or resumed --------------------------------------------------

    def start(self, resume: bool = True) -> ResumePlan:
        """The model, its training pixel size and the optimizer, fresh or from the
        interrupted run; raises the refusal of :func:`~.resume.resume_plan`."""
        self.check_inputs()
        with self._out_of_memory(f"loading {self.last_path.name}"):
            plan = resume_plan(
                self.out_path, self.config, self.dataset, resume=resume, device=self.device
            )
        if plan.action == "refuse":
            raise plan.error()
        optimizer_state = None
        own_mpp = None  # the pixel size of a resumed run or of init_from
        if plan.continues:
            assert plan.checkpoint is not None and plan.run is not None
            self.model = plan.checkpoint.model
            self.resumed = True
            self.state = plan.run.state
            own_mpp = plan.run.data.get("mpp")
            optimizer_state = plan.checkpoint.optimizer_state
            self.rng_state = plan.checkpoint.rng_state
        with self._out_of_memory("while building the model"):
            if not plan.continues:
                own_mpp = self._build()
            self.model.to(self.device)
            self.optimizer = torch.optim.Adam(
                _parameter_groups(self.model, self.config),
                lr=self.config.lr,
                betas=(0.9, 0.999),
                weight_decay=self.config.weight_decay,
            )
            # the schedule's base rates: the saved state holds the last epoch's rates
            self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
            if optimizer_state is not None:
                try:
                    self.optimizer.load_state_dict(optimizer_state)
                except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                    raise CheckpointError(
                        self.last_path,
                        f"its optimizer state does not fit this model ({exc}).",
                        "Start over with resume=False (CLI: --fresh).",
                    ) from None
        self._choose_resolution(own_mpp)
        self._open_view_cache()
        self.scaler = grad_scaler(self.device)
        self._clock = time.perf_counter()
        return plan

    def check_inputs(self) -> None:
        """Every input, before the first training state is written: each slide opens,
        each annotation file parses, the model and training-state paths can be written.

        A refusal here leaves nothing behind (no resume file, no partial checkpoint);
        without it a bad ROI file of the fifth slide stopped a run that had already
        written its first training state.
        """
        from ..engine.results import check_output_path

        for path in (self.out_path, self.last_path):
            check_output_path(path, folder=False, what="the checkpoint path")
        check_output_path(self.history_path, folder=False, what="the training history path")
        for i in self.train_idx + self.val_idx:
            self.dataset.slide_mpp(i)  # opens the slide (and keeps what it read)
            self.dataset.roi_mask(i)  # reads and parses its annotation file, if any

    def _build(self) -> float | None:
        """A fresh model from ``seed`` (and ``init_from``, or a MagNet's encoders from
        ``init_encoder``); ``init_from``'s pixel size."""
        from ..engine.checkpoints import complete_config, load_model

        config = self.config
        start = theirs = None
        if config.init_from:
            start = load_model(config.init_from)
            theirs = complete_config(start.kind, start.config)
            self.settings = model_settings(config, len(self.classes), theirs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(config.seed, 0))
            try:
                self.model = build_model(config.kind, self.settings)
            except (ValueError, TypeError) as exc:
                raise TrainingError(None, f"cannot build the {config.kind} model: {exc}.") from None
        if start is not None:
            return _initialise_from(
                self.model, start, theirs, config, self.settings, len(self.classes)
            )
        if config.init_encoder:
            from ..engine.encoder_weights import load_encoder_weights

            load_encoder_weights(self.model, config.init_encoder)
        return None

    def _choose_resolution(self, own_mpp: float | None) -> None:
        """The pixel size every training input is read at (and what the model records)."""
        mpp, message = _choose_mpp(
            self.dataset, self.train_idx, self.val_idx, own_mpp, self.resumed
        )
        self.dataset.model_mpp = mpp
        self.summary["mpp"] = mpp
        # what the model will know: checked against every slide it classifies (trust.py)
        profiles = [self.dataset.profile(i) for i in self.train_idx]
        self.summary["profile"] = training_profile(profiles, mpp)
        if message:
            logging.getLogger(__name__).warning(message)
            self.emit(Resolution(self.state.epoch, self.config.epochs, mpp, message))

    def _open_view_cache(self) -> None:
        """The run's stage-1 views on disk (``cache_views``), beside the checkpoint; none
        for a model without a stage-1 view (a MagNet) or when the setting is off."""
        scale = getattr(self.model.config, "view_scale", None)
        cache = None
        if self.config.cache_views and scale is not None:
            cache = ViewCache(view_cache_folder(self.out_path), float(scale))
        self.dataset.view_cache = cache

    # -- 2. pre-training from ROI masks (000 §2.5) --------------------------------------

    def pretrain(self) -> bool:
        """Pre-train ``a``, ``b`` and ``f`` on annotated slides once, before epoch 1.

        Returns False when cancelled before it started.
        """
        config, state = self.config, self.state
        annotated = [i for i in self.train_idx if self.dataset.records[i].annotations is not None]
        if not (state.epoch == 0 and state.step == 0 and state.pretrained is None):
            return True
        # a MagNet has no attention network to pre-train (002 uses no ROI masks)
        wanted = bool(config.pretrain_epochs and annotated and hasattr(self.model, "attention"))
        if wanted and self.should_stop():
            return False
        state.pretrained = {}
        if wanted:
            steps = config.pretrain_epochs
            self.emit(Pretraining(0, config.epochs, 0, steps, len(annotated)))
            sources = [_LazySource(self.dataset, i) for i in annotated]
            with self._out_of_memory("while pre-training"), torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(config.seed, 1))
                state.pretrained = pretrain_tile_classifiers(
                    self.model,
                    sources,
                    epochs=steps,
                    patches_per_image=config.pretrain_patches,
                    pooling=config.pretrain_pooling,
                    generator=torch.Generator().manual_seed(_seed(config.seed, 2)),
                    on_epoch=lambda network, step, total, loss: self.emit(
                        PretrainProgress(
                            epoch=0,
                            epochs=config.epochs,
                            step=step,
                            steps=total,
                            network=network,
                            network_epoch=(step - 1) % steps + 1,
                            network_epochs=steps,
                            loss=loss,
                        )
                    ),
                )
            finals = {k: v[-1] for k, v in state.pretrained.items() if v}
            loss = float(np.mean(list(finals.values()))) if finals else None
            self.emit(Pretrained(0, config.epochs, steps, steps, loss, finals))
        self.save_last()
        return True

    # -- 3. the epochs -------------------------------------------------------------------

    def run_epochs(self) -> bool:
        """Epochs until the last one, early stopping or a cancel (True: cancelled)."""
        with torch.random.fork_rng(devices=[]):
            while self.state.epoch < self.config.epochs:
                if self.run_epoch():
                    return True
                if self.state.stopped_early:
                    break
        return False

    def run_epoch(self) -> bool:
        """Epoch ``state.epoch + 1`` (from ``state.step`` when resumed mid-epoch); True
        when cancelled (the position is saved)."""
        config, state = self.config, self.state
        epoch = state.epoch
        train_labels = [int(self.labels[i]) for i in self.train_idx]
        self._epoch_clock = time.perf_counter()  # slides per minute: this epoch's time
        order_gen = torch.Generator().manual_seed(_seed(config.seed, 4, epoch))
        batches = stratified_batches(
            train_labels, config.batch_size, order_gen, config.balanced_batches
        )
        sampler = torch.Generator().manual_seed(_seed(config.seed, 5, epoch))
        torch.manual_seed(_seed(config.seed, 6, epoch))  # dropout, if any
        if state.step:
            sampler.set_state(self.rng_state["sampler"])
            torch.set_rng_state(self.rng_state["torch"])
        sums = dict(state.partial) if state.step else {}
        factor = lr_factor(config.lr_schedule, epoch, config.epochs)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self.model.train()
        self._epoch_slides = sum(len(b) for b in batches[state.step :])
        for step in range(state.step, len(batches)):
            if self.should_stop():
                state.step, state.partial = step, sums
                self.save_last(rng={"sampler": sampler.get_state(), "torch": torch.get_rng_state()})
                return True
            batch = [self.train_idx[k] for k in batches[step]]
            self.train_step(batch, epoch, step, len(batches), sums, sampler)
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise TrainingError(
                self.out_path,
                f"the weights became non-finite in epoch {epoch + 1}.",
                f"Lower the learning rate (now {config.lr:g}, --lr). The checkpoints of "
                f"the last good epoch ({state.epoch}) are kept.",
            )
        self.roi_attention = RoiAttention()
        val_acc, val_loss = self.validate(epoch) if self.val_idx else (None, None)
        if not self.val_idx:
            self.measure_roi_attention(epoch)
        self.end_epoch(epoch, len(batches), sums, val_acc, val_loss)
        return False

    def train_step(
        self,
        batch: list[int],
        epoch: int,
        step: int,
        steps: int,
        sums: dict[str, float],
        sampler: torch.Generator,
    ) -> None:
        """One Adam step on the slides ``batch``; adds its loss terms to ``sums``."""
        config, model = self.config, self.model
        with self._out_of_memory(f"at epoch {epoch + 1}, step {step + 1}"):
            sources = self.dataset.sources(batch)
            terms = model.loss(sources, self.labels[batch], epoch=epoch, generator=sampler)
            loss = terms.total
            if config.roi_attention_weight:
                roi_kl = roi_attention_loss(model, sources)
                loss = loss + config.roi_attention_weight * roi_kl
                sums["roi_attention"] = sums.get("roi_attention", 0.0) + float(
                    roi_kl.detach()
                ) * len(batch)
            if not bool(torch.isfinite(loss.detach())):
                raise TrainingError(
                    self.out_path,
                    f"the training loss became {float(loss.detach())} at epoch "
                    f"{epoch + 1}, step {step + 1} (terms: {terms.as_floats()}).",
                    f"Lower the learning rate (now {config.lr:g}, --lr). The checkpoints "
                    f"of the last good epoch ({self.state.epoch}) are kept.",
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if not self.scaler.is_enabled() and not _finite_gradients(model):
                # a finite loss can still have a NaN gradient: stepping would poison the
                # weights, and the next step would fail deep in the sampler
                raise TrainingError(
                    self.out_path,
                    f"the gradients became non-finite at epoch {epoch + 1}, step "
                    f"{step + 1} (the loss was {float(loss.detach()):.4g}).",
                    f"Lower the learning rate (now {config.lr:g}, --lr). The checkpoints "
                    f"of the last good epoch ({self.state.epoch}) are kept.",
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
        n = len(batch)
        probs = class_probabilities(terms.logits.detach().float())
        # the share of the step's estimates that are right: REINFORCE-ATS makes
        # ``repeats`` of each slide, so there are more rows of logits than slides
        right = (probs.argmax(1).cpu() == terms.labels.cpu()).float().mean().item()
        for key, value in {**terms.as_floats(), "total": float(loss.detach())}.items():
            sums[key] = sums.get(key, 0.0) + value * n
        sums["correct"] = sums.get("correct", 0.0) + right * n
        sums["n"] = sums.get("n", 0.0) + n
        self.emit(EpochStep(epoch + 1, config.epochs, step + 1, steps, float(loss.detach()), right))

    def validate(self, epoch: int) -> tuple[float, float]:
        """Accuracy and mean cross-entropy of the mean sampled probability on the
        validation slides (the same draws every epoch: a generator seeded by ``seed``)."""
        config, dataset, val_idx = self.config, self.dataset, self.val_idx
        generator = torch.Generator().manual_seed(_seed(config.seed, 3))
        correct, nll = 0, 0.0
        size = config.batch_size
        chunks = [val_idx[i : i + size] for i in range(0, len(val_idx), size)]
        for k, chunk in enumerate(chunks):
            with self._out_of_memory(f"validating epoch {epoch + 1}"):
                sources = dataset.sources(chunk)
                predictions = self.model.predict(
                    sources,
                    mode="sample",
                    draws=config.val_draws,
                    generator=generator,
                )
            for i, src, p in zip(chunk, sources, predictions, strict=True):
                self.roi_attention.add(self.model, src, p)
                y = int(dataset.records[i].label_index)
                correct += int(p.label == y)
                nll -= math.log(max(float(p.probabilities[y]), 1e-12))
            self.emit(Validating(epoch + 1, config.epochs, k + 1, len(chunks)))
        return correct / len(val_idx), nll / len(val_idx)

    def measure_roi_attention(self, epoch: int) -> None:
        """Without validation slides: the ROI attention shares (:mod:`.history`) of the
        epoch's final weights on the training slides that have an ROI, one sampled
        prediction of ``val_draws`` draws each (a generator seeded by ``seed``).

        An extra pass over those slides, made only when there is nothing to validate
        on (validation measures the shares on its own predictions).  A MagNet has no
        attention distribution to measure.
        """
        config, dataset = self.config, self.dataset
        if not hasattr(self.model, "attention"):
            return
        annotated = [
            i for i in self.train_idx if (m := dataset.roi_mask(i)) is not None and m.has_roi
        ]
        generator = torch.Generator().manual_seed(_seed(config.seed, 7))
        size = config.batch_size
        for chunk in (annotated[i : i + size] for i in range(0, len(annotated), size)):
            with self._out_of_memory(f"measuring the ROI attention of epoch {epoch + 1}"):
                sources = dataset.sources(chunk)
                predictions = self.model.predict(
                    sources, mode="sample", draws=config.val_draws, generator=generator
                )
            for src, p in zip(sources, predictions, strict=True):
                self.roi_attention.add(self.model, src, p)

    def end_epoch(
        self,
        epoch: int,
        steps: int,
        sums: dict[str, float],
        val_acc: float | None,
        val_loss: float | None,
    ) -> None:
        """Record epoch ``epoch + 1``, keep it if best, decide early stopping, save."""
        state, config = self.state, self.config
        n = max(sums.get("n", 0.0), 1.0)
        record = {
            "epoch": epoch + 1,
            "train_loss": sums.get("total", 0.0) / n,
            "train_accuracy": sums.get("correct", 0.0) / n,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            **{f"train_{k}": sums.get(k, 0.0) / n for k in _TERMS},
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        roi1, roi2 = self.roi_attention.means()
        record[f"{self.roi_split}_roi_attention_stage1"] = roi1
        record[f"{self.roi_split}_roi_attention_stage2"] = roi2
        improved = self.improves(val_acc, val_loss)
        state.epoch, state.step, state.partial = epoch + 1, 0, {}
        if improved:
            state.best_epoch = epoch + 1
            state.best_val_accuracy, state.best_val_loss = val_acc, val_loss
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        now = time.perf_counter()
        record["seconds"] = round(state.seconds + now - self._clock, 3)
        # training slides per minute of the epoch's wall time (validation included): the
        # epoch of n training slides takes n / slides_per_minute minutes
        minutes = max(now - self._epoch_clock, 1e-9) / 60.0
        record["slides_per_minute"] = round(self._epoch_slides / minutes, 3)
        self._log_view_cache(epoch)
        state.history.append(record)
        state.stopped_early = self.stops_early()
        final = state.stopped_early or state.epoch >= config.epochs
        if improved:
            self.save_best(final)
        self.save_last(final)
        self.emit(
            Validated(
                epoch=epoch + 1,
                epochs=config.epochs,
                step=steps,
                steps=steps,
                loss=record["train_loss"],
                accuracy=record["train_accuracy"],
                val_accuracy=val_acc,
                val_loss=val_loss,
                best=improved,
                best_epoch=state.best_epoch,
                stopped_early=state.stopped_early,
                terms={k: record[f"train_{k}"] for k in _TERMS if k in sums},
                roi_attention_stage1=roi1,
                roi_attention_stage2=roi2,
                roi_attention_split=None if roi1 is None and roi2 is None else self.roi_split,
                slides_per_minute=record["slides_per_minute"],
            )
        )

    def _log_view_cache(self, epoch: int) -> None:
        cache = self.dataset.view_cache
        if cache is None:
            return
        st = cache.stats
        logging.getLogger(__name__).info(
            "after epoch %d, stage-1 view cache %s: %d views served (%.1f MB), %d decoded "
            "and written (%.1f MB), %d not cached, in this run so far",
            epoch + 1,
            cache.folder,
            st.hits,
            st.bytes_served / 2**20,
            st.written,
            st.bytes_written / 2**20,
            st.skipped,
        )

    def improves(self, val_acc: float | None, val_loss: float | None) -> bool:
        """Better than the best so far: higher validation accuracy, ties by lower loss
        (every epoch is, without validation slides)."""
        best_acc, best_loss = self.state.best_val_accuracy, self.state.best_val_loss
        return (
            val_acc is None
            or best_acc is None
            or val_acc > best_acc
            or (val_acc == best_acc and val_loss < best_loss)
        )

    def stops_early(self) -> bool:
        """``early_stopping_patience`` epochs without improvement, before the last epoch."""
        patience = self.config.early_stopping_patience
        return bool(
            patience
            and self.state.epochs_without_improvement >= patience
            and self.state.epoch < self.config.epochs
        )

    # -- checkpoints ---------------------------------------------------------------------

    def save_best(self, final: bool = False) -> None:
        """The model checkpoint (``out_path``): the weights, described for users."""
        info = self._info(final)
        info.pop("trainer")
        info["trainer_config"] = self.config.to_dict()
        with self._out_of_memory(f"writing {self.out_path.name}"):
            save_checkpoint(self.out_path, self.model, self.classes, info=info)

    def save_last(self, final: bool = False, rng: dict[str, torch.Tensor] | None = None) -> None:
        """The training checkpoint: weights, Adam and generator states, trainer state."""
        now = time.perf_counter()
        self.state.seconds += now - self._clock
        self._clock = now
        with self._out_of_memory(f"writing {self.last_path.name}"):
            save_checkpoint(
                self.last_path,
                self.model,
                self.classes,
                info=self._info(final),
                optimizer=self.optimizer,
                rng_state=rng or {},
            )
        write_history_csv(self.history_path, self.history_columns, self.state.history)

    def _info(self, final: bool = False) -> dict[str, Any]:
        state = self.state
        csv = self.dataset.labels_csv
        return {
            "trainer": {
                "config": self.config.to_dict(),
                "data": self.summary,
                "state": state.to_dict(),
                "finished": final,
            },
            "classes": self.classes,
            "data": {**self.summary, "labels_csv": None if csv is None else str(csv)},
            "metrics": {
                "best_epoch": state.best_epoch,
                "best_val_accuracy": state.best_val_accuracy,
                "best_val_loss": state.best_val_loss,
                "epochs_run": state.epoch,
            },
            "history": state.history,
            "seconds": round(state.seconds, 3),
            "versions": runtime.versions(),
        }

    @contextlib.contextmanager
    def _out_of_memory(self, where: str) -> Iterator[None]:
        """Running out of memory inside (any device, :func:`~napari_zoomin.engine.runtime.is_oom`)
        becomes a :class:`TrainingError` saying ``where`` and what to make smaller."""
        try:
            yield
        except ZoominError:
            raise
        except Exception as exc:
            if runtime.is_oom(exc):
                raise self._oom(where) from exc
            raise

    def _oom(self, where: str) -> TrainingError:
        config = self.config
        if config.kind == "zoomin":
            sizes = (
                f"smaller tiles or sub-tiles ({config.tile_size}/{config.subtile_size} px, "
                "--tile/--subtile)"
            )
        else:
            sizes = f"smaller sub-tiles ({config.subtile_size} px, --subtile)"
        return TrainingError(
            self.out_path,
            f"ran out of memory on {self.device} {where}.",
            f"Use fewer samples (N = {config.n_samples}, --n), {sizes} or a smaller batch "
            f"({config.batch_size}, --batch-size).",
        )


# -- helpers ---------------------------------------------------------------------------


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


def _check_run(config: TrainConfig, out_path: Path) -> None:
    """Settings that can train and a model path that is not a training checkpoint's."""
    config.validate()
    if out_path.name.endswith(".last.safetensors"):
        raise TrainingError(out_path, "the model file cannot end in '.last.safetensors'.")


def _as_dataset(data, classes, config: TrainConfig) -> SlideDataset:
    if isinstance(data, SlideDataset):
        data.set_lookalikes(config.lookalike_labels)  # the settings decide, not the caller
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
    return SlideDataset(
        records,
        classes,
        roi_labels=config.roi_labels,
        lookalike_labels=config.lookalike_labels,
        workers=config.num_workers,
    )


class _LazySource:
    """A slide of the dataset opened on every access (for pre-training over many slides).

    Every attribute but ``shape`` (``read``, ``tissue_mask``, ``read_roi``, the
    look-alike reads, any capability a source gains later) is the open slide source's
    own, looked up on each access.  A list of forwarding methods once lacked the
    look-alike reads, and pre-training silently fell back to the ROI alone.
    """

    def __init__(self, dataset: SlideDataset, index: int):
        self.dataset, self.index = dataset, index
        self.shape = dataset[index].shape

    def __getattr__(self, name: str):
        if name in ("dataset", "index"):  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.dataset[self.index], name)


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


def _initialise_from(
    model, start, theirs: dict, config: TrainConfig, settings: dict, num_classes: int
):
    """Copy the weights of ``start`` (the checkpoint ``config.init_from``, whose
    completed model config is ``theirs``) into a freshly built ``model``.

    Returns the checkpoint's training pixel size (``None`` when it records none).
    """
    from ..engine.checkpoints import training_mpp

    ours = model_config_dict(config.kind, settings)
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
    """Adam parameter groups: the rest at ``lr``, the attention network(s) at
    ``attention_lr``, ``f`` at ``feature_lr`` (each only when set, in that order, so a
    checkpoint of a run without them keeps its group order)."""
    rest: list = []
    attention: list = []
    feature: list = []
    for name, p in model.named_parameters():
        if config.attention_lr is not None and name.startswith(("attention.", "stage2_attention.")):
            attention.append(p)
        elif config.feature_lr is not None and name.startswith("feature."):
            feature.append(p)
        else:
            rest.append(p)
    groups = [
        {"params": rest},
        {"params": attention, "lr": config.attention_lr},
        {"params": feature, "lr": config.feature_lr},
    ]
    return [g for g in groups if g["params"]]


def _finite_gradients(model: torch.nn.Module) -> bool:
    """Whether every gradient is finite (a NaN or infinity makes its tensor's norm so);
    one synchronisation, not one per parameter on a GPU."""
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return not norms or bool(torch.isfinite(torch.stack(norms)).all())
