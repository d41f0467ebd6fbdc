"""MagNets on the demo task's sample slides, beside a one-stage ATS and the shipped demo.

    .venv/bin/python -m benchmarks.magnet_slides [--train 48] [--val 4] [--epochs 6] \\
        [--fresh 20] [--rows magnet,ats,demo] [--out DIR]

Issue 20's second table.  The training slides are the demo's
(``scripts/train_demo_model.py``: its writer, recipe, names, seeds and cache folder;
the first ``--train``/``--val`` of its 96 + 16 when fewer), the fresh slides
``benchmarks/demo_accuracy.py``'s (seeds from 5000, 8192² and 12,288², half
positive).  Rows:

* ``magnet``: a MagNet (002) trained with ``train(..., kind="magnet")`` and 002's
  settings where they fit a CPU (3 layers of (2, 3, 3) boxes, 56² views, 112² ``I′``,
  224² patches, LMS, auxiliary classifiers on layers 1 and 3 with the paradoxical
  loss, grey filter, flips and rotations, Adam with cosine annealing; ``--magnet-set``
  overrides), but at lr 1e-3 in batches of 4 (``--magnet-lr``, ``--magnet-batch``):
  002's 3e-5 in batches of 16 is for 200 epochs, and 48 slides make 3 such batches.
  The MagNet path takes no supervision from the annotations (it has no attention
  map for ROI pre-training or the ROI term): only the slide labels.
* ``ats``: a one-stage ATS with the demo's recipe (s = 1/16, 32 px sub-tiles at full
  resolution, N = 32, ROI pre-training with tumours as ROI and distractors as
  look-alikes, ``f`` kept as pre-trained, the ROI attention term), same slides and epochs.
* ``demo``: the shipped Zoom-In demo checkpoint (trained on all 96 slides, 20 epochs).

A trained row is evaluated at its best epoch by validation accuracy (then loss), as
the demo, or at its last (``--checkpoint last``).  Each training
and each evaluation runs in a fresh process (peak memory of its own);
every row classifies the same fresh slides with
:func:`~napari_zoomin.engine.inference.classify` (16 draws, as ``demo_accuracy``; one
pass for a MagNet) and the table reports accuracy, false positives / negatives,
training time, seconds per slide, peak RSS, the level-0 (full-resolution) pixels
decoded per slide, whether the final regions cover the tumour centre on positive
slides, and a MagNet's magnification.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks._measure import machine, peak_rss_mb, run_child

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("magnet", "ats", "demo")
#: 002's 3-layer MagNet (figure 4) from scratch, as MagNetConfig's defaults, with its
#: training settings (§4.3: Adam, cosine annealing; lr and batch are flags here)
MAGNET_OPTIONS: dict[str, Any] = {"patches": [2, 3, 3]}
#: the ``ats`` row's model, by the kind ``--ats-set`` gives it
KIND_NAMES = {"ats": "ATS", "uniform": "U-N", "reinforce-ats": "REINFORCE-ATS"}
#: demo settings that a one-stage ATS has no use for (it has no stage 2)
ZOOMIN_ONLY = ("stage2_scale", "tile_size")


def demo_script():
    """``scripts/train_demo_model.py`` as a module (its slide writer, seeds, recipe),
    registered in ``sys.modules`` so its writer can be sent to worker processes."""
    if "train_demo_model" in sys.modules:
        return sys.modules["train_demo_model"]
    path = ROOT / "scripts" / "train_demo_model.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_demo_model"] = module
    spec.loader.exec_module(module)
    return module


def _kind_name(kind: str) -> str:
    return KIND_NAMES.get(kind, kind)


def row_config(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig settings of a trained row (JSON-able)."""
    demo = demo_script().CONFIG
    common = {
        "epochs": args.epochs,
        "seed": args.seed,
        "device": "cpu",
        "early_stopping_patience": 0,
        "num_workers": 1,
    }
    if row == "magnet":
        options = {**MAGNET_OPTIONS, **json.loads(args.magnet_set)}
        feature_dim = options.pop("feature_dim", 512)
        return {
            **common,
            "kind": "magnet",
            "batch_size": args.magnet_batch,
            "lr": args.magnet_lr,
            "lr_schedule": "cosine",
            "pretrain_epochs": 0,
            "val_draws": 1,  # one deterministic pass
            "feature_dim": feature_dim,
            "model_options": options,
        }
    if row == "ats":
        config = {k: v for k, v in demo.items() if k not in ZOOMIN_ONLY}
        config.update(common, kind="ats")
        config.update(json.loads(args.ats_set))
        return config
    raise ValueError(f"no training for row {row!r}")


# -- children: one process per training and per evaluation ----------------------------------


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.row`` on the slides of ``args.labels``; its time and peak memory."""
    import torch

    from napari_zoomin.engine.checkpoints import load_checkpoint
    from napari_zoomin.engine.dataset import SlideDataset
    from napari_zoomin.training import TrainConfig, Validated, train

    torch.set_num_threads(args.threads)
    config = TrainConfig(**row_config(args.row, args))
    t0 = time.perf_counter()

    def progress(event) -> None:
        if isinstance(event, Validated):
            print(
                f"{args.row} {time.perf_counter() - t0:6.0f} s  epoch {event.epoch}/"
                f"{event.epochs}  loss {event.loss:.3f}  train acc {event.accuracy:.2f}  "
                f"val acc {event.val_accuracy}  val loss {event.val_loss}",
                file=sys.stderr,
                flush=True,
            )

    out = args.out / "runs" / args.row / "model.safetensors"
    with SlideDataset.from_csv(
        args.labels,
        args.labels.parent,
        roi_labels=config.roi_labels,
        lookalike_labels=config.lookalike_labels,
        workers=1,
    ) as dataset:
        result = train(dataset, config, out, progress=progress, resume=False)
    seconds = load_checkpoint(result.last_checkpoint_path).info["info"]["seconds"]
    return {
        "checkpoint": str(result.checkpoint_path),
        "last_checkpoint": str(result.last_checkpoint_path),
        "train_seconds": float(seconds),
        "train_peak_rss_mb": peak_rss_mb(),
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "history": [
            {k: h.get(k) for k in ("epoch", "train_loss", "train_accuracy", "val_accuracy")}
            for h in result.history
        ],
    }


def _covers(box: list[float], point: tuple[float, float]) -> bool:
    """Whether a level-0 ``[top, left, h, w]`` box contains ``(y, x)``."""
    return box[0] <= point[0] < box[0] + box[2] and box[1] <= point[1] < box[1] + box[3]


def area_fraction(boxes: list[list[float]], shape: tuple[int, int], grid: int = 512) -> float:
    """The share of the slide under the union of level-0 ``[top, left, h, w]`` boxes, on a
    ``grid`` × ``grid`` raster (a cell counts when a box touches it): the chance that
    a box covers a point by luck alone."""
    import numpy as np

    h, w = shape
    mask = np.zeros((grid, grid), bool)
    for top, left, bh, bw in boxes:
        y0, x0 = max(0, int(top / h * grid)), max(0, int(left / w * grid))
        y1 = min(grid, int(np.ceil((top + bh) / h * grid)))
        x1 = min(grid, int(np.ceil((left + bw) / w * grid)))
        mask[y0:y1, x0:x1] = True
    return float(mask.mean())


def slide_row(result, label: str, regions: list[dict], seconds: float) -> dict[str, Any]:
    """What the table needs of one slide's :class:`~napari_zoomin.engine.results.Result`.

    ``final`` regions are a MagNet's last-layer boxes, or the sub-tiles an attention
    model read; ``covers_tumour``: one of them contains a tumour's centre.
    """
    tumours = [
        (r["y"] + r["box"] / 2, r["x"] + r["box"] / 2)
        for r in regions
        if r["kind"].lower() == "tumor"
    ]
    if result.magnified is not None:
        boxes = result.magnified["boxes"]
        last = max(b["depth"] for b in boxes)
        final = [b for b in boxes if b["depth"] == last]
        regions_final = [b["box"] for b in final]
        zoom = max(b["zoom"] for b in final)
        full_detail = sum(b["level"] == 0 and b["read_scale"] >= 1.0 for b in final) / len(final)
    else:
        regions_final = [s["region"] for s in result.subtiles]
        zoom = full_detail = None
    covers = any(_covers(box, c) for box in regions_final for c in tumours)
    return {
        "label": label,
        "predicted": result.label,
        "p_positive": result.probabilities.get("positive"),
        "seconds": seconds,
        "level0_decoded": int(result.decode["decoded_pixels_by_level"].get("0", 0)),
        "pixels_read": int(result.pixels_read),
        "covers_tumour": covers if tumours else None,
        "area": area_fraction(regions_final, tuple(result.slide["shape"])),
        "zoom": zoom,
        "full_detail": full_detail,
    }


def child_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Classify every fresh slide with ``args.model``: per-slide rows and peak memory."""
    import torch

    from napari_zoomin.engine.checkpoints import load_model
    from napari_zoomin.engine.inference import classify

    torch.set_num_threads(args.threads)
    ckpt = load_model(args.model)
    rows = []
    for path, _size, label, _seed in json.loads(args.jobs_json):
        regions = json.loads(Path(path).with_suffix(".json").read_text())["regions"]
        t = time.perf_counter()
        result = classify(path, ckpt, draws=args.draws, device="cpu", workers=1)
        row = slide_row(result, label, regions, time.perf_counter() - t)
        rows.append(row)
        print(
            f"{args.row} {Path(path).name}: {row['predicted']} (p+ {row['p_positive']:.2f}) "
            f"covers tumour {row['covers_tumour']} zoom {row['zoom']} {row['seconds']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return {"slides": rows, "eval_peak_rss_mb": peak_rss_mb()}


# -- the table --------------------------------------------------------------------------------


def summarise(name: str, trained: dict | None, evaluated: dict) -> dict[str, Any]:
    """One table row from a training's and an evaluation's child output."""
    slides = evaluated["slides"]
    pos = [s for s in slides if s["label"] == "positive"]
    neg = [s for s in slides if s["label"] == "negative"]
    zooms = [s["zoom"] for s in slides if s["zoom"] is not None]
    return {
        "row": name,
        "right": sum(s["label"] == s["predicted"] for s in slides),
        "n": len(slides),
        "fp": sum(s["predicted"] == "positive" for s in neg),
        "n_neg": len(neg),
        "fn": sum(s["predicted"] == "negative" for s in pos),
        "n_pos": len(pos),
        "train_seconds": None if trained is None else trained["train_seconds"],
        "train_peak_rss_mb": None if trained is None else trained["train_peak_rss_mb"],
        "seconds_per_slide": statistics.mean(s["seconds"] for s in slides),
        "eval_peak_rss_mb": evaluated["eval_peak_rss_mb"],
        "level0_mpx": statistics.mean(s["level0_decoded"] for s in slides) / 1e6,
        "covers": sum(bool(s["covers_tumour"]) for s in pos),
        "area": statistics.mean(s["area"] for s in slides),
        "zoom": statistics.median(zooms) if zooms else None,
        "zoom_max": max(zooms) if zooms else None,
        "full_detail": (statistics.mean(s["full_detail"] for s in slides) if zooms else None),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`summarise` rows."""

    def opt(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = [
        "| model | right | false positives | false negatives | training (s) | training peak "
        "RSS (MB) | seconds per slide | classify peak RSS (MB) | level-0 Mpx decoded per "
        "slide | positives whose final regions cover the tumour centre | slide area under "
        "the final regions | a slide's largest last-layer magnification (median; max) | "
        "last-layer boxes read at full detail |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        zoom = "–" if r["zoom"] is None else f"{r['zoom']:.1f}×; {r['zoom_max']:.1f}×"
        lines.append(
            f"| {r['row']} | {r['right']} / {r['n']} ({r['right'] / max(r['n'], 1):.0%}) | "
            f"{r['fp']} / {r['n_neg']} | {r['fn']} / {r['n_pos']} | "
            f"{opt(r['train_seconds'], '.0f')} | {opt(r['train_peak_rss_mb'], '.0f')} | "
            f"{r['seconds_per_slide']:.2f} | {r['eval_peak_rss_mb']:.0f} | "
            f"{r['level0_mpx']:.2f} | {r['covers']} / {r['n_pos']} | {r['area']:.1%} | {zoom} | "
            f"{opt(r['full_detail'], '.0%')} |"
        )
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------------


def _child_args(args: argparse.Namespace, row: str) -> list[str]:
    return [
        "benchmarks.magnet_slides",
        f"--row={row}",
        f"--out={args.out}",
        f"--epochs={args.epochs}",
        f"--seed={args.seed}",
        f"--threads={args.threads}",
        f"--draws={args.draws}",
        f"--magnet-lr={args.magnet_lr}",
        f"--magnet-batch={args.magnet_batch}",
        f"--magnet-set={args.magnet_set}",
        f"--ats-set={args.ats_set}",
    ]


def prepare(args: argparse.Namespace) -> tuple[Path, list]:
    """The training slides (demo cache) and the fresh slides (demo_accuracy's cache)."""
    from benchmarks.demo_accuracy import _write, fresh_jobs
    from napari_zoomin.paths import cache_dir

    t = time.perf_counter()
    demo = demo_script()
    slides = args.slides or cache_dir("demo-training") / "slides-2"
    labels = demo.make_slides(
        slides, args.jobs, args.train, args.val, f"labels-magnet-{args.train}-{args.val}.csv"
    )
    folder = args.fresh_out or cache_dir("bench") / "demo-accuracy"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = fresh_jobs(folder, args.fresh, [int(v) for v in args.sizes.split(",")], args.first_seed)
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(_write, jobs))
    print(f"slides ready in {time.perf_counter() - t:.0f} s: {labels}, {folder}", flush=True)
    return labels, jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"some of {','.join(ROWS)}")
    parser.add_argument("--train", type=int, default=48, help="training slides (demo: 96)")
    parser.add_argument("--val", type=int, default=4, help="validation slides (demo: 16)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--fresh", type=int, default=20, help="fresh slides to classify")
    parser.add_argument("--sizes", default="8192,12288", help="fresh slides' sides")
    parser.add_argument("--first-seed", type=int, default=5000, help="fresh slides' first seed")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=2, help="processes writing slides")
    parser.add_argument("--magnet-lr", type=float, default=1e-3, help="002: 3e-5 (200 epochs)")
    parser.add_argument("--magnet-batch", type=int, default=4, help="002: 16")
    parser.add_argument("--magnet-set", default="{}", help="JSON MagNetConfig overrides")
    parser.add_argument("--ats-set", default="{}", help="JSON TrainConfig overrides for ats")
    parser.add_argument("--demo-model", default="demo", help="the Zoom-In row's checkpoint")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="evaluate a trained row's best epoch (by validation) or its last",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/magnet-slides"))
    parser.add_argument("--slides", type=Path, default=None, help="training slides folder")
    parser.add_argument("--fresh-out", type=Path, default=None, help="fresh slides folder")
    # a child's own flags (one training or one evaluation, JSON on its last line)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--labels", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--jobs-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.row is not None:  # a child
        out = child_train(args) if args.model is None else child_eval(args)
        print(json.dumps(out))
        return 0

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    labels, jobs = prepare(args)
    summary = []
    for row in rows:
        trained, model = None, args.demo_model
        if row != "demo":
            print(f"training {row} (log: {log})", flush=True)
            trained = run_child([*_child_args(args, row), f"--labels={labels}"], log)
            model = trained["checkpoint" if args.checkpoint == "best" else "last_checkpoint"]
        print(f"classifying {len(jobs)} fresh slides with {row}", flush=True)
        evaluated = run_child(
            [*_child_args(args, row), f"--model={model}", f"--jobs-json={json.dumps(jobs)}"], log
        )
        name = {
            "magnet": f"MagNet (002), {row_config('magnet', args)['model_options']['patches']}"
            " boxes, from scratch",
            "ats": f"{_kind_name(row_config('ats', args)['kind'])}, one stage, demo recipe",
            "demo": "Zoom-In, the shipped demo (96 slides, 20 epochs)",
        }[row]
        if trained is not None:
            epoch = trained["best_epoch"] if args.checkpoint == "best" else args.epochs
            name += f", {args.epochs} epochs ({args.checkpoint}: {epoch})"
        summary.append(summarise(name, trained, evaluated))
        (args.out / f"{row}.json").write_text(
            json.dumps({"train": trained, "eval": evaluated}, indent=1)
        )
        print(table(summary[-1:]), flush=True)
    print(
        f"\n{len(jobs)} fresh slides (seeds {args.first_seed}–{args.first_seed + len(jobs) - 1},"
        f" sizes {args.sizes}); trained rows: {args.train} + {args.val} demo slides, "
        f"{args.epochs} epochs, {args.threads} torch thread(s); {machine()}\n"
    )
    print(table(summary))
    (args.out / "table.md").write_text(table(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
