"""Draw a training run's learning curves from its history CSV (issue 18: the demo's figure).

    .venv/bin/python -m benchmarks.plot_history RUN.history.csv --out curve.png

Every ``zoomin train`` / :func:`napari_zoomin.training.train` run writes
``<checkpoint stem>.history.csv`` beside its checkpoint, one row per epoch.  This
draws, against the epoch: the training and validation loss (left), the training and
validation accuracy (middle), and, where ROIs are known, the share of stage-1 and
stage-2 attention on them (right).  matplotlib is in the ``bench`` extra only.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path


def read_history(path: Path) -> dict[str, list[float]]:
    """The history's columns as floats (an empty cell, a term not measured, is NaN)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no epoch rows")
    return {
        key: [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]
        for key in rows[0]
    }


def plot(history: dict[str, list[float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        (("train_classification", "training (classification term)"), ("val_loss", "validation")),
        (("train_accuracy", "training (one sampled draw)"), ("val_accuracy", "validation")),
        (
            ("val_roi_attention_stage1", "stage 1 (validation)"),
            ("val_roi_attention_stage2", "stage 2 (validation)"),
        ),
    )
    labels = ("cross-entropy", "accuracy", "attention share on ROIs")
    for ax, series, ylabel in zip(axes, panels, labels, strict=True):
        for key, name in series:
            values = history.get(key)
            if values and not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker=".", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_ylim(0, 1.05)
    axes[2].set_ylim(0, 1.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history", type=Path, help="a <checkpoint stem>.history.csv")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    history = read_history(args.history)
    plot(history, args.out, args.title or args.history.name)
    print(f"{len(history['epoch'])} epochs drawn: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
