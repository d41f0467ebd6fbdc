"""Non-repeating tissue for sample slides (recipe 2): real fragments quilted along cuts.

The plane is covered by a grid of square *blocks* (``STEP`` apart, ``BLOCK`` wide, so
neighbours overlap by ``OVERLAP`` px).  Blocks are grouped into irregular *pieces*
(Voronoi cells of jittered seeds ``PIECE`` blocks apart); a piece is one rigid copy
of CMU-1-Small-Region under one of the 8 rotations/flips, at a random place of dense
tissue, in one of a few slightly different stains, so inside a piece overlapping
blocks agree exactly.  Where pieces meet, blocks are joined along minimum-error
boundary cuts (image quilting, Efros & Freeman 2001): a vertical cut through the
overlap with the block to the left, and a horizontal cut through the overlap with
the (already cut) row above.  Every cut depends only on a handful of neighbouring
blocks, so all cuts are computed up front, vectorised across many blocks at once,
and any window of the plane is then a pure gather (:meth:`QuiltTissue.at`): tiles
render independently, in any order, in parallel, and the same seed gives the same
pixels.

Why pieces and not single random blocks: random 384-px blocks make a patchwork whose
every border is a cut (visible where two unrelated fragments meet) and whose
rotations scramble fibre directions; pieces keep real structure over 0.3-0.8 mm.
Stain varies smoothly over the slide (two smooth fields scale haematoxylin and eosin
in HED space by a few %), quantised to a few stain variants of the source.

Coordinates are level-0 pixels, arrays ``[y, x]``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np

#: Block grid: blocks start every STEP px and are BLOCK px wide (OVERLAP = BLOCK - STEP).
STEP = 256
OVERLAP = 128
BLOCK = STEP + OVERLAP
#: Pieces: seeds of the Voronoi partition of the block grid are PIECE blocks apart.
PIECE = 3
#: Structures of CMU-1-Small-Region that would be recognised when they repeat (a hair
#: follicle, two sweat ducts): discs (y, x, radius) in source pixels, treated as unusable.
LANDMARKS = ((2090, 1265, 170), (2560, 1720, 90), (2800, 1660, 90))
#: Random source origins tried per piece, and the tissue fraction that accepts one.
TRIES = 24
MIN_DENSITY = 0.85
#: Weight of the smooth random cost added to cut errors (per squared grey level), so
#: cuts between very different fragments wander like a tissue border, not a ruler.
CUT_NOISE = 3000.0
NOISE_BANK = 32
#: Stain variants: haematoxylin and eosin scale factors (HED space), all combinations.
STAIN_SCALES = (0.92, 1.0, 1.08)
#: Correlation length (blocks) of the smooth stain fields.
STAIN_SMOOTH = 8.0
#: Blocks whose cuts are computed together (memory: ~0.3 MB per block).
CHUNK = 256


def stain_lut(h: float, e: float) -> np.ndarray:
    """Colour shift ``(32**3, 3)`` (int16) scaling haematoxylin by ``h``, eosin by ``e``.

    Scaling HED stain densities is a linear map in optical density: the colour
    ``exp(-OD @ M)`` with one 3×3 ``M`` (the same transform as
    ``hed2rgb(rgb2hed(rgb) * [h, e, 1])`` in scikit-image, whose matrices it uses).
    The shift is smooth in RGB, so it is tabulated on an 8-level grid
    (:func:`colour_bins`) and added to the exact pixel (:func:`apply_stain`).
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    c = np.arange(4, 256, 8, dtype=np.float64)  # bin centres
    rgb = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1).reshape(-1, 3)
    od = -np.log(rgb / 255.0)
    m = hed_from_rgb @ np.diag([h, e, 1.0]) @ rgb_from_hed
    return np.rint(np.exp(-(od @ m)) * 255.0 - rgb).astype(np.int16)


def colour_bins(rgb: np.ndarray) -> np.ndarray:
    """Row of :func:`stain_lut` for every pixel of ``rgb`` (int16, same shape less colour)."""
    q = (rgb >> 3).astype(np.int16)
    return (q[..., 0] << 10) | (q[..., 1] << 5) | q[..., 2]


def apply_stain(rgb: np.ndarray, bins: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    """``out = rgb`` re-stained with ``lut`` (:func:`stain_lut`; ``bins``: :func:`colour_bins`)."""
    for y in range(0, rgb.shape[0], 256):
        new = lut.take(bins[y : y + 256], axis=0)
        new += rgb[y : y + 256]
        np.clip(new, 0, 255, out=new)
        out[y : y + 256] = new


def _smooth_uniform(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A smooth random field on ``shape`` with values spread uniformly over [0, 1)."""
    from scipy.ndimage import gaussian_filter
    from scipy.special import ndtr

    pad = int(3 * sigma) + 1
    raw = rng.standard_normal((shape[0] + 2 * pad, shape[1] + 2 * pad))
    f = gaussian_filter(raw, sigma, mode="wrap")[pad:-pad, pad:-pad]
    return ndtr(f / (f.std() + 1e-12))


def _sq_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared colour distance of two uint8 ``(..., 3)`` stacks, summed over colour (float32)."""
    out = None
    for c in range(3):
        d = a[..., c].astype(np.float32) - b[..., c]
        d *= d
        out = d if out is None else out + d
    return out


def _min_cut(err: np.ndarray) -> np.ndarray:
    """Minimum-error paths through ``err`` (n, L, W), top to bottom: (n, L) column indices.

    Dynamic programming as in image quilting: each step moves at most one column.
    """
    n, length, width = err.shape
    cost = err.copy()
    for r in range(1, length):
        prev = cost[:, r - 1]
        best = prev.copy()
        np.minimum(best[:, 1:], prev[:, :-1], out=best[:, 1:])
        np.minimum(best[:, :-1], prev[:, 1:], out=best[:, :-1])
        cost[:, r] += best
    path = np.empty((n, length), np.int64)
    path[:, -1] = cost[:, -1].argmin(axis=1)
    rows = np.arange(n)
    for r in range(length - 2, -1, -1):
        c = path[:, r + 1]
        cand = np.stack([np.maximum(c - 1, 0), c, np.minimum(c + 1, width - 1)], axis=1)
        vals = cost[rows[:, None], r, cand]
        path[:, r] = cand[rows, vals.argmin(axis=1)]
    return path


class QuiltTissue:
    """The tissue texture of one slide: any window of the plane ``[0, extent)²``.

    ``source`` is the real RGB image (CMU-1-Small-Region); ``has_tissue(y0, x0, h,
    w)`` says conservatively whether a window can contain tissue (blocks that cannot
    are never cut, as nothing shows them).  ``rng`` fixes everything.
    ``map_fn(fn, items)`` may run the cut chunks in parallel; ``progress(fraction)``
    hears how far the cuts are.

    Blocks are grouped into *pieces* (Voronoi cells of a jittered grid of seeds,
    ``PIECE`` blocks apart): a piece is one contiguous fragment of the source under
    one dihedral transform and one stain, so its blocks agree exactly where they
    overlap and only piece borders need a cut.
    """

    def __init__(
        self,
        source: np.ndarray,
        extent: int,
        rng: np.random.Generator,
        has_tissue: Callable[[int, int, int, int], bool],
        map_fn: Callable | None = None,
        progress: Callable[[float], None] | None = None,
    ):
        self.n = n = math.ceil(extent / STEP) + 2  # a spare row and column of blocks
        self.piece = _pieces(rng, n)
        n_pieces = int(self.piece.max()) + 1
        nh = len(STAIN_SCALES)
        # stain variants, each computed on first use (untouched ones cost no memory)
        self.source = source
        self.variants = np.empty((nh * nh, *source.shape), np.uint8)
        self._made: set[int] = set()
        self._bins: np.ndarray | None = None
        self._lock = threading.Lock()
        self.piece_k = rng.integers(0, 8, n_pieces)
        # stain: two smooth fields (H and E scale levels), read at each piece's centre
        counts = np.bincount(self.piece.ravel())
        level = []
        for _ in range(2):
            f = _smooth_uniform(rng, (n, n), STAIN_SMOOTH)
            mean = np.bincount(self.piece.ravel(), f.ravel()) / counts
            level.append(np.minimum((mean * nh).astype(np.int64), nh - 1))
        self.piece_variant = level[0] * nh + level[1]
        tissue = _usable(source)
        density = [_window_density(dihedral(tissue, k)) for k in range(8)]
        ii, jj = np.mgrid[0:n, 0:n]
        order = np.argsort(self.piece.ravel(), kind="stable")
        bounds = np.searchsorted(self.piece.ravel()[order], np.arange(n_pieces + 1))
        # a piece is one rigid copy: slide pixel (y, x) is pixel (y + dy, x + dx) of its
        # transformed source.  A block of a piece that would show mostly glass or a hole
        # of the source leaves it and becomes a piece of its own, with its own fragment.
        ks, variants, dys, dxs = list(self.piece_k), list(self.piece_variant), [], []
        split: list[tuple[int, int, int, int]] = []  # (k, variant, dy, dx) of lone blocks
        for p in range(n_pieces):
            cells = order[bounds[p] : bounds[p + 1]]
            bi, bj = ii.ravel()[cells], jj.ravel()[cells]
            k = int(self.piece_k[p])
            oy, ox, dens = _piece_origin(rng, density[k], bi - bi.min(), bj - bj.min())
            dys.append(oy - int(bi.min()) * STEP)
            dxs.append(ox - int(bj.min()) * STEP)
            for cell in cells[dens < MIN_DENSITY] if len(cells) > 1 else ():
                i, j = divmod(int(cell), n)
                k = int(rng.integers(0, 8))
                oy, ox, _ = _piece_origin(rng, density[k], np.zeros(1, int), np.zeros(1, int))
                self.piece[i, j] = n_pieces + len(split)
                split.append((k, int(self.piece_variant[p]), oy - i * STEP, ox - j * STEP))
        for k, v, dy, dx in split:
            ks.append(k)
            variants.append(v)
            dys.append(dy)
            dxs.append(dx)
        self.piece_k = np.array(ks)
        self.piece_variant = np.array(variants)
        self.piece_dy = np.array(dys, np.int64)
        self.piece_dx = np.array(dxs, np.int64)
        # ... and pixel number base + cy * y + cx * x of self.variants
        h, w = source.shape[:2]
        piece_affine = np.zeros((len(ks), 3), np.int64)
        for p, (k, v, dy, dx) in enumerate(zip(ks, variants, dys, dxs, strict=True)):
            pts = [_to_source(int(k), dy + y, dx + x, h, w) for y, x in ((0, 0), (1, 0), (0, 1))]
            flat = [(int(v) * h + y) * w + x for y, x in pts]
            piece_affine[p] = (flat[0], flat[1] - flat[0], flat[2] - flat[0])
        self.k = self.piece_k[self.piece].astype(np.int8)
        self.variant = self.piece_variant[self.piece].astype(np.int8)
        self.sy = self.piece_dy[self.piece] + ii * STEP  # block corners, transformed source
        self.sx = self.piece_dx[self.piece] + jj * STEP
        # each block maps its (u, v) affinely to a pixel number of self.variants
        self.piece_affine = piece_affine
        self.affine = piece_affine[self.piece]
        self.affine[..., 0] += self.affine[..., 1] * ii * STEP + self.affine[..., 2] * jj * STEP
        self.active = np.array(
            [[has_tissue(i * STEP, j * STEP, BLOCK, BLOCK) for j in range(n)] for i in range(n)]
        )
        self.active[-1] = self.active[:, -1] = False  # the spare blocks only feed cuts
        self.left = np.zeros((n, n, BLOCK), np.int8)  # vertical cut: block owns col >= left
        self.top = np.zeros((n, n, BLOCK), np.int8)  # horizontal cut: block owns row >= top
        from scipy.ndimage import gaussian_filter

        half = (NOISE_BANK, BLOCK // 2, OVERLAP // 2)
        noise = gaussian_filter(rng.standard_normal(half), (0, 4, 4))
        self.noise = (noise * (CUT_NOISE / noise.std())).astype(np.float32)
        map_fn = map_fn or (lambda fn, items: [fn(x) for x in items])
        border = np.zeros((n, n), bool)
        border[:, 1:] = self.piece[:, 1:] != self.piece[:, :-1]
        left = _chunks(np.argwhere(self.active & border))
        border[:] = False
        border[1:] = self.piece[1:] != self.piece[:-1]
        # a block's top strip also meets the pieces of the row above's neighbours
        border[1:, 1:] |= self.piece[1:, 1:] != self.piece[:-1, :-1]
        border[1:, :-1] |= self.piece[1:, :-1] != self.piece[:-1, 1:]
        top = _chunks(np.argwhere(self.active & border))
        # the horizontal cuts look at the row above as cut: all vertical cuts come first
        done = 0
        for fn, chunks in ((self._left_cuts, left), (self._top_cuts, top)):
            for _ in map_fn(fn, chunks):
                done += 1
                if progress is not None:
                    progress(done / (len(left) + len(top)))

    # -- blocks ---------------------------------------------------------------
    def _ensure(self, variants) -> None:
        """Compute the stain variants in ``variants`` that do not exist yet."""
        for v in sorted({int(x) for x in np.ravel(variants)} - self._made):
            with self._lock:
                if v in self._made:
                    continue
                nh = len(STAIN_SCALES)
                h, e = STAIN_SCALES[v // nh], STAIN_SCALES[v % nh]
                if h == 1.0 and e == 1.0:
                    self.variants[v] = self.source
                else:
                    if self._bins is None:
                        self._bins = colour_bins(self.source)
                    apply_stain(self.source, self._bins, stain_lut(h, e), self.variants[v])
                self._made.add(v)

    def block(self, i: int, j: int) -> np.ndarray:
        """Block ``(i, j)``'s pixels, ``(BLOCK, BLOCK, 3)`` (a view)."""
        if not (0 <= i < self.n and 0 <= j < self.n):
            return np.zeros((BLOCK, BLOCK, 3), np.uint8)
        self._ensure(self.variant[i, j])
        y, x = int(self.sy[i, j]), int(self.sx[i, j])
        a = dihedral(self.variants[self.variant[i, j]], int(self.k[i, j]))
        return a[y : y + BLOCK, x : x + BLOCK]

    def _left_cuts(self, ij: np.ndarray) -> None:
        """Vertical cuts of blocks ``ij`` against their left neighbours (at half resolution)."""
        a = np.stack([self.block(i, j - 1)[::2, STEP::2] for i, j in ij])
        b = np.stack([self.block(i, j)[::2, :OVERLAP:2] for i, j in ij])
        err = _sq_diff(a, b)
        err += self.noise[(ij[:, 0] * 7 + ij[:, 1] * 13) % NOISE_BANK]
        self.left[ij[:, 0], ij[:, 1]] = 2 * _min_cut(err).repeat(2, axis=1)

    def _top_cuts(self, ij: np.ndarray) -> None:
        """Horizontal cuts of blocks ``ij`` against the finished row above (half resolution)."""
        above = np.empty((len(ij), OVERLAP // 2, BLOCK // 2, 3), np.uint8)
        for i in np.unique(ij[:, 0]):  # one strip per block row, cut into block widths
            sel = np.flatnonzero(ij[:, 0] == i)
            j0, j1 = int(ij[sel, 1].min()), int(ij[sel, 1].max())
            strip = self.at(i * STEP, j0 * STEP, OVERLAP, (j1 - j0) * STEP + BLOCK, i - 1, 2)
            for n in sel:
                x = (int(ij[n, 1]) - j0) * STEP // 2
                above[n] = strip[:, x : x + BLOCK // 2]
        b = np.stack([self.block(i, j)[:OVERLAP:2, ::2] for i, j in ij])
        err = _sq_diff(above, b).transpose(0, 2, 1)
        err += self.noise[(ij[:, 0] * 13 + ij[:, 1] * 7 + 1) % NOISE_BANK]
        self.top[ij[:, 0], ij[:, 1]] = 2 * _min_cut(err).repeat(2, axis=1)

    # -- windows --------------------------------------------------------------
    def at(
        self, y0: int, x0: int, h: int, w: int, band: int | None = None, step: int = 1
    ) -> np.ndarray:
        """Quilted pixels ``[y0, y0+h) × [x0, x0+w)`` as a new ``(h, w, 3)`` uint8 array.

        ``band`` and ``step`` (internal, for the cuts) restrict to one block row before
        its cut to the row below, and take every ``step``-th pixel.
        """
        if step == 1 and band is None:
            return self._at_pieces(y0, x0, h, w)
        yy = np.arange(y0, y0 + h, step)
        xx = np.arange(x0, x0 + w, step)
        bi, u, bj, v = self._blocks(yy, xx, band)
        # each block maps (u, v) affinely to a pixel of its stained, transformed source
        i0, j0 = int(bi.min()), int(bj.min())
        i1, j1 = int(bi.max()) + 1, int(bj.max()) + 1
        if i0 < 0 or j0 < 0 or i1 > self.n or j1 > self.n:
            raise ValueError(f"window ({y0}, {x0}, {h}, {w}) reaches beyond the tissue plane")
        self._ensure(self.variant[i0:i1, j0:j1])
        coef = self.affine[i0:i1, j0:j1].reshape(-1, 3)
        local = (bi - i0) * (j1 - j0) + (bj - j0)
        flat = coef[:, 0].take(local)
        flat += coef[:, 1].take(local) * u
        flat += coef[:, 2].take(local) * v
        return self.variants.reshape(-1, 3).take(flat, axis=0)

    def _at_pieces(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """:meth:`at` through the pieces: each is a rigid copy of its transformed source
        (one affine map for all its blocks), and the cuts are constant on aligned 2×2
        pixels (computed at half resolution), so ownership is found on every other pixel."""
        ey, ex = y0 - y0 % 2, x0 - x0 % 2  # even corner
        bi, _, bj, _ = self._blocks(np.arange(ey, y0 + h, 2), np.arange(ex, x0 + w, 2), None)
        if bi.min() < 0 or bj.min() < 0 or bi.max() >= self.n or bj.max() >= self.n:
            raise ValueError(f"window ({y0}, {x0}, {h}, {w}) reaches beyond the tissue plane")
        owner = self.piece[bi, bj]
        p0 = int(owner.min())
        local = (owner - p0).astype(np.int32)
        used = np.arange(p0, int(owner.max()) + 1)
        self._ensure(self.piece_variant[used])
        coef = self.piece_affine[used]
        local = local.repeat(2, axis=0).repeat(2, axis=1)
        local = local[y0 - ey : y0 - ey + h, x0 - ex : x0 - ex + w]
        flat = coef[:, 0].take(local)
        flat += coef[:, 1].take(local) * np.arange(y0, y0 + h)[:, None]
        flat += coef[:, 2].take(local) * np.arange(x0, x0 + w)
        return self.variants.reshape(-1, 3).take(flat, axis=0)

    def _blocks(self, yy: np.ndarray, xx: np.ndarray, band: int | None):
        """Owning block ``(bi, bj)`` and position in it ``(u, v)`` of pixels ``yy × xx``."""
        h, w = len(yy), len(xx)
        bi_row = yy // STEP if band is None else np.full(h, band)
        u_row = yy - bi_row * STEP  # row inside block row bi
        bj, v = self._owner(bi_row[:, None], u_row[:, None], xx)
        bi = np.repeat(bi_row[:, None], w, axis=1)
        u = np.repeat(u_row[:, None], w, axis=1)
        if band is None:
            # rows in the top overlap: above the block's horizontal cut, the row above shows
            rows = np.flatnonzero((u_row < OVERLAP) & (bi_row > 0) & (bi_row < self.n))
            if len(rows):
                ri, ru = bi_row[rows][:, None], u_row[rows][:, None]
                rj, rv = bj[rows], v[rows]
                cut = self.top.ravel().take((ri * self.n + np.minimum(rj, self.n - 1)) * BLOCK + rv)
                up = ru < cut
                uj, uv = self._owner(ri - 1, ru + STEP, xx)
                bi[rows] = np.where(up, ri - 1, ri)
                u[rows] = np.where(up, ru + STEP, ru)
                bj[rows] = np.where(up, uj, rj)
                v[rows] = np.where(up, uv, rv)
        return bi, u, bj, v

    def _owner(self, bi: np.ndarray, u: np.ndarray, xx: np.ndarray):
        """Block column and column-in-block owning ``(u, x)`` of block rows ``bi`` (column
        vectors ``(r, 1)``): ``(r, len(xx))`` arrays; the vertical cuts decide in overlaps."""
        j = xx // STEP
        v = xx - j * STEP
        # left[:, 0] is all 0 (nothing left of column 0) and v >= OVERLAP never shifts
        index = (np.minimum(bi, self.n - 1) * self.n + np.minimum(j, self.n - 1)) * BLOCK + u
        shift = v < self.left.ravel().take(index)
        return j - shift, v + shift * STEP


def _to_source(k: int, ty: int, tx: int, h: int, w: int) -> tuple[int, int]:
    """Pixel ``(ty, tx)`` of ``dihedral(a, k)`` is pixel ``(y, x)`` of ``a`` (``h × w``)."""
    hh, ww = (w, h) if k >= 4 else (h, w)  # shape after the transpose
    r = k % 4
    if r == 0:
        y, x = ty, tx
    elif r == 1:
        y, x = tx, ww - 1 - ty
    elif r == 2:
        y, x = hh - 1 - ty, ww - 1 - tx
    else:
        y, x = hh - 1 - tx, ty
    return (x, y) if k >= 4 else (y, x)


def dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 rotations/flips of ``a`` (a view): ``k`` quarter turns, ``+4`` transposed."""
    if k >= 4:
        a = a.swapaxes(0, 1)
    return np.rot90(a, k % 4)


def _pieces(rng: np.random.Generator, n: int) -> np.ndarray:
    """Piece id of every block of an ``n × n`` grid: Voronoi cells of jittered seeds."""
    from scipy.spatial import cKDTree

    m = math.ceil(n / PIECE) + 1
    gy, gx = np.mgrid[0:m, 0:m].astype(float)
    seeds = (np.stack([gy.ravel(), gx.ravel()], 1) + rng.uniform(0, 1, (m * m, 2))) * PIECE
    seeds -= PIECE / 2
    ii, jj = np.mgrid[0:n, 0:n]
    _, nearest = cKDTree(seeds).query(np.stack([ii.ravel(), jj.ravel()], 1))
    _, ids = np.unique(nearest, return_inverse=True)
    return ids.reshape(n, n)


def _usable(source: np.ndarray) -> np.ndarray:
    """Where ``source`` is usable tissue: not white, not a :data:`LANDMARKS` disc."""
    tissue = source.min(axis=2) < 215
    for y, x, r in LANDMARKS:
        yy, xx = np.ogrid[y - r : y + r + 1, x - r : x + r + 1]
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        window = tissue[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1]
        window &= ~disc[max(r - y, 0) :, max(r - x, 0) :][: window.shape[0], : window.shape[1]]
    return tissue


def _window_density(usable: np.ndarray) -> np.ndarray:
    """Usable fraction of the ``BLOCK²`` window at every top-left corner, on a 4-px grid."""
    q = 4
    h, w = usable.shape[0] // q, usable.shape[1] // q
    tissue = usable[: h * q : q, : w * q : q]
    ii = np.zeros((h + 1, w + 1), np.int64)
    ii[1:, 1:] = tissue.cumsum(0).cumsum(1)
    b = BLOCK // q
    return (ii[b:, b:] - ii[:-b, b:] - ii[b:, :-b] + ii[:-b, :-b]) / b**2


def _piece_origin(
    rng: np.random.Generator, density: np.ndarray, di: np.ndarray, dj: np.ndarray
) -> tuple[int, int, np.ndarray]:
    """Where a piece (blocks at offsets ``di, dj``) starts in the transformed source,
    and the tissue fraction of each of its blocks there.

    The first of ``TRIES`` random origins whose blocks hold on average at least
    ``MIN_DENSITY`` tissue, else the best: always the best would always be the same
    few places.
    """
    q = 4
    hi_y = density.shape[0] - int(di.max()) * STEP // q
    hi_x = density.shape[1] - int(dj.max()) * STEP // q
    if hi_y < 1 or hi_x < 1:
        raise ValueError("a sample-slide piece is larger than the tissue source")
    cy = rng.integers(0, hi_y, TRIES)
    cx = rng.integers(0, hi_x, TRIES)
    dens = density[cy[:, None] + di * STEP // q, cx[:, None] + dj * STEP // q]
    score = dens.mean(axis=1)
    ok = np.flatnonzero(score >= MIN_DENSITY)
    best = int(ok[0]) if len(ok) else int(score.argmax())
    return int(cy[best]) * q, int(cx[best]) * q, dens[best]


def _chunks(ij: np.ndarray) -> list[np.ndarray]:
    return [ij[s : s + CHUNK] for s in range(0, len(ij), CHUNK)]
