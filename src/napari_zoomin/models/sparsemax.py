"""Spatial sparsemax: a sparse probability map over the pixels of a map (MagNets, 002 §3.1).

Sparsemax (Martins & Astudillo 2016) is the Euclidean projection of a score vector
``z`` onto the probability simplex, ``argmin_p ‖p − z‖²`` subject to ``p ≥ 0``,
``Σ p = 1``.  Its solution is ``p = max(z − τ, 0)`` with the threshold ``τ`` found by
sorting: with ``z`` sorted in decreasing order, ``k* = max{k : 1 + k z_(k) > Σ_{j≤k}
z_(j)}`` and ``τ = (Σ_{j≤k*} z_(j) − 1) / k*``.  Unlike a softmax it gives exact zeros,
so a magnifying layer's box follows only the pixels it selected.

"Spatial" means the projection is over all ``H × W`` positions of each map at once.
The backward pass is the closed-form Jacobian: on the support ``S`` (``p > 0``),
``∂L/∂z = g − mean_S(g)``; off it, zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sparsemax", "spatial_sparsemax"]


def _threshold(z: Tensor) -> Tensor:
    """``τ`` (…, 1) of sparsemax over the last dimension of ``z`` (…, n)."""
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    cumsum = sorted_z.cumsum(dim=-1)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    support = (1 + k * sorted_z) > cumsum  # a prefix of the sorted scores
    k_star = support.sum(dim=-1, keepdim=True).clamp(min=1)
    tau_sum = cumsum.gather(-1, k_star - 1)
    return (tau_sum - 1) / k_star.to(z.dtype)


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        p = torch.clamp(z - _threshold(z), min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        support = (p > 0).to(grad.dtype)
        mean = (grad * support).sum(dim=-1, keepdim=True) / support.sum(dim=-1, keepdim=True)
        return support * (grad - mean)


def sparsemax(z: Tensor) -> Tensor:
    """Sparsemax over the last dimension: non-negative, sums to 1, exact zeros."""
    return _Sparsemax.apply(z)


def spatial_sparsemax(logits: Tensor) -> Tensor:
    """Sparsemax over the last two dimensions (…, H, W) taken together: one
    distribution per map, same shape, computed in float32 at least."""
    if logits.dim() < 2:
        raise ValueError(f"spatial sparsemax needs (…, H, W), got shape {tuple(logits.shape)}")
    shape = logits.shape
    z = logits.reshape(*shape[:-2], -1)
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return sparsemax(z).reshape(shape)
