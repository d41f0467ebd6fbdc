"""One-stage attention sampling (ATS, 001) and its uniform-attention baseline (U-N).

``α = a(V(x, s))`` over the cells of a low-resolution view; ``N`` sub-tiles (the
ATS paper's patches) are drawn with or without replacement (capped at the number of
non-zero cells) and read at full resolution around their cell's centre; their
features are aggregated by :func:`~napari_zoomin.sampling.expected_features`,
unbiased in value and gradient for ``g(Σ_c α_c f(P(x, c)))`` (ATS eq. 19).
:class:`Uniform` replaces ``a`` by a constant: the U-N baseline of ATS §4.1.1 (same
networks, uniform attention).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..sampling import expected_features, sample
from ..sampling.sampler import sample_with_threshold
from .base import (
    AttentionSamplingModel,
    SamplingConfig,
    Stage1,
    side_problems,
    stack_rows,
    unique_pairs,
)
from .device import autocast
from .losses import attention_mse, classification_loss, entropy_regulariser
from .networks import UniformAttention, class_probabilities
from .outputs import LossTerms, Prediction, SubtileSet, TileSet
from .source import ImageSource, full_region, read_attention_target
from .topk import distinct_top_k, topk_weights

__all__ = ["ATS", "ATSConfig", "OneStagePass", "Uniform"]


@dataclass
class ATSConfig(SamplingConfig):
    """ATS settings (defaults: ATS's colon-cancer experiment, §4.3).

    Attributes:
        subtile_size: ``(h, w)`` level-0 size of a sub-tile (the feature network's input);
            must exceed ``1/view_scale`` for coverage.
        replace: draw with replacement (ATS eq. 12) or without (§3.2.3, the default).
    """

    view_scale: float = 0.2
    subtile_size: tuple[int, int] = (27, 27)
    replace: bool = False

    def problems(self) -> list[str]:
        problems = super().problems()
        if not problems and self.estimator == "priority" and self.replace:
            problems.append(
                "estimator 'priority' weighs distinct draws: set replace to false, or "
                "estimator to 'sequential'"
            )
        return problems or side_problems(self, "subtile_size")


@dataclass(eq=False)
class OneStagePass:
    """One one-stage sampling pass over R rows (image, draw).

    Attributes:
        rows: (R,) image of each row.
        attention: (R, K) the sampled distribution (differentiable).
        indices: (R, N) draws (sequential order without replacement; 0 where invalid).
        valid: (R, N) bool: fewer than N non-zero cells cap a row without replacement.
        subtile_ids: (R, N) index into the sub-tile table.
        table_images, table_cells, table_regions: (S,), (S,), (S, 4) distinct sub-tiles.
        features: (R, N, D) features of the draws.
        table_features: (S, D) ``f`` of every distinct sub-tile.
        z: (R, D) aggregated features.
    """

    rows: Tensor
    attention: Tensor
    indices: Tensor
    valid: Tensor
    subtile_ids: Tensor
    table_images: Tensor
    table_cells: Tensor
    table_regions: Tensor
    features: Tensor
    z: Tensor
    table_features: Tensor | None = None


class ATS(AttentionSamplingModel):
    """Attention sampling with one stage: ``a``, ``f``, ``g`` (001)."""

    config: ATSConfig

    def __init__(self, config: ATSConfig | None = None, **networks: nn.Module):
        """Default networks from ``config``; ``attention``, ``feature`` and ``classifier``
        may be given instead (see :class:`AttentionSamplingModel`)."""
        super().__init__(config or ATSConfig(), **networks)

    @property
    def subtile_size(self) -> tuple[int, int]:
        return tuple(self.config.subtile_size)  # type: ignore[return-value]

    @property
    def replace(self) -> bool:
        return bool(self.config.replace)

    # -- sampling --------------------------------------------------------------------

    def _draw(
        self, p: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(R, N) draws and validity, and without replacement each row's threshold ``κ``
        (R,) (:func:`~napari_zoomin.sampling.sampler.sample_with_threshold`); each row
        is capped at its nnz."""
        n = self.config.n_samples
        r = p.shape[0]
        if self.replace:
            idx = sample(p.detach(), n, replace=True, generator=generator)
            return idx, torch.ones_like(idx, dtype=torch.bool), None
        idx = torch.zeros((r, n), dtype=torch.long, device=p.device)
        valid = torch.zeros((r, n), dtype=torch.bool, device=p.device)
        kappa = torch.empty(r, dtype=torch.float64, device=p.device)
        a = p.detach()
        # a row at a time: the Gumbel noise of R rows of a gigapixel slide's map at once
        # took 22 GB (K = 16 draws of 39 million cells in float64)
        for row in range(r):
            cap = min(int((a[row] > 0).sum()), n)
            drawn, threshold = sample_with_threshold(a[row : row + 1], cap, generator)
            idx[row, :cap], kappa[row] = drawn[0], threshold[0]
            valid[row, :cap] = True
        return idx, valid, kappa

    def aggregate(
        self,
        p: Tensor,
        idx: Tensor,
        valid: Tensor,
        features: Tensor,
        threshold: Tensor | None = None,
    ) -> Tensor:
        """Unbiased estimate of ``Σ α f`` per row (rows grouped by their number of draws);
        ``threshold`` (R,) gives the draws priority weights (``estimator="priority"``)."""
        counts = valid.sum(dim=1).tolist()
        groups: dict[int, list[int]] = defaultdict(list)
        for row, n in enumerate(counts):
            groups[int(n)].append(row)
        parts, order = [], []
        for n, rows in groups.items():
            sel = torch.as_tensor(rows, device=p.device)
            kappa = None if threshold is None else threshold[sel]
            parts.append(
                expected_features(p[sel], idx[sel, :n], features[sel, :n], self.replace, kappa)
            )
            order.extend(rows)
        z = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long, device=z.device)
        inverse[torch.as_tensor(order, device=z.device)] = torch.arange(len(order), device=z.device)
        return z[inverse]

    def one_stage(
        self,
        sources: Sequence[ImageSource],
        stage1: Sequence[Stage1],
        rows: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> OneStagePass:
        """Draw sub-tiles for every row, read each distinct one once, aggregate."""
        rows_t = torch.as_tensor(list(rows), dtype=torch.int64)
        p = stack_rows([s.attention for s in stage1], rows_t.tolist())  # (R, K)
        idx, valid, kappa = self._draw(p, generator)
        images = rows_t[:, None].expand(idx.shape)
        t_images, t_cells, ids = unique_pairs(images, idx, valid)
        regions = torch.empty(int(t_images.shape[0]), 4, dtype=torch.int64)
        for b in torch.unique(t_images).tolist():
            sel = t_images == b
            regions[sel] = stage1[b].grid.regions(t_cells[sel], self.subtile_size)
        feats = self.featurise(sources, t_images, regions)  # (S, D)
        feat_rows = feats[ids.to(feats.device)]  # (R, N, D)
        z = self.aggregate(
            p, idx, valid, feat_rows, kappa if self.config.estimator == "priority" else None
        )
        return OneStagePass(
            rows_t, p, idx, valid, ids, t_images, t_cells, regions, feat_rows, z, feats
        )

    def sampled_logits(self, sources, generator=None) -> Tensor:
        stage1 = self.stage1(sources)
        return self.classifier(self.one_stage(sources, stage1, range(len(sources)), generator).z)

    # -- training --------------------------------------------------------------------

    def _attention_terms(self, sources, stage1: Sequence[Stage1]) -> tuple[Tensor, Tensor]:
        """Entropy regulariser (ATS eq. 21) and pixel MSE (000 eq. 11) on α, averaged."""
        c = self.config
        zero = torch.zeros((), device=self.device)
        ent, pix = zero, zero
        for src, st in zip(sources, stage1, strict=True):
            if c.entropy_weight:
                ent = ent + entropy_regulariser(st.attention, c.entropy_weight)
            if c.pixel_weight:
                roi = read_attention_target(src, full_region(src), c.view_scale)
                if roi is not None:
                    target = st.grid.cell_values(roi[0].cpu(), mean=True).reshape(1, -1)
                    mask = None if st.mask is None else st.mask[None]
                    pix = pix + attention_mse(st.attention[None], target, mask)
        b = len(sources)
        return ent / b, pix / b

    def loss(
        self,
        sources: Sequence[ImageSource],
        labels: Tensor | Sequence[int],
        epoch: int = 0,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """Cross-entropy + entropy regulariser on α (+ pixel MSE for annotated sources)."""
        c = self.config
        labels = torch.as_tensor(labels, dtype=torch.long)
        zero = torch.zeros((), device=self.device)
        with autocast(self.device):
            stage1 = self.stage1(sources)
            run = self.one_stage(sources, stage1, range(len(sources)), generator)
            logits = self.classifier(run.z)
        ce = classification_loss(logits, labels)
        ent, pix = self._attention_terms(sources, stage1)
        total = ce + ent + c.pixel_weight * pix
        return LossTerms(total, ce, zero, ent, pix, zero, logits.detach(), labels)

    # -- inference -------------------------------------------------------------------

    def _predict_sampled(self, sources, stage1, draws, generator) -> list[Prediction]:
        """K estimates per image; sub-tiles = union over the draws, counts summed."""
        rows = [b for b in range(len(sources)) for _ in range(draws)]
        run = self.one_stage(sources, stage1, rows, generator)
        probs = class_probabilities(self.classifier(run.z)).cpu()
        out = []
        for b, st in enumerate(stage1):
            per_draw = probs[run.rows == b]
            subtiles = torch.nonzero(run.table_images == b)[:, 0]
            counts = torch.zeros(int(run.table_images.shape[0]), dtype=torch.int64)
            valid = run.valid.cpu()
            counts.index_add_(0, run.subtile_ids[valid], torch.ones_like(run.subtile_ids[valid]))
            out.append(
                self._prediction(
                    st,
                    per_draw,
                    "sample",
                    run.table_cells[subtiles],
                    run.table_regions[subtiles],
                    counts[subtiles],
                    self.subtile_scores(run.table_features[subtiles.to(run.table_features.device)]),
                )
            )
        return out

    def _prediction(
        self, st: Stage1, per_draw, mode, cells, regions, counts, scores=None
    ) -> Prediction:
        alpha = st.attention.detach().float().cpu()
        a = alpha[cells]
        n = int(cells.shape[0])
        return Prediction(
            probabilities=per_draw.mean(0),
            spread=per_draw.std(0, correction=0),
            draw_probabilities=per_draw,
            mode=mode,
            attention=alpha.reshape(st.grid.map_shape),
            attention_grid=st.grid,
            tiles=TileSet(cells=cells, regions=regions, counts=counts, attention=a),
            subtiles=SubtileSet(
                tile=torch.arange(n), cells=cells, regions=regions, weights=a, scores=scores
            ),
        )

    def _topk_weights(self, ranked_attention: Tensor) -> Tensor:
        """Weights of the top-k regions' features, best first (:func:`~.topk.topk_weights`)."""
        return topk_weights(ranked_attention, self.replace, self.config.topk_weights)

    def _predict_topk(self, sources, stage1: Sequence[Stage1], b: int) -> Prediction:
        """The ``N`` most attended sub-tiles that do not overlap a better one by more than
        ``config.topk_max_overlap`` of their area (:func:`~.topk.distinct_top_k`), their
        features weighed by ``config.topk_weights`` (renormalised attention by default)."""
        st = stage1[b]
        alpha = st.attention.detach().float()
        cells = distinct_top_k(
            alpha,
            self.config.n_samples,
            lambda c: st.grid.region_centres(c, self.subtile_size),  # regions read (edge rule)
            self.subtile_size,
            self.config.topk_max_overlap,
        )
        k = int(cells.shape[0])
        w = self._topk_weights(alpha[cells.to(alpha.device)])
        regions = st.grid.regions(cells, self.subtile_size)
        feats = self.featurise(sources, torch.full((k,), b, dtype=torch.int64), regions)
        z = (w[:, None].to(feats.dtype) * feats).sum(0, keepdim=True)
        probs = class_probabilities(self.classifier(z)).cpu()
        ones = torch.ones(k, dtype=torch.int64)
        scores = self.subtile_scores(feats)
        return self._prediction(st, probs, "topk", cells, regions, ones, scores)


class Uniform(ATS):
    """The U-N baseline (ATS §4.1.1): ATS with a fixed uniform attention over (tissue) cells."""

    def make_attention_network(self, stride: int = 1) -> nn.Module:
        return UniformAttention()  # one cell per view pixel whatever the stride
