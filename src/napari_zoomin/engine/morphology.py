"""Binary morphology for tissue detection, in numpy alone.

Detection needs a closing, a hole fill, speck removal and a one-pixel growth on a
mask of about 1,500² pixels.  ``scipy.ndimage`` does each, but importing it costs
0.22-0.25 s (scipy 1.17 wraps every function for other array backends), more than
detection itself, in every ``zoomin classify`` process (issue 22; and scikit-image's
labelling and Otsu import it too).  Each function here gives exactly the pixels of
the scipy or scikit-image call named in its docstring; tests/test_morphology.py
compares them on random and real masks.

Connected components are found on the mask's runs (maximal horizontal segments of
set pixels), not its pixels: two runs in adjacent rows are 4-connected where their
columns overlap, and the runs' graph is solved by hooking each root to the smaller
one and pointer jumping, so every step is a whole-array numpy operation.
"""

from __future__ import annotations

import numpy as np


def disk(radius: int) -> np.ndarray:
    """The pixels within ``radius`` of the centre, ``(2r+1, 2r+1)`` bool: what
    ``skimage.morphology.disk(radius)`` gives."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def binary_closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, footprint)``, the same pixels (outside the
    image counts as background), from shifted copies: 7x faster for the small
    footprints of detection (69 → 7 ms at a 100,000² slide's detection level)."""
    h, w = mask.shape
    fh, fw = footprint.shape
    ry, rx = fh // 2, fw // 2
    offsets = [(dy - ry, dx - rx) for dy, dx in zip(*np.nonzero(footprint), strict=True)]
    # dilation: a pixel is set where the footprint, centred on it, meets a set pixel
    # (a footprint symmetric about its centre, as a disk is, needs no reflection)
    grown = np.zeros((h + 2 * ry, w + 2 * rx), bool)
    for dy, dx in offsets:
        grown[ry + dy : ry + dy + h, rx + dx : rx + dx + w] |= mask
    # erosion: a pixel stays where the footprint, centred on it, lies on set pixels only;
    # beyond the image is background (scipy's border_value=0)
    grown = np.pad(grown[ry : ry + h, rx : rx + w], ((ry, ry), (rx, rx)))
    out = np.ones((h, w), bool)
    for dy, dx in offsets:
        out &= grown[ry + dy : ry + dy + h, rx + dx : rx + dx + w]
    return out


def grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 4-neighbours: ``scipy.ndimage.binary_dilation(mask)`` (a cross,
    one iteration)."""
    mask = np.asarray(mask, bool)
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components numbered 1, 2, ... in raster order of their first pixel
    (0 = background), and their count: ``scipy.ndimage.label(mask)``."""
    runs = _Runs(mask)
    first = runs.components()
    numbers = np.cumsum(first == np.arange(len(runs)), dtype=np.int32)  # roots, in order
    return runs.paint(numbers[first]), int(numbers[-1]) if len(runs) else 0


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region that does not reach the image's edge set:
    ``scipy.ndimage.binary_fill_holes(mask)`` (background 4-connected)."""
    mask = np.asarray(mask, bool)
    background = _Runs(~mask)
    if not len(background):
        return mask.copy()
    first = background.components()
    h, w = mask.shape
    edge = (
        (background.rows == 0)
        | (background.rows == h - 1)
        | (background.starts == 0)
        | (background.stops == w)
    )
    open_ = np.zeros(len(background), bool)
    open_[first[edge]] = True  # a region open to the edge, by its first run
    return mask | background.paint(~open_[first])


def remove_small_objects(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without its 4-connected components of at most ``max_size`` pixels: what
    ``skimage.morphology.remove_small_objects(mask, max_size=max_size)`` gives."""
    runs = _Runs(mask)
    if not len(runs):
        return np.zeros(runs.shape, bool)
    first = runs.components()
    sizes = np.bincount(first, weights=runs.stops - runs.starts, minlength=len(runs))
    return runs.paint(sizes[first] > max_size)


class _Runs:
    """The maximal horizontal runs of set pixels of a 2-D mask, in raster order:
    run ``i`` covers row ``rows[i]``, columns ``[starts[i], stops[i])``."""

    def __init__(self, mask: np.ndarray) -> None:
        mask = np.asarray(mask, bool)
        if mask.ndim != 2:
            raise ValueError(f"a 2-D mask is needed, got shape {mask.shape}")
        self.shape = h, w = mask.shape
        padded = np.zeros((h, w + 2), np.int8)
        padded[:, 1:-1] = mask
        steps = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past its end
        self.rows, self.starts = np.nonzero(steps == 1)
        self.stops = np.nonzero(steps == -1)[1]  # row-major order pairs them up

    def __len__(self) -> int:
        return len(self.rows)

    def _touching(self) -> tuple[np.ndarray, np.ndarray]:
        """Pairs (a, b) of runs in adjacent rows whose columns overlap (a above b)."""
        width = self.shape[1] + 1  # a run's stop is at most the mask's width
        keyed_starts = self.rows * width + self.starts
        keyed_stops = self.rows * width + self.stops
        above = (self.rows - 1) * width
        # the runs of the row above overlapping run b form one slice [lo, hi) of the
        # raster order: those ending after b starts and starting before b stops
        lo = np.searchsorted(keyed_stops, above + self.starts, side="right")
        hi = np.searchsorted(keyed_starts, above + self.stops, side="left")
        counts = np.maximum(hi - lo, 0)
        b = np.repeat(np.arange(len(self)), counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(lo, counts) + within, b

    def components(self) -> np.ndarray:
        """Each run's component, named by its first run in raster order."""
        a, b = self._touching()
        parent = np.arange(len(self))
        while True:
            ra, rb = parent[a], parent[b]  # roots: parent is fully compressed here
            differ = ra != rb
            if not differ.any():
                return parent
            ra, rb = ra[differ], rb[differ]
            # hook each root onto the smaller root of a run it touches; a parent is
            # never larger than its child, so there are no cycles, and every round
            # joins at least two trees
            np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
            while True:  # pointer jumping until every run points at its root
                up = parent[parent]
                if np.array_equal(up, parent):
                    break
                parent = up

    def paint(self, values: np.ndarray) -> np.ndarray:
        """A full-size image with each run's pixels set to its value (bool or int);
        0 / False elsewhere."""
        values = np.asarray(values)
        h, w = self.shape
        kind = np.int32 if values.dtype != bool else np.int8
        steps = np.zeros((h, w + 1), kind)
        # within a row one run's stop never equals another's start (runs are
        # maximal), so no two runs write the same step
        steps[self.rows, self.starts] = values
        steps[self.rows, self.stops] = -values.astype(kind)
        out = np.cumsum(steps[:, :w], axis=1, dtype=kind)
        return out.astype(bool) if values.dtype == bool else out
