"""Unbiased estimators of ``Σ_k a_k f_k`` whose autograd gradients are unbiased too.

The full model (ATS eq. 1, Zoom-In eq. 5) aggregates every cell's feature with its
attention.  The sampled model replaces that sum by an estimate from a few drawn
cells.  Every function here returns a tensor whose *value* is an unbiased estimate
of the sum and whose *gradient* (with respect to the attention, hence to whatever
produced it, and to the drawn features) is an unbiased estimate of the gradient of
the sum.  Both are written as per-draw weights ``w_k`` with ``estimate = Σ_k w_k f_k``
whose value and derivative are chosen with ``stopgrad`` (``.detach()``):

- with replacement (ATS eq. 12): ``w_q = (1/N) · a_q / sg(a_q)``: value ``1/N``,
  gradient ``∇a_q / (N a_q)``;
- without replacement (ATS eqs. 14–17, Zoom-In eq. 9): draw ``n`` contributes
  ``T_n = Σ_{k<n} a_{I_k} f_{I_k} + (1 − S_{n−1}) f_{I_n}``, ``S_{n−1} = Σ_{k<n} a_{I_k}``
  (an *exclusive* sum).  The known terms are differentiated as they stand, the new
  term as ``(1 − sg(S_{n−1})) · (a_{I_n} / sg(a_{I_n})) · f_{I_n}``: conditioned on the
  earlier draws its gradient averages to ``Σ_{i not drawn} ∇(a_i f_i)``, so every
  ``T_n`` has expected gradient ``∇ Σ_i a_i f_i``.  The reference ATS backward pass
  is biased here and the main PyTorch port also uses an inclusive sum (docs/methods.md);
  ``tests/core/test_estimators.py`` proves ours by exact enumeration.
- two stages (Zoom-In): ``(1/N) Σ_c m_c · (α_c / sg(α_c)) · mean_{n ≤ n_c} T^c_n`` with
  ``m_c`` the with-replacement counts of tile ``c`` among ``N`` draws and
  ``n_c = min(m_c, nnz(β^c))`` sub-tiles drawn without replacement from ``β^c``;
  with stage 1 *without* replacement (our option, not 000's), ``N`` distinct tiles in
  draw order, one sub-tile each: ``Σ_k w_k · (β^{c_k}_{c'_k} / sg(β^{c_k}_{c'_k})) · f``
  with ``w_k`` the one-stage without-replacement weights of the tiles' ``α``.  The
  inner factor is an unbiased estimate of ``Σ_c' β^c_c' f(c, c')`` drawn independently
  given the tile, and both estimators are linear in it, so value and gradients stay
  unbiased.
- priority weights (our option for distinct draws, ATS's or Zoom-In's stage 1):
  ``w_i = a_i / sg(q_i(κ))`` with ``q_i(κ) = 1 − exp(−a_i e^{−κ})`` the probability
  that cell ``i``'s Gumbel key beats ``κ``, the largest key left out (Kool et al.
  2019, §4, 000 ref. [14]; priority sampling).  Unbiased for any per-cell values, so
  for ``a_i f_i`` and for their gradients alike.  The draw order does not enter: once
  the few cells that hold the attention are all drawn, ``q ≈ 1`` for each and the
  estimate is their exact sum, where the sequential weights above still give the
  first drawn of them more weight than the last.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampler import subtile_draw_counts

__all__ = [
    "expected_features",
    "priority_weights",
    "two_stage_expected_features",
    "undrawn_mass",
    "with_replacement_weights",
    "without_replacement_weights",
]


def with_replacement_weights(drawn_attention: Tensor) -> Tensor:
    """Per-draw weights of the with-replacement estimator, ATS eq. (12).

    Args:
        drawn_attention: (..., N) the attention ``a_q`` of each draw (differentiable).

    Returns:
        (..., N) weights, value ``1/N`` each, gradient ``∇a_q / (N a_q)``.
    """
    n = drawn_attention.shape[-1]
    return drawn_attention / drawn_attention.detach() / n


def without_replacement_weights(
    drawn_attention: Tensor, n_valid: Tensor | None = None, undrawn: Tensor | None = None
) -> Tensor:
    """Per-draw weights ``w_k`` with ``Σ_k w_k f_k = (1/n) Σ_{n'≤n} T_{n'}``, ATS eqs. (14)–(17).

    Args:
        drawn_attention: (..., M) attention of the draws ``a_{I_1}, …, a_{I_M}`` in
            sequential draw order (differentiable).
        n_valid: optional LongTensor (...) — only the first ``n_valid`` draws of each
            row are real (the rest is padding and gets weight exactly 0, no gradient);
            rows with ``n_valid == 0`` get all-zero weights. Default: all M.
        undrawn: optional (...) attention of the row's cells that no real draw took
            (:func:`undrawn_mass`).  With it, the mass left before draw ``k`` is summed
            from small terms, ``undrawn + Σ_{j≥k} a_{I_j}``, instead of ``1 − S_{k−1}``:
            once the first draws hold all but 10⁻⁷ of a peaked map, ``1 − S`` in
            float32 is rounding noise, and divided by a later draw's tiny attention it
            overflowed the gradient to NaN (measured: Zoom-In's stage 2 at the end of
            a digits training run).

    Returns:
        (..., M) weights.  Draw ``k`` (1-based) appears as a known term in
        ``T_{k+1}, …, T_n`` (``n − k`` times, coefficient ``a_{I_k}``) and as the new
        term of ``T_k`` (coefficient ``(1 − sg S_{k−1}) a_{I_k} / sg(a_{I_k})``).
    """
    a = drawn_attention
    m = a.shape[-1]
    position = torch.arange(m, device=a.device)  # k − 1
    if n_valid is None:
        n = torch.full(a.shape[:-1], m, dtype=torch.long, device=a.device)
    else:
        n = n_valid.to(a.device).long()
    valid = position < n.unsqueeze(-1)
    a_valid = torch.where(valid, a, torch.zeros_like(a))
    a_safe = torch.where(valid, a.detach(), torch.ones_like(a))
    drawn = a_valid.detach()
    if undrawn is None:  # 1 − S_{k−1}, S the earlier draws' attention (no gradient)
        left = 1.0 - (torch.cumsum(drawn, dim=-1) - drawn)
    else:  # the same mass, as a sum of what is left: this draw's, the later ones', the rest
        later = torch.flip(torch.cumsum(torch.flip(drawn, [-1]), dim=-1), [-1])
        left = undrawn.detach().to(a.dtype).unsqueeze(-1) + later
    # the coefficient first: a draw's attention can be denormal (a peaked map), and
    # autograd's 1 / a of ``(left · a) / a`` then overflows where ``left / a`` does not
    new_term = (left / a_safe) * a_valid
    known_term = (n.unsqueeze(-1) - 1 - position).clamp(min=0).to(a.dtype) * a_valid
    denom = n.clamp(min=1).to(a.dtype).unsqueeze(-1)
    return torch.where(valid, (new_term + known_term) / denom, torch.zeros_like(a))


def priority_weights(
    drawn_attention: Tensor, threshold: Tensor, n_valid: Tensor | None = None
) -> Tensor:
    """Per-draw weights ``a_i / sg(q_i(κ))`` of Gumbel-top-k draws (Kool et al. 2019, §4).

    Args:
        drawn_attention: (..., M) attention of the distinct draws (differentiable).
        threshold: (...) ``κ`` of each row (:func:`.sampler.sample_with_threshold`);
            ``−inf`` where every non-zero cell was drawn (then ``q = 1``: exact sum).
        n_valid: optional LongTensor (...), the number of real draws (the rest is
            padding and gets weight 0, no gradient).  Default: all M.

    Returns:
        (..., M) weights: value ``a_i / q_i``, gradient ``∇a_i / q_i``.
    """
    a = drawn_attention
    m = a.shape[-1]
    if n_valid is None:
        valid = torch.ones(a.shape, dtype=torch.bool, device=a.device)
    else:
        valid = torch.arange(m, device=a.device) < n_valid.to(a.device).unsqueeze(-1)
    a64 = torch.where(valid, a.detach(), torch.ones_like(a)).to(torch.float64)
    kappa = threshold.detach().to(device=a.device, dtype=torch.float64).unsqueeze(-1)
    # q = P(log a + G > κ) = 1 − exp(−e^{log a − κ}); expm1 keeps a small q exact
    q = -torch.expm1(-torch.exp(torch.log(a64) - kappa))
    at_least_float32 = torch.promote_types(a.dtype, torch.float32)  # q can be tiny
    weights = a.to(at_least_float32) / q.to(at_least_float32)
    return torch.where(valid, weights, torch.zeros_like(weights))


def undrawn_mass(attention: Tensor, indices: Tensor, valid: Tensor | None = None) -> Tensor:
    """(...) the attention of each row's cells that none of its real draws took.

    Args:
        attention: (..., K) the distribution drawn from.
        indices: LongTensor (..., M) the draws (distinct within a row, without
            replacement).
        valid: optional bool (..., M), which draws are real; default all.
    """
    idx = indices.to(attention.device)
    a = attention.detach()
    if a.numel() > UNDRAWN_ROWS_AT_ONCE:
        return _undrawn_mass_by_row(a, idx, valid)
    real = torch.ones(idx.shape, dtype=a.dtype, device=a.device)
    if valid is not None:
        real = valid.to(device=a.device, dtype=a.dtype)
    hits = torch.zeros_like(a).scatter_add_(-1, idx, real)
    return torch.where(hits > 0, torch.zeros_like(hits), a).sum(dim=-1)


#: cells (all rows) above which :func:`undrawn_mass` takes one row at a time
UNDRAWN_ROWS_AT_ONCE = 2**24


def _undrawn_mass_by_row(a: Tensor, idx: Tensor, valid: Tensor | None) -> Tensor:
    """:func:`undrawn_mass` one row at a time, for gigapixel maps: one copy of a row
    instead of three of every row (ATS's 16 draws on a 100,000² slide's 9.8 M cells
    held 2 GB more).  The same sums, of the same terms."""
    k = a.shape[-1]
    rows, draws = a.reshape(-1, k), idx.reshape(-1, idx.shape[-1])
    real = None if valid is None else valid.to(a.device).reshape(draws.shape).bool()
    out = torch.empty(rows.shape[0], dtype=a.dtype, device=a.device)
    for r in range(rows.shape[0]):
        row = rows[r].clone()
        row[draws[r] if real is None else draws[r][real[r]]] = 0
        out[r] = row.sum()
    return out.reshape(a.shape[:-1])


def expected_features(
    attention: Tensor,
    indices: Tensor,
    features: Tensor,
    replace: bool,
    threshold: Tensor | None = None,
) -> Tensor:
    """Unbiased estimate of ``Σ_k a_k f_k`` from drawn cells, with unbiased gradients.

    Args:
        attention: (B, K) the distribution the cells were drawn from (differentiable).
        indices: LongTensor (B, n) from :func:`~napari_zoomin.sampling.sample` with the
            same ``replace``; without replacement, in sequential draw order.
        features: (B, n, D) features of the drawn cells, in the order of ``indices``.
        replace: how ``indices`` were drawn.
        threshold: optional (B,) ``κ`` of draws without replacement
            (:func:`~napari_zoomin.sampling.sampler.sample_with_threshold`): priority
            weights (:func:`priority_weights`) instead of the sequential ones.

    Returns:
        (B, D).
    """
    if attention.dim() != 2 or indices.dim() != 2 or features.dim() != 3:
        raise ValueError(
            "expected attention (B, K), indices (B, n), features (B, n, D); got "
            f"{tuple(attention.shape)}, {tuple(indices.shape)}, {tuple(features.shape)}"
        )
    if features.shape[:2] != indices.shape or attention.shape[0] != indices.shape[0]:
        raise ValueError(
            f"shapes disagree: attention {tuple(attention.shape)}, indices "
            f"{tuple(indices.shape)}, features {tuple(features.shape)}"
        )
    if indices.shape[1] == 0:
        raise ValueError("expected_features needs at least one draw")
    drawn = attention.gather(1, indices.to(attention.device))
    if bool((drawn.detach() <= 0).any()):
        raise ValueError("a drawn cell has zero attention: it cannot have been drawn from it")
    if threshold is not None:
        if replace or threshold.shape != indices.shape[:1]:
            raise ValueError("threshold needs replace=False and one κ per row (B,)")
        weights = priority_weights(drawn, threshold)
    elif replace:
        weights = with_replacement_weights(drawn)
    else:
        weights = without_replacement_weights(drawn, undrawn=undrawn_mass(attention, indices))
    return torch.einsum("bn,bnd->bd", weights.to(features.dtype), features)


def two_stage_expected_features(
    tile_attention: Tensor,
    tile_indices: Tensor,
    tile_counts: Tensor,
    subtile_attention: Tensor,
    subtile_indices: Tensor,
    features: Tensor,
    replace: bool = True,
    subtile_baseline: bool = False,
    tile_threshold: Tensor | None = None,
) -> Tensor:
    """Zoom-In's two-stage estimate of ``Σ_c α_c Σ_c' β^c_c' f(c, c')`` (000 eq. 5).

    Stage 1 draws ``N`` tiles with replacement from ``α`` and keeps them as counts
    ``m_c``; stage 2 draws ``n_c = min(m_c, nnz(β^c))`` sub-tiles of each tile without
    replacement from ``β^c``.  The estimate
    ``(1/N) Σ_c m_c · (α_c / sg(α_c)) · mean_{n ≤ n_c} T^c_n`` (the structure behind the
    garbled eq. (9) of 000) has unbiased value and unbiased gradients with respect to
    ``α``, every ``β^c`` and the features.

    Args:
        tile_attention: (B, K1) α (differentiable).
        tile_indices: LongTensor (B, T) distinct drawn tiles (any cell where the count is 0).
        tile_counts: LongTensor (B, T) m_c, 0 for padding; ``N = tile_counts.sum(1)``.
        subtile_attention: (B, T, K2) β^c of each drawn tile (differentiable).
        subtile_indices: LongTensor (B, T, M) sub-tile draws in sequential order, as
            returned by :func:`~napari_zoomin.sampling.sampler.sample_subtiles`; only
            the first ``n_c`` entries of each row are read.
        features: (B, T, M, D) features of those sub-tiles (padding entries are ignored
            and receive zero gradient).
        replace: how stage 1 drew.  ``False``: ``tile_indices`` are distinct tiles in
            sequential draw order (:func:`~napari_zoomin.sampling.sample` without
            replacement), ``tile_counts`` 1 for each and 0 for trailing padding, so
            every tile has one sub-tile.
        subtile_baseline: subtract a control variate from the ``β`` gradients (the
            value and every other gradient are unchanged, all stay unbiased): tile
            ``c``'s sub-tile weights, which sum to exactly 1 in value, contribute
            ``∇w · (f − v_c)`` instead of ``∇w · f``, with ``v_c`` the mean feature
            (no gradient) of the row's other tiles' sub-tiles.  Those were drawn
            independently of tile ``c``'s, and ``E[∇ Σ_n w_n] = ∇1 = 0``, so no bias;
            without it a tile with one sub-tile gets no baseline at all, and every
            sampled sub-tile is reinforced by ``f``'s raw score.
        tile_threshold: optional (B,) ``κ`` of the stage-1 draws (``replace=False``
            only): the tiles get :func:`priority_weights` instead of the sequential
            weights.  Stage 2 is unchanged.

    Returns:
        (B, D).
    """
    if tile_attention.dim() != 2 or subtile_attention.dim() != 3 or features.dim() != 4:
        raise ValueError(
            "expected tile_attention (B, K1), subtile_attention (B, T, K2), features "
            f"(B, T, M, D); got {tuple(tile_attention.shape)}, "
            f"{tuple(subtile_attention.shape)}, {tuple(features.shape)}"
        )
    b, t = tile_indices.shape
    if tile_counts.shape != (b, t) or subtile_attention.shape[:2] != (b, t):
        raise ValueError("tile_indices, tile_counts and subtile_attention disagree on (B, T)")
    if features.shape[:3] != subtile_indices.shape or subtile_indices.shape[:2] != (b, t):
        raise ValueError("subtile_indices and features disagree on (B, T, M)")
    if tile_threshold is not None and (replace or tile_threshold.shape != (b,)):
        raise ValueError("tile_threshold needs replace=False and one κ per row (B,)")
    counts = tile_counts.to(tile_attention.device).long()
    total = counts.sum(dim=1)
    if bool((total <= 0).any()):
        raise ValueError("every row needs at least one stage-1 draw (tile_counts.sum(1) > 0)")
    n_sub = subtile_draw_counts(subtile_attention, counts)
    if n_sub.numel() and int(n_sub.max()) > subtile_indices.shape[2]:
        raise ValueError("subtile_indices has fewer draws than min(m_c, nnz(β^c)) for a tile")
    live = counts > 0

    # Stage 1, with replacement as counts: (m_c / N) · α_c / sg(α_c).
    alpha = tile_attention.gather(1, tile_indices.to(tile_attention.device))
    if bool((live & (alpha.detach() <= 0)).any()):
        raise ValueError("a drawn tile has zero attention α_c")
    if replace:
        alpha_safe = torch.where(live, alpha.detach(), torch.ones_like(alpha))
        tile_weight = torch.where(
            live,
            counts.to(alpha.dtype) / total.unsqueeze(1).to(alpha.dtype) * alpha / alpha_safe,
            torch.zeros_like(alpha),
        )
    else:
        prefix = torch.arange(t, device=counts.device) < total.unsqueeze(1)
        if bool((counts > 1).any()) or bool((live != prefix).any()):
            raise ValueError(
                "without replacement, tile_counts must be 1 for the drawn tiles (in draw "
                "order) and 0 only for trailing padding"
            )
        if tile_threshold is not None:
            tile_weight = priority_weights(alpha, tile_threshold, total)
        else:
            # ``tile_attention`` may hold only the drawn tiles' attention (Zoom-In
            # passes it so): the mass left is ``1 − S``, not summed from undrawn cells
            tile_weight = without_replacement_weights(alpha, total)

    # Stage 2, without replacement, per tile: weights of mean_n T^c_n.
    m = subtile_indices.shape[2]
    safe_indices = torch.where(
        torch.arange(m, device=subtile_indices.device)
        < n_sub.to(subtile_indices.device)[..., None],
        subtile_indices,
        torch.zeros_like(subtile_indices),
    )
    beta = subtile_attention.gather(2, safe_indices.to(subtile_attention.device))
    valid = torch.arange(m, device=beta.device) < n_sub.to(beta.device)[..., None]
    if bool((valid & (beta.detach() <= 0)).any()):
        raise ValueError("a drawn sub-tile has zero attention β^c_c'")
    sub_weight = without_replacement_weights(
        beta, n_sub, undrawn_mass(subtile_attention, safe_indices, valid)
    )  # (B, T, M)

    weights = tile_weight.unsqueeze(-1) * sub_weight
    z = torch.einsum("btm,btmd->bd", weights.to(features.dtype), features)
    if subtile_baseline:
        z = z - _subtile_control_variate(tile_weight, sub_weight, valid, live, features)
    return z


def _subtile_control_variate(
    tile_weight: Tensor, sub_weight: Tensor, valid: Tensor, live: Tensor, features: Tensor
) -> Tensor:
    """``Σ_c w_c (S_c − sg S_c) v_c``: zero in value, zero mean gradient (see the caller).

    ``S_c = Σ_n`` sub-tile weights of tile ``c`` (exactly 1 in value); ``v_c`` the
    leave-one-out mean, over the row's other live tiles, of their mean sub-tile
    feature (0 for a row with a single tile).
    """
    f = features.detach()
    n = valid.sum(-1, keepdim=True).clamp(min=1).to(f.dtype)  # (B, T, 1)
    tile_mean = torch.einsum("btm,btmd->btd", valid.to(f.dtype), f) / n
    tile_mean = tile_mean * live.unsqueeze(-1).to(f.dtype)
    others = live.sum(1, keepdim=True).unsqueeze(-1).to(f.dtype) - 1  # (B, 1, 1)
    v = (tile_mean.sum(1, keepdim=True) - tile_mean) / others.clamp(min=1)
    v = torch.where(others > 0, v, torch.zeros_like(v))
    s = sub_weight.sum(-1)
    centred = (s - s.detach()) * tile_weight.detach()  # zero in value; α gets no gradient
    return torch.einsum("bt,btd->bd", centred.to(f.dtype), v)
