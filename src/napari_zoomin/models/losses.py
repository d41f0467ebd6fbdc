"""The training objectives of 000 eq. (10)–(11), ATS eq. (21) and 003 §IV–V.

Every function returns a scalar averaged over the batch (rows), so terms of
different models compare and weights transfer between batch sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributions import entropy

__all__ = [
    "attention_mse",
    "classification_loss",
    "contrastive_loss",
    "entropy_regulariser",
    "mask_target",
    "policy_gradient_loss",
    "sequence_policy_gradient_loss",
]


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the image label: sigmoid for (B, 1) logits, softmax for (B, C)."""
    labels = labels.to(logits.device).long()
    logits = logits.float()
    if logits.shape[-1] == 1:
        if bool(((labels < 0) | (labels > 1)).any()):
            raise ValueError("binary models need labels 0 or 1")
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def contrastive_loss(logits: Tensor, negative_class: int = 0) -> Tensor:
    """In-sample contrastive loss of 000 §2.3: ``−log P(negative class)`` of contrastive views.

    For the binary sigmoid head and ``negative_class = 0`` this is ``−log(1 − Ψ)``;
    for C classes it is the cross-entropy towards the reference class (000 §2.3's
    multi-class extension).
    """
    target = torch.full((logits.shape[0],), negative_class, dtype=torch.long)
    return classification_loss(logits, target)


def entropy_regulariser(
    distributions: Tensor, weight: float, counts: Tensor | None = None
) -> Tensor:
    """``λ Σ_i p_i log p_i = −λ H(p)`` (000 eq. 10, ATS eq. 21), summed over maps.

    Minimising it with ``λ > 0`` *raises* the entropy: it keeps attention from
    collapsing early in training (``tests/core/test_losses.py`` checks the sign).

    Args:
        distributions: (…, K) one or more distributions (α, or the β^c of drawn tiles).
        weight: λ.
        counts: optional (…) multiplicity of each map (``Σ_{c∈Q}`` over the multiset of
            drawn tiles, 000 eq. 10).

    Returns:
        Scalar: ``−λ Σ counts · H`` over the leading dimensions.
    """
    h = entropy(distributions.float())
    if counts is not None:
        h = h * counts.to(h.dtype)
    return -weight * h.sum()


def mask_target(roi_fraction: Tensor, allowed: Tensor | None = None) -> Tensor:
    """The distribution an attention map is supervised towards in eq. (11) of 000.

    ``α`` sums to 1 while a binary mask sums to the ROI's area, so an MSE against the
    raw mask cannot reach zero and mostly pulls every ROI cell towards 1 (an
    impossible target whose optimum on the simplex depends on the ROI size).  We
    normalise the mask (fraction of ROI pixels per cell) to sum to 1 over the
    allowed cells: the target is then a distribution, the MSE is zero exactly when
    the attention spreads over the ROI in proportion to its area, and it is bounded
    by 2 whatever the map size.  Without ROI (an annotated negative image) the target
    is uniform over the allowed cells — which is what the paper's MSE against an
    all-zero mask favours too (minimising ``Σ α²`` on the simplex).

    Args:
        roi_fraction: (…, K) fraction of ROI pixels under each cell, in [0, 1].
        allowed: optional (…, K) bool, cells that may carry attention (tissue).

    Returns:
        (…, K) float32 target rows summing to 1.
    """
    r = roi_fraction.float().clamp(min=0)
    a = torch.ones_like(r) if allowed is None else allowed.to(r.dtype)
    a = torch.where(a.sum(-1, keepdim=True) > 0, a, torch.ones_like(a))
    r = r * a
    total = r.sum(-1, keepdim=True)
    uniform = a / a.sum(-1, keepdim=True)
    return torch.where(
        total > 0, r / torch.where(total > 0, total, torch.ones_like(total)), uniform
    )


def attention_mse(attention: Tensor, roi_fraction: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Pixel-level supervision, 000 eq. (11): ``Σ_c (M̃_c − α_c)²`` per map, summed.

    ``M̃`` is :func:`mask_target` (the ROI mask at the map's view scale, normalised to
    a distribution).  Args are (…, K); returns a scalar.
    """
    target = mask_target(roi_fraction.to(attention.device), allowed)
    return ((target - attention.float()) ** 2).sum()


def policy_gradient_loss(log_attention: Tensor, rewards: Tensor) -> Tensor:
    """REINFORCE with a mean baseline (003 §IV): ``−Σ_p log a_p (r_p − mean_p r)``.

    Args:
        log_attention: (R, N) ``log a_p`` of the sampled sub-tiles (differentiable).
        rewards: (R, N) ``r_p`` (no gradient), e.g. P(true class | sub-tile p alone).

    Returns:
        Scalar: the sum over sub-tiles, averaged over rows.
    """
    r = rewards.detach().to(log_attention.dtype)
    advantage = r - r.mean(dim=-1, keepdim=True)
    return -(log_attention * advantage).sum(dim=-1).mean()


def leave_one_out_policy_gradient_loss(
    log_attention: Tensor, rewards: Tensor, rewards_without: Tensor
) -> Tensor:
    """REINFORCE on each draw of an estimate, baselined by the estimate without that
    draw: ``−Σ_p log a_p (R − R_{−p})``.

    ``R_{−p}`` (e.g. P(true class | the other draws' aggregate)) does not depend on
    draw ``p`` (draws with replacement are independent), so it is a baseline for draw
    ``p``'s score function: it leaves the policy gradient's expectation unchanged
    (tests/core/test_losses.py enumerates every draw sequence).  The advantage is
    then what draw ``p`` added to the prediction, not the luck of its estimate's other
    draws, which :func:`sequence_policy_gradient_loss` pays every draw for alike.

    Args:
        log_attention: (R, N) ``log a_p`` of the draws (differentiable).
        rewards: (R,) ``R`` of each row's estimate (no gradient).
        rewards_without: (R, N) ``R_{−p}`` (no gradient); equal to ``R`` where a draw
            has no others to compare with (its advantage is then 0).

    Returns:
        Scalar: the sum over draws, averaged over rows.
    """
    r = rewards.detach().to(log_attention.dtype)
    advantage = r[:, None] - rewards_without.detach().to(log_attention.dtype)
    return -(log_attention * advantage).sum(dim=-1).mean()


def sequence_policy_gradient_loss(log_attention: Tensor, rewards: Tensor) -> Tensor:
    """REINFORCE on the joint draws of each estimate: ``−(R_e − mean R) Σ_p log a_p``.

    Draws with replacement are independent, so ``Σ_p log a_p`` is the log-probability
    of an estimate's draws; each estimate's reward ``R_e`` (e.g. P(true class | the
    estimate)) is baselined by the mean over the estimates of the same image.  That
    mean includes ``R_e`` itself, which scales the leave-one-out baseline's (unbiased)
    gradient by ``(k − 1)/k`` for ``k`` estimates per image.

    Args:
        log_attention: (B·k, N) ``log a_p`` of the draws, the ``k`` estimates of an
            image in consecutive rows (differentiable).
        rewards: (B, k) ``R_e`` (no gradient).

    Returns:
        Scalar: averaged over the ``B·k`` estimates.
    """
    r = rewards.detach().to(log_attention.dtype)
    advantage = (r - r.mean(dim=-1, keepdim=True)).reshape(-1)
    if advantage.shape[0] != log_attention.shape[0]:
        raise ValueError(f"{advantage.shape[0]} rewards for {log_attention.shape[0]} rows of draws")
    return -(log_attention.sum(dim=-1) * advantage).mean()
