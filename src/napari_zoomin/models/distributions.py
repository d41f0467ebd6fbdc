"""Attention maps as probability distributions over cells, with exact masking.

The sampler draws from, and the estimators divide by, the tensors built here; so
masked cells (background) are *exactly* zero, never drawn and never divided by, and
any uniform mass that keeps probabilities positive (ATS) is mixed over the unmasked
cells only.  All distributions are float32 or wider even under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention_distribution", "complement_distribution", "entropy"]


def _flat_mask(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    m = mask.to(device=device, dtype=torch.bool).reshape(shape)
    # A row without any unmasked cell (all background) cannot be a distribution: use
    # every cell for it rather than produce NaNs.
    empty = ~m.any(dim=-1, keepdim=True)
    return m | empty


def attention_distribution(
    logits: Tensor, mask: Tensor | None = None, uniform_mix: float = 0.0
) -> Tensor:
    """Softmax over all cells of each map, masked cells exactly zero (000 eq. 1, ATS eq. 18).

    Args:
        logits: (B, h, w) or (B, K) attention logits.
        mask: optional bool of the same shape, True = may be drawn (tissue).  A row
            with no True cell is treated as unmasked.
        uniform_mix: ``ε`` in ``(1 − ε) softmax + ε · uniform(unmasked)`` (ATS keeps
            every unmasked probability above zero this way); 0 disables it.

    Returns:
        (B, K) float32 (float64 if ``logits`` is), rows summing to 1.
    """
    b = logits.shape[0]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = logits.reshape(b, -1).to(dtype)
    m = _flat_mask(mask, flat.shape, flat.device)
    if m is not None:
        flat = flat.masked_fill(~m, float("-inf"))
    p = torch.softmax(flat, dim=-1)
    if uniform_mix > 0:
        if not uniform_mix < 1:
            raise ValueError(f"uniform_mix must be in [0, 1), got {uniform_mix}")
        allowed = torch.ones_like(p) if m is None else m.to(p.dtype)
        uniform = allowed / allowed.sum(dim=-1, keepdim=True)
        p = (1.0 - uniform_mix) * p + uniform_mix * uniform
    return p


def complement_distribution(attention: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(1 − a)`` renormalised over the unmasked cells: 000 §2.3's contrastive distribution.

    Low-attention cells become likely; masked cells stay exactly zero.  If nothing is
    left (a single unmasked cell holding all the mass), falls back to uniform over the
    unmasked cells.  Differentiable in ``attention``.

    Args:
        attention: (B, K) distribution.
        mask: optional (B, K) bool, True = may be drawn.

    Returns:
        (B, K) distribution.
    """
    m = _flat_mask(mask, attention.shape, attention.device)
    allowed = torch.ones_like(attention) if m is None else m.to(attention.dtype)
    weight = (1.0 - attention).clamp(min=0) * allowed
    total = weight.sum(dim=-1, keepdim=True)
    fallback = allowed / allowed.sum(dim=-1, keepdim=True)
    ok = total > torch.finfo(attention.dtype).tiny
    return torch.where(ok, weight / torch.where(ok, total, torch.ones_like(total)), fallback)


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy ``−Σ p log p`` of each row of (…, K), treating ``0 log 0 = 0``.

    Zero cells contribute neither value nor gradient (no ``log 0`` ever reaches
    autograd), so masked maps are safe.
    """
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))
    return -torch.where(positive, p * torch.log(safe), torch.zeros_like(p)).sum(dim=-1)
