"""Top-k inference picks distinct regions: greedy non-maximum suppression by overlap."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from napari_zoomin.models import ATS, ATSConfig, TensorSource, ZoomIn, ZoomInConfig
from napari_zoomin.models.networks import class_probabilities
from napari_zoomin.models.topk import distinct_top_k, topk_weights
from napari_zoomin.models.zoomin import topk_tiles

SMALL = {"feature_dim": 8, "feature_channels": (4, 8), "feature_hidden": 16}


def _row(xs: list[int]):
    """Centres on one row at the given columns."""
    table = torch.tensor([[0, x] for x in xs], dtype=torch.int64)
    return lambda idx: table[idx]


def test_plain_top_k_when_any_overlap_is_allowed():
    scores = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.2])
    got = distinct_top_k(scores, 3, _row([0, 1, 2, 3, 4]), (40, 40), 1.0)
    assert got.tolist() == [1, 3, 4]


def test_greedy_suppression_by_overlap_fraction():
    # centres 10 px apart, 40-px regions: offset d overlaps (40 - d) / 40 of the area,
    # so 0.25 keeps a region only 30 px or more from every chosen one.
    scores = torch.arange(10, 0, -1, dtype=torch.float32)
    centres = _row(list(range(0, 100, 10)))
    assert distinct_top_k(scores, 3, centres, (40, 40), 0.25).tolist() == [0, 3, 6]
    assert distinct_top_k(scores, 5, centres, (40, 40), 0.25).tolist() == [0, 3, 6, 9]
    assert distinct_top_k(scores, 3, centres, (40, 40), 0.5).tolist() == [0, 2, 4]
    assert distinct_top_k(scores, 3, centres, (40, 40), 0.0).tolist() == [0, 4, 8]
    # the best cell in the middle: its near neighbours on both sides are skipped (30 px
    # away overlaps exactly 0.25, which is allowed)
    peak = torch.tensor([1.0, 2, 3, 4, 9, 8, 7, 6, 5, 0.5])
    assert distinct_top_k(peak, 3, centres, (40, 40), 0.25).tolist() == [4, 7, 1]


def test_zero_scores_are_never_chosen_and_bad_overlap_is_refused():
    scores = torch.tensor([0.0, 0.6, 0.0, 0.4])
    assert distinct_top_k(scores, 5, _row([0, 100, 200, 300]), (40, 40), 0.25).tolist() == [1, 3]
    assert distinct_top_k(torch.zeros(4), 2, _row([0, 1, 2, 3]), (4, 4), 0.25).numel() == 0
    with pytest.raises(ValueError, match="max_overlap"):
        distinct_top_k(scores, 2, _row([0, 1, 2, 3]), (4, 4), 1.5)


def test_widens_the_candidates_when_the_first_ones_are_all_one_region():
    # 10,000 cells on one spot outrank three far-away ones: the first 4,096
    # candidates give a single region, so the search must go on past them.
    n = 10_000
    table = torch.zeros(n + 3, 2, dtype=torch.int64)
    table[n:, 1] = torch.tensor([1000, 2000, 3000])
    scores = torch.cat([torch.linspace(2.0, 1.0, n), torch.tensor([0.3, 0.2, 0.1])])
    got = distinct_top_k(scores, 3, lambda i: table[i], (50, 50), 0.25)
    assert got.tolist() == [0, n, n + 1]


class FixedLogits(nn.Module):
    """An attention network that returns given logits: a peak at one view pixel."""

    offset = (0.0, 0.0)
    stride = (1, 1)

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def map_shape(self, view_shape):
        return tuple(view_shape)

    def forward(self, view):
        return self.logits.expand(view.shape[0], *view.shape[-2:])


def _bump(h: int, w: int, cy: float, cx: float, width: float = 2.0) -> torch.Tensor:
    y = torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.arange(w, dtype=torch.float32)[None, :]
    return -((y - cy) ** 2 + (x - cx) ** 2) / width**2


def _overlap(a: list[int], b: list[int]) -> float:
    rows = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return rows * cols / (a[2] * a[3])


def _max_pairwise_overlap(regions: torch.Tensor) -> float:
    return max(_overlap(a, b) for a, b in itertools.combinations(regions.tolist(), 2))


def _zoomin(max_overlap: float) -> ZoomIn:
    cfg = ZoomInConfig(
        view_scale=0.25,
        stage2_scale=0.5,
        tile_size=(16, 16),
        subtile_size=(8, 8),
        n_samples=4,
        topk_max_overlap=max_overlap,
        **SMALL,
    )
    torch.manual_seed(0)
    # one bright spot in the middle at both stages: the plain top cells are its neighbours
    return ZoomIn(
        cfg,
        attention=FixedLogits(_bump(16, 16, 8, 8)),
        stage2_attention=FixedLogits(_bump(8, 8, 4, 4)),
    )


def test_zoomin_topk_reads_distinct_tiles_and_sub_tiles():
    src = TensorSource(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)))
    plain_model, distinct_model = _zoomin(1.0), _zoomin(0.25)
    (plain,) = plain_model.predict([src], mode="topk")
    (distinct,) = distinct_model.predict([src], mode="topk")
    alpha, grid = plain.attention.reshape(-1), plain.attention_grid
    # the plain rule reads the torch.topk tiles, four neighbours of the peak, and
    # takes all four sub-tiles from the best of them
    read = topk_tiles(alpha, grid, plain_model.config)
    assert sorted(read.tolist()) == sorted(torch.topk(alpha, 4).indices.tolist())
    assert _max_pairwise_overlap(grid.regions(read, (16, 16))) > 0.5
    assert plain.tiles.cells.tolist() == [int(torch.argmax(alpha))]
    assert _max_pairwise_overlap(plain.subtiles.regions) > 0.5
    # the distinct rule starts at the peak, then keeps every pair within a quarter
    read = topk_tiles(alpha, grid, distinct_model.config)
    assert int(read[0]) == int(torch.argmax(alpha)) and len(read) == 4
    assert _max_pairwise_overlap(grid.regions(read, (16, 16))) <= 0.25
    assert set(distinct.tiles.cells.tolist()) <= set(read.tolist())
    assert int(torch.argmax(distinct.subtiles.weights)) == 0
    assert len(distinct.subtiles.regions) == 4
    assert _max_pairwise_overlap(distinct.subtiles.regions) <= 0.25
    # the weights are α_c β^c_c' of the chosen sub-tiles, best first
    beta = distinct.tiles.stage2_attention.reshape(len(distinct.tiles.cells), -1)
    p = distinct.subtiles
    torch.testing.assert_close(p.weights, distinct.tiles.attention[p.tile] * beta[p.tile, p.cells])
    assert torch.all(p.weights[:-1] >= p.weights[1:])


def test_ats_topk_reads_distinct_subtiles():
    src = TensorSource(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)))

    def ats(max_overlap: float) -> ATS:
        cfg = ATSConfig(
            view_scale=0.25,
            subtile_size=(16, 16),
            n_samples=4,
            topk_max_overlap=max_overlap,
            **SMALL,
        )
        torch.manual_seed(0)
        return ATS(cfg, attention=FixedLogits(_bump(16, 16, 8, 8)))

    (plain,) = ats(1.0).predict([src], mode="topk")
    (distinct,) = ats(0.25).predict([src], mode="topk")
    alpha = plain.attention.reshape(-1)
    assert plain.subtiles.cells.tolist() == torch.topk(alpha, 4).indices.tolist()
    assert distinct.subtiles.cells[0] == torch.argmax(alpha)
    assert len(distinct.subtiles.cells) == 4
    assert _max_pairwise_overlap(plain.subtiles.regions) > 0.5
    assert _max_pairwise_overlap(distinct.subtiles.regions) <= 0.25
    torch.testing.assert_close(distinct.subtiles.weights, alpha[distinct.subtiles.cells])


def test_topk_weights_are_the_training_estimators():
    """Ranked attention 0.5, 0.2, 0.1.  Without replacement, the estimates after each
    draw are f1; 0.5 f1 + 0.5 f2; 0.5 f1 + 0.2 f2 + 0.3 f3 (ATS eq. 14), whose mean
    weighs f1, f2, f3 by 2/3, 0.7/3, 0.3/3.  With replacement, or by the "attention"
    rule: 0.5, 0.2, 0.1 renormalised."""
    a = torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64)
    draws = topk_weights(a, replace=False)
    torch.testing.assert_close(draws, torch.tensor([2 / 3, 0.7 / 3, 0.1], dtype=torch.float64))
    renormalised = torch.tensor([0.625, 0.25, 0.125], dtype=torch.float64)
    torch.testing.assert_close(topk_weights(a, replace=True), renormalised)
    torch.testing.assert_close(topk_weights(a, replace=False, rule="attention"), renormalised)
    with pytest.raises(ValueError, match="rule"):
        topk_weights(a, replace=False, rule="mean")


@pytest.mark.parametrize("rule", ["draws", "attention"])
def test_ats_and_zoomin_topk_aggregate_with_the_configured_weights(rule):
    """The top-k probabilities are g(Σ w f) over the regions reported, w by the rule."""
    src = TensorSource(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2)))
    torch.manual_seed(0)
    ats = ATS(
        ATSConfig(view_scale=0.25, subtile_size=(16, 16), n_samples=4, topk_weights=rule, **SMALL),
        attention=FixedLogits(_bump(16, 16, 8, 8)),
    )
    zoomin = _zoomin(0.25)
    zoomin.config.stage1_replace = False
    zoomin.config.topk_weights = rule
    for model, replace in ((ats, False), (zoomin, False)):
        (p,) = model.predict([src], mode="topk")
        w = topk_weights(p.subtiles.weights, replace, rule)
        images = torch.zeros(len(w), dtype=torch.int64)
        with torch.no_grad():
            feats = model.featurise([src], images, p.subtiles.regions)
            expected = class_probabilities(model.classifier((w[:, None] * feats).sum(0)[None]))
        torch.testing.assert_close(p.probabilities, expected[0])
    assert rule == "attention" or not torch.allclose(
        w, p.subtiles.weights / p.subtiles.weights.sum()
    )


def test_config_refuses_an_overlap_outside_zero_one():
    with pytest.raises(ValueError, match="topk_max_overlap"):
        ATS(ATSConfig(topk_max_overlap=-0.1, **SMALL))
    with pytest.raises(ValueError, match="topk_weights"):
        ATS(ATSConfig(topk_weights="mean", **SMALL))
