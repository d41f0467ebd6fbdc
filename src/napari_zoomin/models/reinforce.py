"""ATS with the attention trained by REINFORCE, as in the lymphoma study (003).

Differences from :class:`~napari_zoomin.models.ats.ATS` (docs/methods.md, "Losses"):

- sub-tiles (003's patches) are drawn with replacement (``replace=False``: distinct,
  below) and aggregated with the attention-renormalised weights ``sg(a_p) / Σ sg(a_p)``
  (003 eq. 1; ``aggregation="mean"``: their plain mean): no gradient reaches the
  attention through the sampling or the aggregation;
- ``f`` and ``g`` train by back-propagation of the cross-entropy;
- ``a`` trains by policy gradient with a mean baseline, ``−Σ_p log a_p (r_p − mean r)``
  (003 §IV), with reward ``r_p = P(true class | sub-tile p alone)``, plus the entropy
  bonus ``λ Σ a log a`` (003 §V);
- each image is sampled ``repeats`` times per step (003 §VII: batches ×4).

``reward="estimate"`` is a named deviation from 003 (issue 18): every draw of one
estimate is rewarded by that estimate's own ``P(true class | aggregate)``, the value
the prediction uses, with the mean over the ``repeats`` estimates of the same image as
baseline: REINFORCE on the joint log-probability of the draws, as in recurrent
attention models.  003's per-sub-tile reward pays the attention for one confident
sub-tile, and on Megapixel MNIST it collapsed onto one digit (docs/benchmarks.md);
the estimate's reward pays for what the prediction makes of all its draws together.

``reward="leave_one_out"`` is another (issue 18): each draw is rewarded by what it
adds to its estimate, ``P(true class | all draws) − P(true class | the others)``.  The
second term does not depend on the draw itself, so it is a baseline: the policy
gradient's expectation is unchanged (tests/core/test_losses.py enumerates it).
Unlike the estimate's reward, a draw on a scribble is not paid for the digits its
estimate's other draws found.  Measured on Megapixel MNIST it is no better (with the
entropy bonus, 32.7 % top-k error against the estimate's 32.3 %; without it, it
collapses onto one patch: docs/benchmarks.md).

``aggregation="mean"`` is a second named deviation: the estimate is the plain mean of
the drawn sub-tiles' features, ATS's unbiased estimate of ``Σ α f`` with replacement
(ATS eq. 12), instead of 003 eq. (1), whose weights ``a_p`` (times the draw count of
a sub-tile drawn twice) let the most attended sub-tile outweigh the others.

``replace=False`` is a third (issue 18): an estimate's sub-tiles are distinct, drawn
in sequence by Gumbel-top-k as ATS draws them, and the policy gradient is REINFORCE on
the log-probability of that sequence (:func:`~..sampling.sampler.draw_log_probabilities`:
each draw's probability given the earlier ones, ATS eq. 13), so it needs the
estimate's reward.  With replacement a peaked attention map spends its draws on one
sub-tile again and again, and the entropy bonus that stops it also spreads the draws
over the empty canvas; without replacement ``n_samples`` draws always read
``n_samples`` different sub-tiles, however peaked the map.  With the mean aggregation
it is what made REINFORCE-ATS learn Megapixel MNIST (docs/benchmarks.md, thirteenth
session), and ``train()``'s recipe for the kind (``training.config.TRAIN_RECIPES``);
the defaults here stay 003's, which older checkpoints were saved with.

003's classifier is a parameter-free softmax over the L2-normalised ``C``-dimensional
sub-tile features, which caps the confidence (at most ``e/(e + (C−1)/e)``); we keep the
shared linear ``g`` of the other models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..sampling.sampler import draw_log_probabilities
from .ats import ATS, ATSConfig
from .base import MAX_WEIGHT
from .device import autocast
from .losses import (
    classification_loss,
    leave_one_out_policy_gradient_loss,
    policy_gradient_loss,
    sequence_policy_gradient_loss,
)
from .networks import class_probabilities
from .outputs import LossTerms
from .source import ImageSource

__all__ = ["ReinforceATS", "ReinforceConfig"]


@dataclass
class ReinforceConfig(ATSConfig):
    """REINFORCE-ATS settings (defaults: 003's best model, 20 sub-tiles of 50×50, 3 classes).

    Attributes:
        repeats: independent samples of each image per training step (003: 4).
        policy_weight: weight of the policy-gradient loss.
        replace: ``True`` (003); ``False`` draws distinct sub-tiles (module docstring),
            with ``reward="estimate"`` only.
        reward: ``"subtile"`` (003 §IV: ``P(true class | sub-tile alone)``, baselined
            by the mean over the row's draws) or ``"estimate"`` (the deviation of the
            module docstring: ``P(true class | the estimate)``, baselined by the mean
            over the image's ``repeats`` estimates; needs ``repeats`` ≥ 2) or
            ``"leave_one_out"`` (each draw rewarded by what it adds to its estimate's
            ``P(true class)``: the estimate's value minus that of the same estimate
            without the draw, see the module docstring).
        aggregation: ``"attention"`` (003 eq. 1) or ``"mean"`` (the deviation of the
            module docstring: the mean of the drawn sub-tiles' features).
        topk_weights: ``"draws"``: top-k weighs its regions as ``aggregation`` weighs
            draws (:meth:`ReinforceATS._topk_weights`); ``"attention"``: renormalised.
    """

    num_classes: int = 3
    view_scale: float = 0.2
    n_samples: int = 20
    subtile_size: tuple[int, int] = (50, 50)
    replace: bool = True
    attention_norm: str | None = "batch"
    attention_activation: str = "leaky_relu"
    entropy_weight: float = 1e-4
    repeats: int = 4
    policy_weight: float = 1.0
    reward: Literal["subtile", "estimate", "leave_one_out"] = "subtile"
    aggregation: Literal["attention", "mean"] = "attention"
    topk_weights: Literal["draws", "attention"] = "draws"

    def problems(self) -> list[str]:
        problems = super().problems()
        if not problems and not 1 <= self.repeats <= 1024:
            problems.append(f"repeats must be in [1, 1024], got {self.repeats}")
        if not problems and not 0 <= self.policy_weight <= MAX_WEIGHT:
            problems.append(f"policy_weight must be in [0, {MAX_WEIGHT}]")
        if not problems and not self.replace and self.reward != "estimate":
            problems.append(
                "drawing without replacement (replace false) needs reward 'estimate' "
                f"(the draws of an estimate depend on each other), got reward "
                f"{self.reward!r}: set replace to true for it, or reward to 'estimate'"
            )
        if not problems and self.estimator != "sequential":
            problems.append(
                "REINFORCE-ATS aggregates its draws by 'aggregation', not by an "
                f"estimator: set estimator to 'sequential', got {self.estimator!r}"
            )
        if not problems and self.reward == "estimate" and self.repeats < 2:
            problems.append(
                "reward 'estimate' is baselined by the other repeats of the image: "
                f"set repeats to 2 or more, got {self.repeats}"
            )
        return problems


class ReinforceATS(ATS):
    """One-stage attention sampling whose attention network is trained by REINFORCE (003)."""

    config: ReinforceConfig

    def __init__(self, config: ReinforceConfig | None = None, **networks: nn.Module):
        super().__init__(config or ReinforceConfig(), **networks)

    def aggregate(
        self,
        p: Tensor,
        idx: Tensor,
        valid: Tensor,
        features: Tensor,
        threshold: Tensor | None = None,
    ) -> Tensor:
        """003 eq. (1): ``Σ_p sg(a_p) f_p / Σ_p sg(a_p)`` over the drawn sub-tiles, or
        their plain mean (``aggregation="mean"``); no estimator, so no ``threshold``."""
        w = self._weights(p.gather(1, idx), valid)
        return (w[..., None] * features).sum(1) / w.sum(1, keepdim=True)

    def _topk_weights(self, ranked_attention: Tensor) -> Tensor:
        """``topk_weights="draws"`` (the default here): the chosen regions weighed as
        :meth:`aggregate` weighs an estimate's draws, their attention renormalised (003
        eq. 1) or ``1/k`` each (``aggregation="mean"``), so ``g`` sees the kind of
        aggregate it was trained on; ``"attention"``: renormalised whatever the
        aggregation (with the mean's aggregation, one peaked region then outvoted the
        rest: 41.7 % top-k error against 5.6 % sampled on Megapixel MNIST)."""
        if self.config.topk_weights != "draws":
            return super()._topk_weights(ranked_attention)
        w = self._weights(
            ranked_attention[None], torch.ones_like(ranked_attention[None], dtype=torch.bool)
        )[0]
        return w / w.sum()

    def _weights(self, drawn_attention: Tensor, valid: Tensor) -> Tensor:
        """Each draw's weight in :meth:`aggregate` (R, N), from the draws' attention
        (R, N): ``sg(a_p)``, or 1 for the mean; 0 for a draw that is not valid."""
        w = valid.to(drawn_attention.dtype)
        if self.config.aggregation == "attention":
            w = drawn_attention.detach() * w
        return w

    @torch.no_grad()
    def _leave_one_out_rewards(self, run, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``P(true class)`` of each row's estimate (R,), and of the same estimate with
        each draw left out (R, N): the aggregate of :meth:`aggregate` recomputed without
        the draw's weight.  A draw whose leaving would leave no weight gets ``R``."""
        w = self._weights(run.attention.gather(1, run.indices), run.valid)
        weighted = w[..., None] * run.features.detach()  # (R, N, D)
        rest = w.sum(1, keepdim=True) - w  # (R, N)
        z_without = (weighted.sum(1, keepdim=True) - weighted) / rest.clamp_min(1e-30)[..., None]
        full = _true_class_probability(logits, labels)
        without = _true_class_probability(self.classifier(z_without), labels)
        return full, torch.where(rest <= 0, full[:, None], without)

    def loss(
        self,
        sources: Sequence[ImageSource],
        labels: Tensor | Sequence[int],
        epoch: int = 0,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """Cross-entropy (``f``, ``g``) + policy gradient and entropy bonus (``a``) + pixel MSE."""
        c = self.config
        labels = torch.as_tensor(labels, dtype=torch.long)
        rows = [b for b in range(len(sources)) for _ in range(c.repeats)]
        row_labels = labels[rows]
        zero = torch.zeros((), device=self.device)
        with autocast(self.device):
            stage1 = self.stage1(sources)
            run = self.one_stage(sources, stage1, rows, generator)
            logits = self.classifier(run.z)
            if c.reward == "subtile":
                with torch.no_grad():  # rewards are constants of the policy gradient
                    subtile_logits = self.classifier(run.features)  # (R, N, L)
        ce = classification_loss(logits, row_labels)
        log_a = draw_log_probabilities(run.attention, run.indices, self.replace, run.valid)
        if c.reward == "estimate":
            rewards = _true_class_probability(logits, row_labels)  # (R,)
            policy = sequence_policy_gradient_loss(log_a, rewards.reshape(-1, c.repeats))
        elif c.reward == "leave_one_out":
            full, without = self._leave_one_out_rewards(run, logits, row_labels)
            policy = leave_one_out_policy_gradient_loss(log_a, full, without)
        else:
            rewards = _true_class_probability(subtile_logits, row_labels)  # (R, N)
            policy = policy_gradient_loss(log_a, rewards)
        ent, pix = self._attention_terms(sources, stage1)
        total = ce + c.policy_weight * policy + ent + c.pixel_weight * pix
        return LossTerms(total, ce, zero, ent, pix, policy, logits.detach(), row_labels)


def _true_class_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """``P(labels[r])`` under ``logits`` (R, L) or (R, N, L): (R,) or (R, N), a constant
    of the policy gradient (no gradient)."""
    probs = class_probabilities(logits.detach())
    index = labels.to(probs.device).reshape(-1, *([1] * (probs.dim() - 1)))
    return probs.gather(-1, index.expand(*probs.shape[:-1], 1))[..., 0]
