"""What a training run records per epoch beyond its losses, and the file it keeps it in.

* :func:`roi_attention_shares`: where ROIs are known, the share of a prediction's
  stage-1 and stage-2 attention that lies on them: whether the model is learning to
  look at the right place, which the loss and accuracy alone do not say.
* :class:`RoiAttention`: those shares summed over an epoch's slides.
* :func:`history_csv_path`, :func:`history_columns`, :func:`write_history_csv`: the
  history as a plain CSV beside the checkpoint, rewritten atomically every epoch.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from ..models.outputs import Prediction
from ..models.source import full_region, read_roi, tissue_mask

__all__ = [
    "RoiAttention",
    "history_columns",
    "history_csv_path",
    "roi_attention_shares",
    "write_history_csv",
]


def roi_attention_shares(
    model, source, prediction: Prediction
) -> tuple[float | None, float | None]:
    """The shares of ``prediction``'s stage-1 and stage-2 attention on the ROI of ``source``.

    Stage 1: ``Σ_c α_c m_c`` with ``m_c`` the ROI fraction of the stage-1 view over
    cell ``c`` (the target of the pixel and ROI-attention losses), over ``Σ α = 1``; a
    uniform ``α`` on tissue gives the ROI's share of the tissue cells.
    Stage 2 (Zoom-In): in every drawn tile, ``Σ_c' β^c_c' m_c'`` with ``m_c'`` the ROI
    fraction of the tile's stage-2 view at sub-cell ``c'``, averaged over the drawn
    tiles weighed by how often each was drawn: the expected ROI fraction of a sub-tile
    the two-stage sampler draws.  ``None`` for one-stage models (ATS, REINFORCE-ATS:
    ``α`` is their only attention) and for both stages of a MagNet (no attention
    distribution: its boxes are regressed, not drawn).

    Both are ``None`` when the source has no ROI mask or its mask has no ROI on
    tissue (an annotated negative slide: nothing to attend to).  Reads only the
    rasterised annotations and the cached tissue mask, never the pyramid.
    """
    if prediction.mode == "magnify":
        return None, None
    scale = float(model.config.view_scale)
    roi = read_roi(source, full_region(source), scale)
    if roi is None:
        return None, None
    grid = prediction.attention_grid
    # the stage-1 ROI target of the pixel and ROI-attention losses: the ROI's mean over
    # each cell's view pixels
    cells = grid.cell_values(roi[0].float().cpu(), mean=True).reshape(-1).double()
    cells = cells.clamp(0.0, 1.0)
    tissue = tissue_mask(source, scale)
    if tissue is not None:
        cells = cells * grid.cell_values(tissue.to(torch.bool).cpu()).reshape(-1)
    if float(cells.sum()) <= 0:
        return None, None
    alpha = prediction.attention.reshape(-1).double()
    stage1 = float((alpha * cells).sum() / alpha.sum().clamp(min=1e-300))
    return _unit(stage1), _stage2_share(model, source, prediction)


def _stage2_share(model, source, prediction: Prediction) -> float | None:
    tiles = prediction.tiles
    stage2_scale = getattr(model.config, "stage2_scale", None)
    if tiles.stage2_attention is None or tiles.stage2_grid is None or stage2_scale is None:
        return None
    n = int(tiles.cells.shape[0])
    counts = tiles.counts.double()
    if n == 0 or float(counts.sum()) <= 0:
        return None
    roi = read_roi(source, tiles.regions, float(stage2_scale))
    if roi is None:
        return None
    cells = tiles.stage2_grid.cell_values(roi.double().cpu()).reshape(n, -1).clamp(0.0, 1.0)
    beta = tiles.stage2_attention.reshape(n, -1).double()
    per_tile = (beta * cells).sum(1) / beta.sum(1).clamp(min=1e-300)
    return _unit(float((per_tile * counts).sum() / counts.sum()))


def _unit(value: float) -> float:
    """``value`` in [0, 1] (rounding can carry a sum of ``α m`` a hair past 1)."""
    return min(max(value, 0.0), 1.0)


class RoiAttention:
    """The means of :func:`roi_attention_shares` over the slides of one epoch that have
    an ROI (slides without one are not counted)."""

    def __init__(self) -> None:
        self.sums = [0.0, 0.0]
        self.counts = [0, 0]

    def add(self, model, source, prediction: Prediction) -> None:
        for k, share in enumerate(roi_attention_shares(model, source, prediction)):
            if share is not None:
                self.sums[k] += share
                self.counts[k] += 1

    def means(self) -> tuple[float | None, float | None]:
        """(stage 1, stage 2), each ``None`` when no slide gave one."""
        return tuple(s / n if n else None for s, n in zip(self.sums, self.counts, strict=True))


# -- the history file ------------------------------------------------------------------


def history_csv_path(out_path: str | Path) -> Path:
    """``<checkpoint stem>.history.csv`` beside the model checkpoint ``out_path``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.history.csv")


def history_columns(terms: Sequence[str], roi_on: str) -> list[str]:
    """The CSV's columns, fixed when a run starts: the epoch, losses and accuracies, each
    loss term (``train_<term>``), the training slides per minute of the epoch's wall
    time, the ROI attention shares (``<roi_on>_roi_attention_stage1``
    and ``_stage2``; ``roi_on`` is ``"val"`` or ``"train"``), the learning rate and the
    seconds so far."""
    return [
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        *(f"train_{t}" for t in terms),
        "slides_per_minute",
        f"{roi_on}_roi_attention_stage1",
        f"{roi_on}_roi_attention_stage2",
        "lr",
        "seconds",
    ]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def write_history_csv(path: str | Path, columns: Sequence[str], history: Sequence[dict]) -> Path:
    """Write ``history`` (one dict per epoch) as a CSV of ``columns``, atomically: empty
    cells for ``None`` or a column an epoch lacks (an epoch from an older version)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for record in history:
        writer.writerow([_cell(record.get(c)) for c in columns])
    return write_text_atomic(path, text.getvalue(), newline="")
