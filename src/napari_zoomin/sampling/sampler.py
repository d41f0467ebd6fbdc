"""Drawing cells from attention distributions, with and without replacement.

The estimators in :mod:`.estimators` are unbiased only if the cells are drawn from
exactly the distribution they divide by, so everything that draws lives here and
takes the attention *probabilities* themselves (never a smoothed or re-normalised
copy):

- with replacement: independent categorical draws (inverse CDF in float64), ATS
  eq. (4) / Zoom-In eq. (3);
- without replacement: Gumbel-top-k on the *log*-probabilities (Kool et al. 2019,
  ref. [14] of 000), which yields a draw of ATS eq. (13) in sequential draw order.
  The official Zoom-In code adds the noise to the probabilities instead, which
  makes stage-2 sampling almost uniform (docs/methods.md); we do not.
  :func:`sample_with_threshold` also returns the first key left out, the threshold
  that priority weights (:func:`.estimators.priority_weights`) divide by.

Cells with probability zero (masked background) are never drawn, in either mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "draw_log_probabilities",
    "draws_to_counts",
    "gumbel_noise",
    "sample",
    "sample_subtiles",
    "sample_with_threshold",
    "subtile_draw_counts",
]


def _check_attention(attention: Tensor, name: str = "attention") -> None:
    if attention.dim() != 2:
        raise ValueError(f"{name} must have shape (B, K), got {tuple(attention.shape)}")
    if not torch.is_floating_point(attention):
        raise TypeError(f"{name} must be a floating-point tensor, got {attention.dtype}")
    with torch.no_grad():
        if attention.numel():
            # one pass (a NaN anywhere makes both NaN): a gigapixel slide's map has tens
            # of millions of cells, and three separate tests took 33 ms against 1 ms
            low, high = torch.aminmax(attention)
            if not (bool(low >= 0) and bool(torch.isfinite(high))):
                raise ValueError(f"{name} must be finite and non-negative")


def _uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) noise drawn on the generator's device (so seeding is device-independent)."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return u.to(like.device)


def gumbel_noise(
    shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Standard Gumbel noise ``−log(−log U)`` of ``shape``, in ``like``'s dtype and device.

    ``U`` is drawn in float64 and kept inside the open interval (0, 1), so the noise
    is always finite.
    """
    u = _uniform(shape, like, generator)
    tiny = torch.finfo(torch.float64).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(torch.float64).eps)
    return (-torch.log(-torch.log(u))).to(like.dtype)


def sample(
    attention: Tensor,
    n: int,
    replace: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``n`` cell indices per row of ``attention``.

    Args:
        attention: (B, K) probabilities, non-negative, rows summing to 1 (the
            estimators divide by these exact values). Not differentiated.
        n: draws per row.
        replace: ``True`` for independent categorical draws (duplicates allowed);
            ``False`` for distinct cells in sequential draw order (Gumbel-top-k on
            ``log attention``), i.e. draw ``k`` has probability
            ``a_i / (1 − Σ_{earlier} a)`` (ATS eq. 13).
        generator: optional ``torch.Generator``; with a seeded one the draws are
            deterministic. Its device may differ from ``attention``'s.

    Returns:
        LongTensor (B, n) of cell indices into K, on ``attention``'s device.

    Raises:
        ValueError: bad shapes or values, or (without replacement) ``n`` larger than
            the number of non-zero cells in some row. Callers cap ``n`` first.
    """
    return _sample(attention, n, replace, generator)[0]


def sample_with_threshold(
    attention: Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`sample` without replacement, and each row's threshold ``κ``.

    ``κ`` is the ``(n+1)``-th largest perturbed log-probability of the same
    Gumbel-top-k, the largest key left out (``−inf`` where a row has no further
    non-zero cell): a cell is drawn exactly when its key exceeds it, which is what
    :func:`.estimators.priority_weights` divides by.  The draws are those
    :func:`sample` makes from the same generator state.

    Returns:
        LongTensor (B, n) of cell indices in draw order, and (B,) ``κ`` in float64.
    """
    indices, threshold = _sample(attention, n, False, generator, threshold=True)
    assert threshold is not None
    return indices, threshold


def _sample(
    attention: Tensor,
    n: int,
    replace: bool,
    generator: torch.Generator | None,
    threshold: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`sample`'s draws, with Gumbel-top-k's threshold when asked (no replacement)."""
    _check_attention(attention)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    b, k = attention.shape
    if n == 0:
        kappa = _no_threshold(b, attention.device) if threshold else None
        return torch.zeros((b, 0), dtype=torch.long, device=attention.device), kappa
    a = attention.detach()
    # non-negative: a row's largest value says whether any cell is not 0
    empty = a.amax(dim=1) <= 0 if k else torch.ones(b, dtype=torch.bool)
    if b and bool(empty.any()):
        row = int(torch.nonzero(empty)[0, 0])
        raise ValueError(f"attention row {row} has no cell with non-zero probability")
    if replace:
        return _sample_with_replacement(a, n, generator), None
    nonzero = (a > 0).sum(dim=1)
    fewest = int(nonzero.min()) if b else k
    if n > fewest:
        row = int(torch.argmin(nonzero))
        raise ValueError(
            f"cannot draw n={n} distinct cells without replacement: row {row} has only "
            f"{fewest} cells with non-zero probability (cap n at the non-zero count first)"
        )
    # Gumbel-top-k, 000 ref. [14]: perturb log-probabilities, keep the order of the
    # top n, which is the sequential draw order.  log 0 = −inf, so zero cells lose
    # against every non-zero cell.  Keys in the attention's precision (at least
    # float32), so a gigapixel stage-1 map is not copied to float64.
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    keys = torch.log(a) + gumbel_noise((b, k), a, generator)
    if not threshold:
        return torch.topk(keys, n, dim=1, largest=True, sorted=True).indices, None
    top = torch.topk(keys, min(n + 1, k), dim=1, largest=True, sorted=True)
    # a zero cell's key is −inf: no further non-zero cell leaves κ at −inf
    kappa = top.values[:, n].to(torch.float64) if k > n else _no_threshold(b, a.device)
    return top.indices[:, :n], kappa


def _no_threshold(rows: int, device: torch.device) -> Tensor:
    """``κ = −inf`` per row: no key was left out, so every cell's ``q`` is 1."""
    return torch.full((rows,), -torch.inf, dtype=torch.float64, device=device)


def draw_log_probabilities(
    attention: Tensor, indices: Tensor, replace: bool, valid: Tensor | None = None
) -> Tensor:
    """(R, N) log-probability of each draw of :func:`sample`, given the earlier ones.

    Their row sum is the log-probability of the row's draw sequence, the score a
    policy gradient differentiates (REINFORCE on the joint draws).  With replacement
    draw ``k`` has probability ``a_{I_k}``; without, ``a_{I_k} / (1 − Σ_{j<k} a_{I_j})``
    (ATS eq. 13), the mass left summed from what is left, ``undrawn + Σ_{j≥k} a_{I_j}``,
    as in :func:`.estimators.without_replacement_weights` (``1 − S`` is rounding
    noise once a peaked map's first draws hold almost all of it; both have the same
    gradient, since the attention sums to 1).  Differentiable in
    ``attention``; draws that are not ``valid`` (padding) get 0.
    """
    idx = indices.to(attention.device)
    real = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(idx.device)
    drawn = torch.where(real, attention.gather(-1, idx), torch.ones((), dtype=attention.dtype))
    log_p = torch.log(drawn)
    if not replace:
        kept = torch.where(real, drawn, torch.zeros((), dtype=attention.dtype))
        later = torch.flip(torch.cumsum(torch.flip(kept, [-1]), dim=-1), [-1])
        hits = torch.zeros_like(attention, dtype=torch.bool).scatter_(-1, idx, real)
        rest = attention.masked_fill(hits, 0.0).sum(-1)  # the undrawn cells' mass
        log_p = log_p - torch.log(torch.where(real, rest.unsqueeze(-1) + later, 1.0))
    return torch.where(real, log_p, torch.zeros((), dtype=attention.dtype))


#: cells per chunk of the two-level draw of :func:`_sample_with_replacement`
CHUNK = 1024


def _sample_with_replacement(
    a: Tensor, n: int, generator: torch.Generator | None, chunk: int = CHUNK
) -> Tensor:
    """Inverse-CDF categorical draws in float64.

    Cell ``k`` is drawn iff ``cum[k-1] <= u·total < cum[k]``; a zero-probability cell
    has an empty interval, so it is never drawn.  A ``u·total`` that rounding pushes
    to ``total`` is mapped to the last non-zero cell.  The cumulative sum is float64
    because a float32 sum over millions of cells drifts by more than small
    probabilities.  Maps of more than 64 chunks are drawn in two levels
    (:func:`_sample_chunked`).
    """
    if a.shape[0] and a.shape[1] > 64 * chunk:
        return _sample_chunked(a, n, generator, chunk)
    cum = torch.cumsum(a, dim=1, dtype=torch.float64)
    total = cum[:, -1:].contiguous()  # a (B, 1) column: searchsorted wants it contiguous
    u = _uniform((a.shape[0], n), cum, generator) * total
    idx = torch.searchsorted(cum, u, right=True)
    # the last non-zero cell is the first whose cumulative sum reaches the total; found
    # on ``cum`` itself, no temporary the size of a gigapixel slide's map (tens of
    # millions of cells: each such copy is hundreds of MB)
    last_nonzero = torch.searchsorted(cum, total, right=False)
    return torch.minimum(idx, last_nonzero)


def _sample_chunked(a: Tensor, n: int, generator: torch.Generator | None, chunk: int) -> Tensor:
    """:func:`_sample_with_replacement` in two levels, the same rule: a chunk of
    ``chunk`` cells by the float64 cumulative sum of the chunks' float64 sums, then a cell
    by the float64 cumulative sum inside it.  A gigapixel slide's map (9.8 million
    cells at 100,000²) is then never summed cumulatively as a whole: 64 → 10 ms.

    The two sums of a chunk may differ in the last bit; a draw past the end of its
    chunk's own sum goes to the chunk's last non-zero cell, as a draw past the total
    does in one level.  A zero chunk or cell has an empty interval: never drawn.
    """
    b, k = a.shape
    full = k - k % chunk
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        # numpy's pairwise float64 sums: 4x faster than torch's
        import numpy as np

        x = a.numpy()
        parts = [np.add.reduce(x[:, :full].reshape(b, -1, chunk), axis=2, dtype=np.float64)]
        if full < k:
            parts.append(np.add.reduce(x[:, full:], axis=1, dtype=np.float64)[:, None])
        sums = torch.from_numpy(np.concatenate(parts, axis=1))
    else:
        sums = a[:, :full].reshape(b, -1, chunk).sum(dim=2, dtype=torch.float64)
        if full < k:
            sums = torch.cat((sums, a[:, full:].sum(dim=1, keepdim=True, dtype=torch.float64)), 1)
    cum = torch.cumsum(sums, dim=1)
    total = cum[:, -1:].contiguous()
    u = _uniform((b, n), cum, generator) * total
    last_chunk = torch.searchsorted(cum, total, right=False)
    c = torch.minimum(torch.searchsorted(cum, u, right=True), last_chunk)  # (B, n)
    before = torch.where(c > 0, cum.gather(1, (c - 1).clamp(min=0)), 0.0)
    # the drawn chunks' cells, a chunk per draw (the last chunk padded with zeros)
    cells = c[..., None] * chunk + torch.arange(chunk, device=a.device)  # (B, n, chunk)
    inside = cells < k
    values = a.gather(1, cells.clamp(max=k - 1).reshape(b, -1)).reshape(cells.shape)
    values = torch.where(inside, values, 0)
    within = torch.cumsum(values, dim=2, dtype=torch.float64)
    v = (u - before)[..., None]
    j = torch.searchsorted(within, v, right=True)
    last = torch.searchsorted(within, within[..., -1:].contiguous(), right=False)
    return (c[..., None] * chunk + torch.minimum(j, last))[..., 0]


def draws_to_counts(indices: Tensor) -> tuple[Tensor, Tensor]:
    """Turn with-replacement draws into distinct cells and their counts.

    Zoom-In stage 1 reads and attends each drawn tile once, however often it was
    drawn (000 §2.2); its count ``m_c`` enters the two-stage estimator.

    Args:
        indices: LongTensor (B, N) of draws.

    Returns:
        ``cells`` (B, T) and ``counts`` (B, T), T = the largest number of distinct
        cells in a row; distinct cells come first in ascending order, padding
        entries have cell 0 and count 0. ``counts.sum(1) == N``.
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must have shape (B, N), got {tuple(indices.shape)}")
    b, n = indices.shape
    device = indices.device
    if n == 0:
        empty = torch.zeros((b, 0), dtype=torch.long, device=device)
        return empty, empty.clone()
    ordered, _ = torch.sort(indices, dim=1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = torch.cumsum(first.long(), dim=1) - 1  # (B, N) which distinct cell each draw is
    t = int(slot.max()) + 1
    cells = torch.zeros((b, t), dtype=torch.long, device=device)
    counts = torch.zeros((b, t), dtype=torch.long, device=device)
    cells.scatter_(1, slot, ordered)
    counts.scatter_add_(1, slot, torch.ones_like(ordered))
    return cells, counts


def subtile_draw_counts(subtile_attention: Tensor, tile_counts: Tensor) -> Tensor:
    """How many sub-tiles each drawn tile gets: ``min(m_c, non-zero cells of β^c)``.

    Capping at the non-zero count keeps the estimator unbiased (the mean of fewer
    ``T_n`` is still unbiased) and is the single rule shared by the sampler and the
    estimator, so both always agree on which draws are real.

    Args:
        subtile_attention: (B, T, K2) β^c of each drawn tile.
        tile_counts: LongTensor (B, T) m_c (0 for padding).

    Returns:
        LongTensor (B, T).
    """
    nonzero = (subtile_attention.detach() > 0).sum(dim=-1)
    return torch.minimum(tile_counts.to(nonzero.device), nonzero)


def sample_subtiles(
    subtile_attention: Tensor,
    tile_counts: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Zoom-In stage 2: for every drawn tile, draw its sub-tiles without replacement.

    Tile ``c`` gets ``n_c = min(m_c, nnz(β^c))`` distinct sub-tiles from ``β^c``
    (Gumbel-top-k on ``log β^c``, in sequential draw order, 000 eq. 9).

    Args:
        subtile_attention: (B, T, K2) β^c, rows summing to 1 where ``tile_counts > 0``.
        tile_counts: LongTensor (B, T) m_c from :func:`draws_to_counts`.
        generator: optional seeded generator.

    Returns:
        ``indices`` LongTensor (B, T, M), M = max n_c, the first ``n_c`` entries of
        ``indices[b, t]`` are the draws; and ``n_subtiles`` LongTensor (B, T) = n_c.
    """
    if subtile_attention.dim() != 3:
        raise ValueError(
            f"subtile_attention must have shape (B, T, K2), got {tuple(subtile_attention.shape)}"
        )
    b, t, k2 = subtile_attention.shape
    if tile_counts.shape != (b, t):
        raise ValueError(f"tile_counts must have shape {(b, t)}, got {tuple(tile_counts.shape)}")
    beta = subtile_attention.detach()
    live = tile_counts > 0
    if bool((beta < 0).any() | ~torch.isfinite(beta).all()):
        raise ValueError("subtile_attention must be finite and non-negative")
    n_sub = subtile_draw_counts(beta, tile_counts)
    if bool((live & (n_sub == 0)).any()):
        raise ValueError("a drawn tile has a sub-tile attention with no non-zero cell")
    m = int(n_sub.max()) if n_sub.numel() else 0
    if m == 0:
        return torch.zeros((b, t, 0), dtype=torch.long, device=beta.device), n_sub
    beta = beta.to(torch.promote_types(beta.dtype, torch.float32))
    keys = torch.log(beta) + gumbel_noise((b, t, k2), beta, generator)
    indices = torch.topk(keys, m, dim=-1, largest=True, sorted=True).indices
    return indices, n_sub
