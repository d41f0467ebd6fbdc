"""The sampler draws from exactly the distribution the estimators divide by.

Frequencies are checked with chi-square tests against the exact probabilities
(first draw ``a_i``, second draw ``Σ_i a_i a_j / (1 − a_i)``, ordered pairs
``a_i a_j / (1 − a_i)``), at a significance level of 1e-4 with fixed seeds.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chi2

from napari_zoomin.sampling import sample
from napari_zoomin.sampling.sampler import draw_log_probabilities, draws_to_counts, sample_subtiles

ATTENTION = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03], dtype=torch.float64)
DRAWS = 40_000
ALPHA = 1e-4


def _chi_square_ok(observed: torch.Tensor, expected_p: torch.Tensor) -> bool:
    n = observed.sum()
    keep = expected_p > 0
    expected = expected_p[keep] * n
    stat = float((((observed[keep] - expected) ** 2) / expected).sum())
    assert int(observed[~keep].sum()) == 0, "a zero-probability outcome was drawn"
    return chi2.sf(stat, int(keep.sum()) - 1) > ALPHA


def _rows(n_rows: int, a: torch.Tensor = ATTENTION) -> torch.Tensor:
    return a.expand(n_rows, -1).contiguous()


def test_with_replacement_frequencies_match_attention():
    draws = sample(_rows(DRAWS // 4), 4, replace=True, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(draws.reshape(-1), minlength=6).double()
    assert _chi_square_ok(counts, ATTENTION)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_large_maps_drawn_in_two_levels_give_the_one_level_draws(chunk):
    """A gigapixel slide's map is drawn a chunk, then a cell (no cumulative sum over
    millions of cells): the same cells as one level for the same generator, zero cells
    and whole zero chunks never drawn, the last chunk shorter than the others."""
    from napari_zoomin.sampling.sampler import _sample_chunked, _sample_with_replacement

    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        k = int(torch.randint(1, 300, (), generator=gen))
        a = torch.rand(3, k, generator=gen) ** 6
        a[torch.rand(3, k, generator=gen) < 0.3] = 0.0
        if trial % 4 == 0:
            a[:, : k // 2] = 0.0  # whole zero chunks
        a[:, -1] += 1e-3
        a = a / a.sum(1, keepdim=True)
        two = _sample_chunked(a, 60, torch.Generator().manual_seed(trial), chunk)
        one = _sample_with_replacement(a, 60, torch.Generator().manual_seed(trial), 10**9)
        assert torch.equal(two, one)
        assert bool((a.gather(1, two) > 0).all())
    big = torch.rand(2, 70 * 1024, generator=gen) ** 8  # sample() takes two levels here
    big[:, 5000:9000] = 0.0
    big = big / big.sum(1, keepdim=True)
    drawn = sample(big, 500, True, torch.Generator().manual_seed(5))
    assert torch.equal(
        drawn, _sample_with_replacement(big, 500, torch.Generator().manual_seed(5), 10**9)
    )
    counts = torch.bincount(
        sample(big[:1], 40_000, True, torch.Generator().manual_seed(6))[0] // 7168, minlength=10
    )
    assert _chi_square_ok(counts.double(), big[0].reshape(10, -1).sum(1).double())


def test_without_replacement_first_and_second_draw_marginals():
    draws = sample(_rows(DRAWS), 2, replace=False, generator=torch.Generator().manual_seed(2))
    a = ATTENTION
    first = torch.bincount(draws[:, 0], minlength=6).double()
    assert _chi_square_ok(first, a)
    second_p = sum(a[i] * a / (1 - a[i]) * (torch.arange(6) != i) for i in range(6))
    second = torch.bincount(draws[:, 1], minlength=6).double()
    assert _chi_square_ok(second, second_p)
    pair_p = torch.zeros(36, dtype=torch.float64)
    for i, j in itertools.permutations(range(6), 2):
        pair_p[i * 6 + j] = a[i] * a[j] / (1 - a[i])
    pairs = torch.bincount(draws[:, 0] * 6 + draws[:, 1], minlength=36).double()
    assert _chi_square_ok(pairs, pair_p)


def test_gumbel_noise_is_added_to_log_probabilities():
    """The official Zoom-In code perturbs probabilities: its top cell is then drawn first
    almost never; on log-probabilities it is drawn first with its probability."""
    a = torch.tensor([0.66] + [0.34 / 30] * 30, dtype=torch.float64)
    draws = sample(_rows(20_000, a), 3, replace=False, generator=torch.Generator().manual_seed(3))
    assert float((draws[:, 0] == 0).double().mean()) == pytest.approx(0.66, abs=0.015)


def test_without_replacement_draws_are_distinct_and_ordered():
    a = torch.softmax(torch.randn(50, 20, generator=torch.Generator().manual_seed(4)), dim=1)
    draws = sample(a, 20, replace=False, generator=torch.Generator().manual_seed(5))
    assert draws.dtype == torch.int64 and draws.shape == (50, 20)
    assert all(len(set(row.tolist())) == 20 for row in draws)


@pytest.mark.parametrize("replace", [True, False])
def test_masked_cells_are_never_drawn(replace):
    a = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0], dtype=torch.float32)
    draws = sample(_rows(5000, a), 3, replace=replace, generator=torch.Generator().manual_seed(6))
    assert set(draws.unique().tolist()) <= {1, 3, 4}
    if not replace:
        assert set(draws.unique().tolist()) == {1, 3, 4}


def test_too_many_distinct_draws_is_a_clear_error():
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    with pytest.raises(ValueError, match=r"n=3 .* only 2 cells with non-zero probability"):
        sample(a, 3, replace=False)
    assert sample(a, 3, replace=True).shape == (2, 3)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("replace", [True, False])
def test_invalid_attention_is_rejected(bad, replace):
    """Negative, NaN and infinite values anywhere in any row (one pass finds them)."""
    a = torch.full((3, 50), 0.02)
    a[2, 17] = bad
    with pytest.raises(ValueError, match="finite and non-negative"):
        sample(a, 1, replace=replace)
    with pytest.raises(ValueError, match="row 1 has no cell with non-zero probability"):
        sample(torch.tensor([[0.5, 0.5], [0.0, 0.0]]), 1, replace=replace)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sample(torch.tensor([0.5, 0.5]), 1, replace=True)


@pytest.mark.parametrize("replace", [True, False])
def test_seeded_generator_makes_draws_deterministic(replace):
    a = torch.softmax(torch.randn(8, 30, generator=torch.Generator().manual_seed(7)), dim=1)
    d1 = sample(a, 5, replace, generator=torch.Generator().manual_seed(11))
    d2 = sample(a, 5, replace, generator=torch.Generator().manual_seed(11))
    d3 = sample(a, 5, replace, generator=torch.Generator().manual_seed(12))
    assert torch.equal(d1, d2)
    assert not torch.equal(d1, d3)


def test_draws_to_counts():
    draws = torch.tensor([[3, 1, 3, 3], [0, 2, 5, 7]])
    cells, counts = draws_to_counts(draws)
    assert cells.tolist() == [[1, 3, 0, 0], [0, 2, 5, 7]]
    assert counts.tolist() == [[1, 3, 0, 0], [1, 1, 1, 1]]
    assert counts.sum(1).tolist() == [4, 4]


def test_subtile_draws_are_capped_per_tile_and_distinct():
    beta = torch.tensor(
        [[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]],
        dtype=torch.float64,
    )
    counts = torch.tensor([[3, 2, 4]])
    idx, n_sub = sample_subtiles(beta, counts, generator=torch.Generator().manual_seed(8))
    assert n_sub.tolist() == [[2, 2, 1]]
    assert idx.shape == (1, 3, 2)
    assert sorted(idx[0, 0].tolist()) == [0, 1]
    assert len(set(idx[0, 1].tolist())) == 2
    assert idx[0, 2, 0] == 0


def test_draw_log_probabilities_are_the_sequence_probabilities_by_enumeration():
    """Every ordered sequence of 3 distinct draws from the 6 cells: the row sums of
    :func:`draw_log_probabilities` are a distribution (sum 1), the one :func:`sample`
    draws (chi-square over 40,000 sequences), and REINFORCE on them is unbiased: the
    probability-weighted score times an arbitrary reward table is ``∇ E[R]``."""
    a = ATTENTION[None]
    seqs = torch.tensor(list(itertools.permutations(range(6), 3)))  # (120, 3)
    log_p = draw_log_probabilities(a.expand(len(seqs), -1), seqs, replace=False)
    probs = log_p.sum(1).exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    draws = sample(_rows(DRAWS), 3, replace=False, generator=torch.Generator().manual_seed(4))
    code = (seqs[:, 0] * 36 + seqs[:, 1] * 6 + seqs[:, 2]).tolist()
    drawn = torch.bincount(draws[:, 0] * 36 + draws[:, 1] * 6 + draws[:, 2], minlength=216)
    assert _chi_square_ok(drawn[code].double(), probs)

    logits = torch.log(ATTENTION)[None].clone().requires_grad_(True)
    reward = torch.rand(len(seqs), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    log_p = draw_log_probabilities(torch.softmax(logits, 1).expand(len(seqs), -1), seqs, False)
    (expected,) = torch.autograd.grad(
        (log_p.sum(1).exp() * reward).sum(), logits, retain_graph=True
    )
    (score,) = torch.autograd.grad(
        (log_p.sum(1) * log_p.sum(1).exp().detach() * reward).sum(), logits
    )
    torch.testing.assert_close(score, expected)


def test_draw_log_probabilities_with_replacement_padding_and_a_peaked_map():
    """With replacement each draw is ``log a``; padding draws count 0; without
    replacement, after draws holding all but 1e-9 of a float32 map, the next draw's
    conditional is exact (``1 − S`` would be rounding noise) and its gradient finite."""
    a = ATTENTION[None]
    idx = torch.tensor([[0, 0, 5]])
    torch.testing.assert_close(draw_log_probabilities(a, idx, True), torch.log(a[:, [0, 0, 5]]))
    valid = torch.tensor([[True, True, False]])
    got = draw_log_probabilities(a, torch.tensor([[2, 1, 0]]), False, valid)
    torch.testing.assert_close(
        got, torch.log(torch.tensor([[0.15, 0.25 / 0.85, 1.0]], dtype=torch.float64))
    )

    logits = torch.tensor([[0.0, -20.7, -21.0, -40.0]], requires_grad=True)  # float32
    peaked = torch.softmax(logits, 1)
    log_p = draw_log_probabilities(peaked, torch.tensor([[0, 1, 2]]), False)
    a64 = torch.softmax(logits.detach().double(), 1)[0]
    want = torch.log(a64[2] / (a64[2] + a64[3]))  # given cells 0 and 1 drawn
    assert abs(float(log_p.detach()[0, 2]) - float(want)) < 1e-5
    log_p.sum().backward()
    assert torch.isfinite(logits.grad).all()
