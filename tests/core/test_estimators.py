"""Exact proofs (no Monte Carlo) that the estimators are unbiased in value and gradient.

Every ordered draw is enumerated with its exact probability (with replacement:
``Π a_{i_k}``; without: ``Π a_{i_k} / (1 − S_{k−1})``), the estimator's value and
autograd gradients are computed for it, and the probability-weighted sums are
compared with the full model ``Σ_k a_k f_k`` (ATS eq. 1, Zoom-In eq. 5): value, the
gradient through a softmax over logits, and the gradient with respect to the
features.  Everything in float64, tolerance 1e-6 (the agreement is ~1e-15).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from napari_zoomin.sampling import expected_features, sample, two_stage_expected_features
from napari_zoomin.sampling.estimators import (
    priority_weights,
    undrawn_mass,
    without_replacement_weights,
)
from napari_zoomin.sampling.sampler import (
    draws_to_counts,
    sample_with_threshold,
    subtile_draw_counts,
)

TOL = 1e-6
D = 3


def _setup(k: int, seed: int, masked: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=g, dtype=torch.float64)
    features = torch.randn(k, D, generator=g, dtype=torch.float64)
    mask = torch.zeros(k, dtype=torch.bool)
    mask[list(masked)] = True
    return logits, features, mask


def _attention(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)


def _jacobians(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d output_d / d input, stacked over the D output components."""
    rows = [torch.autograd.grad(output[d], inputs, retain_graph=True) for d in range(D)]
    return [torch.stack([r[i] for r in rows]) for i in range(len(inputs))]


def _full_model(logits, features, mask):
    logits = logits.clone().requires_grad_(True)
    features = features.clone().requires_grad_(True)
    a = _attention(logits, mask)
    value = a @ features
    return value.detach(), _jacobians(value, [logits, features])


def _ordered_draws(a: torch.Tensor, n: int, replace: bool):
    """Every ordered draw of n cells with its exact probability."""
    k = a.numel()
    if replace:
        for seq in itertools.product(range(k), repeat=n):
            p = float(torch.prod(a[list(seq)]))
            if p > 0:
                yield seq, p
        return
    for seq in itertools.permutations(range(k), n):
        p, used = 1.0, 0.0
        for i in seq:
            p *= float(a[i]) / (1.0 - used)
            used += float(a[i])
        if p > 0:
            yield seq, p


def _enumerate_estimator(logits, features, mask, n, replace, estimator=expected_features):
    a = _attention(logits, mask).detach()
    total_p, value, jac_logits, jac_features = 0.0, 0.0, 0.0, 0.0
    for seq, p in _ordered_draws(a, n, replace):
        lg = logits.clone().requires_grad_(True)
        ft = features.clone().requires_grad_(True)
        att = _attention(lg, mask)
        idx = torch.tensor([seq])
        est = estimator(att[None], idx, ft[idx], replace)[0]
        jl, jf = _jacobians(est, [lg, ft])
        total_p += p
        value = value + p * est.detach()
        jac_logits = jac_logits + p * jl
        jac_features = jac_features + p * jf
    assert total_p == pytest.approx(1.0, abs=1e-12)
    return value, [jac_logits, jac_features]


@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_stage_estimator_is_exactly_unbiased(n, replace, seed):
    logits, features, mask = _setup(5, seed)
    full_value, (full_jl, full_jf) = _full_model(logits, features, mask)
    value, (jl, jf) = _enumerate_estimator(logits, features, mask, n, replace)
    torch.testing.assert_close(value, full_value, atol=TOL, rtol=0)
    torch.testing.assert_close(jl, full_jl, atol=TOL, rtol=0)
    torch.testing.assert_close(jf, full_jf, atol=TOL, rtol=0)


@pytest.mark.parametrize("replace", [True, False])
def test_one_stage_estimator_unbiased_with_masked_cells(replace):
    """Masked cells have probability exactly 0: never drawn, and the proof still holds."""
    logits, features, mask = _setup(5, 3, masked=(1, 4))
    full_value, (full_jl, full_jf) = _full_model(logits, features, mask)
    value, (jl, jf) = _enumerate_estimator(logits, features, mask, 3, replace)
    torch.testing.assert_close(value, full_value, atol=TOL, rtol=0)
    torch.testing.assert_close(jl, full_jl, atol=TOL, rtol=0)
    torch.testing.assert_close(jf, full_jf, atol=TOL, rtol=0)


def _published_without_replacement(attention, indices, features, replace):
    """The estimator of the public ATS port: inclusive cumulative sum, plain gradients."""
    a = attention.gather(1, indices)
    s_inclusive = torch.cumsum(a, dim=1)
    n = a.shape[1]
    t = [
        (a[:, :k, None] * features[:, :k]).sum(1)
        + (1 - s_inclusive[:, k - 1, None]) * features[:, k]
        for k in range(n)
    ]
    return torch.stack(t, 1).mean(1)


def test_enumeration_detects_the_published_defect():
    """The proof has teeth: the public port's estimator fails the same exact check."""
    logits, features, mask = _setup(5, 0)
    full_value, (full_jl, _) = _full_model(logits, features, mask)
    value, (jl, _) = _enumerate_estimator(
        logits, features, mask, 3, False, estimator=_published_without_replacement
    )
    assert (value - full_value).abs().max() > 1e-3 or (jl - full_jl).abs().max() > 1e-3


def test_without_replacement_weights_padding_has_no_effect():
    a = torch.tensor([[0.3, 0.2, 0.1, 0.05]], dtype=torch.float64, requires_grad=True)
    w_full = without_replacement_weights(a[:, :2])
    w_padded = without_replacement_weights(a, torch.tensor([2]))
    torch.testing.assert_close(w_padded[:, :2], w_full)
    assert torch.all(w_padded[:, 2:] == 0)
    w_padded.sum().backward()
    assert torch.all(a.grad[:, 2:] == 0)


def test_without_replacement_weights_with_the_undrawn_mass_match_one_minus_s():
    """On an ordinary map both ways of counting the mass left give the same weights."""
    a = torch.softmax(torch.randn(2, 6, generator=torch.Generator().manual_seed(3)), -1)
    idx = torch.tensor([[4, 1, 0], [2, 5, 3]])
    drawn = a.gather(1, idx)
    torch.testing.assert_close(
        without_replacement_weights(drawn, undrawn=undrawn_mass(a, idx)),
        without_replacement_weights(drawn),
    )
    assert torch.allclose(undrawn_mass(a, idx), 1 - drawn.sum(1))


def test_the_undrawn_mass_of_a_gigapixel_map_is_summed_a_row_at_a_time(monkeypatch):
    """Above ``UNDRAWN_ROWS_AT_ONCE`` cells one row is copied at a time (ATS's 16 draws
    on a 100,000² slide held 2 GB more): the same mass, padding draws left out, and
    still summed from the small terms (a peaked map's mass left is not rounding noise)."""
    from napari_zoomin.sampling import estimators

    gen = torch.Generator().manual_seed(4)
    a = torch.softmax(torch.randn(3, 4, 40, generator=gen) * 30, -1)
    idx = torch.stack([torch.randperm(40, generator=gen)[:6] for _ in range(12)]).reshape(3, 4, 6)
    valid = torch.rand(3, 4, 6, generator=gen) < 0.7
    together = undrawn_mass(a, idx, valid)
    monkeypatch.setattr(estimators, "UNDRAWN_ROWS_AT_ONCE", 10)
    by_row = undrawn_mass(a, idx, valid)
    torch.testing.assert_close(by_row, together, rtol=1e-6, atol=0)
    assert torch.equal(undrawn_mass(a, idx), estimators._undrawn_mass_by_row(a, idx, None))
    peaked = torch.softmax(torch.tensor([[0.0, -1.0, -90.0, -95.0]]), -1)
    left = estimators._undrawn_mass_by_row(peaked, torch.tensor([[0, 1]]), None)
    assert float(left) == pytest.approx(float(peaked[0, 2:].sum()), rel=1e-6) and left > 0


@pytest.mark.parametrize("gap", [80.0, 95.0, 102.0])
def test_peaked_subtile_map_keeps_weights_positive_and_gradients_finite(gap):
    """A tile drawn 4 times has 4 sub-tiles drawn without replacement, but its map has
    2 sizeable cells: the other draws take cells of β ≈ e^−gap (10⁻³⁵, and denormal
    10⁻⁴² and 10⁻⁴⁵).  Counting the mass left as ``1 − S`` gave them weights of −3·10⁻⁸
    (rounding noise), and the denormal ones a NaN gradient: what stopped a digits
    training run at its 15th epoch."""
    tile_logits = torch.zeros(1, 2, requires_grad=True)
    sub_logits = torch.tensor([[[0.0, -0.8474] + [-gap] * 14]], requires_grad=True)
    beta = torch.softmax(sub_logits, -1)
    draws = torch.tensor([[[0, 1, 2, 3]]])
    assert 0 < float(beta.detach()[0, 0, 2]) < 1e-34
    feats = torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(0))
    z = two_stage_expected_features(
        torch.softmax(tile_logits, -1),
        torch.tensor([[0]]),
        torch.tensor([[4]]),
        beta,
        draws,
        feats,
    )
    (100 * z).sum().backward()
    assert torch.isfinite(sub_logits.grad).all() and torch.isfinite(tile_logits.grad).all()
    b = beta.detach()[0]
    w = without_replacement_weights(b.gather(1, draws[0]), undrawn=undrawn_mass(b, draws[0]))
    assert bool((w > 0).all())
    assert abs(float(w.sum()) - 1) < 1e-6


# ---- two stages ----------------------------------------------------------------------

K1, K2 = 3, 3


def _two_stage_setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    tile_logits = torch.randn(K1, generator=g, dtype=torch.float64)
    sub_logits = torch.randn(K1, K2, generator=g, dtype=torch.float64)
    features = torch.randn(K1, K2, D, generator=g, dtype=torch.float64)
    # Tile 1 has one masked sub-cell, tile 2 only one non-zero sub-cell: with N >= 2
    # its draws are capped at nnz(β^c) = 1, which must not bias anything.
    sub_mask = torch.tensor([[False, False, False], [False, True, False], [True, False, True]])
    return tile_logits, sub_logits, features, sub_mask


def _two_stage_attention(tile_logits, sub_logits, sub_mask):
    alpha = torch.softmax(tile_logits, dim=-1)
    beta = torch.softmax(sub_logits.masked_fill(sub_mask, float("-inf")), dim=-1)
    return alpha, beta


def _two_stage_full(tile_logits, sub_logits, features, sub_mask):
    inputs = [x.clone().requires_grad_(True) for x in (tile_logits, sub_logits, features)]
    alpha, beta = _two_stage_attention(inputs[0], inputs[1], sub_mask)
    value = torch.einsum("c,cs,csd->d", alpha, beta, inputs[2])
    return value.detach(), _jacobians(value, inputs)


def _two_stage_enumerated(
    tile_logits, sub_logits, features, sub_mask, n, replace=True, baseline=False, moments=False
):
    """Probability-weighted value and Jacobians over every two-stage draw; with
    ``moments``, also the expected squared β-logit Jacobian (for variances)."""
    alpha, beta = (x.detach() for x in _two_stage_attention(tile_logits, sub_logits, sub_mask))
    total_p, value, jacs, beta_sq = 0.0, 0.0, [0.0, 0.0, 0.0], 0.0
    for tiles, p_tiles in _ordered_draws(alpha, n, replace=replace):
        if replace:
            cells, counts = draws_to_counts(torch.tensor([tiles]))
        else:  # distinct tiles in draw order, one sub-tile each
            cells, counts = torch.tensor([tiles]), torch.ones(1, n, dtype=torch.long)
        n_sub = subtile_draw_counts(beta[cells], counts)[0]
        t = cells.shape[1]
        per_tile = [
            list(_ordered_draws(beta[int(cells[0, j])], int(n_sub[j]), replace=False))
            for j in range(t)
        ]
        m = int(n_sub.max())
        for combo in itertools.product(*per_tile):
            p = p_tiles
            sub_idx = torch.zeros(1, t, m, dtype=torch.long)
            for j, (seq, p_sub) in enumerate(combo):
                p *= p_sub
                sub_idx[0, j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            inputs = [x.clone().requires_grad_(True) for x in (tile_logits, sub_logits, features)]
            a, b = _two_stage_attention(inputs[0], inputs[1], sub_mask)
            feats = inputs[2][cells[0][:, None], sub_idx[0]][None]  # (1, T, M, D)
            est = two_stage_expected_features(
                a[None],
                cells,
                counts,
                b[cells[0]][None],
                sub_idx,
                feats,
                replace=replace,
                subtile_baseline=baseline,
            )[0]
            for i, jac in enumerate(_jacobians(est, inputs)):
                jacs[i] = jacs[i] + p * jac
                if i == 1:
                    beta_sq = beta_sq + p * jac**2
            value = value + p * est.detach()
            total_p += p
    assert total_p == pytest.approx(1.0, abs=1e-12)
    return (value, jacs, beta_sq) if moments else (value, jacs)


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_two_stage_estimator_is_exactly_unbiased(n, seed, replace, baseline):
    """3 tiles × 3 sub-cells: value and gradients wrt α logits, β logits and features,
    with stage 1 drawing with replacement (000) or without (N distinct tiles), with
    and without the sub-tile control variate."""
    tile_logits, sub_logits, features, sub_mask = _two_stage_setup(seed)
    full_value, full_jacs = _two_stage_full(tile_logits, sub_logits, features, sub_mask)
    value, jacs = _two_stage_enumerated(
        tile_logits, sub_logits, features, sub_mask, n, replace, baseline
    )
    torch.testing.assert_close(value, full_value, atol=TOL, rtol=0)
    for jac, full in zip(jacs, full_jacs, strict=True):
        torch.testing.assert_close(jac, full, atol=TOL, rtol=0)


@pytest.mark.parametrize("replace", [True, False])
def test_subtile_baseline_lowers_the_beta_gradient_variance(replace):
    """Features sharing a common part (as unit-norm features of one image do): the
    exact variance of the β-logit gradient, summed, falls with the control variate."""
    tile_logits, sub_logits, features, sub_mask = _two_stage_setup(0)
    features = features * 0.3 + torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)
    variances = []
    for baseline in (False, True):
        _, jacs, sq = _two_stage_enumerated(
            tile_logits, sub_logits, features, sub_mask, 3, replace, baseline, moments=True
        )
        variances.append(float((sq - jacs[1] ** 2).sum()))
    assert variances[1] < 0.6 * variances[0], variances


def test_estimators_reject_inconsistent_input():
    a = torch.tensor([[0.5, 0.5, 0.0]])
    f = torch.ones(1, 1, 2)
    with pytest.raises(ValueError, match="zero attention"):
        expected_features(a, torch.tensor([[2]]), f, replace=True)
    with pytest.raises(ValueError, match="shapes"):
        expected_features(a, torch.tensor([[0, 1]]), f, replace=True)


# ---- priority weights (Gumbel-top-k with its threshold, Kool et al. 2019 §4) ---------


def _priority_rows(logits: torch.Tensor, n: int, rows: int, seed: int):
    """``rows`` independent Gumbel-top-k draws of ``softmax(logits)``, with κ."""
    a = torch.softmax(logits, dim=0)
    g = torch.Generator().manual_seed(seed)
    idx, kappa = sample_with_threshold(a.detach().expand(rows, -1).contiguous(), n, g)
    return a, idx, kappa


def test_priority_estimate_is_unbiased_in_value_and_gradient():
    """Monte Carlo over 200,000 seeded draws (κ is continuous, so no enumeration): the
    value and the gradient with respect to the logits are within 4 standard errors of
    ``Σ a f`` and its gradient, each row's gradient written out by hand."""
    k, n, d, rows = 6, 3, 2, 200_000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
    f = torch.randn(k, d, generator=g, dtype=torch.float64)
    a, idx, kappa = _priority_rows(logits, n, rows, seed=1)
    w = priority_weights(a[idx], kappa)  # (rows, n)
    z = torch.einsum("rn,rnd->rd", w, f[idx])
    exact = a @ f
    mean, se = z.mean(0), z.std(0) / rows**0.5
    assert torch.all((mean - exact).abs() <= 4 * se), (mean, exact, se)
    # per row: d(Σ_d z_d)/d logits = Σ_{i∈S} (Σ_d f_i)/q_i · a_i (e_i − a)
    c = f.sum(1)
    q = (a[idx] / w).detach()  # (rows, n)
    jac = a.detach()[:, None] * (torch.eye(k, dtype=a.dtype) - a.detach()[None, :])  # da_i/dθ
    per_row = torch.einsum("rn,rnk->rk", c[idx] / q, jac[idx])
    (grad,) = torch.autograd.grad(z.sum(1).mean(), logits, retain_graph=True)
    assert torch.allclose(grad, per_row.mean(0))  # autograd computes the written-out rule
    (true,) = torch.autograd.grad(exact.sum(), logits)
    gse = per_row.std(0) / rows**0.5
    assert torch.all((per_row.mean(0) - true).abs() <= 4 * gse), (per_row.mean(0), true, gse)


def test_priority_estimate_is_the_exact_sum_once_every_nonzero_cell_is_drawn():
    a = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]])
    f = torch.tensor([[1.0], [9.0], [2.0], [3.0], [9.0]])
    idx, kappa = sample_with_threshold(a, 3, torch.Generator().manual_seed(0))
    assert kappa.item() == -float("inf")
    w = priority_weights(a.gather(1, idx), kappa)
    assert torch.equal(w, a.gather(1, idx))
    assert torch.isclose(w[0] @ f[idx[0], 0], torch.tensor(0.5 + 0.6 + 0.6))


def test_sample_with_threshold_draws_what_sample_draws():
    a = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(2)), 1)
    plain = sample(a, 7, replace=False, generator=torch.Generator().manual_seed(3))
    idx, kappa = sample_with_threshold(a, 7, torch.Generator().manual_seed(3))
    assert torch.equal(plain, idx) and kappa.shape == (4,) and kappa.dtype == torch.float64
    assert bool(torch.isfinite(kappa).all())


def test_priority_weights_vary_far_less_than_sequential_once_the_attended_cells_are_drawn():
    """Five cells hold 95 % of the attention (five digits), 95 share the rest, N = 10:
    every draw takes the five, and the priority estimate is almost their exact sum,
    where the sequential one still weighs the first drawn more than the last."""
    a = torch.cat([torch.full((5,), 0.19), torch.full((95,), 0.05 / 95)]).double()[None]
    f = torch.randn(100, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows = 4000
    idx, kappa = sample_with_threshold(a.expand(rows, -1), 10, torch.Generator().manual_seed(6))
    drawn = a[0][idx]
    prio = torch.einsum("rn,rnd->rd", priority_weights(drawn, kappa), f[idx])
    seq_w = without_replacement_weights(drawn, undrawn=undrawn_mass(a.expand(rows, -1), idx))
    seq = torch.einsum("rn,rnd->rd", seq_w, f[idx])
    exact = a[0] @ f
    for z in (prio, seq):  # both unbiased
        assert torch.all((z.mean(0) - exact).abs() <= 4 * z.std(0) / rows**0.5 + 1e-12)
    assert float(prio.var(0).sum()) < 0.1 * float(seq.var(0).sum())


def test_two_stage_estimator_uses_priority_weights_for_the_tiles():
    """With ``tile_threshold`` the tiles are weighed ``α/q`` and the sub-tiles as before."""
    g = torch.Generator().manual_seed(7)
    alpha = torch.softmax(torch.randn(1, 8, generator=g), 1)
    tiles, kappa = sample_with_threshold(alpha, 3, g)
    drawn = alpha.gather(1, tiles)
    beta = torch.softmax(torch.randn(1, 3, 4, generator=g), -1)
    sub = torch.randint(0, 4, (1, 3, 1), generator=g)
    feats = torch.randn(1, 3, 1, 2, generator=g)
    counts = torch.ones(1, 3, dtype=torch.long)
    positions = torch.arange(3)[None]
    z = two_stage_expected_features(
        drawn, positions, counts, beta, sub, feats, replace=False, tile_threshold=kappa
    )
    expected = torch.einsum("bt,btd->bd", priority_weights(drawn, kappa), feats[:, :, 0])
    assert torch.allclose(z, expected)
    with pytest.raises(ValueError, match="tile_threshold needs replace=False"):
        two_stage_expected_features(
            drawn, positions, counts, beta, sub, feats, replace=True, tile_threshold=kappa
        )
