"""The Zoom-In network (000): two-stage hierarchical attention sampling.

Stage 1: ``α = a(V(x, s1))`` over the cells of a low-resolution view; ``N`` tiles are
drawn *with replacement* and kept as counts ``m_c`` (000 §2.2), each distinct tile is
read once.  Stage 2: for a drawn tile, ``β^c = b(V(T(x, c), s2))`` over the cells of
the tile's view (``s2`` relative to the full-resolution tile); ``min(m_c, nnz β^c)``
sub-tiles are drawn *without replacement* and read at full resolution.  Features of
the sub-tiles are aggregated by :func:`~napari_zoomin.sampling.two_stage_expected_features`,
whose value and gradients (for ``a``, ``b``, ``f``) are unbiased for the full model
``g(Σ_c α_c Σ_c' β^c_c' f(c, c'))`` (eq. 5).

Sub-tiles are read directly from the image around their level-0 centre, so a
sub-tile at a tile's edge shows the real neighbouring pixels instead of the
tile's zero padding in 000's ``T_{s2}(T_{s1}(x, c), c')``; only the image's outside
reads as zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..sampling import sample, two_stage_expected_features
from ..sampling.sampler import draws_to_counts, sample_subtiles, sample_with_threshold
from .base import (
    MAX_WEIGHT,
    AttentionSamplingModel,
    SamplingConfig,
    Stage1,
    scale_problems,
    side_problems,
    unique_pairs,
)
from .coordinates import CellGrid
from .device import autocast
from .distributions import attention_distribution, complement_distribution
from .losses import (
    attention_mse,
    classification_loss,
    contrastive_loss,
    entropy_regulariser,
)
from .networks import class_probabilities
from .outputs import LossTerms, Prediction, SubtileSet, TileSet
from .source import ImageSource, full_region, read_attention_target
from .topk import distinct_top_k, topk_weights

__all__ = ["TwoStagePass", "ZoomIn", "ZoomInConfig", "topk_tiles"]


@dataclass
class ZoomInConfig(SamplingConfig):
    """Zoom-In settings (defaults: 000's colon-cancer experiment, A.5).

    Attributes:
        stage2_scale: ``s2``, scale of a tile's view relative to the full-resolution tile.
        tile_size: ``(h1, w1)`` level-0 size of a tile; must exceed ``1/s1`` for coverage.
        subtile_size: ``(h2, w2)`` level-0 size of a sub-tile (the feature network's input).
        contrastive: use the in-sample contrastive loss (000 §2.3).
        contrastive_weight: its weight in eq. (10) (1 in the paper).
        contrastive_warmup_epochs: epochs without it first (10 in the paper).
        mask_subtiles: also exclude background sub-cells, using the stage-1 tissue mask
            at each sub-cell's centre (tiles without any tissue sub-cell stay unmasked).
        stage1_replace: ``True`` (000): N tiles with replacement, kept as counts, a tile
            drawn m times gets m sub-tiles.  ``False``: N distinct tiles (Gumbel-top-k,
            ATS's estimator) with one sub-tile each, so an estimate cannot spend its
            draws on one tile as ``α`` sharpens; unbiased too (``estimators.py``).
        subtile_baseline: train ``b`` with a leave-one-out control variate (the other
            tiles' sub-tile features) in the two-stage estimator: same value, same
            expected gradients, lower variance of ``β``'s gradient
            (:func:`~napari_zoomin.sampling.two_stage_expected_features`).
        topk_weights: as in :class:`~.base.SamplingConfig`, ``"draws"`` by default
            here: α·β multiplies two peaked maps, and renormalising it leaves one
            sub-tile most of the vote where training gave N distinct tiles about
            ``1/N`` each (identical rules with 000's stage 1 with replacement).
    """

    stage2_scale: float = 0.2
    tile_size: tuple[int, int] = (50, 50)
    subtile_size: tuple[int, int] = (27, 27)
    contrastive: bool = True
    contrastive_weight: float = 1.0
    contrastive_warmup_epochs: int = 10
    mask_subtiles: bool = True
    stage1_replace: bool = True
    subtile_baseline: bool = False
    topk_weights: Literal["draws", "attention"] = "draws"

    def problems(self) -> list[str]:
        """The shared checks, the stage-2 scale, and a sub-tile that fits in its tile."""
        problems = super().problems()
        if problems:
            return problems
        problems += scale_problems(self, ("stage2_scale",))
        problems += side_problems(self, "tile_size")
        problems += side_problems(self, "subtile_size")
        if not problems and any(
            s > t for s, t in zip(self.subtile_size, self.tile_size, strict=True)
        ):
            problems.append(
                f"subtile_size {tuple(self.subtile_size)} must not exceed tile_size "
                f"{tuple(self.tile_size)} (a sub-tile is a part of a tile)"
            )
        if self.estimator == "priority" and self.stage1_replace:
            problems.append(
                "estimator 'priority' weighs distinct stage-1 tiles: set stage1_replace "
                "to false, or estimator to 'sequential'"
            )
        if not 0 <= self.contrastive_weight <= MAX_WEIGHT:
            problems.append(f"contrastive_weight must be in [0, {MAX_WEIGHT}]")
        if self.contrastive_warmup_epochs < 0:
            problems.append("contrastive_warmup_epochs must not be negative")
        return problems


def topk_tiles(alpha: Tensor, grid: CellGrid, config: ZoomInConfig) -> Tensor:
    """Stage-1 cells that top-k inference reads: the ``N`` most attended distinct tiles.

    Also used by the engine to account for the tile views read (one rule, one place).
    """
    size = tuple(config.tile_size)
    return distinct_top_k(
        alpha,
        config.n_samples,
        lambda cells: grid.region_centres(cells, size),
        size,
        config.topk_max_overlap,
    )


def _draw_tiles(
    alphas: Sequence[Tensor],
    rows: Tensor,
    n: int,
    generator: torch.Generator | None,
    replace: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """N stage-1 draws per row, as distinct cells, counts and ``α_c``.

    With replacement, each image's distribution is sampled once for all its rows
    (independent draws, so ``r·N`` draws split into ``r`` rows are ``r`` independent
    samples), over its non-zero cells only: K draws of a gigapixel slide whose ``α``
    has tens of millions of cells never stack K copies of it.  Without replacement,
    each row draws ``min(N, nnz α)`` distinct cells in draw order (count 1 each, then
    padding), one Gumbel-top-k per row over the non-zero cells, a row at a time.

    Returns:
        ``cells`` (R, T) with ``counts`` (R, T) (0 = padding), ``α`` (R, T) at
        those cells, differentiable, and without replacement each row's threshold
        ``κ`` (R,) (:func:`~napari_zoomin.sampling.sampler.sample_with_threshold`).
    """
    picked = torch.zeros((len(rows), n), dtype=torch.int64)  # stage-1 cells, N per row
    distinct = torch.zeros((len(rows), n), dtype=torch.int64)  # counts without replacement
    kappa = None if replace else torch.empty(len(rows), dtype=torch.float64)
    for b in torch.unique(rows).tolist():
        sel = torch.nonzero(rows == b)[:, 0]
        a = alphas[b].detach()
        if replace:  # inverse-CDF draws never pick a zero cell: no compacted copy of α
            picks = sample(a[None], n * len(sel), replace=True, generator=generator)
            picked[sel] = picks[0].cpu().reshape(len(sel), n)
            continue
        nonzero = torch.nonzero(a > 0)[:, 0]
        k = min(n, int(nonzero.shape[0]))
        for r in sel.tolist():  # one row at a time: no K copies of a slide's α
            picks, threshold = sample_with_threshold(a[nonzero][None], k, generator)
            kappa[r] = threshold[0].cpu()
            picked[r, :k] = nonzero[picks[0]].cpu()
            distinct[r, :k] = 1
    cells, counts = draws_to_counts(picked) if replace else (picked, distinct)
    gathered = torch.stack(
        [alphas[b][cells[r].to(alphas[b].device)] for r, b in enumerate(rows.tolist())]
    )
    return cells, counts, gathered, kappa


@dataclass(eq=False)
class TwoStagePass:
    """One two-stage sampling pass over R rows (image, draw).

    Tiles and sub-tiles are kept once per image in *union tables*; rows refer to them.

    Attributes:
        rows: (R,) image of each row.
        tile_attention: (R, T) the stage-1 distribution that was sampled (α, or its
            complement for contrastive views) at the drawn tiles ``tile_cells`` (a
            gigapixel slide's α has millions of cells; rows never copy it).
        tile_cells, tile_counts, tile_ids: (R, T) distinct drawn tiles, their counts
            ``m_c`` (0 = padding) and their index in the tile table.
        table_images, table_cells, table_regions: (U,), (U,), (U, 4) the tile table.
        beta: (U, K2) ``β^c`` of every tile in the table (as the network gives it).
        beta_sampled: (U, K2) the stage-2 distribution that was sampled (β or complement).
        beta_mask: (U, K2) bool or ``None``.
        stage2_grid: cells of every ``β^c`` in level-0 pixels (U origins).
        subtile_indices, n_subtiles, subtile_ids: (R, T, M), (R, T), (R, T, M).
        sub_tiles, sub_cells, sub_regions: (S,), (S,), (S, 4) the sub-tile table.
        sub_features: (S, D) ``f`` of every sub-tile in the table.
        z: (R, D) aggregated features.
    """

    rows: Tensor
    tile_attention: Tensor
    tile_cells: Tensor
    tile_counts: Tensor
    tile_ids: Tensor
    table_images: Tensor
    table_cells: Tensor
    table_regions: Tensor
    beta: Tensor
    beta_sampled: Tensor
    beta_mask: Tensor | None
    stage2_grid: CellGrid
    subtile_indices: Tensor
    n_subtiles: Tensor
    subtile_ids: Tensor
    sub_tiles: Tensor
    sub_cells: Tensor
    sub_regions: Tensor
    sub_features: Tensor
    z: Tensor


class ZoomIn(AttentionSamplingModel):
    """Zoom-In network: ``a`` (stage 1), ``b`` (stage 2), ``f``, ``g``.

    Use :meth:`loss` to train (eq. 10, plus eq. 11 for annotated sources) and
    :meth:`predict` for inference (K sampled draws, or deterministic top-k).
    """

    config: ZoomInConfig

    def __init__(
        self,
        config: ZoomInConfig | None = None,
        *,
        stage2_attention: nn.Module | None = None,
        **networks: nn.Module,
    ):
        """Default networks from ``config``; ``attention``, ``stage2_attention``, ``feature``
        and ``classifier`` may be given instead (see :class:`AttentionSamplingModel`)."""
        config = config or ZoomInConfig()
        if not 0 < config.stage2_scale <= 1:
            raise ValueError(f"stage2_scale must be in (0, 1], got {config.stage2_scale}")
        super().__init__(config, **networks)
        self.stage2_attention = (
            stage2_attention if stage2_attention is not None else self.make_attention_network()
        )

    @property
    def subtile_size(self) -> tuple[int, int]:
        return tuple(self.config.subtile_size)  # type: ignore[return-value]

    # -- sampling --------------------------------------------------------------------

    def _stage2_mask(self, stage1: Sequence[Stage1], images: Tensor, grid: CellGrid):
        """Which sub-cells may be drawn: eligible by the edge rule (centre inside the
        image) and, with ``mask_subtiles``, on tissue in the stage-1 tissue mask.

        A tile without any eligible tissue sub-cell keeps its eligible cells (never
        the cells outside the image).  ``None`` when every cell may be drawn.
        """
        k2 = grid.n_cells
        n = int(images.shape[0])
        cells = torch.arange(k2, dtype=torch.int64).expand(n, k2)
        inside = grid.inside(cells)  # (n, K2)
        use_tissue = self.config.mask_subtiles and any(s.view_tissue is not None for s in stage1)
        if not use_tissue:
            return None if bool(inside.all()) else inside.to(self.device)
        mask = inside.clone()
        centres = grid.centres(cells)  # (n, K2, 2)
        for b in torch.unique(images).tolist():
            st = stage1[b]
            if st.view_tissue is None:
                continue
            sel = torch.nonzero(images == b)[:, 0]
            ok = inside[sel]
            pix = st.grid.nearest_view_pixels(centres[sel][ok])  # inside points only
            tissue = torch.zeros_like(ok)
            tissue[ok] = st.view_tissue[pix[:, 0], pix[:, 1]]
            some = tissue.any(dim=1, keepdim=True)
            mask[sel] = torch.where(some, tissue, ok)
        return mask.to(self.device)

    def two_stage(
        self,
        sources: Sequence[ImageSource],
        stage1: Sequence[Stage1],
        rows: Sequence[int],
        complement: bool = False,
        generator: torch.Generator | None = None,
    ) -> TwoStagePass:
        """Draw tiles and sub-tiles for every row and aggregate their features.

        Args:
            sources, stage1: the images and their stage-1 results.
            rows: image index of each row (repeat an image for several draws).
            complement: draw from ``1 − α`` and ``1 − β^c`` (contrastive views, 000 §2.3).
            generator: optional seeded generator.
        """
        c = self.config
        rows_t = torch.as_tensor(list(rows), dtype=torch.int64)
        alphas = []
        for s in stage1:
            a = s.attention
            if complement:
                a = complement_distribution(a[None], None if s.mask is None else s.mask[None])[0]
            alphas.append(a)
        # Stage 1: N tiles with replacement, kept as counts m_c (000 §2.2, eq. 6), or
        # N distinct tiles in draw order (stage1_replace=False).
        cells, counts, p, kappa = _draw_tiles(
            alphas, rows_t, c.n_samples, generator, c.stage1_replace
        )  # (R, T) each, and (R,)
        row_images = rows_t[:, None].expand(cells.shape)
        t_images, t_cells, tile_ids = unique_pairs(row_images, cells, counts.cpu() > 0)
        regions = torch.empty(int(t_images.shape[0]), 4, dtype=torch.int64)
        for b in torch.unique(t_images).tolist():
            sel = t_images == b
            regions[sel] = stage1[b].grid.regions(t_cells[sel], c.tile_size)

        # Stage 2: β^c = b(V(T(x, c), s2)) once per distinct tile, eq. (4) of 000.
        views = self.read_regions(sources, t_images, regions, c.stage2_scale)
        logits2 = self.stage2_attention(views)  # (U, u_a, v_a)
        grid2 = CellGrid(
            origins=regions[:, :2],
            region_size=tuple(c.tile_size),
            view_shape=tuple(views.shape[-2:]),
            map_shape=tuple(logits2.shape[-2:]),
            offset=tuple(self.stage2_attention.offset),
            stride=tuple(self.stage2_attention.stride),
            bounds=torch.tensor([stage1[b].grid.bounds[0].tolist() for b in t_images.tolist()]),
        )
        mask2 = self._stage2_mask(stage1, t_images, grid2)
        beta = attention_distribution(logits2, mask2, c.uniform_mix)  # (U, K2)
        beta_sampled = complement_distribution(beta, mask2) if complement else beta

        tile_ids_dev = tile_ids.to(beta_sampled.device)
        beta_rows = beta_sampled[tile_ids_dev]  # (R, T, K2)
        # min(m_c, nnz β^c) sub-tiles per tile without replacement, eq. (9) of 000.
        sub_idx, n_sub = sample_subtiles(beta_rows.detach(), counts, generator)
        m = sub_idx.shape[-1]
        valid = torch.arange(m, device=n_sub.device) < n_sub[..., None]
        s_tiles, s_cells, sub_ids = unique_pairs(
            tile_ids[..., None].expand(sub_idx.shape), sub_idx, valid
        )
        sub_regions = grid2.select(s_tiles).regions(s_cells[:, None], c.subtile_size)[:, 0]
        feats = self.featurise(sources, t_images[s_tiles], sub_regions)  # (S, D)
        feat_rows = feats[sub_ids.to(feats.device)]  # (R, T, M, D)
        # Unbiased value and gradients for a, b and f (estimators.py, eq. 5 and 9 of 000).
        positions = torch.arange(cells.shape[1], device=p.device).expand(cells.shape)
        z = two_stage_expected_features(
            p,
            positions,
            counts,
            beta_rows,
            sub_idx,
            feat_rows,
            replace=c.stage1_replace,
            subtile_baseline=c.subtile_baseline,
            tile_threshold=kappa if c.estimator == "priority" else None,
        )
        return TwoStagePass(
            rows=rows_t,
            tile_attention=p,
            tile_cells=cells,
            tile_counts=counts,
            tile_ids=tile_ids,
            table_images=t_images,
            table_cells=t_cells,
            table_regions=regions,
            beta=beta,
            beta_sampled=beta_sampled,
            beta_mask=mask2,
            stage2_grid=grid2,
            subtile_indices=sub_idx,
            n_subtiles=n_sub,
            subtile_ids=sub_ids,
            sub_tiles=s_tiles,
            sub_cells=s_cells,
            sub_regions=sub_regions,
            sub_features=feats,
            z=z,
        )

    def sampled_logits(self, sources, generator=None) -> Tensor:
        stage1 = self.stage1(sources)
        return self.classifier(
            self.two_stage(sources, stage1, range(len(sources)), False, generator).z
        )

    # -- training --------------------------------------------------------------------

    def loss(
        self,
        sources: Sequence[ImageSource],
        labels: Tensor | Sequence[int],
        epoch: int = 0,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """The objective of 000 eq. (10) (+ eq. 11 where sources carry ROI masks).

        ``cross-entropy + contrastive (positives, after the warm-up) + λ Σ p log p on α
        and every drawn β^c (with multiplicity) + pixel MSE``; all averaged over images.
        """
        c = self.config
        labels = torch.as_tensor(labels, dtype=torch.long)
        b = len(sources)
        zero = torch.zeros((), device=self.device)
        with autocast(self.device):
            stage1 = self.stage1(sources)
            main = self.two_stage(sources, stage1, range(b), False, generator)
            logits = self.classifier(main.z)
            con = zero
            positives = [i for i in range(b) if int(labels[i]) != c.negative_class]
            if c.contrastive and epoch >= c.contrastive_warmup_epochs and positives:
                view = self.two_stage(sources, stage1, positives, True, generator)
                con = contrastive_loss(self.classifier(view.z), c.negative_class) * (
                    len(positives) / b
                )
        ce = classification_loss(logits, labels)
        ent = zero
        if c.entropy_weight:
            for s in stage1:
                ent = ent + entropy_regulariser(s.attention, c.entropy_weight)
            beta_rows = main.beta[main.tile_ids.to(main.beta.device)]
            ent = ent + entropy_regulariser(beta_rows, c.entropy_weight, main.tile_counts)
            ent = ent / b
        pix = self._pixel_loss(sources, stage1, main) / b if c.pixel_weight else zero
        total = ce + c.contrastive_weight * con + ent + c.pixel_weight * pix
        return LossTerms(total, ce, con, ent, pix, zero, logits.detach(), labels)

    def _pixel_loss(self, sources, stage1: Sequence[Stage1], main: TwoStagePass) -> Tensor:
        """000 eq. (11) on α and on the β^c of the drawn tiles, for annotated sources."""
        c = self.config
        total = torch.zeros((), device=self.device)
        for b, (src, st) in enumerate(zip(sources, stage1, strict=True)):
            roi = read_attention_target(src, full_region(src), c.view_scale)
            if roi is None:
                continue
            cells = st.grid.cell_values(roi[0].cpu(), mean=True).reshape(1, -1)
            mask = None if st.mask is None else st.mask[None]
            total = total + attention_mse(st.attention[None], cells, mask)
            sel = torch.nonzero(main.table_images == b)[:, 0]
            if sel.numel():
                roi2 = read_attention_target(src, main.table_regions[sel], c.stage2_scale)
                grid2 = main.stage2_grid.select(sel)
                target = grid2.cell_values(roi2.cpu()).reshape(int(sel.shape[0]), -1)
                beta_mask = None if main.beta_mask is None else main.beta_mask[sel.to(self.device)]
                total = total + attention_mse(main.beta[sel.to(self.device)], target, beta_mask)
        return total

    # -- inference -------------------------------------------------------------------

    read_steps = ("stage 1", "stage 2", "sub-tiles")

    def _predict_sampled(self, sources, stage1, draws, generator) -> list[Prediction]:
        """K two-stage estimates per image; tiles and sub-tiles are the union over the
        draws (tile counts summed)."""
        rows = [b for b in range(len(sources)) for _ in range(draws)]
        run = self.two_stage(sources, stage1, rows, False, generator)
        probs = class_probabilities(self.classifier(run.z)).cpu()
        return [self._prediction_from_pass(stage1, run, probs, b) for b in range(len(sources))]

    def _prediction_from_pass(
        self, stage1: Sequence[Stage1], run: TwoStagePass, probs: Tensor, b: int
    ) -> Prediction:
        st = stage1[b]
        per_draw = probs[run.rows == b]
        tiles = torch.nonzero(run.table_images == b)[:, 0]
        local = torch.full((int(run.table_images.shape[0]),), -1, dtype=torch.int64)
        local[tiles] = torch.arange(int(tiles.shape[0]))
        counts = torch.zeros(int(run.table_images.shape[0]), dtype=torch.int64)
        live = run.tile_counts.cpu() > 0
        counts.index_add_(0, run.tile_ids[live], run.tile_counts.cpu()[live])
        alpha = st.attention.detach().float().cpu()
        beta = run.beta.detach().float().cpu()
        tile_alpha = alpha[run.table_cells[tiles]]
        subs = torch.nonzero(run.table_images[run.sub_tiles] == b)[:, 0]
        sub_tile = run.sub_tiles[subs]
        weights = alpha[run.table_cells[sub_tile]] * beta[sub_tile, run.sub_cells[subs]]
        return Prediction(
            probabilities=per_draw.mean(0),
            spread=per_draw.std(0, correction=0),
            draw_probabilities=per_draw,
            mode="sample",
            attention=alpha.reshape(st.grid.map_shape),
            attention_grid=st.grid,
            tiles=TileSet(
                cells=run.table_cells[tiles],
                regions=run.table_regions[tiles],
                counts=counts[tiles],
                attention=tile_alpha,
                stage2_attention=beta[tiles].reshape(-1, *run.stage2_grid.map_shape),
                stage2_grid=run.stage2_grid.select(tiles),
            ),
            subtiles=SubtileSet(
                tile=local[sub_tile],
                cells=run.sub_cells[subs],
                regions=run.sub_regions[subs],
                weights=weights,
                scores=self.subtile_scores(run.sub_features[subs.to(run.sub_features.device)]),
            ),
        )

    def _predict_topk(self, sources, stage1: Sequence[Stage1], b: int) -> Prediction:
        """Deterministic: the ``N`` most attended tiles, then the ``N`` sub-tiles with the
        largest ``α_c β^c_c'`` among them, their features weighed by
        ``config.topk_weights`` (by default as the training estimator weighs a draw
        sequence that took them in that order; biased, but converges to the full model
        as ``N`` grows); at both stages a region that overlaps a better-ranked chosen one
        by more than ``config.topk_max_overlap`` of its area is skipped
        (:func:`topk_tiles`).  The stage-2 views of all ``N`` tiles are read, including
        those none of whose sub-tiles made the cut (``Prediction.stage2_views``)."""
        c = self.config
        st = stage1[b]
        alpha = st.attention.detach().float()
        top_cells = topk_tiles(alpha, st.grid, c)
        k = int(top_cells.shape[0])
        regions = st.grid.regions(top_cells, c.tile_size)
        images = torch.full((k,), b, dtype=torch.int64)
        views = self.read_regions(sources, images, regions, c.stage2_scale)
        logits2 = self.stage2_attention(views)
        grid2 = CellGrid(
            regions[:, :2],
            tuple(c.tile_size),
            tuple(views.shape[-2:]),
            tuple(logits2.shape[-2:]),
            tuple(self.stage2_attention.offset),
            tuple(self.stage2_attention.stride),
            bounds=st.grid.bounds,
        )
        mask2 = self._stage2_mask(stage1, images, grid2)
        beta = attention_distribution(logits2, mask2, c.uniform_mix).float()  # (k, K2)
        joint = (alpha[top_cells.to(alpha.device)][:, None] * beta).reshape(-1)
        k2 = beta.shape[1]

        def sub_centres(f: Tensor) -> Tensor:  # of the regions read (edge rule)
            cells = (f % k2)[:, None]
            return grid2.select(f // k2).region_centres(cells, c.subtile_size)[:, 0]

        flat = distinct_top_k(joint, c.n_samples, sub_centres, c.subtile_size, c.topk_max_overlap)
        n = int(flat.shape[0])
        w = joint[flat.to(joint.device)]
        sub_tile, sub_cell = flat // k2, flat % k2
        sub_regions = grid2.select(sub_tile).regions(sub_cell[:, None], c.subtile_size)[:, 0]
        feats = self.featurise(sources, torch.full((n,), b, dtype=torch.int64), sub_regions)
        agg = topk_weights(w, c.stage1_replace, c.topk_weights)
        z = (agg[:, None].to(feats.dtype) * feats).sum(0, keepdim=True)
        probs = class_probabilities(self.classifier(z)).cpu()
        used = torch.unique(sub_tile)
        local = torch.full((k,), -1, dtype=torch.int64)
        local[used] = torch.arange(int(used.shape[0]))
        return Prediction(
            probabilities=probs[0],
            spread=torch.zeros_like(probs[0]),
            draw_probabilities=probs,
            mode="topk",
            attention=alpha.cpu().reshape(st.grid.map_shape),
            attention_grid=st.grid,
            tiles=TileSet(
                cells=top_cells[used],
                regions=regions[used],
                counts=torch.bincount(sub_tile, minlength=k)[used],
                attention=alpha.cpu()[top_cells[used]],
                stage2_attention=beta.cpu()[used].reshape(-1, *grid2.map_shape),
                stage2_grid=grid2.select(used),
            ),
            subtiles=SubtileSet(
                tile=local[sub_tile],
                cells=sub_cell,
                regions=sub_regions,
                weights=w.cpu(),
                scores=self.subtile_scores(feats),
            ),
            stage2_views=regions,
        )
