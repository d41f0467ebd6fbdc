"""Attention sampling: draw cells from attention maps and estimate the attended features.

A torch-only area (no napari, Qt or slide imports).  The contract other code and
external checks rely on is exactly these three functions:

- :func:`sample` — draws with replacement, or distinct draws in sequential order by
  Gumbel-top-k on log-probabilities;
- :func:`expected_features` — one-stage estimator (ATS), unbiased in value and
  gradient for both modes;
- :func:`two_stage_expected_features` — Zoom-In's two-stage estimator (tiles with
  replacement as counts, sub-tiles without replacement per tile), unbiased in value
  and in the gradients of both attention levels and the features.

Helpers (counts, per-tile sub-tile draws, estimator weights) live in
:mod:`.sampler` and :mod:`.estimators`.
"""

from __future__ import annotations

from .estimators import expected_features, two_stage_expected_features
from .sampler import sample

__all__ = ["expected_features", "sample", "two_stage_expected_features"]
