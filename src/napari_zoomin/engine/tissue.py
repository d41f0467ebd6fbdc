"""Where the tissue is: a low-resolution mask that keeps stage-1 sampling off the glass.

Detection (documented for users in docs/engine.md): read the pyramid level
nearest a downsample of 64 (16 µm per pixel at 0.25 µm/pixel), compute the HSV
saturation ``(max − min) / max`` of each pixel, threshold it with Otsu's method
clipped to [0.04, 0.15] (glass is grey, stained tissue is coloured; the clip
keeps a slide that is all tissue, or all glass, from being split in two), then
close small gaps, fill holes, drop specks smaller than 0.1 % of the mask and
grow the result by one mask pixel so tiles on the tissue border are kept.  Users
can pass their own mask instead (an image or label file: non-zero = tissue) at
any resolution with the slide's aspect ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import AnnotationError
from ..models.source import scaled_size
from ..slide import Slide

#: the level used for detection is the one nearest this downsample
DETECTION_DOWNSAMPLE = 64.0
#: bounds on the saturation threshold found by Otsu's method
MIN_SATURATION, MAX_SATURATION = 0.04, 0.15


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
        size = (scaled_size(h, scale), scaled_size(w, scale))
        m = _any_in_ranges(self.mask, size[0], axis=0)
        return torch.from_numpy(_any_in_ranges(m, size[1], axis=1))


def _any_in_ranges(mask: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Resize a bool mask along ``axis`` to ``size``: True where any covered pixel is.

    Output pixel ``i`` covers input pixels ``[floor(i·n/size), ceil((i+1)·n/size))``
    (the ranges of area resampling), counted with a cumulative sum: exact, and fast
    both up and down (a gigapixel slide's 1/16 view is 4x its tissue mask).
    """
    n = mask.shape[axis]
    i = np.arange(size, dtype=np.int64)
    lo = (i * n) // size
    hi = -((-(i + 1) * n) // size)  # ceil
    if n <= size:  # upsampling: a range holds one or two pixels
        return mask.take(lo, axis=axis) | mask.take(hi - 1, axis=axis)
    counts = np.cumsum(mask, axis=axis, dtype=np.int32)
    counts = np.concatenate([np.zeros_like(counts.take([0], axis=axis)), counts], axis=axis)
    return (counts.take(hi, axis=axis) - counts.take(lo, axis=axis)) > 0


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)


def detect_tissue(slide: Slide, downsample: float = DETECTION_DOWNSAMPLE) -> TissueMask:
    """Otsu on saturation at a low pyramid level (see the module docstring)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk, remove_small_objects

    level = int(np.argmin([abs(np.log(d / downsample)) for d in slide.level_downsamples]))
    rows, cols = slide.level_shapes[level]
    sat = _saturation(slide.read(level, 0, 0, rows, cols))
    try:
        threshold = float(threshold_otsu(sat))
    except ValueError:  # a constant image
        threshold = MAX_SATURATION
    threshold = min(max(threshold, MIN_SATURATION), MAX_SATURATION)
    mask = sat > threshold
    mask = ndimage.binary_closing(mask, structure=disk(2), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    mask = remove_small_objects(mask, max_size=max(int(mask.size * 1e-3), 4))
    mask = ndimage.binary_dilation(mask, iterations=1)
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
