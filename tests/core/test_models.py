"""The models wire sources, attention, sampling and estimators together correctly.

The estimators are proven exactly in ``test_estimators.py``; here the question is
whether a model feeds them the right tiles, sub-tiles and features.  The sampled
aggregate of a whole model is compared with its full model computed over every
(sub-)tile (a Monte Carlo mean over many draws, with a 5-sigma tolerance).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_zoomin.models import (
    ATS,
    ATSConfig,
    LowResolutionCNN,
    ReinforceATS,
    ReinforceConfig,
    TensorSource,
    Uniform,
    ZoomIn,
    ZoomInConfig,
    autocast,
    grad_scaler,
    pretrain_tile_classifiers,
    select_device,
)
from napari_zoomin.models.distributions import attention_distribution

SMALL = {"feature_dim": 8, "feature_channels": (4, 8), "feature_hidden": 16}


class PixelFeatures(nn.Module):
    """A cheap stand-in for ``f`` on tiny patches: linear map of the pixels, L2-normalised."""

    def __init__(self, patch: tuple[int, int], dim: int = 8):
        super().__init__()
        self.linear = nn.Linear(3 * patch[0] * patch[1], dim)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1)), dim=-1)


class FixedLogits(nn.Module):
    """An attention network that returns given logits (same geometry as 'same' padding)."""

    offset = (0.0, 0.0)
    stride = (1, 1)

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def map_shape(self, view_shape):
        return tuple(view_shape)

    def forward(self, view):
        return self.logits.to(view.dtype).expand(view.shape[0], *view.shape[-2:])


def _randomise_logits(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.logit.weight.copy_(torch.randn(net.logit.weight.shape, generator=g))


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _tissue(h: int, w: int) -> torch.Tensor:
    t = torch.ones(h, w, dtype=torch.bool)
    t[:, : w // 3] = False  # a background band
    return t


# ---- whole-model unbiasedness (wiring) ----------------------------------------------


def _zoomin_tiny(**kw) -> ZoomIn:
    cfg = ZoomInConfig(
        view_scale=0.25,
        stage2_scale=0.5,
        tile_size=(8, 8),
        subtile_size=(4, 4),
        n_samples=3,
        **SMALL,
        **kw,
    )
    torch.manual_seed(0)
    m = ZoomIn(cfg, feature=PixelFeatures((4, 4)))
    _randomise_logits(m.attention, 1)
    _randomise_logits(m.stage2_attention, 2)
    return m.eval()


def _zoomin_full_model(m: ZoomIn, src: TensorSource) -> torch.Tensor:
    """``Σ_c α_c Σ_c' β^c_c' f(c, c')`` over every tile and sub-tile (000 eq. 5)."""
    st = m.stage1([src])[0]
    c = m.config
    cells = torch.arange(st.grid.n_cells)
    regions = st.grid.regions(cells, c.tile_size)
    views = src.read(regions, c.stage2_scale)
    logits = m.stage2_attention(views)
    from napari_zoomin.models.coordinates import CellGrid

    grid2 = CellGrid(
        regions[:, :2],
        c.tile_size,
        tuple(views.shape[-2:]),
        tuple(logits.shape[-2:]),
        bounds=src.shape,
    )
    mask2 = m._stage2_mask([st], torch.zeros(len(cells), dtype=torch.long), grid2)
    beta = attention_distribution(logits, mask2)
    k2 = grid2.n_cells
    sub = grid2.regions(torch.arange(k2).expand(len(cells), k2), c.subtile_size)
    feats = m.feature(src.read(sub.reshape(-1, 4), 1.0)).reshape(len(cells), k2, -1)
    return torch.einsum("c,cs,csd->d", st.attention, beta, feats)


@pytest.mark.parametrize(
    ("masked", "stage1_replace", "estimator"),
    [
        (False, True, "sequential"),
        (True, True, "sequential"),
        (True, False, "sequential"),
        (True, False, "priority"),
    ],
)
def test_zoomin_sampled_aggregate_is_unbiased_for_its_full_model(masked, stage1_replace, estimator):
    h, w = 24, 20
    src = TensorSource(_image(h, w, 3), tissue=_tissue(h, w) if masked else None)
    m = _zoomin_tiny(stage1_replace=stage1_replace, estimator=estimator)
    with torch.no_grad():
        full = _zoomin_full_model(m, src)
        st = m.stage1([src])
        run = m.two_stage([src], st, [0] * 20_000, generator=torch.Generator().manual_seed(4))
    mean, se = run.z.mean(0), run.z.std(0) / run.z.shape[0] ** 0.5
    assert torch.all((mean - full).abs() <= 5 * se + 1e-6), (mean, full, se)
    live = run.tile_counts > 0
    if not stage1_replace:  # N distinct tiles per row, one sub-tile each
        assert torch.all(run.tile_counts[live] == 1) and torch.all(live.sum(1) == 3)
        cells = torch.where(live, run.tile_cells, -1 - torch.arange(3))
        assert all(len(set(r)) == 3 for r in cells[:200].tolist())
        assert torch.all(run.n_subtiles[live] == 1)
    if masked:
        alpha = st[0].attention.reshape(st[0].grid.map_shape)
        assert torch.all(alpha[:, : st[0].grid.map_shape[1] // 3 - 1] == 0)
        assert bool((run.beta_mask == 0).any())


def _ats_tiny(**kw) -> ATS:
    cfg = ATSConfig(view_scale=0.25, subtile_size=(4, 4), n_samples=3, **SMALL, **kw)
    return ATS(cfg, feature=PixelFeatures((4, 4)))


@pytest.mark.parametrize(
    ("replace", "estimator"), [(True, "sequential"), (False, "sequential"), (False, "priority")]
)
def test_ats_sampled_aggregate_is_unbiased_for_its_full_model(replace, estimator):
    h, w = 20, 28
    src = TensorSource(_image(h, w, 5), tissue=_tissue(h, w))
    torch.manual_seed(0)
    m = _ats_tiny(replace=replace, estimator=estimator)
    _randomise_logits(m.attention, 6)
    m.eval()
    with torch.no_grad():
        st = m.stage1([src])[0]
        cells = torch.arange(st.grid.n_cells)
        feats = m.feature(src.read(st.grid.regions(cells, (4, 4)), 1.0))
        full = st.attention @ feats
        run = m.one_stage([src], [st], [0] * 20_000, generator=torch.Generator().manual_seed(7))
    mean, se = run.z.mean(0), run.z.std(0) / run.z.shape[0] ** 0.5
    assert torch.all((mean - full).abs() <= 5 * se + 1e-6), (mean, full, se)


def test_priority_estimator_is_refused_where_the_draws_are_with_replacement():
    with pytest.raises(ValueError, match="set stage1_replace to false"):
        ZoomInConfig(estimator="priority")
    with pytest.raises(ValueError, match="set replace to false"):
        ATSConfig(estimator="priority", replace=True)
    with pytest.raises(ValueError, match="not by an estimator"):
        ReinforceConfig(estimator="priority", replace=False, reward="estimate")
    with pytest.raises(ValueError, match="estimator must be one of"):
        ATSConfig(estimator="ordered")
    assert ZoomInConfig(estimator="priority", stage1_replace=False).estimator == "priority"


def test_priority_reads_a_sharp_map_as_its_exact_sum_where_sequential_weights_vary():
    """α on three of the image's cells, N = 3 distinct draws: every estimate takes all
    three, so priority weights give each its exact α and every estimate is the full
    model's; the sequential weights depend on the draw order."""
    src = TensorSource(_image(20, 28, 5))
    peak = torch.full((5, 7), -60.0)
    peak[1, 1], peak[2, 4], peak[3, 2] = 1.0, 0.5, 0.0
    z = {}
    for estimator in ("sequential", "priority"):
        m = _ats_tiny(replace=False, estimator=estimator).eval()
        m.attention = FixedLogits(peak)
        with torch.no_grad():
            st = m.stage1([src])[0]
            cells = torch.arange(st.grid.n_cells)
            full = st.attention @ m.feature(src.read(st.grid.regions(cells, (4, 4)), 1.0))
            z[estimator] = m.one_stage([src], [st], [0] * 200, torch.Generator().manual_seed(1)).z
    assert torch.allclose(z["priority"], full.expand(200, -1), atol=1e-5)
    assert float(z["sequential"].std(0).max()) > 1e-2


# ---- contrastive views -------------------------------------------------------------


def test_contrastive_views_draw_from_one_minus_attention():
    src = TensorSource(_image(24, 20, 8))
    m = _zoomin_tiny()
    peak1 = torch.zeros(6, 5)
    peak1[2, 3] = 40.0  # α ≈ 1 on cell 13
    peak2 = torch.zeros(4, 4)
    peak2[1, 2] = 40.0  # β ≈ 1 on sub-cell 6
    m.attention = FixedLogits(peak1)
    m.stage2_attention = FixedLogits(peak2)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        st = m.stage1([src])
        normal = m.two_stage([src], st, [0] * 200, complement=False, generator=gen)
        contrast = m.two_stage([src], st, [0] * 200, complement=True, generator=gen)
    assert set(normal.table_cells.tolist()) == {13}
    # every tile's first sub-tile is the peak (the next ones are drawn without replacement)
    assert set(normal.subtile_indices[..., 0][normal.tile_counts > 0].tolist()) == {6}
    assert 13 not in contrast.table_cells.tolist()
    assert 6 not in contrast.sub_cells.tolist()
    assert len(set(contrast.table_cells.tolist())) > 10


def test_contrastive_loss_only_for_positives_after_warmup():
    srcs = [TensorSource(_image(24, 20, s)) for s in (10, 11)]
    m = _zoomin_tiny(contrastive_warmup_epochs=2).train()
    gen = torch.Generator().manual_seed(0)
    assert m.loss(srcs, [1, 0], epoch=1, generator=gen).contrastive.item() == 0.0
    assert m.loss(srcs, [0, 0], epoch=5, generator=gen).contrastive.item() == 0.0
    assert m.loss(srcs, [1, 0], epoch=2, generator=gen).contrastive.item() > 0.0


# ---- training terms ----------------------------------------------------------------


def test_zoomin_loss_trains_every_network():
    srcs = [TensorSource(_image(24, 20, s)) for s in (12, 13, 14)]
    m = _zoomin_tiny(contrastive_warmup_epochs=0).train()
    lt = m.loss(srcs, [1, 0, 1], epoch=0, generator=torch.Generator().manual_seed(1))
    lt.total.backward()
    for name in ("attention", "stage2_attention", "feature", "classifier"):
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads), (
            name
        )
    assert lt.entropy.item() < 0  # λ Σ p log p with λ > 0


@pytest.mark.parametrize("stage1_replace", [True, False])
def test_subtile_baseline_changes_only_the_stage2_gradients(stage1_replace):
    """Same draws, same loss, same gradients for a, f, g; b's differ (the control
    variate is zero in value and leaves every other gradient alone)."""
    srcs = [TensorSource(_image(24, 20, s)) for s in (12, 13)]
    runs = []
    for baseline in (False, True):
        m = _zoomin_tiny(stage1_replace=stage1_replace, subtile_baseline=baseline).train()
        lt = m.loss(srcs, [1, 0], generator=torch.Generator().manual_seed(3))
        lt.total.backward()
        grads = {
            name: torch.cat([p.grad.flatten() for p in getattr(m, name).parameters()])
            for name in ("attention", "stage2_attention", "feature", "classifier")
        }
        runs.append((float(lt.total.detach()), grads))
    (loss0, g0), (loss1, g1) = runs
    assert loss1 == loss0
    for name in ("attention", "feature", "classifier"):
        torch.testing.assert_close(g1[name], g0[name], atol=1e-7, rtol=0)
    assert float((g1["stage2_attention"] - g0["stage2_attention"]).abs().max()) > 1e-6


def test_pixel_supervision_uses_roi_masks():
    h, w = 24, 20
    roi = torch.zeros(h, w, dtype=torch.bool)
    roi[4:10, 12:18] = True
    with_roi = TensorSource(_image(h, w, 15), roi=roi)
    without = TensorSource(_image(h, w, 15))
    m = _zoomin_tiny(pixel_weight=1.0)
    gen = torch.Generator().manual_seed(2)
    lt = m.loss([with_roi], [1], generator=gen)
    assert lt.pixel.item() > 0
    assert m.loss([without], [1], generator=gen).pixel.item() == 0.0
    m.zero_grad()
    lt.pixel.backward()
    assert float(m.attention.logit.weight.grad.abs().sum()) > 0


def test_reinforce_attention_learns_only_from_the_policy_gradient():
    srcs = [TensorSource(_image(24, 28, s)) for s in (16, 17)]
    torch.manual_seed(0)
    m = ReinforceATS(
        ReinforceConfig(view_scale=0.25, subtile_size=(8, 8), n_samples=4, repeats=3, **SMALL)
    )
    _randomise_logits(m.attention, 3)
    lt = m.loss(srcs, [2, 0], generator=torch.Generator().manual_seed(3))
    assert lt.logits.shape == (6, 3) and lt.labels.tolist() == [2, 2, 2, 0, 0, 0]
    lt.classification.backward(retain_graph=True)
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in m.attention.parameters())
    assert float(m.feature.fc[1].weight.grad.abs().sum()) > 0
    m.zero_grad()
    (lt.policy + lt.entropy).backward()
    assert float(m.attention.logit.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in m.feature.parameters())


def test_reinforce_estimate_reward_is_the_hand_computed_reinforce_gradient():
    """``reward="estimate"``: ∂policy/∂(attention logit j of image b) is
    ``−(1/R) Σ_{e of b} (R_e − mean_b R) Σ_p (1[draw p = j] − a_j)`` with ``R_e`` the
    estimate's own P(true class), replayed here from the same seeded draws."""
    srcs = [TensorSource(_image(24, 28, s)) for s in (16, 17)]
    torch.manual_seed(0)
    config = ReinforceConfig(
        view_scale=0.25, subtile_size=(8, 8), n_samples=4, repeats=3, reward="estimate", **SMALL
    )
    m = ReinforceATS(config)
    _randomise_logits(m.attention, 3)
    labels = [2, 0]
    lt = m.loss(srcs, labels, generator=torch.Generator().manual_seed(3))
    m.zero_grad()
    lt.policy.backward()
    got = m.attention.logit.weight.grad.clone()

    stage1 = m.stage1(srcs)
    rows = [0, 0, 0, 1, 1, 1]
    run = m.one_stage(srcs, stage1, rows, torch.Generator().manual_seed(3))
    reward = torch.softmax(m.classifier(run.z), 1)[torch.arange(6), [2, 2, 2, 0, 0, 0]].detach()
    torch.testing.assert_close(reward, torch.softmax(lt.logits, 1)[torch.arange(6), lt.labels])
    advantage = reward - reward.reshape(2, 3).mean(1).repeat_interleave(3)
    grads = []
    for b, st in enumerate(stage1):
        a = st.attention.detach()
        g = torch.zeros_like(a)
        for e in (3 * b, 3 * b + 1, 3 * b + 2):
            counts = torch.bincount(run.indices[e], minlength=a.numel()).to(a.dtype)
            g -= advantage[e] * (counts - config.n_samples * a) / 6
        grads.append(g)
    m.zero_grad()
    surrogate = sum((g * st.logits.reshape(-1)).sum() for g, st in zip(grads, stage1, strict=True))
    surrogate.backward()
    assert float(got.abs().sum()) > 0
    torch.testing.assert_close(got, m.attention.logit.weight.grad, rtol=1e-4, atol=1e-7)


def test_reinforce_without_replacement_is_reinforce_on_the_draw_sequence():
    """``replace=False``: each estimate reads ``n_samples`` distinct sub-tiles, and the
    policy loss is ``−(1/R) Σ_e A_e Σ_k log(a_{I_k} / (1 − Σ_{j<k} a_{I_j}))``, the
    sequence's log-probability written out here from the same seeded draws."""
    srcs = [TensorSource(_image(24, 28, s)) for s in (16, 17)]
    torch.manual_seed(0)
    config = ReinforceConfig(
        view_scale=0.25, subtile_size=(8, 8), n_samples=4, repeats=3, reward="estimate",
        replace=False, **SMALL,
    )  # fmt: skip
    m = ReinforceATS(config)
    _randomise_logits(m.attention, 3)
    lt = m.loss(srcs, [2, 0], generator=torch.Generator().manual_seed(3))
    m.zero_grad()
    lt.policy.backward()
    got = m.attention.logit.weight.grad.clone()

    run = m.one_stage(srcs, m.stage1(srcs), [0, 0, 0, 1, 1, 1], torch.Generator().manual_seed(3))
    assert run.valid.all() and all(len(set(r.tolist())) == 4 for r in run.indices)
    reward = torch.softmax(lt.logits, 1)[torch.arange(6), lt.labels].detach()
    advantage = reward - reward.reshape(2, 3).mean(1).repeat_interleave(3)
    score = []
    for e in range(6):
        drawn = run.attention[e, run.indices[e]]
        before = torch.cumsum(drawn, 0) - drawn
        score.append(torch.log(drawn / (1 - before)).sum())
    m.zero_grad()
    (-(torch.stack(score) * advantage).mean()).backward()
    assert float(got.abs().sum()) > 0
    torch.testing.assert_close(got, m.attention.logit.weight.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["attention", "mean"])
def test_reinforce_leave_one_out_rewards_are_each_estimate_without_each_draw(aggregation):
    """``reward="leave_one_out"``: draw ``p`` is baselined by P(true class) of its
    estimate re-aggregated without it, recomputed here one draw at a time."""
    srcs = [TensorSource(_image(24, 28, s)) for s in (16, 17)]
    torch.manual_seed(0)
    config = ReinforceConfig(
        view_scale=0.25, subtile_size=(8, 8), n_samples=4, repeats=2, aggregation=aggregation,
        reward="leave_one_out", **SMALL,
    )  # fmt: skip
    m = ReinforceATS(config)
    _randomise_logits(m.attention, 3)
    lt = m.loss(srcs, [2, 0], generator=torch.Generator().manual_seed(3))
    run = m.one_stage(srcs, m.stage1(srcs), [0, 0, 1, 1], torch.Generator().manual_seed(3))
    labels = torch.tensor([2, 2, 0, 0])
    full, without = m._leave_one_out_rewards(run, m.classifier(run.z), labels)
    torch.testing.assert_close(full, torch.softmax(lt.logits, 1)[torch.arange(4), labels])
    for r in range(4):
        for p in range(config.n_samples):
            keep = [q for q in range(config.n_samples) if q != p]
            z = m.aggregate(
                run.attention[r : r + 1],
                run.indices[r : r + 1, keep],
                run.valid[r : r + 1, keep],
                run.features[r : r + 1, keep],
            )
            expected = torch.softmax(m.classifier(z), 1)[0, labels[r]]
            torch.testing.assert_close(without[r, p], expected.detach(), rtol=1e-5, atol=1e-6)
    log_a = torch.log(run.attention.gather(1, run.indices))
    torch.testing.assert_close(lt.policy, -(log_a * (full[:, None] - without)).sum(1).mean())


def test_reinforce_mean_aggregation_averages_the_draws():
    m = ReinforceATS(ReinforceConfig(aggregation="mean", **SMALL))
    p = torch.tensor([[0.7, 0.2, 0.1]])
    idx = torch.tensor([[0, 0, 2]])
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]]])
    valid = torch.ones_like(idx, dtype=torch.bool)
    torch.testing.assert_close(m.aggregate(p, idx, valid, feats), torch.tensor([[2 / 3, 1.0]]))
    m.config.aggregation = "attention"  # 003 eq. (1): weights 0.7, 0.7, 0.1
    torch.testing.assert_close(
        m.aggregate(p, idx, valid, feats), torch.tensor([[1.4 / 1.5, 0.3 / 1.5]])
    )


@pytest.mark.parametrize(
    ("aggregation", "topk_weights"),
    [("mean", "draws"), ("attention", "draws"), ("mean", "attention")],
)
def test_reinforce_topk_weighs_its_regions_as_training_aggregates(aggregation, topk_weights):
    """Top-k's aggregate is the one ``g`` was trained on: the mean of the chosen
    regions' features for the mean aggregation, their renormalised attention for 003's
    (``topk_weights="draws"``, the default); ``"attention"`` renormalises always."""
    src = TensorSource(_image(24, 28, 16))
    torch.manual_seed(0)
    m = ReinforceATS(
        ReinforceConfig(
            view_scale=0.25, subtile_size=(8, 8), n_samples=4, aggregation=aggregation,
            topk_weights=topk_weights, topk_max_overlap=1.0, **SMALL,
        )
    )  # fmt: skip
    _randomise_logits(m.attention, 3)
    (p,) = m.predict([src], mode="topk")
    regions = p.subtiles.regions
    feats = m.featurise([src], torch.zeros(len(regions), dtype=torch.int64), regions)
    alpha = p.attention.reshape(-1)[p.subtiles.cells]
    w = torch.full((len(regions),), 1 / len(regions))
    if aggregation == "attention" or topk_weights == "attention":
        w = alpha / alpha.sum()
    expected = torch.softmax(m.classifier((w[:, None] * feats).sum(0, keepdim=True)), 1)[0]
    torch.testing.assert_close(p.probabilities, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (
            {"reward": "patch"},
            "reward must be one of 'subtile', 'estimate', 'leave_one_out', got 'patch'",
        ),
        ({"aggregation": "max"}, "aggregation must be one of 'attention', 'mean', got 'max'"),
        ({"reward": "estimate", "repeats": 1}, "set repeats to 2 or more, got 1"),
        ({"replace": False}, "without replacement .* needs reward 'estimate'"),
    ],
)
def test_reinforce_config_refuses_bad_reward_settings(settings, words):
    with pytest.raises(ValueError, match=words):
        ReinforceConfig(**settings)


def test_uniform_baseline_has_no_attention_parameters_and_masks():
    h, w = 20, 28
    m = Uniform(ATSConfig(view_scale=0.25, subtile_size=(8, 8), n_samples=4, **SMALL))
    assert list(m.attention.parameters()) == []
    st = m.stage1([TensorSource(_image(h, w, 18), tissue=_tissue(h, w))])[0]
    alpha = st.attention[st.attention > 0]
    torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / len(alpha)))


# ---- inference ----------------------------------------------------------------------


def test_zoomin_prediction_reports_what_a_viewer_needs():
    h, w = 24, 20
    src = TensorSource(_image(h, w, 19), tissue=_tissue(h, w))
    m = _zoomin_tiny()
    (p,) = m.predict([src], mode="sample", draws=5, generator=torch.Generator().manual_seed(5))
    assert p.draw_probabilities.shape == (5, 2)
    torch.testing.assert_close(p.probabilities.sum(), torch.tensor(1.0))
    torch.testing.assert_close(p.spread, p.draw_probabilities.std(0, correction=0))
    assert p.attention.shape == p.attention_grid.map_shape
    t = p.tiles
    assert int(t.counts.sum()) == 5 * m.config.n_samples
    torch.testing.assert_close(t.attention, p.attention.reshape(-1)[t.cells])
    torch.testing.assert_close(t.regions, p.attention_grid.regions(t.cells, m.config.tile_size))
    assert torch.all(t.attention > 0)  # background tiles are never drawn
    assert t.stage2_attention.shape[0] == len(t.cells)
    s = p.subtiles
    beta = t.stage2_attention.reshape(len(t.cells), -1)
    torch.testing.assert_close(s.weights, t.attention[s.tile] * beta[s.tile, s.cells])
    expected = t.stage2_grid.select(s.tile).regions(s.cells[:, None], m.config.subtile_size)[:, 0]
    assert torch.equal(s.regions, expected)
    assert s.regions.dtype == torch.int64


def test_topk_inference_is_deterministic():
    src = TensorSource(_image(24, 20, 20))
    m = _zoomin_tiny()
    a, b = m.predict([src], mode="topk"), m.predict([src], mode="topk")
    assert torch.equal(a[0].probabilities, b[0].probabilities)
    assert torch.all(a[0].spread == 0) and a[0].mode == "topk"
    assert len(a[0].subtiles.weights) == m.config.n_samples
    with pytest.raises(ValueError, match="mode"):
        m.predict([src], mode="argmax")


def _alone(m, src: TensorSource, regions: torch.Tensor) -> torch.Tensor:
    """Class probabilities of ``g(f(x))`` for each region read alone, from scratch."""
    from napari_zoomin.models.networks import class_probabilities

    with torch.no_grad():
        return class_probabilities(m.classifier(m.feature(src.read(regions, 1.0))))


@pytest.mark.parametrize("kind", ["zoomin", "ats"])
@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_subtile_scores_are_the_classifier_on_each_subtile_alone(kind, mode):
    """``SubtileSet.scores`` is ``g ∘ f`` of each sub-tile's own pixels, and since ``g`` is
    linear, a top-k slide logit is exactly the weighted mean of its sub-tiles' logits
    (``topk_weights`` sum to 1): the scores decompose the prediction."""
    src = TensorSource(_image(24, 20, 23), tissue=_tissue(24, 20))
    if kind == "zoomin":
        m = _zoomin_tiny(num_classes=3)
    else:
        cfg = ATSConfig(view_scale=0.25, subtile_size=(4, 4), n_samples=3, num_classes=3, **SMALL)
        torch.manual_seed(0)
        m = ATS(cfg, feature=PixelFeatures((4, 4))).eval()
    with torch.no_grad():
        m.classifier.linear.weight.mul_(20.0)  # scores far from uniform
    (p,) = m.predict([src], mode=mode, draws=4, generator=torch.Generator().manual_seed(2))
    s = p.subtiles
    assert s.scores is not None and s.scores.shape == (len(s.weights), 3)
    torch.testing.assert_close(s.scores, _alone(m, src, s.regions))
    assert float(s.scores.max() - s.scores.min()) > 0.3  # not a constant
    if mode == "topk":
        from napari_zoomin.models.topk import topk_weights

        w = topk_weights(s.weights, True, m.config.topk_weights)
        logits = torch.log(s.scores.double())  # softmax logits up to a constant per row
        mixed = torch.softmax((w.double()[:, None] * logits).sum(0), -1)
        torch.testing.assert_close(mixed.float(), p.probabilities, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["ats", "uniform", "reinforce"])
def test_one_stage_predictions(model):
    src = TensorSource(_image(20, 28, 21))
    cfg = {"view_scale": 0.25, "subtile_size": (8, 8), "n_samples": 4, **SMALL}
    m = {
        "ats": lambda: ATS(ATSConfig(**cfg)),
        "uniform": lambda: Uniform(ATSConfig(**cfg)),
        "reinforce": lambda: ReinforceATS(ReinforceConfig(**cfg)),
    }[model]()
    (p,) = m.predict([src], draws=3, generator=torch.Generator().manual_seed(0))
    assert p.draw_probabilities.shape[0] == 3
    assert int(p.tiles.counts.sum()) == 12
    torch.testing.assert_close(p.subtiles.weights, p.tiles.attention)
    (q,) = m.predict([src], mode="topk")
    assert len(q.tiles.cells) == 4


def test_multiclass_valid_padding_non_square_batch():
    """Views of different shapes in one batch, 'valid' attention nets, three classes."""
    cfg = ZoomInConfig(
        num_classes=3,
        view_scale=0.25,
        stage2_scale=0.5,
        tile_size=(16, 16),
        subtile_size=(8, 8),
        n_samples=4,
        attention_padding="valid",
        **SMALL,
    )
    m = ZoomIn(cfg, feature=PixelFeatures((8, 8)))
    srcs = [TensorSource(_image(40, 32, 22)), TensorSource(_image(36, 48, 23))]
    lt = m.loss(srcs, [2, 1], generator=torch.Generator().manual_seed(0))
    assert lt.logits.shape == (2, 3)
    lt.total.backward()
    preds = m.predict(srcs, draws=2, generator=torch.Generator().manual_seed(1))
    assert [p.attention.shape for p in preds] == [(4, 2), (3, 6)]
    assert preds[0].attention_grid.offset == (3.0, 3.0)


def test_low_resolution_cnn_baseline():
    m = LowResolutionCNN(view_scale=0.25)
    srcs = [TensorSource(_image(24, 20, s)) for s in (24, 25)]
    lt = m.loss(srcs, [0, 1])
    lt.total.backward()
    assert m.predict_proba(srcs).shape == (2, 2)


# ---- pre-training and device ---------------------------------------------------------


def test_tile_classifier_pretraining_keeps_the_model_parameters():
    h, w = 48, 40
    roi = torch.zeros(h, w, dtype=torch.bool)
    roi[10:20, 5:15] = True
    srcs = [TensorSource(_image(h, w, s), roi=roi) for s in (26, 27)]
    m = ZoomIn(
        ZoomInConfig(
            view_scale=0.5, stage2_scale=0.5, tile_size=(16, 16), subtile_size=(12, 12), **SMALL
        )
    )
    keys = set(m.state_dict())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    seen = []  # (network, step, steps, loss) after every epoch of every network
    history = pretrain_tile_classifiers(
        m, srcs, epochs=2, patches_per_image=8, on_epoch=lambda *a: seen.append(a)
    )
    assert set(history) == {"stage1_attention", "stage2_attention", "feature"}
    assert all(len(v) == 2 for v in history.values())
    # one report per network epoch, in order, with that epoch's loss
    order = ["stage1_attention", "stage2_attention", "feature"]
    assert seen == [
        (name, 2 * i + k + 1, 6, history[name][k]) for i, name in enumerate(order) for k in (0, 1)
    ]
    assert set(m.state_dict()) == keys
    for name in ("attention.logit.weight", "stage2_attention.logit.weight", "feature.fc.4.weight"):
        assert not torch.equal(before[name], m.state_dict()[name])
    with pytest.raises(ValueError, match="ROI"):
        pretrain_tile_classifiers(m, [TensorSource(_image(h, w, 28))], epochs=1)


def test_pretraining_reports_each_epoch_and_reporting_changes_nothing():
    """``epochs`` reports for one network, in order, each with its epoch's loss; the
    losses are the same as without a callback (the report draws no random numbers)."""
    h, w = 48, 40
    roi = torch.zeros(h, w, dtype=torch.bool)
    roi[10:20, 5:15] = True
    srcs = [TensorSource(_image(h, w, s), roi=roi) for s in (26, 27)]

    class Reports(list):
        def append_args(self, *args):
            self.append(args)

    runs = []
    for report in (None, Reports()):
        torch.manual_seed(0)
        m = ATS(ATSConfig(view_scale=0.5, subtile_size=(8, 8), **SMALL))
        history = pretrain_tile_classifiers(
            m, srcs, epochs=3, patches_per_image=4, networks=("feature",),
            generator=torch.Generator().manual_seed(1),
            on_epoch=None if report is None else report.append_args,
        )  # fmt: skip
        runs.append((history, report))
    (plain, _), (reported, seen) = runs
    assert plain == reported and len(plain["feature"]) == 3
    assert seen == [("feature", k, 3, plain["feature"][k - 1]) for k in (1, 2, 3)]


def test_max_pooled_pretraining_learns_an_roi_much_smaller_than_its_patch():
    """``pooling="max"`` trains ``a`` for patch logit = max of its map: on 1-pixel ROIs
    (bright dots, 1/256 of a 16×16 view patch) the max-pooled logit separates patches
    with and without a dot, far below the label prior's cross-entropy, where 000's mean
    pooling learns little (measured 0.09 vs 0.60 against a prior of 0.64); only the
    networks asked for change."""
    from napari_zoomin.models.pretrain import _patches

    h = w = 96
    srcs = []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        image = 0.3 * torch.rand(3, h, w, generator=g)
        roi = torch.zeros(h, w, dtype=torch.bool)
        for top, left in torch.randint(4, h - 6, (3, 2), generator=g).tolist():
            roi[top : top + 2, left : left + 2] = True  # one view pixel at s1 = 0.5
        image[:, roi] = 1.0
        srcs.append(TensorSource(image, roi=roi))
    x, y = _patches(srcs, (32, 32), 0.5, 32, 0.5, torch.Generator().manual_seed(7))
    prior = float(F.binary_cross_entropy(y.mean().expand_as(y), y))
    assert 0.2 < float(y.mean()) < 0.8
    bce = {}
    for pooling in ("max", "mean"):
        torch.manual_seed(0)
        m = ATS(ATSConfig(view_scale=0.5, subtile_size=(8, 8), **SMALL))
        before = {k: v.clone() for k, v in m.state_dict().items()}
        history = pretrain_tile_classifiers(
            m, srcs, epochs=30, patches_per_image=32, lr=1e-2, pooling=pooling,
            networks=("stage1_attention",), generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        assert set(history) == {"stage1_attention"}
        after = m.state_dict()
        for k in before:
            assert torch.equal(before[k], after[k]) == (not k.startswith("attention."))
        with torch.no_grad():
            logit_map = m.attention(x).float()
        pooled = logit_map.amax(dim=(-2, -1)) if pooling == "max" else logit_map.mean((-2, -1))
        bce[pooling] = float(F.binary_cross_entropy_with_logits(pooled, y))
    assert bce["max"] < 0.3 * prior
    assert bce["mean"] > 0.8 * prior
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'max'"):
        pretrain_tile_classifiers(m, srcs, epochs=1, pooling="median")
    with pytest.raises(ValueError, match="unknown network"):
        pretrain_tile_classifiers(m, srcs, epochs=1, networks=("g",))


def test_pretraining_patches_cover_rois_hard_negatives_and_tissue():
    """Half the patch centres on the ROI, a quarter on annotated look-alikes, the rest
    in the tissue (never on glass)."""
    from napari_zoomin.models.pretrain import _centres

    h, w = 256, 256
    roi = torch.zeros(h, w, dtype=torch.bool)
    roi[16:48, 16:48] = True
    hard = torch.zeros(h, w, dtype=torch.bool)
    hard[200:232, 16:48] = True
    tissue = torch.zeros(h, w, dtype=torch.bool)
    tissue[:, :128] = True  # the right half is glass
    src = TensorSource(_image(h, w, 5), tissue=tissue, roi=roi, hard_negatives=hard)
    centres = _centres(src, 64, 1 / 8, torch.Generator().manual_seed(0))
    assert centres.shape == (64, 2)

    def inside(c, top, left, size, margin=8):  # jitter: one view pixel of 8
        return (
            (c[:, 0] >= top - margin)
            & (c[:, 0] < top + size + margin)
            & (c[:, 1] >= left - margin)
            & (c[:, 1] < left + size + margin)
        )

    on_roi, on_hard = inside(centres, 16, 16, 32), inside(centres, 200, 16, 32)
    assert int(on_roi.sum()) >= 32 and int(on_hard.sum()) >= 16
    assert bool((centres[:, 1] < 128 + 8).all())  # nothing on the glass half
    # without hard negatives and tissue: half on the ROI, the rest anywhere
    plain = _centres(TensorSource(_image(h, w, 5), roi=roi), 64, 1 / 8, torch.Generator())
    assert int(inside(plain, 16, 16, 32).sum()) >= 32
    assert bool((plain[:, 1] >= 128).any())


def test_device_selection_never_assumes_a_gpu():
    assert select_device("cpu").type == "cpu"
    auto = select_device()
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled()
    assert not grad_scaler(torch.device("cpu")).is_enabled()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            select_device("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zoomin_runs_on_cuda_with_amp():
    m = _zoomin_tiny().to("cuda")
    src = TensorSource(_image(24, 20, 29))
    lt = m.loss([src, src], [1, 0], generator=torch.Generator().manual_seed(0))
    lt.total.backward()
    (p,) = m.predict([src], draws=2)
    assert p.probabilities.device.type == "cpu"


@pytest.mark.parametrize(
    ("padding", "stride", "shape"),
    [
        ("same", 1, (150, 131)),
        ("valid", 1, (150, 131)),
        ("same", 2, (150, 131)),
        ("same", 4, (301, 263)),
        ("same", 4, (9, 7)),
    ],
)
def test_blockwise_attention_equals_the_whole_view(padding, stride, shape):
    """Inference computes stage-1 logits only in blocks with tissue, with the same values:
    every stride, from an 8-bit view as from its floats, edges and corners included
    (where forward() replicates the border at every layer)."""
    from napari_zoomin.models.networks import AttentionNetwork

    torch.manual_seed(0)
    net = AttentionNetwork(padding=padding, stride=stride).eval()
    nn.init.normal_(net.logit.weight)
    view8 = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    view = view8.float() / 255.0
    with torch.no_grad():
        full = net(view[None])[0]
    assert tuple(full.shape) == net.map_shape(shape)
    needed = torch.rand(full.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    needed[0, 0] = needed[-1, -1] = needed[0, -1] = needed[-1, 0] = True
    needed[:8, 16:] = False  # a block without a needed cell
    for v in (view, view8):
        blocks = net.forward_blocks(v, needed, block=8)
        torch.testing.assert_close(blocks[needed], full[needed], rtol=0, atol=1e-6)
    if full.shape[1] > 24:
        assert float(blocks[:8, 16:24].abs().max()) == 0.0  # not computed


def test_blocks_of_a_view_read_as_rows_of_rgb_pixels_get_a_dense_buffer():
    """The slide reader gives a view as (h, w, 3) bytes, permuted to (3, h, w): a crop
    of it passes torch's channels-last test with a batch stride oneDNN does not accept
    as dense (its convolutions took 3× as long).  Each crop gets a buffer of its own,
    and the logits are those of the same view stored channel by channel."""
    from napari_zoomin.models.networks import AttentionNetwork, dense_channels_last

    torch.manual_seed(0)
    rgb = torch.randint(0, 256, (70, 90, 3), dtype=torch.uint8)  # what Slide.read returns
    view = rgb.permute(2, 0, 1)
    crop = view[None, :, 10:40, 0:90].float()
    assert crop.is_contiguous(memory_format=torch.channels_last)  # torch calls it dense
    assert crop.stride()[0] != 3 * 30 * 90  # but it is not
    dense = dense_channels_last(crop)
    assert dense.stride() == (3 * 30 * 90, 1, 90 * 3, 3)
    assert torch.equal(dense, crop)
    assert dense_channels_last(dense) is dense  # already dense: no copy

    net = AttentionNetwork(stride=2).eval()
    needed = torch.ones(net.map_shape((70, 90)), dtype=torch.bool)
    from_rows = net.forward_blocks(view, needed, block=16)
    from_planes = net.forward_blocks(view.contiguous(), needed, block=16)
    assert torch.equal(from_rows, from_planes)


def test_a_strided_map_places_each_cell_on_its_own_view_pixels():
    """Stride s: cell (i, j) is centred on view pixel (s·i, s·j); ROI targets average the
    cell's s² pixels, so an ROI a few view pixels across between two centres counts."""
    from napari_zoomin.models.coordinates import CellGrid
    from napari_zoomin.models.networks import AttentionNetwork

    net = AttentionNetwork(stride=4)
    assert net.stride == (4, 4) and net.offset == (0.0, 0.0) and net.radius == 7
    assert net.map_shape((100, 37)) == (25, 10)
    grid = CellGrid(
        torch.zeros(1, 2),
        (400, 148),
        (100, 37),
        net.map_shape((100, 37)),
        net.offset,
        net.stride,
        bounds=(400, 148),
    )
    # level-0 centres at 4x: view pixel 4·i ↔ level-0 4·i·(399/99)
    c = grid.centres(torch.tensor([0, 1, 10]))
    assert c.tolist() == [[0, 0], [0, 16], [16, 0]]
    roi = torch.zeros(100, 37)
    roi[5:7, 9:11] = 1.0  # 2 × 2 view pixels, no cell centre on them (centres: 4, 8, ...)
    assert float(grid.cell_values(roi).sum()) == 0.0
    mean = grid.cell_values(roi, mean=True)
    # cell (1, 2) covers rows 2..5, cols 6..9; cell (1, 3) rows 2..5, cols 10..13; ...
    assert mean[1, 2] == pytest.approx(1 / 16) and mean[1, 3] == pytest.approx(1 / 16)
    assert float(mean.sum()) * 16 == pytest.approx(4.0)  # the ROI's 4 pixels, all counted


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"attention_stride": 3}, "attention_stride must be one of"),
        ({"attention_stride": 4, "attention_padding": "valid"}, "needs attention_padding"),
        ({"attention_stride": 4, "attention_layers": 1}, "attention_layers of at least 2"),
    ],
)
def test_impossible_strides_are_refused_before_a_network_is_built(settings, words):
    with pytest.raises(ValueError, match=words):
        ZoomInConfig(**settings)


def test_stage1_skips_glass_blocks_at_inference_with_identical_alpha():
    h, w = 96, 80
    torch.manual_seed(0)
    m = ZoomIn(
        ZoomInConfig(
            view_scale=1.0, stage2_scale=0.5, tile_size=(16, 16), subtile_size=(8, 8), **SMALL
        )
    )
    nn.init.normal_(m.attention.logit.weight)
    src = TensorSource(_image(h, w, 3), tissue=_tissue(h, w))
    trained = m.stage1([src])[0]  # with gradients: the whole view
    with torch.no_grad():
        inferred = m.stage1([src])[0]
    torch.testing.assert_close(inferred.attention, trained.attention.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_standardised_layers_ignore_a_shift_common_to_a_units_weights(layer):
    """What cures the cold start of label-only training: Adam's first steps move all the
    weights of a unit by about the same amount; a standardised unit does not see that."""
    from napari_zoomin.models.networks import StandardisedConv2d, StandardisedLinear

    torch.manual_seed(0)
    if layer == "linear":
        m, x = StandardisedLinear(50, 7), torch.rand(16, 50)  # post-ReLU inputs: all ≥ 0
    else:
        m, x = StandardisedConv2d(3, 7, 4), torch.rand(16, 3, 12, 12)
    before = m(x)
    w = m.weight.detach()
    flat = w.reshape(w.shape[0], -1)
    effective = (flat - flat.mean(1, keepdim=True)) / flat.std(1, correction=0, keepdim=True)
    expected = effective * (2 / flat.shape[1]) ** 0.5  # zero mean, variance 2/fan_in
    if layer == "linear":
        assert torch.allclose(before, F.linear(x, expected, m.bias), atol=1e-5)
    else:
        assert torch.allclose(before, F.conv2d(x, expected.view_as(w), m.bias), atol=1e-5)
    with torch.no_grad():
        shift = torch.randn(w.shape[0]).view(-1, *([1] * (w.dim() - 1)))
        m.weight.add_(shift).mul_(3.0)  # a per-unit shift, then a common scale
    after = m(x)
    assert torch.allclose(before, after, atol=1e-4)
    plain = nn.Linear(50, 7) if layer == "linear" else nn.Conv2d(3, 7, 4)
    with torch.no_grad():
        plain.weight.copy_(w)
        plain.bias.copy_(m.bias)
        moved = plain(x)
        plain.weight.add_(0.01)  # one Adam-sized step on every weight, the same way
    assert (plain(x) - moved).abs().mean() > 0.05  # a plain unit shifts on every input


def test_feature_standardise_gives_diverse_features_with_the_plain_lenets_keys():
    """``feature_standardise=True``: every layer of ``f`` standardised, the state-dict
    keys of the plain LeNet (checkpoints load either), and sub-tile features that do not
    all start in one direction as the plain LeNet's do."""
    torch.manual_seed(0)
    plain = ZoomIn(ZoomInConfig(**SMALL, subtile_size=(16, 16), tile_size=(32, 32)))
    torch.manual_seed(0)
    model = ZoomIn(
        ZoomInConfig(**SMALL, subtile_size=(16, 16), tile_size=(32, 32), feature_standardise=True)
    )
    assert list(model.feature.state_dict()) == list(plain.feature.state_dict())
    kinds = {type(m).__name__ for m in model.feature.modules()}
    assert {"StandardisedConv2d", "StandardisedLinear"} <= kinds
    assert not kinds & {"Conv2d", "Linear"}
    x = torch.rand(64, 3, 16, 16)
    z = model.feature(x)
    assert torch.allclose(z.norm(dim=1), torch.ones(64), atol=1e-5)
    cosine = (z @ z.T).fill_diagonal_(0).sum() / (64 * 63)
    plain_z = plain.feature(x)
    plain_cosine = (plain_z @ plain_z.T).fill_diagonal_(0).sum() / (64 * 63)
    assert cosine < 0.8 < 0.95 < plain_cosine  # the plain LeNet starts near one direction
