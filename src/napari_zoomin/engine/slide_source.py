"""A lazy slide as the models' :class:`~napari_zoomin.models.source.ImageSource`.

A read at scale ``s`` is served from the pyramid level nearest ``1/s`` that is
at least as fine (``Slide.best_level``), never from level 0 unless ``s`` asks
for it, and resampled by area averaging to the project's output size rule
(``scaled_size``).  Several regions are read in parallel by a thread pool (the
decoders release the GIL), so the sub-tiles of one classification cost about one
round of tile decodes.

**Model pixels.**  A model is trained at one physical pixel size (``model_mpp``, µm
per pixel).  When both it and the slide's pixel size are known, the source presents
a *virtual level 0* at the model's pixel size: ``factor`` ``r = model_mpp /
slide_mpp`` (slide pixels per model pixel, per axis), ``shape`` ``(⌊H/r_y⌋,
⌊W/r_x⌋)``, and every region the model asks for is in model pixels.  A read maps the
region to slide level-0 coordinates (``top·r_y``, …), takes the level
``best_level(min(r)/s)`` (the finer of the two axes) and resamples the level
window covering it to ``scaled_size(h, s) × scaled_size(w, s)``: area averaging when
shrinking (as for ``r = 1``), bilinear (antialiased) interpolation when the slide is
coarser than the model and a read needs more pixels than the file holds
(``upsampled_reads`` counts those regions).  Factors within :data:`MPP_TOLERANCE` of
1 are read in the slide's own pixels, and so is everything when either pixel size is
unknown (``units == "pixel"``): then reads are exactly those of a plain source.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..geometry import scaled_size
from ..models.source import ReadCounter, as_regions
from ..slide import Slide
from .tissue import TissueMask
from .view_cache import ViewCache

__all__ = ["MPP_TOLERANCE", "SlideSource", "resolution_factor"]

#: a slide whose pixel size is within this fraction of the model's is read in its own
#: pixels (scanners' calibrations differ by about this much; resampling by 1.01 would
#: only blur)
MPP_TOLERANCE = 0.02


def _valid_mpp(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def resolution_factor(
    slide_mpp: tuple[float, float] | None, model_mpp: float | None
) -> tuple[float, float]:
    """Slide pixels per model pixel ``(r_y, r_x) = model_mpp / slide_mpp``.

    ``(1, 1)`` when either pixel size is unknown; an axis within
    :data:`MPP_TOLERANCE` of 1 is 1.  Both are positive when given (``Slide.mpp`` is
    checked when the slide opens, ``model_mpp`` by :class:`SlideSource`).
    """
    if model_mpp is None or slide_mpp is None:
        return (1.0, 1.0)
    ry, rx = (model_mpp / s for s in slide_mpp)
    ry, rx = (1.0 if abs(r - 1.0) <= MPP_TOLERANCE else r for r in (ry, rx))
    return (ry, rx)


def _snap(x: float) -> float:
    """``x`` or the integer it misses by float rounding only (``3·0.1/0.1``)."""
    n = round(x)
    return float(n) if abs(x - n) <= 1e-9 * max(1.0, abs(x)) else x


def _resize(pixels: Tensor, size: tuple[int, int]) -> tuple[Tensor, bool]:
    """(1, C, h, w) to ``size``: area when no axis grows, else bilinear (antialiased).

    Returns the result and whether an axis was upsampled.
    """
    h, w = pixels.shape[-2:]
    if (h, w) == tuple(size):
        return pixels, False
    if h >= size[0] and w >= size[1]:
        return F.interpolate(pixels, size=size, mode="area"), False
    out = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out, True


class SlideSource:
    """Reads level-0 regions of a :class:`Slide` at any scale, as float tensors in [0, 1].

    Args:
        slide: the opened slide (its tile cache and decode counter are shared).
        tissue: a :class:`TissueMask` (over the slide's own level 0); cells outside it
            get zero attention.
        roi: optional callable ``(regions, scale) -> Tensor (n, h', w')`` giving the
            fraction of annotated ROI under each output pixel (pixel supervision).  It
            is given slide level-0 regions; the source resamples its maps to the
            model-pixel output size.
        hard_negatives: optional callable of the same form for annotated regions that
            are not ROI (hard negatives for tile pre-training).
        attention_target: optional callable of the same form for where attention should
            go (ROIs and look-alikes, :meth:`RoiMask.attention_target`); ``roi`` if none.
        workers: threads decoding regions in parallel.
        model_mpp: the model's training pixel size in µm (``training_mpp``); with the
            slide's ``mpp`` it makes regions model pixels (module docstring).
        view_cache: a training run's :class:`~.view_cache.ViewCache`: a read of the whole
            slide at its scale (the stage-1 view) is served from it, bit-identical.

    Attributes:
        factor: ``(r_y, r_x)`` slide level-0 pixels per model pixel (1 in pixel units).
        units: ``"µm"`` when both pixel sizes are known, else ``"pixel"``.
        upsampled_reads: regions read so far that needed upsampling (slide coarser
            than the model).
    """

    def __init__(
        self,
        slide: Slide,
        tissue: TissueMask | None = None,
        roi=None,
        workers: int = 4,
        *,
        hard_negatives=None,
        attention_target=None,
        model_mpp: float | None = None,
        view_cache: ViewCache | None = None,
    ):
        self.slide = slide
        self.tissue = tissue
        self._roi = roi
        self._hard_negatives = hard_negatives
        self._attention_target = attention_target
        self.workers = max(1, int(workers))
        self.counter = ReadCounter()
        self.model_mpp = _valid_mpp(model_mpp)
        # None, or a plausible (y, x) pair: the slide checked its pixel size when it opened
        self.slide_mpp: tuple[float, float] | None = slide.mpp
        self.factor: tuple[float, float] = resolution_factor(self.slide_mpp, self.model_mpp)
        self.units = "µm" if self.model_mpp is not None and self.slide_mpp is not None else "pixel"
        self.upsampled_reads = 0
        self.view_cache = view_cache

    # -- geometry ---------------------------------------------------------------------
    @property
    def resampled(self) -> bool:
        """True when model pixels are not the slide's pixels (``factor != (1, 1)``)."""
        return self.factor != (1.0, 1.0)

    @property
    def coarser_than_model(self) -> bool:
        """True when the slide's pixels are larger than the model's on an axis."""
        return min(self.factor) < 1.0

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) in model pixels: ``(⌊H/r_y⌋, ⌊W/r_x⌋)`` of the slide's level 0."""
        if not self.resampled:
            return self.slide.shape
        (h, w), (ry, rx) = self.slide.shape, self.factor
        return max(1, math.floor(_snap(h / ry))), max(1, math.floor(_snap(w / rx)))

    def level_for(self, scale: float) -> int:
        """The pyramid level a read at ``scale`` comes from (the finer axis decides)."""
        return self.slide.best_level(min(self.factor) / scale)

    def to_level0(self, regions) -> Tensor:
        """Slide level-0 ``[top, left, h, w]`` (int64 (n, 4)) covering model-pixel regions.

        Edges are rounded outwards, so a row covers its region; with a non-integer
        factor the rows' sizes may differ by a pixel.
        """
        r = torch.as_tensor(regions, dtype=torch.int64).reshape(-1, 4)
        if not self.resampled:
            return r.clone()
        ry, rx = self.factor
        out = []
        for top, left, h, w in r.tolist():
            y0, x0 = math.floor(_snap(top * ry)), math.floor(_snap(left * rx))
            y1, x1 = math.ceil(_snap((top + h) * ry)), math.ceil(_snap((left + w) * rx))
            out.append([y0, x0, y1 - y0, x1 - x0])
        return torch.tensor(out, dtype=torch.int64).reshape(-1, 4)

    def to_level0_yx(self, values) -> tuple[float, float]:
        """A continuous ``(y, x)`` point or length in model pixels, in slide level-0 pixels."""
        y, x = values
        return float(y) * self.factor[0], float(x) * self.factor[1]

    # -- pixels -------------------------------------------------------------------------
    def prefetch_view(self, scale: float) -> Callable[[], None]:
        """Start decoding the file tiles of the whole image's view at ``scale`` (the
        stage-1 view) in the background; returns ``stop`` (:meth:`Slide.prefetch`)."""
        level = self.level_for(scale)
        region = self.to_level0([[0, 0, *self.shape]])[0].tolist()
        y0, y1, x0, x1 = self.slide.level_window(level, *region)
        return self.slide.prefetch(level, y0, x0, y1 - y0, x1 - x0, self.workers)

    def read(self, regions: Tensor, scale: float) -> Tensor:
        regions = as_regions(regions)
        if regions.shape[0] == 0:
            return torch.zeros((0, 3, 0, 0))
        return self._read(regions, scale, exact_bytes=False)

    def read_bytes(self, regions: Tensor, scale: float) -> Tensor | None:
        """:meth:`read`'s pixels as stored, uint8 (n, 3, h', w'), when the read needs no
        resampling (``read`` would return exactly these ``/ 255``); ``None`` otherwise.

        A gigapixel slide's stage-1 view is hundreds of MB in 8 bits and four times that
        as floats: the attention network converts it a block at a time instead.
        """
        regions = as_regions(regions)
        if regions.shape[0] == 0:
            return None
        return self._read(regions, scale, exact_bytes=True)

    def _read(self, regions: Tensor, scale: float, exact_bytes: bool) -> Tensor | None:
        n = regions.shape[0]
        h, w = int(regions[0, 2]), int(regions[0, 3])
        out_size = (scaled_size(h, scale), scaled_size(w, scale))
        level = self.level_for(scale)
        rows = regions.tolist()
        if self.resampled:
            ry, rx = self.factor
            rows = [
                (_snap(t * ry), _snap(left * rx), _snap(h * ry), _snap(w * rx))
                for t, left, _, _ in rows
            ]
        windows = [self.slide.level_window(level, *r) for r in rows]
        # regions of one read share a size, but their windows can differ by one pixel
        lh = max(y1 - y0 for y0, y1, _, _ in windows)
        lw = max(x1 - x0 for _, _, x0, x1 in windows)

        def read_one(window, workers=1):
            y0, _, x0, _ = window
            return self.slide.read(level, y0, x0, lh, lw, workers=workers)

        if n == 1 and self.view_cache is not None and regions[0].tolist() == [0, 0, *self.shape]:
            # the whole slide: a stage-1 view, from the run's view cache when it is one
            y0, _, x0, _ = windows[0]
            blocks = [
                self.view_cache.block(
                    self.slide.path,
                    scale,
                    self.model_mpp,
                    level,
                    (y0, x0, lh, lw),
                    lambda: read_one(windows[0], self.workers),
                )
            ]
        elif n == 1:  # one large region: its file tiles in parallel
            blocks = [read_one(windows[0], self.workers)]
        elif self.workers == 1:
            blocks = [read_one(win) for win in windows]
        else:
            with ThreadPoolExecutor(min(self.workers, n)) as pool:
                blocks = list(pool.map(read_one, windows))
        # one region (a stage-1 view: hundreds of MB on a gigapixel slide) is not copied
        stacked = blocks[0][None] if n == 1 else np.stack(blocks)
        pixels = torch.from_numpy(stacked).permute(0, 3, 1, 2)
        resize = (lh, lw) != out_size or any(
            (y1 - y0, x1 - x0) != (lh, lw) for y0, y1, x0, x1 in windows
        )
        if exact_bytes:
            if resize:
                return None
            self.counter.add(regions, scale, out_size)
            return pixels
        pixels = pixels.float().div_(255.0)
        if resize:
            if not self.resampled:  # exactly the reads of a source in the slide's pixels
                # one call per window size (a tile off the level's grid spans one pixel
                # more): hundreds of tiny calls cost seconds on a busy CPU
                out = pixels.new_empty((n, 3, *out_size))
                groups: dict[tuple[int, int], list[int]] = defaultdict(list)
                for k, (y0, y1, x0, x1) in enumerate(windows):
                    groups[(y1 - y0, x1 - x0)].append(k)
                for (gh, gw), idx in groups.items():
                    sel = torch.tensor(idx)
                    out[sel] = F.interpolate(pixels[sel, :, :gh, :gw], size=out_size, mode="area")
                pixels = out
            else:
                resized = []
                for k, (y0, y1, x0, x1) in enumerate(windows):
                    one, up = _resize(pixels[k : k + 1, :, : y1 - y0, : x1 - x0], out_size)
                    self.upsampled_reads += int(up)
                    resized.append(one[0].clamp_(0.0, 1.0) if up else one[0])
                pixels = torch.stack(resized)
        self.counter.add(regions, scale, out_size)
        return pixels

    def tissue_mask(self, scale: float) -> Tensor | None:
        if self.tissue is None:
            return None
        if not self.resampled:
            return self.tissue.at_scale(scale)
        hv, wv = self.shape
        size = (scaled_size(hv, scale), scaled_size(wv, scale))
        return self.tissue.at_size(size, extent=self.to_level0_yx((hv, wv)))

    def _masks(self, fn, regions: Tensor, scale: float) -> Tensor | None:
        """An ROI-like callable of slide level-0 regions, at the model-pixel output size."""
        regions = as_regions(regions)
        n = regions.shape[0]
        if not self.resampled or n == 0:
            return fn(regions, scale)
        h, w = int(regions[0, 2]), int(regions[0, 3])
        out_size = (scaled_size(h, scale), scaled_size(w, scale))
        ry, rx = self.factor
        rows = regions.tolist()
        if n == 1 and rows[0] == [0, 0, *self.shape]:
            real = [[0, 0, *self.slide.shape]]  # the whole slide (callables cache it)
        else:
            hr, wr = max(1, math.floor(h * ry + 0.5)), max(1, math.floor(w * rx + 0.5))
            real = [
                [math.floor(t * ry + 0.5), math.floor(left * rx + 0.5), hr, wr]
                for t, left, _, _ in rows
            ]
        maps = fn(torch.tensor(real, dtype=torch.int64), scale / min(ry, rx))
        if maps is None:
            return None
        maps = torch.as_tensor(maps)
        if tuple(maps.shape[-2:]) == out_size:
            return maps
        dtype = maps.dtype
        resized = [_resize(m[None, None].float(), out_size)[0][0, 0] for m in maps]
        return torch.stack(resized).clamp_(0.0, 1.0).to(dtype)

    def read_roi(self, regions: Tensor, scale: float) -> Tensor | None:
        return None if self._roi is None else self._masks(self._roi, regions, scale)

    def read_attention_target(self, regions: Tensor, scale: float) -> Tensor | None:
        mask = self._attention_target or self._roi
        return None if mask is None else self._masks(mask, regions, scale)

    def read_hard_negatives(self, regions: Tensor, scale: float) -> Tensor | None:
        if self._hard_negatives is None:
            return None
        return self._masks(self._hard_negatives, regions, scale)
