#!/usr/bin/env python
"""Train the packaged demo model (``--model demo``) on sample slides; see docs/training.md.

    python scripts/train_demo_model.py

1. Writes 112 sample slides (the default recipe: real tissue fragments, no mirror
   tiling) with :func:`~napari_zoomin.samples.write_sample_slide` into a cache folder
   (once): 96 for training (8192² and 12,288²) and 16 held out for validation
   (8192², 12,288² and 16,384²), half positive, other seeds than training, one tumour
   and one distractor each (two distractors on a negative slide).  A 1/16 view
   cannot tell a tumour from its distractor (same 16×16 block sums); full
   resolution can.
2. Trains a small Zoom-In network with :func:`napari_zoomin.training.train`
   (resuming an interrupted run); ``--threads 1`` reproduces it bit for bit.  The
   recipe (docs/training.md, "The demo model"): pre-train ``a``, ``b`` and ``f`` from
   the annotations (tumours as ROI, distractors as look-alikes, max pooling), then
   train on the slide labels with ``f`` kept as pre-trained (``feature_lr`` 0).
3. Writes the best checkpoint (by validation accuracy) to
   ``src/napari_zoomin/weights/demo.safetensors`` with the recipe in its metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from napari_zoomin.engine.checkpoints import DEMO_MODEL, load_checkpoint, save_checkpoint
from napari_zoomin.engine.dataset import SlideDataset
from napari_zoomin.paths import cache_dir
from napari_zoomin.training import TrainConfig, TrainEvent, Validated, train

SEED = 0
CLASSES = ["negative", "positive"]
TRAIN_SIZES = (8192, 12288)
VAL_SIZES = (8192, 12288, 16384)
N_TRAIN, N_VAL = 96, 16
TRAIN_SEEDS, VAL_SEEDS = 1000, 2000
#: the sample-slide recipe of the training slides (written down: a later default
#: would otherwise change what this script trains on)
SAMPLE_RECIPE = 2

#: the demo's training settings (everything else: TrainConfig defaults)
CONFIG = {
    "kind": "zoomin",
    "epochs": 20,
    "batch_size": 2,
    # with f fixed, lr is g's alone: at 1e-3 its bias was still far off after 20
    # epochs (fresh negatives at P 0.24, missed positives at 0.37-0.48); the attention
    # logits must move by about log(cells)
    "lr": 1e-2,
    "attention_lr": 1e-2,
    # f keeps what pre-training taught it (tumour against distractor): trained on the
    # slide labels it lost that within an epoch and became "brown region or not"
    "feature_lr": 0.0,
    "seed": SEED,
    "device": "cpu",
    "early_stopping_patience": 0,
    "val_draws": 4,
    # s1 = 1/16 (000's Camelyon16 value): a planted region is a 3-9 px blob of the
    # view, barely different from the tissue's own brown areas, but learnable (at 1/32
    # and 1/64 it was not); tiles of 128 px (> 1/s1) hold it whole; s2 = 1/4 shows it
    # as a 12-36 px blob in a 32×32 tile view; sub-tiles of 32 px are full-resolution
    # crops of it, where tumour cells and scrambled distractors differ.
    "view_scale": 1 / 16,
    "stage2_scale": 1 / 4,
    "tile_size": 128,
    "subtile_size": 32,
    "n_samples": 32,
    "feature_dim": 32,
    "feature_hidden": 64,
    "feature_channels": (16, 32),
    "entropy_weight": 1e-4,
    # The in-sample contrastive loss, switched on before f told tumour from distractor,
    # collapsed every prediction to "negative" in three runs; off for the demo.
    "contrastive": False,
    "pixel_weight": 1.0,
    # The stage-1 view cannot separate a tumour from its distractor, so attention is
    # pulled towards both (look-alikes); f learns them apart in pre-training.
    "roi_labels": ("Tumor",),
    "lookalike_labels": ("Distractor",),
    "roi_attention_weight": 10.0,
    "pretrain_epochs": 10,
    "pretrain_patches": 64,
    # a planted region fills a few of a pre-training patch's 16×16 view pixels: the
    # averaged map learned nothing (0.1-0.4 % of α on them), the maximum 97-100 %
    "pretrain_pooling": "max",
    # stage-1 cells of 2×2 view pixels: 4× cheaper after the first convolution; at
    # stride 4 a 64-px cell straddled a region unevenly and α favoured one of the two
    "model_options": {"attention_stride": 2},
    "num_workers": 1,
}


def _write(job: tuple[str, int, str, int, int]) -> str:
    from napari_zoomin.samples import write_sample_slide

    path, size, label, seed, recipe = job
    if not (Path(path).is_file() and Path(path).with_suffix(".geojson").is_file()):
        write_sample_slide(
            path, size=size, label=label, seed=seed, n_tumor=1, n_distractors=1, recipe=recipe
        )
    return path


def make_slides(
    folder: Path,
    jobs: int,
    n_train: int = N_TRAIN,
    n_val: int = N_VAL,
    labels: str = "labels.csv",
) -> Path:
    """Write the sample slides (skipping existing ones) and their labels CSV.

    ``n_train``/``n_val`` below the demo's take the first slides of its lists (the
    same names and seeds, so a smaller run shares the demo's cache:
    ``benchmarks/magnet_slides.py``); ``labels`` names the CSV they are listed in.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows, work = [], []
    plan = (("train", n_train, TRAIN_SEEDS, TRAIN_SIZES), ("val", n_val, VAL_SEEDS, VAL_SIZES))
    for split, count, first_seed, sizes in plan:
        for k in range(count):
            label = CLASSES[(k + 1) % 2]  # positive first
            size = sizes[(k // 2) % len(sizes)]
            seed = first_seed + k
            name = f"{split}-{k:02d}-{label}-{size}-seed{seed}.tif"
            rows.append(f"{name},{label},{split}")
            work.append((str(folder / name), size, label, seed, SAMPLE_RECIPE))
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(_write, work))
    csv = folder / labels
    csv.write_text("slide,label,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return csv


def write_profile(csv: Path, out: Path) -> int:
    """Put the training slides' profile into an existing checkpoint (weights untouched).

    The demo model was trained before checkpoints described their training slides;
    this adds what the trainer now writes itself (``info.data.mpp``,
    ``info.data.profile``), computed from the same training slides.
    """
    from napari_zoomin.engine.trust import training_profile

    ckpt = load_checkpoint(out)
    info = ckpt.info["info"]
    with SlideDataset.from_csv(csv, csv.parent) as dataset:
        train_idx = dataset.indices("train")
        mpps = {dataset.slide_mpp(i) for i in train_idx}
        (mpp,) = {round(float(m[0]), 6) for m in mpps}  # the sample slides share one
        profile = training_profile([dataset.profile(i) for i in train_idx], mpp)
    info["data"]["mpp"] = mpp
    info["data"]["profile"] = profile
    save_checkpoint(out, ckpt.model, ckpt.classes, info=info)
    print(json.dumps(profile, indent=1))
    print(f"profile of {len(train_idx)} training slides written into {out}")
    return 0


def _progress(t0: float):
    def progress(event: TrainEvent) -> None:
        if isinstance(event, Validated):
            print(
                f"{time.perf_counter() - t0:6.0f} s  epoch {event.epoch:3d}/{event.epochs}"
                f"  loss {event.loss:.3f}  train acc {event.accuracy:.2f}"
                f"  val acc {event.val_accuracy:.3f}  val loss {event.val_loss:.3f}"
                + ("  *" if event.best else ""),
                flush=True,
            )

    return progress


def _phase(csv: Path, config: TrainConfig, work: Path, t0: float, fresh: bool):
    """The training run: the best checkpoint, its total seconds (over sessions), the result."""
    dataset = SlideDataset.from_csv(
        csv,
        csv.parent,
        roi_labels=config.roi_labels,
        lookalike_labels=config.lookalike_labels,
        workers=config.num_workers,
    )
    result = train(dataset, config, work, progress=_progress(t0), resume=not fresh)
    # training time summed over sessions (a resumed run adds up its parts)
    seconds = load_checkpoint(result.last_checkpoint_path).info["info"]["seconds"]
    return load_checkpoint(result.checkpoint_path), seconds, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="slides and work folder")
    parser.add_argument("--out", type=Path, default=DEMO_MODEL, help="where the demo model goes")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (bit-for-bit results need the same)"
    )
    parser.add_argument("--fresh", action="store_true", help="do not resume an earlier run")
    parser.add_argument(
        "--profile-only",
        action="store_true",
        help="do not train: write the training profile (pixel size, stain colour, tissue, "
        "synthetic) of the training slides into the existing --out checkpoint",
    )
    parser.add_argument(
        "--set",
        default="{}",
        help="JSON overrides of the settings, e.g. '{\"n_samples\": 16}'; its model_options "
        "are added to the script's (attention_stride 2 stays unless given)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = args.cache or cache_dir("demo-training")
    t0 = time.perf_counter()
    # slides-2: the folder of recipe-2 slides (recipe 1's, of earlier demos, are in slides/)
    csv = make_slides(folder / "slides-2", args.jobs)
    t_slides = time.perf_counter() - t0
    print(f"slides ready in {t_slides:.0f} s: {csv}", flush=True)
    if args.profile_only:
        return write_profile(csv, args.out)

    run = folder / "run"
    run.mkdir(parents=True, exist_ok=True)
    overrides = json.loads(args.set)
    # merged, not replaced: a --set of one model option once dropped attention_stride 2
    options = {**CONFIG["model_options"], **overrides.pop("model_options", {})}
    config = TrainConfig(**{**CONFIG, **overrides, "model_options": options})
    best, seconds, result = _phase(csv, config, run / "demo.safetensors", t0, args.fresh)
    info = best.info["info"]
    info["data"].pop("fingerprint", None)
    info["data"]["labels_csv"] = "labels.csv (written by scripts/train_demo_model.py)"
    info["recipe"] = {
        "script": "scripts/train_demo_model.py",
        "command": "python scripts/train_demo_model.py",
        "seed": SEED,
        "train_slides": {"n": N_TRAIN, "seeds": [TRAIN_SEEDS, TRAIN_SEEDS + N_TRAIN - 1]},
        "val_slides": {"n": N_VAL, "seeds": [VAL_SEEDS, VAL_SEEDS + N_VAL - 1]},
        "train_sizes": list(TRAIN_SIZES),
        "val_sizes": list(VAL_SIZES),
        "regions_per_slide": "1 tumour + 1 distractor (positive), 2 distractors (negative)",
        "sample_recipe": SAMPLE_RECIPE,
        "seconds_training": round(seconds, 1),
        "seconds_training_to_best": info["seconds"],
        "seconds_this_call": round(time.perf_counter() - t0, 1),
        "seconds_slides": round(t_slides, 1),
        "threads": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, best.model, best.classes, info=info)
    size = args.out.stat().st_size
    print(
        f"best epoch {result.best_epoch}: validation accuracy {result.best_val_accuracy:.3f} "
        f"on {N_VAL} held-out slides; training {seconds:.0f} s (+ {t_slides:.0f} s of "
        f"slides); {args.out} ({size / 1e6:.2f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
