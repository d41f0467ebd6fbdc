"""A lazy slide as the models' :class:`~napari_zoomin.models.source.ImageSource`.

A read at scale ``s`` is served from the pyramid level nearest ``1/s`` that is
at least as fine (``Slide.best_level``), never from level 0 unless ``s`` asks
for it, and resampled by area averaging to the project's output size rule
(``scaled_size``).  Several regions are read in parallel by a thread pool (the
decoders release the GIL), so the sub-tiles of one classification cost about one
round of tile decodes.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.source import ReadCounter, as_regions, scaled_size
from ..slide import Slide
from .tissue import TissueMask


class SlideSource:
    """Reads level-0 regions of a :class:`Slide` at any scale, as float tensors in [0, 1].

    Args:
        slide: the opened slide (its tile cache and decode counter are shared).
        tissue: a :class:`TissueMask`; cells outside it get zero attention.
        roi: optional callable ``(regions, scale) -> Tensor (n, h', w')`` giving the
            fraction of annotated ROI under each output pixel (pixel supervision).
        hard_negatives: optional callable of the same form for annotated regions that
            are not ROI (hard negatives for tile pre-training).
        workers: threads decoding regions in parallel.
    """

    def __init__(
        self,
        slide: Slide,
        tissue: TissueMask | None = None,
        roi=None,
        workers: int = 4,
        *,
        hard_negatives=None,
    ):
        self.slide = slide
        self.tissue = tissue
        self._roi = roi
        self._hard_negatives = hard_negatives
        self.workers = max(1, int(workers))
        self.counter = ReadCounter()

    @property
    def shape(self) -> tuple[int, int]:
        return self.slide.shape

    def level_for(self, scale: float) -> int:
        """The pyramid level a read at ``scale`` comes from."""
        return self.slide.best_level(1.0 / scale)

    def _level_window(self, level: int, region) -> tuple[int, int, int, int]:
        """The level pixels [y0, y1) × [x0, x1) covering a level-0 region."""
        top, left, h, w = region
        dy, dx = self.slide.levels[level].downsample
        y0, x0 = math.floor(top / dy), math.floor(left / dx)
        y1, x1 = math.ceil((top + h) / dy), math.ceil((left + w) / dx)
        return y0, y1, x0, x1

    def read(self, regions: Tensor, scale: float) -> Tensor:
        regions = as_regions(regions)
        n = regions.shape[0]
        if n == 0:
            return torch.zeros((0, 3, 0, 0))
        h, w = int(regions[0, 2]), int(regions[0, 3])
        out_size = (scaled_size(h, scale), scaled_size(w, scale))
        level = self.level_for(scale)
        windows = [self._level_window(level, r) for r in regions.tolist()]
        # regions of one read share a size, but their windows can differ by one pixel
        lh = max(y1 - y0 for y0, y1, _, _ in windows)
        lw = max(x1 - x0 for _, _, x0, x1 in windows)

        def read_one(window):
            y0, _, x0, _ = window
            return self.slide.read(level, y0, x0, lh, lw)

        if n == 1 or self.workers == 1:
            blocks = [read_one(win) for win in windows]
        else:
            with ThreadPoolExecutor(min(self.workers, n)) as pool:
                blocks = list(pool.map(read_one, windows))
        # one region (a stage-1 view: hundreds of MB on a gigapixel slide) is not copied
        stacked = blocks[0][None] if n == 1 else np.stack(blocks)
        pixels = torch.from_numpy(stacked).permute(0, 3, 1, 2)
        pixels = pixels.float().div_(255.0)
        if (lh, lw) != out_size or any(
            (y1 - y0, x1 - x0) != (lh, lw) for y0, y1, x0, x1 in windows
        ):
            pixels = torch.stack(
                [
                    F.interpolate(
                        pixels[k : k + 1, :, : y1 - y0, : x1 - x0], size=out_size, mode="area"
                    )[0]
                    for k, (y0, y1, x0, x1) in enumerate(windows)
                ]
            )
        self.counter.add(regions, scale, out_size)
        return pixels

    def tissue_mask(self, scale: float) -> Tensor | None:
        return None if self.tissue is None else self.tissue.at_scale(scale)

    def read_roi(self, regions: Tensor, scale: float) -> Tensor | None:
        return None if self._roi is None else self._roi(as_regions(regions), scale)

    def read_hard_negatives(self, regions: Tensor, scale: float) -> Tensor | None:
        if self._hard_negatives is None:
            return None
        return self._hard_negatives(as_regions(regions), scale)
