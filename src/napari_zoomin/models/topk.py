"""Deterministic top-k of distinct regions, for top-k inference.

Tiles and sub-tiles are centred on attention cells spaced much closer than their size
(a 100² tile every 8 level-0 pixels on Megapixel MNIST, a 50² tile every 5 pixels in
000's colon set-up), so the N largest attention values are usually neighbours: N
near-copies of one region, which waste the read budget and show the user one spot N
times.  :func:`distinct_top_k` takes cells greedily by score instead and skips a
cell whose region overlaps an already chosen one by more than ``max_overlap`` of its
area (non-maximum suppression, as object detectors do); ``max_overlap = 1`` is the
plain top-k.  Sampling is untouched: its unbiased estimate needs no such rule.

:func:`topk_weights` then weighs the regions' features.  For a model trained on
draws without replacement, renormalising their attention gives ``g`` an aggregate
it never saw in training when attention is peaked: one region carries most of the
vote, where the estimator gives N distinct draws about ``1/N`` each (measured on
Megapixel MNIST, where three of five digits decide the label, in
``docs/benchmarks.md``); the estimator's own weights for a draw sequence that took
the regions in rank order keep it in distribution.  For ATS the renormalised
attention did better on the same images, so each model's config sets its default.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..sampling.estimators import without_replacement_weights

__all__ = ["distinct_top_k", "topk_weights"]


def topk_weights(ranked_attention: Tensor, replace: bool, rule: str = "draws") -> Tensor:
    """Weights (summing to 1) for the features of top-k regions, ranked best first.

    Args:
        ranked_attention: (k,) the attention (probability) of each chosen region, in
            rank order.
        replace: whether the model's training draws were made with replacement.
        rule: ``"draws"``: an aggregate like the training estimator's.  Without
            replacement, the weights it gives a draw sequence that took these regions
            in this order (ATS eqs. 14–17: about ``1/k`` each while their attention
            is small, rank order breaking ties); with replacement, the share of the
            draws each region gets on average, its attention renormalised (a draw
            sequence cannot repeat a region here).  ``"attention"``: the attention
            renormalised, whatever the draws.
    """
    a = ranked_attention.detach()
    if rule not in ("draws", "attention"):
        raise ValueError(f"rule must be 'draws' or 'attention', got {rule!r}")
    if replace or rule == "attention":
        return a / a.sum()
    return without_replacement_weights(a[None])[0]


def distinct_top_k(
    scores: Tensor,
    k: int,
    centres: Callable[[Tensor], Tensor],
    size: tuple[int, int],
    max_overlap: float,
) -> Tensor:
    """Indices of up to ``k`` positive scores, best first, whose regions do not pile up.

    Args:
        scores: (M,) non-negative scores (``α``, or ``α_c β^c_c'`` over sub-cells).
        k: how many to choose; fewer come back when the positive cells run out of
            regions that fit the rule.
        centres: maps indices (m,) to their regions' level-0 centres (m, 2).
        size: ``(h, w)`` of every region.
        max_overlap: largest allowed intersection with a chosen region, as a fraction
            of a region's area, in [0, 1]; 1 keeps the plain top-k.
    Returns:
        int64 indices into ``scores`` on the CPU, in decreasing score.
    """
    if not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"max_overlap must be in [0, 1], got {max_overlap}")
    scores = scores.detach().reshape(-1)
    positive = int((scores > 0).sum())
    k = min(int(k), positive)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    if max_overlap >= 1.0:
        return torch.topk(scores, k).indices.cpu()
    h, w = int(size[0]), int(size[1])
    limit = max_overlap * h * w
    # A chosen region suppresses only its neighbours: the first few thousand
    # candidates nearly always suffice, and gigapixel maps are never sorted whole.
    m = min(positive, max(64 * k, 4096))
    while True:
        candidates = torch.topk(scores, m).indices.cpu()
        xy = centres(candidates).reshape(-1, 2).cpu().numpy()
        picks = _greedy(xy, k, h, w, limit)
        if len(picks) == k or m == positive:
            return candidates[torch.as_tensor(picks, dtype=torch.int64)]
        m = min(positive, 8 * m)


def _greedy(xy: np.ndarray, k: int, h: int, w: int, limit: float) -> list[int]:
    kept = np.empty((k, 2), dtype=np.int64)
    picks: list[int] = []
    for i in range(len(xy)):
        n = len(picks)
        if n:
            d = np.abs(kept[:n] - xy[i])
            inter = np.clip(h - d[:, 0], 0, None) * np.clip(w - d[:, 1], 0, None)
            if inter.max() > limit:
                continue
        kept[n] = xy[i]
        picks.append(i)
        if n + 1 == k:
            break
    return picks
