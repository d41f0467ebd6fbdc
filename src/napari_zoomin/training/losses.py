"""A loss term the trainer adds to the models' own (:attr:`TrainConfig.roi_attention_weight`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import AttentionSamplingModel
from ..models.source import full_region, read_attention_target

__all__ = ["roi_attention_loss"]


def roi_attention_loss(
    model: AttentionSamplingModel, sources: Sequence, stage1: Sequence | None = None
) -> torch.Tensor:
    """``KL(M̃ ‖ α)`` averaged over ``sources`` (see ``TrainConfig.roi_attention_weight``).

    ``M̃`` is the source's ROI fraction at the stage-1 view, sampled at the cells and
    restricted to tissue cells, normalised to sum to 1.  Sources without an ROI mask,
    or whose mask has no ROI pixel on tissue (annotated negatives), contribute 0: at
    the stage-1 scale a look-alike of the ROI may be indistinguishable from it, and
    attending to it on a negative slide is what lets ``f`` tell them apart.
    ``stage1``: the sources' stage-1 attention when already computed (one view read).
    """
    total = torch.zeros((), device=model.device)
    if stage1 is None:
        stage1 = model.stage1(sources)
    for src, st in zip(sources, stage1, strict=True):
        roi = read_attention_target(src, full_region(src), model.config.view_scale)
        if roi is None:
            continue
        cells = st.grid.cell_values(roi[0].float().cpu(), mean=True).reshape(-1).clamp(min=0)
        if st.mask is not None:
            cells = cells * st.mask.cpu().to(cells.dtype)
        mass = float(cells.sum())
        if mass <= 0:
            continue
        sel = torch.nonzero(cells > 0)[:, 0]
        target = (cells[sel] / mass).to(model.device)
        alpha = st.attention.float()[sel.to(model.device)].clamp(min=1e-30)
        total = total + (target * (torch.log(target) - torch.log(alpha))).sum()
    return total / max(len(sources), 1)
