"""Losses and attention distributions: signs, masks, normalisations."""

from __future__ import annotations

import math

import pytest
import torch

from napari_zoomin.models.distributions import (
    attention_distribution,
    complement_distribution,
    entropy,
)
from napari_zoomin.models.losses import (
    attention_mse,
    classification_loss,
    contrastive_loss,
    entropy_regulariser,
    leave_one_out_policy_gradient_loss,
    mask_target,
    policy_gradient_loss,
    sequence_policy_gradient_loss,
)


@pytest.mark.parametrize("weight", [1e-2, -1e-2])
def test_entropy_regulariser_sign_by_gradient_step(weight):
    """Gradient descent on ``λ Σ p log p`` raises the entropy for λ > 0 (000 eq. 10)."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    p = attention_distribution(logits)
    loss = entropy_regulariser(p, weight)
    assert float(loss.detach()) == pytest.approx(-weight * float(entropy(p.detach()).sum()))
    loss.backward()
    with torch.no_grad():
        stepped = attention_distribution(logits - 10.0 * logits.grad)
    change = float(entropy(stepped).sum() - entropy(p.detach()).sum())
    assert change > 0 if weight > 0 else change < 0


def test_entropy_of_masked_maps_has_finite_gradients():
    logits = torch.zeros(1, 6, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False, True]])
    p = attention_distribution(logits, mask)
    assert float(entropy(p.detach())) == pytest.approx(math.log(4))
    entropy_regulariser(p, 1.0).backward()
    assert torch.isfinite(logits.grad).all()


def test_attention_distribution_masks_exactly_and_mixes_over_tissue_only():
    logits = torch.randn(2, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 1:, 2:] = True
    mask[1] = True
    p = attention_distribution(logits, mask, uniform_mix=0.1)
    assert p.shape == (2, 12)
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    assert torch.all(p[0][~mask[0].reshape(-1)] == 0)
    assert torch.all(p[0][mask[0].reshape(-1)] >= 0.1 / 4)
    # an all-background map falls back to every cell rather than NaN
    empty = attention_distribution(logits[:1], torch.zeros(1, 3, 4, dtype=torch.bool))
    torch.testing.assert_close(empty, torch.softmax(logits[:1].reshape(1, -1), 1))


def test_complement_distribution_is_one_minus_attention_over_tissue():
    a = torch.tensor([[0.5, 0.3, 0.0, 0.2]])
    mask = torch.tensor([[True, True, False, True]])
    c = complement_distribution(a, mask)
    torch.testing.assert_close(c, torch.tensor([[0.5, 0.7, 0.0, 0.8]]) / 2.0)
    only = complement_distribution(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]))
    torch.testing.assert_close(only, torch.tensor([[1.0, 0.0]]))


def test_mask_target_normalises_roi_to_a_distribution():
    roi = torch.tensor([[0.0, 1.0, 0.5, 0.0]])
    target = mask_target(roi)
    torch.testing.assert_close(target, torch.tensor([[0.0, 2 / 3, 1 / 3, 0.0]]))
    assert float(attention_mse(target, roi)) == pytest.approx(0.0, abs=1e-12)
    assert float(attention_mse(torch.tensor([[0.25] * 4]), roi)) > 0
    empty = mask_target(torch.zeros(1, 4), torch.tensor([[True, True, False, True]]))
    torch.testing.assert_close(empty, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))
    assert float(attention_mse(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), roi)) <= 2.0


def test_classification_and_contrastive_losses():
    logit = torch.tensor([[0.3], [-1.2]])
    p = torch.sigmoid(logit[:, 0])
    expected = -(torch.log(p[0]) + torch.log(1 - p[1])) / 2
    torch.testing.assert_close(classification_loss(logit, torch.tensor([1, 0])), expected)
    # contrastive: −log(1 − Ψ), i.e. towards the negative class
    torch.testing.assert_close(contrastive_loss(logit), -torch.log(1 - p).mean())
    multi = torch.tensor([[0.1, 2.0, -1.0]])
    torch.testing.assert_close(contrastive_loss(multi), -torch.log_softmax(multi, 1)[0, 0])
    with pytest.raises(ValueError, match="binary"):
        classification_loss(logit, torch.tensor([2, 0]))


def test_sequence_policy_gradient_is_reinforce_on_the_joint_draws():
    """Two estimates of one image over 3 uniform cells, draws (0, 0) and (1, 2), rewards
    0.9 and 0.5: advantages ±0.2, and ∂/∂θ_j = −½ Σ_e A_e Σ_p (1[p = j] − ⅓)."""
    logits = torch.zeros(1, 3, requires_grad=True)
    a = torch.softmax(logits, 1).expand(2, 3)
    idx = torch.tensor([[0, 0], [1, 2]])
    loss = sequence_policy_gradient_loss(torch.log(a.gather(1, idx)), torch.tensor([[0.9, 0.5]]))
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.2, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="3 rewards for 2 rows"):
        sequence_policy_gradient_loss(torch.zeros(2, 2), torch.zeros(1, 3))


def test_leave_one_out_policy_gradient_is_unbiased_by_exact_enumeration():
    """Over every sequence of 3 draws with replacement from 4 cells, the mean gradient
    of ``−Σ_p log a_p (R − R_{−p})``, weighted by the sequence's probability, is
    ``−∇ E[R]``: a baseline that is any function of the other draws adds nothing in
    expectation.  ``R`` and ``R_{−p}`` are arbitrary tables here."""
    import itertools

    gen = torch.Generator().manual_seed(5)
    cells, draws = 4, 3
    logits = torch.randn(1, cells, generator=gen, dtype=torch.float64, requires_grad=True)
    reward = torch.rand((cells,) * draws, generator=gen, dtype=torch.float64)
    without = torch.rand((draws,) + (cells,) * (draws - 1), generator=gen, dtype=torch.float64)
    a = torch.softmax(logits, 1)
    expected = torch.autograd.grad(
        -sum(
            torch.prod(a[0, list(seq)]) * reward[seq]
            for seq in itertools.product(range(cells), repeat=draws)
        ),
        logits,
    )[0]
    got = torch.zeros_like(logits)
    for seq in itertools.product(range(cells), repeat=draws):
        a = torch.softmax(logits, 1)
        others = [without[(p, *seq[:p], *seq[p + 1 :])] for p in range(draws)]
        loss = leave_one_out_policy_gradient_loss(
            torch.log(a[:, list(seq)]), reward[seq].reshape(1), torch.stack(others)[None]
        )
        (grad,) = torch.autograd.grad(loss, logits)
        got += torch.prod(a[0, list(seq)]).detach() * grad
    torch.testing.assert_close(got, expected)


def test_policy_gradient_uses_baselined_rewards():
    logits = torch.zeros(1, 4, requires_grad=True)
    a = torch.softmax(logits, 1)
    idx = torch.tensor([[0, 1, 1]])
    rewards = torch.tensor([[0.9, 0.1, 0.2]])
    policy_gradient_loss(torch.log(a.gather(1, idx)), rewards).backward()
    # the rewarded cell gains probability, the others lose it
    assert logits.grad[0, 0] < 0 and logits.grad[0, 1] > 0
    # equal rewards carry no signal
    logits.grad = None
    policy_gradient_loss(
        torch.log(torch.softmax(logits, 1).gather(1, idx)), torch.ones(1, 3)
    ).backward()
    assert torch.allclose(logits.grad, torch.zeros(1, 4))
