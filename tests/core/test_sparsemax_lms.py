"""Spatial sparsemax and linearized multi-sampling (MagNets' building blocks), exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_zoomin.models.lms import grid_sample, lms_grid_sample
from napari_zoomin.models.sparsemax import sparsemax, spatial_sparsemax


def simplex_projection(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex by sorting (Duchi et al. 2008), in float64,
    written independently of the module: a plain loop over the sorted values."""
    u = np.sort(v)[::-1]
    total, rho, rho_sum = 0.0, 0, 0.0
    for j, uj in enumerate(u, start=1):
        total += uj
        if uj - (total - 1.0) / j > 0:
            rho, rho_sum = j, total
    tau = (rho_sum - 1.0) / rho
    return np.maximum(v - tau, 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_sparsemax_is_the_projection_onto_the_simplex(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=[0.1, 1.0, 5.0][seed % 3], size=(3, 7, 9))
    p = spatial_sparsemax(torch.from_numpy(z)).numpy()
    for b in range(3):
        expected = simplex_projection(z[b].ravel()).reshape(7, 9)
        np.testing.assert_allclose(p[b], expected, rtol=0, atol=1e-12)
        assert p[b].sum() == pytest.approx(1.0, abs=1e-12)
        assert (p[b] >= 0).all()


def test_sparsemax_is_sparse_for_peaked_inputs_and_uniform_for_flat_ones():
    z = torch.zeros(56, 56, dtype=torch.float64)
    z[10, 20], z[11, 20], z[40, 3] = 5.0, 4.5, 1.0
    p = spatial_sparsemax(z)
    assert torch.count_nonzero(p) == 2  # 5 − τ and 4.5 − τ with τ = 4.25
    assert p[10, 20].item() == pytest.approx(0.75) and p[11, 20].item() == pytest.approx(0.25)
    flat = spatial_sparsemax(torch.zeros(4, 5))
    assert torch.allclose(flat, torch.full((4, 5), 1 / 20))


def test_sparsemax_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(spatial_sparsemax, (z,), eps=1e-6, atol=1e-8)
    v = torch.randn(4, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sparsemax, (v,), eps=1e-6, atol=1e-8)


def _zoom_grid(s: float, tx: float, ty: float, n: int) -> torch.Tensor:
    """The grid of θ = [[s, 0, tx], [0, s, ty]] on an n × n output, as a leaf tensor."""
    theta = torch.tensor([[[s, 0.0, tx], [0.0, s, ty]]], dtype=torch.float64)
    return F.affine_grid(theta, (1, 1, n, n), align_corners=False)


@pytest.mark.parametrize("sampler_copies", [3, 8])
def test_lms_forward_equals_bilinear_exactly(sampler_copies):
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 40, 33, generator=gen)
    grid = (torch.rand(2, 17, 19, 2, generator=gen) * 2.4 - 1.2).requires_grad_(True)
    out = lms_grid_sample(image, grid, copies=sampler_copies, generator=gen)
    expected = F.grid_sample(image, grid.detach(), mode="bilinear", align_corners=False)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.isfinite(grid.grad).all() and grid.grad.abs().sum() > 0


def test_lms_gradient_is_exact_on_a_linear_image():
    """On an image that is linear in the pixel coordinates the least-squares fit is
    exact, so LMS and bilinear give the same gradient (sign and units checked)."""
    h, w = 30, 40
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    image = (0.3 * xx - 0.7 * yy)[None, None]
    gen = torch.Generator().manual_seed(2)
    grid = (torch.rand(1, 9, 9, 2, generator=gen, dtype=torch.float64) - 0.5).requires_grad_()
    grads = []
    for sampler in ("lms", "bilinear"):
        g = grid.detach().clone().requires_grad_(True)
        grid_sample(image, g, sampler, generator=gen).sum().backward()
        grads.append(g.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)
    # d value / d x_norm = 0.3 · w / 2 per point
    assert grads[1][..., 0].flatten()[0].item() == pytest.approx(0.3 * w / 2)


def _theta_gradient(sampler: str, s: float, tx: float, image: torch.Tensor, seed: int = 0):
    theta = torch.tensor([[[s, 0.0, tx], [0.0, s, 0.0]]], dtype=torch.float64, requires_grad=True)
    grid = F.affine_grid(theta, (1, 1, 56, 56), align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    out = grid_sample(image, grid, sampler, generator=gen)
    out.mean().backward()
    return theta.grad[0]


def test_lms_gradient_survives_a_16x_zoom_where_bilinears_vanishes():
    """A 112-pixel image, dark left of column 60 and bright from it; a 16× zoom (s = 1/16,
    a 7-pixel box sampled at 56 × 56) whose right edge stops 0.3 pixel short of the last
    dark pixel.  Moving the box right brightens it, but bilinear sampling sees only the
    flat dark pixels around each grid point: its gradient for t_x is exactly 0.  LMS
    fits over ±0.5 pixel and reaches the edge: finite, positive."""
    w = 112
    image = torch.zeros(1, 1, w, w, dtype=torch.float64)
    image[..., 60:] = 1.0
    s = 1 / 16
    right = 59.0 - 0.3  # pixel-centre coordinate of the box's right edge
    centre = right - s * w / 2
    tx = (2 * centre + 1) / w - 1
    bilinear = _theta_gradient("bilinear", s, tx, image)
    lms = _theta_gradient("lms", s, tx, image)
    assert bilinear.abs().max().item() == 0.0
    assert torch.isfinite(lms).all()
    assert lms[0, 2].item() > 0.05  # d mean / d t_x
    # without zoom the box covers the edge and both samplers see it
    assert _theta_gradient("bilinear", 0.25, 0.07, image)[0, 2].item() > 0
