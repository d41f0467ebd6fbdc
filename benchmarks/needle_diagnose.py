"""Where Needle MNIST's Zoom-In loses the 3: stage 1, stage 2, the sub-tile scores, the mean.

    python -m benchmarks.needle_diagnose --model zoomin_roi [--weights W.pt] [--images 60]

For a model of :mod:`benchmarks.needle_mnist` (freshly pre-trained, or trained weights
from the runner's ``--out``), on the first ``--images`` test images (half hold a 3):

1. the stage-1 attention mass on the 3 (cells whose view holds its ink) in positives,
   and how often at least one of one estimate's sub-tiles *covers the 3* (holds at
   least half of its ink);
2. the AUC of each sub-tile's own classifier logit ``g(f(x))`` for "covers the 3"
   against the other sub-tiles (of positives and negatives);
3. the image logits of one sampled estimate: their AUC and the error at 0;
4. with ``--draws 1,16``: the test error when each image's probability is the mean of
   K sampled estimates (what ``classify`` reports, K = 16 by default), batched and
   seeded as the runner's own evaluation, so K = 1 gives its "sampled" column;
5. with ``--occlusion``: the positives missed by ``classify``'s estimate (16 draws),
   binned by how much of the 3's ink other digits draw over (:func:`covered_ink`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import mnist_runner, needle_mnist
from benchmarks.mnist_data import DIGIT, CompositeImage, load_mnist
from benchmarks.mnist_data import needle_mnist as make_needle
from napari_zoomin.models.distributions import attention_distribution


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties count half (Mann–Whitney)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def _cells_on(view_roi: torch.Tensor, grid) -> torch.Tensor:
    """(K,) bool: the stage-1 cells whose own view pixels hold ROI ink (any of them)."""
    sy, sx = (int(v) for v in grid.stride)
    h, w = grid.map_shape
    pooled = F.max_pool2d(view_roi[None, None, : h * sy, : w * sx], (sy, sx))
    return pooled.reshape(-1) > 0


@torch.no_grad()
def diagnose(model, data, seed: int = 0, cover: float = 0.5, temperatures=(2, 4, 8)) -> dict:
    """The three links above, measured on ``data`` (a Needle ``Haystack``)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    mass, covered, coverers, ahead = [], [], [], []
    tempered = {t: [] for t in temperatures}
    sub_pos, sub_neg, logit_pos, logit_neg = [], [], [], []
    c = model.config
    for i, src in enumerate(data.images):
        positive = bool(data.labels[i])
        st = model.stage1([src])
        run = model.two_stage([src], st, [0], False, generator)
        logit = float(model.classifier(run.z)[0, 0])
        (logit_pos if positive else logit_neg).append(logit)
        scores = model.classifier(run.sub_features)[:, 0]
        if not positive:
            sub_neg.append(scores)
            continue
        roi = src.read_roi(torch.tensor([[0, 0, *src.shape]]), c.view_scale)
        cells = _cells_on(roi[0], st[0].grid)
        mass.append(float(st[0].attention[cells].sum()))
        logits = st[0].logits.reshape(-1).float()
        live = st[0].mask if st[0].mask is not None else torch.ones_like(cells)
        best = logits[cells].max()
        ahead.append(int((logits[live & ~cells] > best).sum()))
        for t in temperatures:
            a = attention_distribution((t * logits)[None], live[None], 0.0)[0]
            tempered[t].append(float(a[cells].sum()))
        ink = float(src.read_roi(torch.tensor([[0, 0, *src.shape]]), 1.0).sum())
        inside = src.read_roi(run.sub_regions, 1.0).sum(dim=(-2, -1)) / ink
        hit = inside >= cover
        covered.append(bool(hit.any()))
        coverers.append(int(hit.sum()))
        sub_pos.append(scores[hit])
        sub_neg.append(scores[~hit])
    sp, sn = torch.cat(sub_pos), torch.cat(sub_neg)
    lp, ln = torch.tensor(logit_pos), torch.tensor(logit_neg)
    m = torch.tensor(mass)
    return {
        "images": len(data),
        "stage1_mass_on_3_median": float(m.median()),
        "stage1_mass_on_3_mean": float(m.mean()),
        "stage1_mass_on_3_q10": float(m.quantile(0.1)),
        "cells_off_3_above_its_best_median": float(torch.tensor(ahead).float().median()),
        "cells_off_3_above_its_best_q90": float(torch.tensor(ahead).float().quantile(0.9)),
        **{
            f"stage1_mass_on_3_median_T{t}": float(torch.tensor(v).median())
            for t, v in tempered.items()
        },
        "estimates_with_a_subtile_covering_3": sum(covered) / len(covered),
        "covering_subtiles_per_positive_estimate": sum(coverers) / len(coverers),
        "subtiles_per_estimate": int(run.sub_features.shape[0]),
        "subtile_auc": auc(sp, sn),
        "subtile_logit_covering_mean": float(sp.mean()) if len(sp) else float("nan"),
        "subtile_logit_other_mean": float(sn.mean()),
        "subtile_logit_other_q99": float(sn.quantile(0.99)),
        "image_auc": auc(lp, ln),
        "image_error_at_0": float(((lp <= 0).sum() + (ln > 0).sum()) / (len(lp) + len(ln))),
        "image_logit_pos_mean": float(lp.mean()),
        "image_logit_neg_mean": float(ln.mean()),
    }


INK = 76  # a pixel is ink from 0.3 of full intensity on (0–255 units)
COVER_BINS = (0.0, 1e-9, 0.1, 0.25, 0.5, 1.01)  # shares of the 3's ink drawn over


def covered_ink(src) -> float:
    """The share of the 3's ink pixels on which other digits also have ink.

    Needle images sum overlapping digits (Needles-in-Haystacks), so another digit
    drawn over the 3 changes its shape; the 3 is the image's first digit."""
    others = CompositeImage(src.shape, src.bank, src.tops[1:], src.lefts[1:], src.ids[1:], "add")
    ink = others.compose(int(src.tops[0]), int(src.lefts[0]), DIGIT, DIGIT)  # k / 255
    drawn = ink > (INK + 0.5) / 255  # k > INK, clear of float32 rounding
    three = src.bank[src.ids[0]] > INK
    return float((three & drawn).sum() / max(int(three.sum()), 1))


@torch.no_grad()
def occlusion(model, data, seed: int = 0, draws: int = 16) -> dict:
    """``classify``'s estimate (the mean of ``draws``) on every image, in order: the
    false positives, and the positives binned by :func:`covered_ink` (how many, how
    many missed, the median stage-1 mass on the 3)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    covered, missed, mass, false_positives = [], [], [], 0
    for i, src in enumerate(data.images):
        (prediction,) = model.predict([src], draws=draws, generator=generator)
        called = float(prediction.probabilities[1]) > 0.5
        if not bool(data.labels[i]):
            false_positives += int(called)
            continue
        missed.append(not called)
        covered.append(covered_ink(src))
        roi = src.read_roi(torch.tensor([[0, 0, *src.shape]]), model.config.view_scale)
        on_3 = _cells_on(roi[0], prediction.attention_grid)
        mass.append(float(prediction.attention.reshape(-1)[on_3].sum()))
    covered, missed, mass = np.array(covered), np.array(missed), np.array(mass)
    bins = []
    for lo, hi in itertools.pairwise(COVER_BINS):
        inside = (covered >= lo) & (covered < hi)
        median = float(np.median(mass[inside])) if inside.any() else None
        bins.append(
            {
                "covered": [lo, min(hi, 1.0)],
                "positives": int(inside.sum()),
                "missed": int(missed[inside].sum()),
                "median_mass_on_3": median,
            }
        )
    negatives = len(data.images) - len(covered)
    return {"false_positives": false_positives, "negatives": negatives, "positives": bins}


def error_with_draws(model, data, draws: int, seed: int = 0, batch_size: int = 16) -> float:
    """Test error with each image's probability the mean of ``draws`` sampled estimates,
    batched and seeded as :func:`benchmarks.mnist_runner.evaluate`'s K = 1 column (K = 1:
    its number)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    return mnist_runner.error_with_draws(model, data, draws, generator, batch_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.needle_diagnose")
    p.add_argument("--model", default="zoomin_roi", choices=list(needle_mnist.BENCH.models))
    p.add_argument("--weights", help="trained weights (.pt) instead of pre-training here")
    p.add_argument("--save", help="save the pre-trained weights here")
    p.add_argument("--images", type=int, default=60, help="test images (half positive)")
    p.add_argument("--train", type=int, default=1600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--draws", default="", help="e.g. 1,16: test errors with K estimates averaged")
    p.add_argument("--occlusion", action="store_true", help="misses by the 3's ink drawn over")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = needle_mnist.BENCH.models[args.model]
    bench_args = argparse.Namespace(**needle_mnist.BENCH.defaults, seed=args.seed, mask="ink")
    mnist = load_mnist()
    torch.manual_seed(args.seed)
    model = spec.build(bench_args)
    start = time.perf_counter()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    elif spec.pretrain is not None:
        train = make_needle(mnist, "train", args.train, args.seed, ink_mask=True)
        history = spec.pretrain(model, train, bench_args)
        print(json.dumps({k: v[-3:] for k, v in history.items()}), file=sys.stderr)
        if args.save:
            torch.save(model.state_dict(), args.save)
    prepared = time.perf_counter() - start
    test = make_needle(mnist, "test", args.images, args.seed, ink_mask=True)
    result = diagnose(model, test, args.seed)
    for k in [int(v) for v in args.draws.split(",") if v.strip()]:
        result[f"test_error_draws_{k}"] = error_with_draws(model, test, k, args.seed)
    if args.occlusion:
        result["occlusion"] = occlusion(model, test, args.seed)
    result["prepare_seconds"] = round(prepared, 1)
    result["diagnose_seconds"] = round(time.perf_counter() - start - prepared, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
