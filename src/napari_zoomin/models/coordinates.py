"""Cells of attention maps ↔ full-resolution (level-0) pixels.

An attention network looks at a view ``V(region, s)`` of a level-0 region (the whole
image at stage 1, a tile at stage 2) and returns a map of cells.  Cell ``(i, j)`` of
that map is centred, in view pixels, on its receptive field::

    v = offset + (i, j) · stride

(``offset = 0, stride = 1`` for 'same' convolutions; for three 3×3 'valid'
convolutions the map is 6 pixels smaller than the view and ``offset = 3``: ignoring
this offset is a defect of public code, docs/methods.md).  The view pixel ``v`` maps to
the level-0 centre of 000 §2.1, written 0-based:

    centre = top + round(v · (h − 1) / (h_v − 1))

for a region of height ``h`` shown by a view of ``h_v`` rows (the same for columns;
``h_v = 1`` maps to the middle).  This is the paper's
``1 + (i − 1)(H − 1)/(h − 1)``: the view's first and last pixel rows land on the
region's first and last rows.  It differs from the centre of an area-downsampled
pixel's footprint by at most half a view pixel, which the tile (side > 1/s) covers.
Rounding is half up, in float64 from int64 inputs (exact for any realistic slide).
A tile of size ``(h1, w1)`` around a centre is ``[cy − h1//2, cx − w1//2, h1, w1]``,
then placed inside the image by :func:`place_regions` (the edge rule below).

**The edge rule** (one rule for every model, both stages, training and inference;
``docs/engine.md``).  000 zero-pads the image by half a tile, so a tile drawn at the
border is half black, and an attention network that likes dark nuclei then likes
the padding: on real H&E the public recipe reads sub-tiles *outside* the slide and
classifies zero fill.  Here:

1. Every grid knows the image's level-0 extent (``bounds``).  A cell is *eligible*
   only if its level-0 centre lies inside the image (:meth:`CellGrid.inside`).  At
   stage 1 every cell is (000's mapping puts the view's first and last pixels on
   the image's first and last rows); at stage 2 every cell of a tile placed inside
   the image is.
2. Every region read around a cell (tile or sub-tile) is *shifted* by the
   least amount that puts it wholly inside the image, never clipped, never
   zero-filled: a border cell reads the real pixels nearest to it, at the size the
   networks expect.  A region longer than the image along an axis cannot fit; it
   is centred on the image along that axis (the only case where zero fill is read,
   and then the cells centred outside the image are ineligible, so nothing is drawn
   there; the engine warns).
3. Masks are looked up only for eligible cells: an outside centre is never clamped
   onto the edge pixel's tissue value.

Everything is int64: slides have more than 2^31 pixels and attention maps can have
more than 2^31 cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CellGrid", "outside_image", "place_regions", "round_half_up"]


def round_half_up(x: Tensor) -> Tensor:
    """Round float64 values half up to int64 (``torch.round`` rounds half to even)."""
    return torch.floor(x + 0.5).to(torch.int64)


def place_regions(centres: Tensor, size: tuple[int, int], bounds) -> Tensor:
    """Regions ``[top, left, h, w]`` of ``size`` around level-0 ``centres`` (…, 2), in the image.

    The edge rule (module docstring): ``top = cy − h//2`` shifted by the least amount
    that puts ``[top, top + h)`` inside ``[0, H)``; a region longer than the image is
    centred on it instead (``top = (H − h)//2``, the only overhang).  ``bounds`` is
    ``(H, W)`` or a tensor of them broadcastable to ``centres``.  int64 (…, 4).
    """
    centres = torch.as_tensor(centres, dtype=torch.int64).cpu()
    bounds = torch.as_tensor(bounds, dtype=torch.int64).cpu()
    h, w = int(size[0]), int(size[1])
    if min(h, w) < 1 or bool((bounds < 1).any()):
        raise ValueError(f"regions of {(h, w)} in an image of {bounds.tolist()} pixels")
    size_t = torch.tensor([h, w], dtype=torch.int64)
    start = centres - size_t // 2
    limit = (bounds - size_t).expand_as(start)  # largest top-left that still fits
    fits = limit >= 0
    placed = torch.minimum(start.clamp(min=0), limit.clamp(min=0))
    start = torch.where(fits, placed, torch.div(limit, 2, rounding_mode="floor"))
    return torch.cat((start, size_t.expand(start.shape)), dim=-1)


def outside_image(regions: Tensor, bounds: tuple[int, int]) -> int:
    """How many ``[top, left, h, w]`` regions break the edge rule: they reach outside
    ``bounds`` along an axis where they would fit (0 for a correct read)."""
    r = torch.as_tensor(regions, dtype=torch.int64).reshape(-1, 4).cpu()
    b = torch.as_tensor(bounds, dtype=torch.int64).reshape(2)
    fits = r[:, 2:] <= b
    out = (r[:, :2] < 0) | (r[:, :2] + r[:, 2:] > b)
    return int((fits & out).any(dim=1).sum())


@dataclass(frozen=True, eq=False)
class CellGrid:
    """Where the cells of one or several same-shaped attention maps lie in level-0 pixels.

    Attributes:
        origins: LongTensor (n, 2) ``[top, left]`` of each region in level-0 pixels
            (one row at stage 1; one per tile at stage 2).
        region_size: ``(h, w)`` of every region, level-0 pixels.
        view_shape: ``(h_v, w_v)`` of the view the attention network saw.
        map_shape: ``(h_a, w_a)`` of the attention map.
        offset: view-pixel position ``(y, x)`` of cell (0, 0)'s receptive-field centre.
        stride: view pixels between neighbouring cells.
        bounds: ``(H, W)`` level-0 extent of the whole image (keyword, required), or
            LongTensor (n, 2), one per region, when the regions come from several
            images: the edge rule places every region inside it (module docstring).
    """

    origins: Tensor
    region_size: tuple[int, int]
    view_shape: tuple[int, int]
    map_shape: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)
    stride: tuple[int, int] = (1, 1)
    bounds: tuple[int, int] | Tensor = field(kw_only=True)

    def __post_init__(self) -> None:
        origins = torch.as_tensor(self.origins, dtype=torch.int64).reshape(-1, 2).cpu()
        object.__setattr__(self, "origins", origins)
        bounds = torch.as_tensor(self.bounds, dtype=torch.int64).reshape(-1, 2).cpu()
        if bounds.shape[0] not in (1, origins.shape[0]) or bool((bounds < 1).any()):
            raise ValueError(f"image bounds {bounds.tolist()} for {origins.shape[0]} regions")
        object.__setattr__(self, "bounds", bounds)
        h_a, w_a = self.map_shape
        h_v, w_v = self.view_shape
        for axis in (0, 1):
            last = self.offset[axis] + (self.map_shape[axis] - 1) * self.stride[axis]
            if self.offset[axis] < 0 or last > self.view_shape[axis] - 1 + 1e-9:
                raise ValueError(
                    f"attention map {self.map_shape} with offset {self.offset} and stride "
                    f"{self.stride} does not fit in view {self.view_shape}"
                )
        if min(h_a, w_a, h_v, w_v) < 1:
            raise ValueError(f"empty view {self.view_shape} or map {self.map_shape}")

    @property
    def n_cells(self) -> int:
        return int(self.map_shape[0]) * int(self.map_shape[1])

    def select(self, index: Tensor | list[int]) -> CellGrid:
        """The grid of a subset of the regions."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return CellGrid(
            self.origins[index],
            self.region_size,
            self.view_shape,
            self.map_shape,
            self.offset,
            self.stride,
            bounds=self.bounds if self.bounds.shape[0] == 1 else self.bounds[index],
        )

    def rows_cols(self, cells: Tensor) -> Tensor:
        """Flat cell indices (…) → ``(i, j)`` (…, 2), int64, row-major."""
        cells = torch.as_tensor(cells, dtype=torch.int64).cpu()
        if cells.numel() and bool(((cells < 0) | (cells >= self.n_cells)).any()):
            raise IndexError(f"cell index out of range for a {self.map_shape} attention map")
        w_a = int(self.map_shape[1])
        return torch.stack((cells // w_a, cells % w_a), dim=-1)

    def view_positions(self, cells: Tensor) -> Tensor:
        """Receptive-field centres of ``cells`` in view pixels, float64 (…, 2)."""
        ij = self.rows_cols(cells).to(torch.float64)
        offset = torch.tensor(self.offset, dtype=torch.float64)
        stride = torch.tensor(self.stride, dtype=torch.float64)
        return offset + ij * stride

    def _expand_origins(self, cells: Tensor) -> tuple[Tensor, Tensor]:
        return self._expand(cells, self.origins)

    def _expand(self, cells: Tensor, per_region: Tensor) -> tuple[Tensor, Tensor]:
        """``cells`` and ``per_region`` (n or 1, 2) reshaped to broadcast against each other."""
        cells = torch.as_tensor(cells, dtype=torch.int64).cpu()
        n = self.origins.shape[0]
        if per_region.shape[0] == 1:
            return cells, per_region[0]
        if cells.dim() >= 1 and cells.shape[0] == n and (cells.dim() == 2 or n != 1):
            return cells, per_region.reshape((n,) + (1,) * (cells.dim() - 1) + (2,))
        raise ValueError(f"cells of shape {tuple(cells.shape)} do not match {n} regions")

    def centres(self, cells: Tensor) -> Tensor:
        """Level-0 ``(row, col)`` centres of ``cells``, int64 (…, 2).

        ``cells`` is (m,) for a single-region grid, or (n, m) with one row per region.
        """
        cells, origins = self._expand_origins(cells)
        v = self.view_positions(cells)
        size = torch.tensor(self.region_size, dtype=torch.float64)
        view = torch.tensor(self.view_shape, dtype=torch.float64)
        # 000 §2.1, 0-based: v (h − 1) / (h_v − 1); a 1-pixel view maps to the middle.
        span = torch.where(view > 1, (size - 1) / (view - 1).clamp(min=1), torch.zeros_like(view))
        middle = torch.where(view > 1, torch.zeros_like(size), (size - 1) / 2)
        return origins + round_half_up(v * span + middle)

    def inside(self, cells: Tensor) -> Tensor:
        """Eligibility of ``cells`` (edge rule): their level-0 centre is in the image. Bool (…)."""
        c = self.centres(cells)
        _, bounds = self._expand(cells, self.bounds)
        return ((c >= 0) & (c < bounds)).all(dim=-1)

    def regions(self, cells: Tensor, size: tuple[int, int]) -> Tensor:
        """Level-0 regions ``[top, left, h, w]`` of ``size`` around ``cells``, placed inside
        the image by the edge rule (:func:`place_regions`), int64 (…, 4)."""
        _, bounds = self._expand(cells, self.bounds)
        return place_regions(self.centres(cells), size, bounds)

    def region_centres(self, cells: Tensor, size: tuple[int, int]) -> Tensor:
        """Level-0 centres of the regions :meth:`regions` reads (shifted at the edges)."""
        r = self.regions(cells, size)
        return r[..., :2] + torch.tensor([int(size[0]) // 2, int(size[1]) // 2])

    def cell_values(self, view_values: Tensor, mean: bool = False) -> Tensor:
        """Values of a view-aligned map at every cell's centre pixel: (…, h_v, w_v) → (…, h_a, w_a).

        Used to carry tissue masks and ROI fractions from the view to the cells
        (positions are rounded half up for non-integer offsets).  ``mean``: for a
        strided map (one cell per ``stride``² view pixels, centred on its pixel
        ``stride·i``), the mean over the cell's own pixels instead, so an ROI a few
        view pixels across is not missed between the centres (ROI targets).
        """
        if tuple(view_values.shape[-2:]) != tuple(self.view_shape):
            raise ValueError(
                f"map of shape {tuple(view_values.shape[-2:])} is not aligned with view "
                f"{self.view_shape}"
            )
        sy, sx = (int(v) for v in self.stride)
        if mean and (sy, sx) != (1, 1) and tuple(self.offset) == (0.0, 0.0):
            # cell i covers view pixels [s·i − s/2, s·i + s/2): pool after shifting by s/2
            # (beyond the view's edge: no pixel, so the mean is over the pixels inside)
            lead = view_values.shape[:-2]
            flat = view_values.reshape(1, -1, *view_values.shape[-2:]).to(torch.float32)
            h_a, w_a = self.map_shape
            pad = (
                sx // 2,
                w_a * sx - view_values.shape[-1] - sx // 2,
                sy // 2,
                h_a * sy - view_values.shape[-2] - sy // 2,
            )
            ones = torch.ones_like(flat[:, :1])
            total = F.avg_pool2d(F.pad(flat, pad), (sy, sx), divisor_override=1)
            count = F.avg_pool2d(F.pad(ones, pad), (sy, sx), divisor_override=1)
            return (total / count).reshape(*lead, h_a, w_a)
        h_a, w_a = self.map_shape
        (oy, ox), (dy, dx) = self.offset, self.stride
        if all(float(v).is_integer() and v >= 0 for v in (oy, ox, dy, dx)):
            # whole-pixel centres: a strided slice, copied (a gigapixel map's 9.8 M cells:
            # 13 → 4 ms against picking rows, then columns)
            oy, ox, dy, dx = int(oy), int(ox), int(dy), int(dx)
            out = view_values[
                ..., oy : oy + dy * (h_a - 1) + 1 : dy, ox : ox + dx * (w_a - 1) + 1 : dx
            ]
            if tuple(out.shape[-2:]) == (h_a, w_a):  # else picked below (and refused)
                return out.contiguous()
        rows = round_half_up(
            self.offset[0] + torch.arange(h_a, dtype=torch.float64) * self.stride[0]
        ).to(view_values.device)
        cols = round_half_up(
            self.offset[1] + torch.arange(w_a, dtype=torch.float64) * self.stride[1]
        ).to(view_values.device)
        return view_values[..., rows, :][..., cols]

    def nearest_view_pixels(self, points: Tensor) -> Tensor:
        """Inverse of the mapping: level-0 ``(row, col)`` points → nearest view pixel (…, 2).

        Only for single-region grids, and only for points inside the region: the edge
        rule never clamps an outside point onto the edge pixel's value.
        """
        if self.origins.shape[0] != 1:
            raise ValueError("nearest_view_pixels needs a single-region grid")
        p = torch.as_tensor(points, dtype=torch.int64).cpu() - self.origins[0]
        size = torch.tensor(self.region_size, dtype=torch.float64)
        if p.numel() and bool(((p < 0) | (p >= size.to(torch.int64))).any()):
            raise ValueError("points outside the region have no view pixel (edge rule)")
        view = torch.tensor(self.view_shape, dtype=torch.float64)
        scale = torch.where(size > 1, (view - 1) / (size - 1).clamp(min=1), torch.zeros_like(view))
        pix = round_half_up(p.to(torch.float64) * scale)
        upper = torch.tensor(self.view_shape, dtype=torch.int64) - 1
        return torch.minimum(pix.clamp(min=0), upper)
