"""Linearized Multi-Sampling (Jiang et al., ICCV 2019): a grid sampler whose gradient
with respect to the sampling positions comes from a least-squares fit, not from the
four nearest pixels.

MagNets (002 §3.1, "Sampler") found that bilinear sampling's gradients with respect to
the transformation ``θ`` vanish when a layer zooms in strongly, and used this sampler.
Bilinear sampling's derivative with respect to a position is the slope between the
(at most) four pixels around it: under a 16× zoom all 56 grid points of a box fall
between a handful of pixels, and when those are flat the gradient is exactly zero
even if the object the box should move towards is a pixel away.

Implemented from the paper's description:

* the forward value is plain bilinear sampling, exactly
  ``F.grid_sample(image, grid, mode="bilinear", align_corners=False)``;
* for the backward pass, ``copies`` jittered copies of the grid are sampled too.
  Copy ``k`` moves every grid point by ``d_k = radius · (cos(φ + 2πk/K), sin(φ + 2πk/K))``
  *input* pixels, with a random angle ``φ`` per grid point (the jitter);
* per grid point, the intensities of the copies are fitted by least squares as a
  linear function of the offset, ``v_k − v_0 ≈ A d_k`` (``A``: C × 2, one gradient per
  channel).  On a ring of evenly spaced offsets ``Σ_k d_k d_kᵀ = (K r²/2) I`` exactly
  (K ≥ 3), so the fit is ``A = 2/(K r²) · Σ_k (v_k − v_0) d_kᵀ``: no per-pixel matrix
  inverse and never ill-conditioned (the reference code pushes random offsets away
  from zero for the same reason);
* the gradient with respect to the grid is ``Aᵀ g`` (``g``: the output gradient),
  the gradient with respect to the image that of bilinear sampling.

The offsets are in input pixels, so the fit always spans about a pixel of the image
being sampled, however far the grid zooms in.  Written as
``v_0 + sg(A)·(grid − sg(grid))``, whose value is ``v_0`` exactly and whose derivative
is ``A``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SAMPLERS", "grid_sample", "lms_grid_sample"]

#: the samplers a magnifying layer can use
SAMPLERS = ("lms", "bilinear")


def lms_grid_sample(
    image: Tensor,
    grid: Tensor,
    *,
    copies: int = 8,
    radius: float = 0.5,
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``image`` (N, C, H, W) at ``grid`` (N, h, w, 2) (normalised ``(x, y)``,
    ``align_corners=False``): bilinear values, linearised-multi-sampling gradients.

    Args:
        copies: ``K`` jittered copies of the grid (at least 3).
        radius: their distance from each grid point, in input pixels.
        padding_mode: as in :func:`torch.nn.functional.grid_sample`, for every copy.
        generator: CPU generator of the jitter angles (default: torch's global one).

    Returns:
        (N, C, h, w), equal to bilinear ``grid_sample``.
    """
    if copies < 3:
        raise ValueError(f"linearized multi-sampling needs at least 3 copies, got {copies}")
    if not radius > 0:
        raise ValueError(f"the jitter radius must be positive, got {radius}")
    fixed = grid.detach()
    v0 = F.grid_sample(
        image, fixed, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )
    if not (torch.is_grad_enabled() and grid.requires_grad):
        return v0
    n, h_out, w_out, _ = grid.shape
    h_in, w_in = image.shape[-2:]
    phase = torch.rand((n, h_out, w_out), generator=generator, dtype=torch.float64)
    phase = phase.to(grid.device) * (2 * math.pi)
    to_norm = torch.tensor([2.0 / w_in, 2.0 / h_in], device=grid.device, dtype=torch.float64)
    dtype = torch.promote_types(image.dtype, torch.float32)
    slope = torch.zeros((n, image.shape[1], h_out, w_out, 2), device=grid.device, dtype=dtype)
    with torch.no_grad():
        centre = v0.detach().to(dtype)
        for k in range(copies):
            angle = phase + 2 * math.pi * k / copies
            d = radius * torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)  # pixels
            moved = (fixed.double() + d * to_norm).to(grid.dtype)
            vk = F.grid_sample(
                image.detach(),
                moved,
                mode="bilinear",
                padding_mode=padding_mode,
                align_corners=False,
            ).to(dtype)
            slope += (vk - centre)[..., None] * d[:, None].to(dtype)
        slope *= 2.0 / (copies * radius**2)  # intensity per input pixel
        slope /= to_norm.to(dtype)  # intensity per normalised unit of the grid
    delta = grid - fixed  # exactly 0, derivative 1
    linear = (slope.to(v0.dtype) * delta[:, None].to(v0.dtype)).sum(-1)
    return v0 + linear


def grid_sample(
    image: Tensor,
    grid: Tensor,
    sampler: Literal["lms", "bilinear"] = "lms",
    *,
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
    copies: int = 8,
    radius: float = 0.5,
) -> Tensor:
    """Bilinear sampling (``align_corners=False``) with the gradient of ``sampler``."""
    if sampler == "lms":
        return lms_grid_sample(
            image,
            grid,
            copies=copies,
            radius=radius,
            padding_mode=padding_mode,
            generator=generator,
        )
    if sampler == "bilinear":
        return F.grid_sample(
            image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
        )
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
