"""Train, evaluate and measure models on an MNIST haystack, one process per run; tabulate.

Shared by :mod:`benchmarks.megapixel_mnist` and :mod:`benchmarks.needle_mnist`.  A
benchmark is a :class:`Bench`: its data, its models (by key) and its defaults.  The
parent process runs, for every model, two children:

1. ``--phase train``: build the model (seeded), optionally pre-train it, train it for
   ``--epochs`` on ``--train`` images (Adam, gradient norm clipped to 1 as in the ATS
   reference), evaluate on ``--test`` images, save its weights;
2. ``--phase cost``: in a fresh process, load the weights and time ``--cost-steps``
   forward+backward passes with batch size 1 (ATS §4.1.2's protocol), with the peak
   resident memory of exactly those passes (the high-water mark is reset first) and
   the pixels the image sources served.

``--reevaluate`` keeps trained runs and evaluates their saved weights again with the
current inference code (``--phase evaluate``), e.g. after a change of the top-k rule.

Each model's result is one JSON file in ``--out`` (written when its run ends, so a
killed benchmark loses at most the run in progress; finished runs with the same
settings are reused unless ``--fresh``).  The parent then prints the Markdown table
and, with ``--plot``, draws the training-loss curves and test errors (matplotlib,
the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from torch import nn

from benchmarks._measure import (
    STEADY_MALLOC,
    code_version,
    current_rss_mb,
    machine,
    peak_rss_mb,
    reset_peak_rss,
    run_child,
)
from benchmarks.mnist_data import Haystack, Mnist, load_mnist
from napari_zoomin.models import LowResolutionCNN
from napari_zoomin.paths import cache_dir

__all__ = ["Bench", "ModelSpec", "main", "train_model"]

SETTINGS = (
    "epochs",
    "train",
    "test",
    "batch_size",
    "lr",
    "lr_schedule",
    "seed",
    "threads",
    "n",
    "mask",
)


@dataclass
class ModelSpec:
    """A model of the table: its label, how to build it, and optional pre-training."""

    label: str
    build: Callable[[argparse.Namespace], nn.Module]
    pretrain: Callable[[nn.Module, Haystack, argparse.Namespace], dict] | None = None
    lr: float | None = None  # overrides --lr (e.g. 000's 1e-4 for its Needle settings)


@dataclass
class Bench:
    """One benchmark: data, models and defaults (``quick`` overrides for ``--quick``)."""

    name: str
    module: str
    make_data: Callable[[Mnist, str, int, argparse.Namespace], Haystack]  # (…, split, n, args)
    models: dict[str, ModelSpec]
    defaults: dict
    quick: dict
    notes: list[str] = field(default_factory=list)
    default_models: list[str] | None = None  # run by default (all models if None)


# -- training and evaluation ---------------------------------------------------------


def _batches(labels: torch.Tensor, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled mini-batches; for two classes, balanced (half positive, half negative).

    Balanced batches keep a rare informative sub-tile's gradient from being drowned
    by the label prior (see ``tests/core/test_digits_e2e.py``).
    """
    if int(labels.max()) > 1:
        order = torch.randperm(len(labels), generator=generator)
        return list(order.split(size))
    pos = torch.nonzero(labels == 1)[:, 0]
    neg = torch.nonzero(labels == 0)[:, 0]
    pos = pos[torch.randperm(len(pos), generator=generator)]
    neg = neg[torch.randperm(len(neg), generator=generator)]
    half = size // 2
    n = min(len(pos), len(neg))
    return [torch.cat((pos[i : i + half], neg[i : i + half])) for i in range(0, n, half)]


def train_model(
    model: nn.Module,
    data: Haystack,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log=None,
    lr_schedule: str = "constant",
) -> dict:
    """Adam with gradient-norm clipping at 1; returns per-step and per-epoch losses.

    ``lr_schedule="cosine"`` decays the learning rate from ``lr`` to 0 over all steps
    (one cosine half-period, stepped per batch): with a budget of a few epochs, the
    last steps then average out the noise of batch-of-8 gradients instead of ending
    on a full-size step.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown learning-rate schedule {lr_schedule!r}")
    total_steps = epochs * len(_batches(data.labels, batch_size, torch.Generator()))
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(total_steps, 1))
        if lr_schedule == "cosine"
        else None
    )
    steps, step_lr, epoch_loss, epoch_error, seconds = [], [], [], [], []
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        losses, wrong, seen, images = [], 0, 0, 0
        for batch in _batches(data.labels, batch_size, generator):
            sources = [data.images[i] for i in batch.tolist()]
            terms = model.loss(sources, data.labels[batch], epoch=epoch, generator=generator)
            optimiser.zero_grad()
            terms.total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            step_lr.append(optimiser.param_groups[0]["lr"])
            optimiser.step()
            if scheduler is not None:
                scheduler.step()
            ce = float(terms.classification.detach())
            steps.append(ce)
            losses.append(ce * len(batch))
            images += len(batch)
            predicted = _predicted(terms.logits)
            wrong += int((predicted != terms.labels.to(predicted.device)).sum())
            seen += len(terms.labels)
            if log and len(steps) % 50 == 0:
                recent = statistics.mean(steps[-50:])
                log(f"step {len(steps)}: mean train loss of the last 50 steps {recent:.4f}")
        epoch_loss.append(sum(losses) / max(images, 1))
        epoch_error.append(wrong / max(seen, 1))
        seconds.append(time.perf_counter() - start)
        if log:
            log(
                f"epoch {epoch + 1}/{epochs}: train loss {epoch_loss[-1]:.4f}, "
                f"train error {epoch_error[-1]:.3f}, {seconds[-1]:.0f} s"
            )
    return {
        "step_loss": steps,
        "step_lr": step_lr,
        "epoch_loss": epoch_loss,
        "epoch_train_error": epoch_error,
        "epoch_seconds": seconds,
        "train_seconds": time.perf_counter() - start,
    }


def _predicted(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.detach().float()
    return (logits[:, 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)


#: estimates averaged per image in the third test column: ``classify``'s default
AVERAGED_DRAWS = 16


@torch.no_grad()
def _test_error(model: nn.Module, data: Haystack, batch_size: int, **predict) -> float:
    """Share of test images whose ``model.predict(..., **predict)`` class is wrong."""
    wrong = 0
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(len(data), start + batch_size)))
        preds = model.predict([data.images[i] for i in idx], **predict)
        probs = torch.stack([p.probabilities for p in preds])
        wrong += int((probs.argmax(1) != data.labels[idx]).sum())
    return wrong / len(data)


def error_with_draws(
    model: nn.Module, data: Haystack, draws: int, generator: torch.Generator, batch_size: int = 16
) -> float:
    """Test error with each image's probability the mean of ``draws`` sampled estimates."""
    return _test_error(model, data, batch_size, draws=draws, generator=generator)


@torch.no_grad()
def evaluate(model: nn.Module, data: Haystack, seed: int, batch_size: int = 16) -> dict:
    """Test error: one sampled estimate per image (K = 1, ATS's protocol), top-k, and
    the mean of :data:`AVERAGED_DRAWS` estimates (``test_error_sample_k16``: what
    ``classify`` reports by default).

    The CNN has one deterministic prediction (reported in the ``sampled`` column's
    place).  Pixels served during the K = 1 pass are returned per image.  Each sampled
    column has a generator of its own, so adding one moves no other.
    """
    data.reset_counters()
    if isinstance(model, LowResolutionCNN):
        wrong = 0
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(len(data), start + batch_size)))
            probs = model.predict_proba([data.images[i] for i in idx])
            wrong += int((probs.argmax(1) != data.labels[idx]).sum())
        return {"test_error_sample": wrong / len(data)}
    results: dict = {
        "test_error_sample": error_with_draws(
            model, data, 1, torch.Generator().manual_seed(seed + 1), batch_size
        )
    }
    px = data.pixels_read()
    results["eval_pixels_per_image"] = {k: v / len(data) for k, v in px.items()}
    results["test_error_topk"] = _test_error(model, data, batch_size, mode="topk")
    results[f"test_error_sample_k{AVERAGED_DRAWS}"] = error_with_draws(
        model, data, AVERAGED_DRAWS, torch.Generator().manual_seed(seed + 3), batch_size
    )
    priority = _read_with_priority(model)
    if priority is not None:  # same weights, same expectation: a lower-variance reading
        results["test_error_sample_priority"] = error_with_draws(
            priority, data, 1, torch.Generator().manual_seed(seed + 1), batch_size
        )
        results[f"test_error_sample_k{AVERAGED_DRAWS}_priority"] = error_with_draws(
            priority, data, AVERAGED_DRAWS, torch.Generator().manual_seed(seed + 3), batch_size
        )
    return results


def _read_with_priority(model: nn.Module) -> nn.Module | None:
    """The same model with priority weights for its distinct draws (ATS without
    replacement, Zoom-In's distinct stage-1 tiles) where it was trained with the
    sequential ones; ``None`` where the estimator does not apply.  Both estimators are
    unbiased for the same sum, so the weights need no retraining."""
    config = getattr(model, "config", None)
    if getattr(config, "estimator", None) != "sequential":
        return None
    try:  # the config refuses priority where the draws are with replacement
        priority = dataclasses.replace(config, estimator="priority")
    except ValueError:
        return None
    other = copy.copy(model)
    other.config = priority
    return other


def measure_cost(model: nn.Module, data: Haystack, steps: int, seed: int) -> dict:
    """Batch-1 forward+backward: median time, peak RSS of one pass, pixels per image.

    One warm-up pass first (one-time kernel and allocator set-up, reported apart);
    then the high-water mark is reset to the current RSS, so ``peak_rss_added_mb``
    is the most one pass adds to the resident memory.  The parent runs this twice:
    for the time with the default allocator, for the memory with glibc's fixed mmap
    threshold (:data:`~benchmarks._measure.STEADY_MALLOC`), which makes RSS follow
    live memory but slows allocation.
    On CUDA ``max_memory_allocated`` is reported too.  Pixels are counted over the
    measured passes.
    """
    generator = torch.Generator().manual_seed(seed + 2)
    device = next(iter(model.parameters())).device
    model.train()

    def one_pass(k: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        terms = model.loss([data.images[k]], data.labels[k : k + 1], generator=generator)
        terms.total.backward()
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
        model.zero_grad(set_to_none=True)
        return seconds

    gc.collect()
    before = current_rss_mb()
    first = one_pass(0)[0]
    warm_rss = current_rss_mb()
    data.reset_counters()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    exact = reset_peak_rss()
    base = current_rss_mb()
    times = [one_pass(i % len(data)) for i in range(1, steps + 1)]
    peak = peak_rss_mb()
    px = data.pixels_read()
    return {
        "seconds_per_sample": statistics.median(t[0] for t in times),
        "cpu_seconds_per_sample": statistics.median(t[1] for t in times),
        "first_pass_seconds": first,
        "first_pass_rss_added_mb": warm_rss - before,
        "peak_rss_added_mb": peak - base,
        "peak_rss_mb": peak,
        "peak_rss_exact": exact,
        "cuda_peak_mb": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
        "train_pixels_per_image": {k: v / steps for k, v in px.items()},
    }


# -- processes -----------------------------------------------------------------------


def _settings(args: argparse.Namespace, key: str, bench: Bench) -> dict:
    s = {k: getattr(args, k) for k in SETTINGS}
    if bench.models[key].lr is not None:
        s["lr"] = bench.models[key].lr
    return s


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child(bench: Bench, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    key, spec = args.child, bench.models[args.child]
    settings = _settings(args, key, bench)
    mnist = load_mnist()
    weights = Path(args.out) / f"{key}.pt"
    torch.manual_seed(args.seed)
    model = spec.build(args)
    if args.phase == "cost":
        model.load_state_dict(torch.load(weights, weights_only=True))
        data = bench.make_data(mnist, "test", min(args.cost_steps + 1, args.test), args)
        return measure_cost(model, data, args.cost_steps, args.seed)
    if args.phase == "evaluate":
        model.load_state_dict(torch.load(weights, weights_only=True))
        return evaluate(model, bench.make_data(mnist, "test", args.test, args), args.seed)
    train = bench.make_data(mnist, "train", args.train, args)
    test = bench.make_data(mnist, "test", args.test, args)
    row: dict = {"key": key, "model": spec.label.format(n=args.n), "settings": settings}
    start = time.perf_counter()
    if spec.pretrain is not None:
        row["pretrain"] = spec.pretrain(model, train, args)
        row["pretrain_seconds"] = time.perf_counter() - start
        _log(f"{key}: pre-trained in {row['pretrain_seconds']:.0f} s")
    row.update(
        train_model(
            model,
            train,
            args.epochs,
            args.batch_size,
            settings["lr"],
            args.seed,
            log=lambda m: _log(f"{key}: {m}"),
            lr_schedule=args.lr_schedule,
        )
    )
    row.update(evaluate(model, test, args.seed))
    _log(f"{key}: test error {row['test_error_sample']:.3f}")
    torch.save(model.state_dict(), weights)
    return row


def run_all(bench: Bench, args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.log"
    common = [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (*SETTINGS, "cost_steps", "out")
    ] + (["--quick"] if args.quick else [])
    rows = []
    code = code_version()
    for key in args.models:
        path = out / f"{key}.json"
        settings = _settings(args, key, bench)
        row = None
        if path.exists() and not args.fresh:
            row = json.loads(path.read_text())
            if row.get("settings") != settings or "cost" not in row:
                row = None
            else:
                if row.get("code") != code:
                    was = row.get("code", "not recorded")
                    _log(
                        f"{key}: reusing a run trained on other code ({was}; today: {code}): "
                        "its row is marked; --fresh reruns it"
                    )
                if args.reevaluate:
                    _log(f"{key}: evaluating the saved weights again")
                    phase = [bench.module, *common, f"--child={key}", "--phase=evaluate"]
                    row.update(run_child(phase, log))
                    row["evaluated"] = date.today().isoformat()
                    path.write_text(json.dumps(row))
                if not args.remeasure:
                    _log(f"{key}: reusing {path}")
                    row["model"] = bench.models[key].label.format(n=args.n)
                    rows.append(row)
                    continue
        if row is None:
            _log(f"{key}: training ({bench.models[key].label.format(n=args.n)})")
            row = run_child([bench.module, *common, f"--child={key}", "--phase=train"], log)
            row["code"] = code
        row["model"] = bench.models[key].label.format(n=args.n)
        _log(f"{key}: measuring cost (batch 1, fresh process)")
        # time with the default allocator, memory with a steady one: two fresh processes
        row["cost"] = run_child([bench.module, *common, f"--child={key}", "--phase=cost"], log)
        memory = run_child(
            [bench.module, *common, f"--child={key}", "--phase=cost"], log, STEADY_MALLOC
        )
        row["cost"]["memory"] = memory
        row["cost"]["peak_rss_added_mb"] = memory["peak_rss_added_mb"]
        row["date"] = date.today().isoformat()
        row["machine"] = machine()
        path.write_text(json.dumps(row))
        rows.append(row)
    return rows


# -- report --------------------------------------------------------------------------


def _px(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def table(rows: list[dict], today: str | None = None) -> str:
    """The Markdown table; ``today`` is :func:`code_version` (computed when not given)."""
    lines = [
        "| model | test error (sampled, K = 1) | test error (top-k) "
        f"| test error ({AVERAGED_DRAWS} estimates averaged) | final train loss "
        "| training time (s) | fwd+bwd / sample, CPU (ms) | wall (ms) | peak RSS / sample (MB) "
        "| full-res px read / image | low-res px read / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    today = code_version() if today is None else today
    for r in rows:
        c = r["cost"]
        topk = r.get("test_error_topk")
        averaged = r.get(f"test_error_sample_k{AVERAGED_DRAWS}")
        one = f"{r['test_error_sample']:.1%}"
        many = "–" if averaged is None else f"{averaged:.1%}"
        if "test_error_sample_priority" in r:  # read again with priority weights
            one += f" (priority {r['test_error_sample_priority']:.1%})"
            many += f" (priority {r[f'test_error_sample_k{AVERAGED_DRAWS}_priority']:.1%})"
        px = c["train_pixels_per_image"]
        # a run reused from other code is not today's number: say so in the row
        stale = "" if r.get("code") == today else " (trained on other code†)"
        lines.append(
            f"| {r['model']}{stale} | {one} | "
            f"{'–' if topk is None else f'{topk:.1%}'} | "
            f"{many} | {r['epoch_loss'][-1]:.3f} | "
            f"{r['train_seconds']:.0f} | "
            f"{c.get('cpu_seconds_per_sample', float('nan')) * 1e3:.1f} | "
            f"{c['seconds_per_sample'] * 1e3:.1f} | {c['peak_rss_added_mb']:.1f} | "
            f"{_px(px['full_resolution'])} | {_px(px['low_resolution'])} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Training-loss curves (moving average over steps) and test errors, one PNG."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for r in rows:
        steps = torch.tensor(r["step_loss"])
        w = max(1, len(steps) // 25)
        smooth = steps.unfold(0, w, 1).mean(1)
        per_epoch = len(steps) / len(r["epoch_loss"])
        x = (torch.arange(len(smooth)) + w / 2) / per_epoch
        ax1.plot(x.numpy(), smooth.numpy(), label=r["model"])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training cross-entropy (moving average)")
    ax1.legend(fontsize=7, loc="best")
    ax1.set_title(title)
    names = [textwrap.fill(r["model"], 30) for r in rows]
    errors = [100 * r["test_error_sample"] for r in rows]
    ax2.barh(names, errors, color="tab:blue", label="sampled, K = 1")
    topk = [100 * r["test_error_topk"] if "test_error_topk" in r else 0 for r in rows]
    ax2.barh(names, topk, color="none", edgecolor="black", label="top-k")
    ax2.invert_yaxis()
    ax2.set_xlabel("test error (%)")
    ax2.legend(fontsize=7, loc="lower right")
    ax2.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line --------------------------------------------------------------------


def parser(bench: Bench) -> argparse.ArgumentParser:
    d = bench.defaults
    p = argparse.ArgumentParser(
        prog=f"python -m {bench.module}",
        description=f"{bench.name}: the models side by side (one process per run).",
    )
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--train", type=int, default=d["train"], help="training images")
    p.add_argument("--test", type=int, default=d["test"], help="test images")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=d.get("lr_schedule", "constant"),
        help="constant learning rate, or cosine decay to 0 over the run",
    )
    p.add_argument("--n", type=int, default=d["n"], help="patches / sub-tiles per image (N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mask",
        choices=("ink", "none"),
        default=d.get("mask", "ink"),
        help="tissue mask of the images: the view pixels holding ink (default), or none",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    p.add_argument("--cost-steps", type=int, default=d.get("cost_steps", 12))
    p.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=bench.default_models or list(bench.models),
        help=f"comma-separated subset of {','.join(bench.models)}",
    )
    p.add_argument("--quick", action="store_true", help="tiny settings (< 5 min on 2 cores)")
    p.add_argument("--out", help="folder for the per-run JSON files (default: in the cache)")
    p.add_argument("--plot", type=Path, help="write the figure to this PNG")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose results exist")
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="keep the trained runs, measure their time and memory again (back to back)",
    )
    p.add_argument(
        "--reevaluate",
        action="store_true",
        help="keep the trained runs, evaluate their weights again with the current code",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("train", "cost", "evaluate"), help=argparse.SUPPRESS)
    return p


def main(bench: Bench, argv: list[str] | None = None) -> int:
    p = parser(bench)
    args = p.parse_args(argv)
    if args.quick:
        explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv)}
        for k, v in bench.quick.items():
            if k not in explicit:
                setattr(args, k, v)
    unknown = [m for m in args.models if m not in bench.models]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(bench.models)}")
    if args.out is None:
        tag = "quick" if args.quick else "full"
        args.out = str(cache_dir("bench", bench.module.rsplit(".", 1)[-1], tag))
    if args.child:
        print(json.dumps(child(bench, args)))
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run_all(bench, args)
    settings = ", ".join(f"{k} {getattr(args, k)}" for k in SETTINGS)
    print(f"\n## {bench.name} — {date.today().isoformat()}\n")
    print(f"Machine: {machine()}; torch {torch.__version__}, {args.threads} thread(s).")
    wall = time.perf_counter() - start
    print(f"Settings: {settings}.  Wall time of this invocation: {wall:.0f} s.\n")
    today = code_version()  # one git call for the table, its footnote and the stamp
    print(table(rows, today))
    print(f"\nCode: {today}.")
    if any(r.get("code") != today for r in rows):
        print("† reused from a run on other code (its JSON's `code`); `--fresh` reruns it.")
    for r in rows:
        if "pretrain" in r:
            pre = r["pretrain"]
            if "reused" in pre:
                print(f"\n- {r['model']}: the same pre-trained networks ({pre['reused']}).")
                continue
            summary = {k: (v[-1] if isinstance(v, list) else v) for k, v in pre.items()}
            print(f"\n- {r['model']}: pre-training {r['pretrain_seconds']:.0f} s, {summary}")
    for note in bench.notes:
        print(f"\n- {note}")
    if args.plot:
        try:
            plot(rows, bench.name, args.plot)
            print(f"\nFigure: {args.plot}")
        except ImportError:
            print("\nNo figure: matplotlib is missing (pip install 'napari-zoomin[bench]').")
    return 0
