"""Training on several GPUs or machines: one process per device, ``torch.distributed``.

Launch ``zoomin train ... --distributed`` under ``torchrun`` (docs/training.md); it
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``,
which :func:`start` reads.  The backend is NCCL on CUDA (each process on
``cuda:LOCAL_RANK``) and gloo on the CPU.  Every collective has a timeout
(:data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT` s), and every failure of one
becomes a :class:`~napari_zoomin.errors.TrainingError`: a process that died is an
error on the others, not a hang.

:class:`DistributedTrainer` is the :class:`~.trainer.Trainer` of one process.  Each
global batch (the same on every process: its order comes from ``seed``) is split
into contiguous shards, one per process (:func:`shard`); each slide of a shard is a
forward and backward pass of its own with generators seeded by ``(seed, epoch,
slide)``, never by the rank, and its loss weighted ``1/B`` (B the global batch), so
the summed gradients (:func:`reduce_gradients`) are those of the mean loss over the
global batch however it is split.  One epoch therefore gives the same weights on
any number of processes, one included (``--distributed`` without ``torchrun``), up
to float rounding.  (A run without ``--distributed`` draws the samples of a whole
batch from one generator: the same model and objective, other draws.)  Validation
is split the same way and its sums gathered.  Only rank 0 reports progress and
writes checkpoints; every process resumes from the same training checkpoint (on a
file system all of them see), whatever the number of processes that wrote it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from ..engine.dataset import SlideDataset
from ..errors import TrainingError, ZoominError
from ..models.networks import class_probabilities
from .config import TrainConfig
from .events import EpochStep, ProgressCallback, Validating
from .history import roi_attention_shares
from .losses import roi_attention_loss
from .resume import RESUMABLE_CHANGES, ResumePlan
from .trainer import Trainer, _seed

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "DistributedTrainer",
    "World",
    "all_reduce_sum",
    "any_rank",
    "is_main",
    "launched",
    "reduce_gradients",
    "shard",
    "start",
    "stop",
    "world",
]

#: seconds a collective may wait for the other processes before it is an error
DEFAULT_TIMEOUT = 600.0
#: the environment variable that sets it (seconds)
TIMEOUT_ENV = "ZOOMIN_DIST_TIMEOUT"
#: what torchrun sets for every process
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: the per-slide sums a step gathers (loss terms as in ``Trainer.train_step``)
_SUMS = (
    "total",
    "classification",
    "contrastive",
    "entropy",
    "pixel",
    "policy",
    "auxiliary",
    "paradoxical",
    "roi_attention",
    "correct",
    "n",
)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that reports progress and writes files."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or with its variables)."""
    return all(name in os.environ for name in _LAUNCH_ENV)


def world() -> World:
    """This process's :class:`World` (one process when no group is started)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = os.environ.get("LOCAL_RANK", "0")
    return World(dist.get_rank(), dist.get_world_size(), int(local) if local.isdigit() else 0)


def is_main() -> bool:
    """Rank 0 (or no process group): the process that reports and writes."""
    return world().main


def start(device: str | torch.device = "auto", timeout: float | None = None) -> World:
    """Join the process group ``torchrun`` describes; one process when not launched by it.

    ``device`` is the training device setting: CUDA uses NCCL and ``cuda:LOCAL_RANK``,
    the CPU gloo.  ``timeout``: seconds a collective waits (default: the
    :data:`TIMEOUT_ENV` variable, else :data:`DEFAULT_TIMEOUT`).
    """
    from ..engine.runtime import resolve_device

    if dist.is_available() and dist.is_initialized():
        return world()
    if not launched():
        return World()
    if not dist.is_available():
        raise TrainingError(None, "this PyTorch has no torch.distributed.", _NO_DIST_FIX)
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "0")
        if not text.isdigit():
            raise TrainingError(None, f"the variable {name}={text!r} is not a number.", _LAUNCH)
        values[name] = int(text)
    rank, size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if not 0 <= rank < size:
        raise TrainingError(None, f"RANK={rank} is not below WORLD_SIZE={size}.", _LAUNCH)
    try:
        chosen = resolve_device(device)
    except ZoominError as exc:
        raise TrainingError(None, exc.problem, exc.fix) from None
    if chosen.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(
                None,
                f"process {rank} has LOCAL_RANK {local_rank} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s).",
                "Start at most one process per GPU (torchrun --nproc_per_node).",
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
        # a collective that times out raises in this process instead of aborting it
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    elif chosen.type == "cpu":
        backend = "gloo"
    else:
        raise TrainingError(
            None,
            f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not {chosen.type}.",
            "Use --device cuda or --device cpu.",
        )
    seconds = timeout if timeout is not None else _timeout_setting()
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=seconds)
        )
    except (RuntimeError, ValueError) as exc:
        address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise TrainingError(
            None,
            f"process {rank} of {size} could not join the others at {address} "
            f"({_first_line(exc)}).",
            "Check that every machine runs the same torchrun command with the same "
            "--rdzv-endpoint (or --master-addr/--master-port) and can reach it.",
        ) from None
    return World(rank, size, local_rank)


def stop() -> None:
    """Leave the process group (nothing when none was started)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], w: World | None = None) -> list[T]:
    """This process's contiguous share of ``items``: sizes differ by at most one, the
    first ``len(items) % size`` processes take one more, and some get none when there
    are fewer items than processes."""
    w = w or world()
    base, extra = divmod(len(items), w.size)
    begin = w.rank * base + min(w.rank, extra)
    return list(items[begin : begin + base + (w.rank < extra)])


# -- collectives (each one a TrainingError when another process is gone) ---------------


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except ZoominError:
        raise
    except (RuntimeError, ValueError) as exc:  # DistBackendError, gloo's and NCCL's errors
        w = world()
        raise TrainingError(
            None,
            f"process {w.rank} of {w.size} lost contact with the others while {what} "
            f"({_first_line(exc)}).",
            "Another process stopped or hangs: its output says why. Run the same command "
            "again to resume from the last saved training state.",
        ) from None


def _group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor, what: str = "summing across processes") -> torch.Tensor:
    """``tensor`` summed over every process, in place (unchanged on one process)."""
    if _group():
        with _collective(what):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(
    flag: bool, device: torch.device | str = "cpu", what: str = "asking whether to stop"
) -> bool:
    """Whether ``flag`` is true on any process (e.g. a cancel asked for on one); a
    barrier too, with the timeout of every collective."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value, what).item() > 0)


def broadcast_module(module: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    """Every process takes rank 0's parameters and buffers (as DDP does when it starts)."""
    if not _group():
        return
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.numel()]
    with _collective("taking the model of process 0"), torch.no_grad():
        for t in tensors:
            buffer = t.detach().to(device)
            dist.broadcast(buffer, src=0)
            t.copy_(buffer.to(t.device))


def reduce_gradients(
    parameters: Sequence[torch.nn.Parameter], device: torch.device | str = "cpu"
) -> None:
    """Sum every parameter's gradient over the processes, in one collective.

    A parameter without a gradient on some process (a loss term that did not reach
    it, or a process without slides this step) counts as zero there, and keeps no
    gradient only when no process has one (Adam then leaves it alone, as on one
    process).
    """
    if not _group():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params
    ]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    flat = torch.cat([t.to(device=device, dtype=torch.float32) for t in parts] + [has.to(device)])
    all_reduce_sum(flat, "averaging the gradients")
    counts = flat[-len(params) :].cpu()
    offset = 0
    for k, p in enumerate(params):
        n = p.numel()
        if counts[k] > 0:
            grad = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            p.grad = grad.clone()
        else:
            p.grad = None
        offset += n


def _agree(outcome: tuple[str, str]) -> None:
    """Every process's ``("ok", fingerprint)`` or ``("error", message)``: an error on one
    is an error on all, and so is a fingerprint that differs from rank 0's."""
    if not _group():
        return
    outcomes: list = [None] * dist.get_world_size()
    with _collective("comparing the processes' starting points"):
        dist.all_gather_object(outcomes, outcome)
    errors = [(r, text) for r, (kind, text) in enumerate(outcomes) if kind == "error"]
    if errors:
        rank, text = errors[0]
        raise TrainingError(None, f"process {rank} could not start: {text}")
    differ = [r for r, (_, text) in enumerate(outcomes) if text != outcomes[0][1]]
    if differ:
        raise TrainingError(
            None,
            f"process(es) {', '.join(map(str, differ))} start from another point than "
            f"process 0 (another training state, settings or data): {outcomes[differ[0]][1]} "
            f"vs {outcomes[0][1]}.",
            "Give every process the same command, and the same files at the same paths "
            "(a file system all machines share).",
        )


def _timeout_setting() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 86_400:
        raise TrainingError(
            None,
            f"{TIMEOUT_ENV}={text!r} is not a number of seconds in (0, 86400].",
            f"Set it to e.g. {DEFAULT_TIMEOUT:g}, or unset it.",
        )
    return seconds


def _first_line(exc: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without gloo's source location."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/.../pair.cc:537] "
    return text.split(". ")[0].rstrip(".")[:300]


_LAUNCH = "Start distributed training with torchrun (docs/training.md)."
_NO_DIST_FIX = "Install a PyTorch build with distributed support, or train without --distributed."


# -- the trainer of one process --------------------------------------------------------


class DistributedTrainer(Trainer):
    """:class:`~.trainer.Trainer` of one process of a group (module docstring).

    Start the group first (:func:`start`); with none, this is one process of one, and
    trains as any number of processes would.
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
        self.world = world()
        super().__init__(
            dataset,
            config,
            out_path,
            progress=progress if self.world.main else None,
            cancel=cancel,
        )
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        nccl = _group() and dist.get_backend() == "nccl"
        self.comm = self.device if nccl else torch.device("cpu")
        asked = self.should_stop
        self.should_stop = lambda: any_rank(bool(asked()), self.comm)
        if self.world.main and config.batch_size < self.world.size:
            logging.getLogger(__name__).warning(
                "batch_size %d < %d processes: some processes have no slide in a step; "
                "a larger --batch-size uses them all.",
                config.batch_size,
                self.world.size,
            )

    def start(self, resume: bool = True) -> ResumePlan:
        """:meth:`Trainer.start` on every process, then the check that all start from the
        same point, and rank 0's weights everywhere.  It also keeps rank 0 from writing
        a training state before every process has read the previous one."""
        try:
            plan = super().start(resume)
        except ZoominError as exc:
            with contextlib.suppress(TrainingError):  # the others say why they stop
                _agree(("error", str(exc)))
            raise
        _agree(("ok", self._fingerprint()))
        broadcast_module(self.model, self.comm)
        return plan

    def _fingerprint(self) -> str:
        settings = self.config.to_dict()
        for name in RESUMABLE_CHANGES:
            settings.pop(name, None)
        state = self.state
        return json.dumps(
            {
                "epoch": state.epoch,
                "step": state.step,
                "data": self.summary.get("fingerprint"),
                "mpp": self.summary.get("mpp"),
                "settings": settings,
            },
            sort_keys=True,
            default=str,
        )

    def pretrain(self) -> bool:
        """Every process pre-trains alike (the same seed); rank 0's result is kept."""
        done = super().pretrain()
        broadcast_module(self.model, self.comm)
        return done

    def run(self, resume: bool = True):
        result = super().run(resume)
        # the others wait until rank 0 has written its last checkpoint (or failed to)
        any_rank(False, self.comm, "waiting for process 0 to write its checkpoints")
        return result

    def train_step(
        self,
        batch: list[int],
        epoch: int,
        step: int,
        steps: int,
        sums: dict[str, float],
        sampler: torch.Generator,
    ) -> None:
        """One Adam step on the global ``batch``: this process's shard slide by slide,
        gradients summed over the processes (``sampler`` is not used: every slide has
        generators of its own)."""
        config, model = self.config, self.model
        local = torch.zeros(2 * len(_SUMS) + 1, dtype=torch.float64)  # sums, present, bad
        self.optimizer.zero_grad(set_to_none=True)
        where = f"at epoch {epoch + 1}, step {step + 1}"
        with self._out_of_memory(where):
            for i in shard(batch, self.world):
                generator = torch.Generator().manual_seed(_seed(config.seed, 5, epoch, i))
                torch.manual_seed(_seed(config.seed, 6, epoch, i))  # dropout, if any
                sources = self.dataset.sources([i])
                terms = model.loss(sources, self.labels[[i]], epoch=epoch, generator=generator)
                loss = terms.total
                values = terms.as_floats()
                if config.roi_attention_weight:
                    roi_kl = roi_attention_loss(model, sources)
                    loss = loss + config.roi_attention_weight * roi_kl
                    values["roi_attention"] = float(roi_kl.detach())
                values["total"] = float(loss.detach())
                if not bool(torch.isfinite(loss.detach())):
                    local[-1] += 1
                    continue
                self.scaler.scale(loss / len(batch)).backward()
                probs = class_probabilities(terms.logits.detach().float())
                values["correct"] = int((probs.argmax(1).cpu() == terms.labels.cpu()).sum())
                values["n"] = 1
                for k, key in enumerate(_SUMS):
                    if key in values:
                        local[k] += values[key]
                        local[len(_SUMS) + k] += 1
        total = all_reduce_sum(local.to(self.comm), f"summing the losses {where}").cpu()
        if total[-1] > 0:
            raise TrainingError(
                self.out_path,
                f"the training loss became non-finite {where} on {int(total[-1])} of "
                f"{len(batch)} slides.",
                f"Lower the learning rate (now {config.lr:g}, --lr). The checkpoints "
                f"of the last good epoch ({self.state.epoch}) are kept.",
            )
        reduce_gradients(list(model.parameters()), self.comm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        broadcast_module_buffers(model, self.comm)
        for k, key in enumerate(_SUMS):
            if total[len(_SUMS) + k] > 0:
                sums[key] = sums.get(key, 0.0) + float(total[k])
        n = max(float(total[_SUMS.index("n")]), 1.0)
        self.emit(
            EpochStep(
                epoch + 1,
                config.epochs,
                step + 1,
                steps,
                float(total[0]) / n,
                float(total[_SUMS.index("correct")]) / n,
            )
        )

    def validate(self, epoch: int) -> tuple[float, float]:
        """:meth:`Trainer.validate` split over the processes: each slide with a generator
        seeded by ``(seed, slide)``; the sums gathered (with the ROI attention shares'
        sums and counts)."""
        config, dataset = self.config, self.dataset
        mine = shard(self.val_idx, self.world)
        sums = torch.zeros(6, dtype=torch.float64)  # right, NLL, shares' sums and counts
        for k, i in enumerate(mine):
            generator = torch.Generator().manual_seed(_seed(config.seed, 3, i))
            with self._out_of_memory(f"validating epoch {epoch + 1}"):
                [source] = dataset.sources([i])
                [p] = self.model.predict(
                    [source],
                    mode="sample",
                    draws=config.val_draws,
                    generator=generator,
                )
            for stage, share in enumerate(roi_attention_shares(self.model, source, p)):
                if share is not None:
                    sums[2 + 2 * stage] += share
                    sums[3 + 2 * stage] += 1
            y = int(dataset.records[i].label_index)
            sums[0] += int(p.label == y)
            sums[1] -= math.log(max(float(p.probabilities[y]), 1e-12))
            self.emit(Validating(epoch + 1, config.epochs, k + 1, len(mine)))
        total = all_reduce_sum(sums.to(self.comm), f"validating epoch {epoch + 1}").cpu()
        self.roi_attention.sums = [float(total[2]), float(total[4])]
        self.roi_attention.counts = [int(total[3]), int(total[5])]
        n = len(self.val_idx)
        return float(total[0]) / n, float(total[1]) / n

    def save_best(self, final: bool = False) -> None:
        if self.world.main:
            super().save_best(final)

    def save_last(self, final: bool = False, rng: dict[str, torch.Tensor] | None = None) -> None:
        if self.world.main:
            super().save_last(final, rng)


def broadcast_module_buffers(module: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    """Rank 0's buffers (batch-norm running statistics) everywhere, as DDP does per step."""
    if not _group() or not any(b.numel() for b in module.buffers()):
        return
    with _collective("taking the buffers of process 0"), torch.no_grad():
        for b in module.buffers():
            if b.numel():
                buffer = b.detach().to(device)
                dist.broadcast(buffer, src=0)
                b.copy_(buffer.to(b.device))
