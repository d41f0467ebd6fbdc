"""Where trained Megapixel MNIST models look: on the digits, or on the scribbles?

    python -m benchmarks.megapixel_attention --out DIR [--models ats,zoomin_half_t75] [--images 100]
        [--first-image 0] [--topk-overlaps 1,0.25] [--topk-weights attention,draws]

Loads the weights that :mod:`benchmarks.megapixel_mnist` saved in ``--out`` (same
``--seed``) and, on ``--images`` test images from ``--first-image`` on, reports per
model:

- the stage-1 attention mass ``α`` on cells whose level-0 centre lies on one of the
  five digits (the rest lies on the 50 scribbles);
- the share of the patches (ATS) or sub-tiles (Zoom-In) of one sampled estimate
  whose centre lies within 8 px of a digit's 28×28 box, and how many of the five
  digits they reach;
- the accuracy of that estimate;
- with ``--topk-overlaps``, the same for the deterministic top-k prediction under
  each value of ``topk_max_overlap`` (1: the plain N largest attention values), and
  under each rule of ``--topk-weights`` (the models' ``topk_weights``); either
  option alone keeps the model's own setting of the other.

The benchmark's test error uses test images 0 to ``--test`` − 1 (1,000 by default).
Images from ``--first-image 1000`` on are built by the same seeded generator but
were never used to train, to choose a setting or to fill the table, so a choice
made on them (the top-k rule, say) is not fitted to the reported error.

A model that reaches fewer digits decides from fewer votes: three of the five
digits carry the label.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks import megapixel_mnist
from benchmarks.mnist_data import load_mnist


def _inside(points: np.ndarray, boxes: np.ndarray, margin: int = 0) -> np.ndarray:
    """(P, B) bool: point p lies in box b (``[top, left, h, w]``) grown by ``margin``."""
    top, left = boxes[None, :, 0] - margin, boxes[None, :, 1] - margin
    bottom, right = top + boxes[None, :, 2] + 2 * margin, left + boxes[None, :, 3] + 2 * margin
    r, c = points[:, None, 0], points[:, None, 1]
    return (r >= top) & (r < bottom) & (c >= left) & (c < right)


def attention_report(model, data, seed: int, mode: str = "sample") -> dict:
    """The measures of the module docstring for one model on ``data``.

    ``mode``: one sampled estimate per image, or the deterministic ``"topk"``.
    """
    generator = torch.Generator().manual_seed(seed + 5)
    mass, on_digits, reached, correct = [], [], [], 0
    model.eval()
    for image, label in zip(data.images, data.labels.tolist(), strict=True):
        if mode == "topk":
            (p,) = model.predict([image], mode="topk")
        else:
            (p,) = model.predict([image], mode="sample", draws=1, generator=generator)
        correct += int(p.label == label)
        alpha = p.attention.reshape(-1)
        centres = p.attention_grid.centres(torch.arange(alpha.numel())).reshape(-1, 2)
        digits = image.boxes()[:5]  # the first five objects are the digits
        on = torch.from_numpy(_inside(centres.numpy(), digits).any(1))
        mass.append(float(alpha[on].sum()))
        regions = p.subtiles.regions.numpy()
        hit = _inside(regions[:, :2] + regions[:, 2:] // 2, digits, margin=8)
        on_digits.append(float(hit.any(1).mean()))
        reached.append(int(hit.any(0).sum()))
    return {
        "alpha_on_digits": float(np.mean(mass)),
        "patches_on_digits": float(np.mean(on_digits)),
        "digits_reached": float(np.mean(reached)),
        "accuracy": correct / len(data),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.megapixel_attention")
    p.add_argument("--out", required=True, help="the --out folder of megapixel_mnist")
    p.add_argument("--models", type=lambda s: s.split(","), default=["ats", "zoomin_half_t75"])
    p.add_argument("--images", type=int, default=100, help="test images")
    p.add_argument(
        "--first-image",
        type=int,
        default=0,
        help="index of the first test image (1000: images the benchmark's table never saw)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=10)
    p.add_argument(
        "--topk-overlaps",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[],
        help="also report top-k under these topk_max_overlap values, e.g. 1,0.25",
    )
    p.add_argument(
        "--topk-weights",
        type=lambda s: s.split(","),
        default=None,
        help="top-k feature weights, e.g. attention,draws (default: the model config's)",
    )
    args = p.parse_args(argv)
    if args.first_image < 0 or args.images < 1:
        p.error("--first-image must be >= 0 and --images >= 1")
    torch.set_num_threads(1)
    build = argparse.Namespace(seed=args.seed, n=args.n, mask="ink")
    # Images are drawn one after another from one seeded generator (composed lazily,
    # so building the skipped ones costs only their digit positions).
    data = megapixel_mnist.BENCH.make_data(
        load_mnist(), "test", args.first_image + args.images, build
    ).select(slice(args.first_image, None))
    print(f"Test images {args.first_image}–{args.first_image + args.images - 1}, seed {args.seed}.")
    print(
        "| model | prediction | α on digits | patches on digits | digits reached (of 5) "
        "| accuracy |"
    )
    print("|---|---|---|---|---|---|")
    for key in args.models:
        spec = megapixel_mnist.BENCH.models[key]
        weights = Path(args.out) / f"{key}.pt"
        if not weights.is_file():
            print(
                f"{weights}: no trained weights; run benchmarks.megapixel_mnist first",
                file=sys.stderr,
            )
            return 1
        torch.manual_seed(args.seed)
        model = spec.build(build)
        model.load_state_dict(torch.load(weights, weights_only=True))
        topk = []
        if args.topk_overlaps or args.topk_weights:
            topk = [
                (f"top-k, max overlap {v:g}, {w} weights", "topk", v, w)
                for v in args.topk_overlaps or [model.config.topk_max_overlap]
                for w in args.topk_weights or [model.config.topk_weights]
            ]
        runs = [("sampled, K = 1", "sample", None, None), *topk]
        for how, mode, overlap, rule in runs:
            if mode == "topk":
                model.config.topk_max_overlap = overlap
                model.config.topk_weights = rule
            r = attention_report(model, data, args.seed, mode)
            print(
                f"| {spec.label.format(n=args.n)} | {how} | {r['alpha_on_digits']:.0%} | "
                f"{r['patches_on_digits']:.0%} | {r['digits_reached']:.2f} | "
                f"{r['accuracy']:.1%} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
