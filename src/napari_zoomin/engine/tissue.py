"""Where the tissue is: a low-resolution mask that keeps stage-1 sampling off the glass.

Detection (documented for users in docs/engine.md): read the pyramid level
nearest a downsample of 64 (16 µm per pixel at 0.25 µm/pixel).  A pixel can be
tissue only if it is coloured and not black:

* its HSV saturation ``(max − min) / max`` is above a threshold found by Otsu's
  method on the pixels that are not black, clipped to [0.04, 0.15] (glass is
  grey, stained tissue is coloured; the clip keeps a slide that is all tissue, or
  all glass, from being split in two);
* its colour stands out of JPEG noise: ``max − min`` is at least 16 (of 255);
* it is not black: its brightest channel is above 40 (of 255).  Black scanner
  borders, zero padding outside the scanned area and black ink have a large
  saturation from noise alone (``max`` is tiny), so they are ruled out here.

The candidates are then closed over small gaps, holes are filled, specks smaller
than 0.1 % of the mask dropped, and the result grown by one mask pixel so tiles
on the tissue border are kept.  The slide's edge is not a gap: tissue that runs
off the edge of the slide stays tissue up to the last pixel.  Finally, black
areas larger than a speck are never tissue, even inside a filled hole or next to
tissue.  White or grey glass and blank grey areas are tissue only as holes that
tissue encloses or in the one-pixel rim; coloured pen marks look like stain and
may be kept.  Users can pass their own mask instead (an image or label file:
non-zero = tissue) at any resolution with the slide's aspect ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import AnnotationError
from ..geometry import scaled_size
from ..slide import Slide
from .morphology import binary_closing, disk, fill_holes, grow, remove_small_objects

if TYPE_CHECKING:
    import torch

#: the level used for detection is the one nearest this downsample
DETECTION_DOWNSAMPLE = 64.0
#: bounds on the saturation threshold found by Otsu's method
MIN_SATURATION, MAX_SATURATION = 0.04, 0.15
#: a pixel whose brightest channel is at most this is black: never tissue
BLACK_VALUE = 40
#: tissue's ``max − min`` is at least this: weaker colour is JPEG noise on grey or black
MIN_CHROMA = 16


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask over the whole slide at a low resolution (True = tissue).

    ``mask`` pixel (i, j) covers level-0 pixels [i·dy, (i+1)·dy) × [j·dx, (j+1)·dx)
    with (dy, dx) = level-0 shape / mask shape.
    """

    mask: np.ndarray
    level0_shape: tuple[int, int]
    source: str = "otsu"

    @property
    def fraction(self) -> float:
        """Share of the slide covered by tissue."""
        return float(self.mask.mean())

    def at_scale(self, scale: float) -> torch.Tensor:
        """The mask at the view ``V(x, scale)``: True where any tissue lies under a pixel."""
        h, w = self.level0_shape
        return self.at_size((scaled_size(h, scale), scaled_size(w, scale)))

    def at_size(
        self, size: tuple[int, int], extent: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """The mask resampled to ``size`` (rows, cols): True where any tissue lies under a pixel.

        The output covers level-0 ``[0, extent_y) × [0, extent_x)`` (default: the whole
        slide; a model-pixel view of a resampled slide ends up to one model pixel
        short of the slide's edge, see ``SlideSource``).
        """
        h, w = self.level0_shape
        fy, fx = (1.0, 1.0) if extent is None else (extent[0] / h, extent[1] / w)
        # the same pixels either way; the column pass gathers pixel by pixel, so it goes
        # where there are fewer rows (72 → 27 ms for a 100,000² slide's 1/16 view)
        if int(size[0]) > self.mask.shape[0]:
            m = _any_in_ranges(self.mask, int(size[1]), axis=1, fraction=fx)
            m = _any_in_ranges(m, int(size[0]), axis=0, fraction=fy)
        else:
            m = _any_in_ranges(self.mask, int(size[0]), axis=0, fraction=fy)
            m = _any_in_ranges(m, int(size[1]), axis=1, fraction=fx)
        import torch  # here, so that detecting tissue never loads torch

        return torch.from_numpy(m)


def _any_in_ranges(mask: np.ndarray, size: int, axis: int, fraction: float = 1.0) -> np.ndarray:
    """Resize a bool mask along ``axis`` to ``size``: True where any covered pixel is.

    Output pixel ``i`` covers input pixels ``[floor(i·n/size), ceil((i+1)·n/size))``
    (the ranges of area resampling), counted with a cumulative sum: exact, and fast
    both up and down (a gigapixel slide's 1/16 view is 4x its tissue mask).  With
    ``fraction`` < 1 the output covers only the first ``fraction·n`` input pixels
    (``n`` above becomes that fractional length).
    """
    n = mask.shape[axis]
    i = np.arange(size, dtype=np.int64)
    if fraction == 1.0:
        lo = (i * n) // size
        hi = -((-(i + 1) * n) // size)  # ceil
    else:
        span = n * float(fraction)
        lo = np.minimum(np.floor(i * span / size + 1e-9).astype(np.int64), n - 1)
        hi = np.clip(np.ceil((i + 1) * span / size - 1e-9).astype(np.int64), lo + 1, n)
        n = span
    if n <= size:  # upsampling: a range holds one or two pixels
        return mask.take(lo, axis=axis) | mask.take(hi - 1, axis=axis)
    counts = np.cumsum(mask, axis=axis, dtype=np.int32)
    counts = np.concatenate([np.zeros_like(counts.take([0], axis=axis)), counts], axis=axis)
    return (counts.take(hi, axis=axis) - counts.take(lo, axis=axis)) > 0


def tissue_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-pixel rule of the module docstring on (rows, cols, 3) uint8 RGB.

    Returns ``(candidate, black)``: the pixels that may be tissue, and the black ones.
    """
    r, g, b = (np.asarray(rgb)[..., i] for i in range(3))
    hi = np.maximum(np.maximum(r, g), b)  # channel-wise: 4x faster than max(axis=-1)
    chroma = hi - np.minimum(np.minimum(r, g), b)
    black = hi <= BLACK_VALUE
    sat = np.divide(chroma, hi, out=np.zeros(hi.shape, np.float32), where=hi > 0, dtype=np.float32)
    # Otsu on the pixels that are not black: a large noisy black border would
    # otherwise pull the threshold into its own noise
    considered = sat[~black]
    threshold = otsu_threshold(considered) if considered.size else MAX_SATURATION
    threshold = min(max(threshold, MIN_SATURATION), MAX_SATURATION)
    return (sat > threshold) & (chroma >= MIN_CHROMA) & ~black, black


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` over 256 bins spanning their range:
    ``skimage.filters.threshold_otsu(values)``, the same number (that module imports
    scipy.ndimage, 0.22 s of a process: :mod:`.morphology`)."""
    values = np.asarray(values).ravel()
    if np.all(values == values[0]):  # one value: no threshold splits it
        return float(values[0])
    counts, edges = np.histogram(values, bins=256)
    counts = counts.astype(np.float32)
    centres = (edges[:-1] + edges[1:]) / 2
    # each class's weight and mean for every cut between bins; the cut maximising the
    # between-class variance wins
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centres) / weight1
    mean2 = (np.cumsum((counts * centres)[::-1]) / weight2[::-1])[::-1]
    between = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[np.argmax(between)])


def detect_tissue(slide: Slide, downsample: float = DETECTION_DOWNSAMPLE) -> TissueMask:
    """Coloured, non-black pixels at a low pyramid level, cleaned up (see the module docstring)."""
    level = int(np.argmin([abs(np.log(d / downsample)) for d in slide.level_downsamples]))
    rows, cols = slide.level_shapes[level]
    mask, black = tissue_pixels(slide.read(level, 0, 0, rows, cols))
    speck = max(int(mask.size * 1e-3), 4)
    # close gaps with the slide's edge continued outwards: with zeros beyond the edge
    # the erosion would eat the tissue that runs off the slide
    radius = 2
    padded = np.pad(mask, radius, mode="edge")
    mask = binary_closing(padded, disk(radius))[radius:-radius, radius:-radius]
    mask = fill_holes(mask)
    mask = remove_small_objects(mask, max_size=speck)
    mask = grow(mask)
    # black beyond a speck (a scanner border, padding, a hole of no data) is never
    # tissue, even where closing, filling or growing reached into it
    if black.any():
        mask &= ~remove_small_objects(black, max_size=speck)
    return TissueMask(mask.astype(bool), slide.shape, "otsu")


def load_tissue_mask(path: str | Path, level0_shape: tuple[int, int]) -> TissueMask:
    """A user's mask file (PNG/TIFF image or .npy labels; non-zero = tissue).

    Any resolution is accepted if its aspect ratio matches the slide's to within one
    mask pixel; anything else is an :class:`AnnotationError` naming both shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "tissue mask file not found.", "Check the path.")
    try:
        if path.suffix.lower() == ".npy":
            data = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            data = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                data = np.asarray(im)
    except Exception as exc:
        raise AnnotationError(
            path, f"cannot read the tissue mask ({type(exc).__name__}: {exc})."
        ) from exc
    if data.ndim == 3:  # an RGB(A) picture of a mask: any non-black pixel is tissue
        data = data[..., :3].any(axis=-1)
    if data.ndim != 2 or min(data.shape) == 0:
        raise AnnotationError(path, f"a tissue mask must be a 2-D image, got shape {data.shape}.")
    mh, mw = data.shape
    h, w = level0_shape
    if abs(mh - mw * h / w) > 1 and abs(mw - mh * w / h) > 1:
        raise AnnotationError(
            path,
            f"the mask is {mh} x {mw} pixels but the slide is {h} x {w}: the aspect ratios differ.",
            "Export the mask over the whole slide (any resolution, same aspect ratio).",
        )
    return TissueMask(np.asarray(data) != 0, level0_shape, str(path))
