"""The image-source protocol the models read from, and its in-memory implementation.

A model never holds an image.  It asks a *source* for regions of the full-resolution
image (level 0) at a scale, through one primitive::

    source.read(regions, scale) -> Tensor (n, 3, scaled_size(h, scale), scaled_size(w, scale))

``regions`` is a LongTensor (n, 4) of ``[top, left, height, width]`` in level-0 pixels
(int64: slides exceed 2^31 pixels), all of the same height and width.  Regions may
extend beyond the image; the outside reads as zeros (000 §2.1 zero-pads the image
by half a tile).  Values are float32 in [0, 1].  The stage-1 view of 000 is
``read([[0, 0, H, W]], s1)``, the stage-2 view of a tile ``read(tile_region, s2)``
(``s2`` is relative to the full-resolution tile, ``V(T(x, c), s2)``) and sub-tiles
are ``read(subtile_regions, 1.0)``.  A pyramid serves a read from the level nearest
the scale, so a gigapixel slide is never decoded at level 0 to build a view.

Optional capabilities, looked up with ``getattr`` (a source may lack them):

- ``tissue_mask(scale) -> BoolTensor (scaled_size(H, s), scaled_size(W, s)) | None``,
  pixel-aligned with the view ``read([[0, 0, H, W]], s)``; True = tissue.  Cells of
  the attention maps outside tissue get probability exactly zero.
- ``read_roi(regions, scale) -> Tensor (n, h', w') | None``: the fraction of
  region-of-interest pixels (annotated tumour, …) under each output pixel, same
  geometry as ``read``; ``None`` when the image has no annotation.  Used for pixel
  supervision (000 §2.5) and tile pre-training.
- ``read_bytes(regions, scale) -> uint8 Tensor (n, 3, h', w') | None``: ``read``'s
  pixels as stored (0–255) when no resampling is needed, else ``None``; inference
  reads a gigapixel stage-1 view this way (:func:`read_view`).
- ``read_attention_target(regions, scale) -> Tensor (n, h', w') | None``: the same
  for where attention should go: ROIs *and* their look-alikes (``TrainConfig.
  lookalike_labels``), which a low-resolution view cannot tell apart; ``read_roi``'s
  mask when the source lacks it.  The attention losses and the attention networks'
  pre-training use it, the feature network's pre-training the ROI alone.
- ``read_hard_negatives(regions, scale) -> Tensor (n, h', w') | None``: the same for
  annotated regions that are *not* ROI (a pathologist's "Normal" outline, the sample
  slides' distractors); tile pre-training draws some negatives there, because such
  look-alikes are what a classifier must learn to reject and random patches rarely
  hit them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..geometry import scaled_size

__all__ = [
    "ImageSource",
    "ReadCounter",
    "TensorSource",
    "as_regions",
    "crop_regions",
    "downsample_area",
    "full_region",
    "read_attention_target",
    "read_hard_negatives",
    "read_roi",
    "read_view",
    "tissue_mask",
]


@runtime_checkable
class ImageSource(Protocol):
    """Anything the models can read pixels from (in-memory tensor, lazy slide, …)."""

    @property
    def shape(self) -> tuple[int, int]:
        """Full-resolution (H, W) in level-0 pixels."""
        ...

    def read(self, regions: Tensor, scale: float) -> Tensor:
        """(n, 3, scaled_size(h, scale), scaled_size(w, scale)) float32 in [0, 1]."""
        ...


def as_regions(regions: Tensor | np.ndarray | list) -> Tensor:
    """Validate ``[top, left, height, width]`` rows and return them as int64 (n, 4) on CPU."""
    r = torch.as_tensor(regions)
    if r.dim() == 1:
        r = r[None]
    if r.dim() != 2 or r.shape[1] != 4:
        raise ValueError(
            f"regions must have shape (n, 4) [top, left, height, width], got {tuple(r.shape)}"
        )
    if torch.is_floating_point(r):
        raise TypeError("regions must be integers (level-0 pixels), got a floating-point tensor")
    r = r.to(device="cpu", dtype=torch.int64)
    if r.shape[0] and bool((r[:, 2:] <= 0).any()):
        raise ValueError("region heights and widths must be positive")
    if r.shape[0] and bool((r[:, 2:] != r[0, 2:]).any()):
        raise ValueError("all regions of one read must have the same height and width")
    return r


def full_region(source: ImageSource) -> Tensor:
    """The region ``[[0, 0, H, W]]`` covering the whole image."""
    h, w = source.shape
    return torch.tensor([[0, 0, h, w]], dtype=torch.int64)


def read_view(source: ImageSource, scale: float, exact_bytes: bool = False) -> Tensor:
    """The low-resolution view ``V(x, scale)`` of the whole image, (3, h, w).

    ``exact_bytes``: the stored 8-bit pixels (uint8, 0–255) when the source can give
    them without resampling (``read_bytes``), so a gigapixel view is never held as
    floats; float in [0, 1] otherwise.
    """
    if exact_bytes:
        method = getattr(source, "read_bytes", None)
        view = None if method is None else method(full_region(source), scale)
        if view is not None:
            return view[0]
    return source.read(full_region(source), scale)[0]


def tissue_mask(source: ImageSource, scale: float) -> Tensor | None:
    """The source's tissue mask at the view of ``scale``, or ``None`` if it has none."""
    method = getattr(source, "tissue_mask", None)
    return None if method is None else method(scale)


def read_roi(source: ImageSource, regions: Tensor, scale: float) -> Tensor | None:
    """The source's ROI fractions for ``regions`` at ``scale``, or ``None`` if unannotated."""
    method = getattr(source, "read_roi", None)
    return None if method is None else method(regions, scale)


def read_attention_target(source: ImageSource, regions: Tensor, scale: float) -> Tensor | None:
    """Where attention should go (ROIs and look-alikes) for ``regions``, or ``None``."""
    method = getattr(source, "read_attention_target", None)
    return read_roi(source, regions, scale) if method is None else method(regions, scale)


def read_hard_negatives(source: ImageSource, regions: Tensor, scale: float) -> Tensor | None:
    """The source's annotated non-ROI fractions for ``regions``, or ``None`` if it has none."""
    method = getattr(source, "read_hard_negatives", None)
    return None if method is None else method(regions, scale)


def crop_regions(image: Tensor, regions: Tensor) -> Tensor:
    """Cut equally sized regions out of a (C, H, W) tensor, zero-filled outside it.

    Args:
        image: (C, H, W).
        regions: (n, 4) int64 ``[top, left, height, width]``, possibly out of bounds.

    Returns:
        (n, C, height, width) in ``image``'s dtype, exact copies of the in-bounds parts.
    """
    regions = as_regions(regions)
    c, h_img, w_img = image.shape
    n = regions.shape[0]
    if n == 0:
        return image.new_zeros((0, c, 0, 0))
    h, w = int(regions[0, 2]), int(regions[0, 3])
    out = image.new_zeros((n, c, h, w))
    for k, (top, left, _, _) in enumerate(regions.tolist()):
        y0, y1 = max(top, 0), min(top + h, h_img)
        x0, x1 = max(left, 0), min(left + w, w_img)
        if y0 < y1 and x0 < x1:
            out[k, :, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
    return out


def downsample_area(pixels: Tensor, scale: float) -> Tensor:
    """Area (box-average) downsampling of (n, C, h, w) to ``scaled_size`` at ``scale`` ≤ 1.

    Uses ``F.interpolate(mode="area")`` (adaptive average pooling): exact box means
    when the factor divides the size, windows of ⌊·⌋/⌈·⌉ pixels otherwise.  Averaging
    (rather than point sampling) keeps tiny objects visible as faint blobs, as a
    slide pyramid level built by averaging would.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    h, w = pixels.shape[-2:]
    size = (scaled_size(h, scale), scaled_size(w, scale))
    if size == (h, w):
        return pixels
    dtype = pixels.dtype
    out = F.interpolate(pixels.float(), size=size, mode="area")
    return out.to(dtype) if torch.is_floating_point(pixels) else out


@dataclass
class ReadCounter:
    """Pixels a source has served, per scale (benchmarks report them).

    ``level0_pixels[s]`` sums ``h·w`` of the requested regions (level-0 pixels) read
    at scale ``s``; ``output_pixels[s]`` sums the pixels returned; ``regions[s]``
    counts regions.  Python ints: no overflow on gigapixel slides.
    """

    regions: dict[float, int] = field(default_factory=lambda: defaultdict(int))
    level0_pixels: dict[float, int] = field(default_factory=lambda: defaultdict(int))
    output_pixels: dict[float, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, regions: Tensor, scale: float, output_shape: tuple[int, int]) -> None:
        n = int(regions.shape[0])
        if n == 0:
            return
        h, w = int(regions[0, 2]), int(regions[0, 3])
        self.regions[scale] += n
        self.level0_pixels[scale] += n * h * w
        self.output_pixels[scale] += n * output_shape[0] * output_shape[1]

    def reset(self) -> None:
        self.regions.clear()
        self.level0_pixels.clear()
        self.output_pixels.clear()

    @property
    def full_resolution_pixels(self) -> int:
        """Level-0 pixels read at scale 1 (sub-tiles)."""
        return self.level0_pixels.get(1.0, 0)


def _to_chw_float(image: Tensor | np.ndarray) -> Tensor:
    """(3, H, W) float32 in [0, 1] from (3, H, W), (H, W, 3), (1, H, W), (H, W, 1) or (H, W).

    A shape that reads both ways, such as (3, H, 3), is taken as channels-first.
    """
    t = torch.as_tensor(image)
    if t.dim() == 2:
        t = t[None]
    elif t.dim() == 3 and t.shape[0] not in (1, 3):
        if t.shape[-1] not in (1, 3):
            raise ValueError(f"image must be (3, H, W), (H, W, 3) or (H, W); got {tuple(t.shape)}")
        t = t.permute(2, 0, 1)
    elif t.dim() != 3:
        raise ValueError(f"image must be (3, H, W), (H, W, 3) or (H, W); got {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.dtype == torch.uint8:
        return t.float().div(255.0).contiguous()
    if torch.is_floating_point(t):
        return t.float().contiguous()
    raise TypeError(f"image must be uint8 or floating point in [0, 1], got {t.dtype}")


def _to_mask(mask: Tensor | np.ndarray | None, shape: tuple[int, int], name: str) -> Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask)
    if tuple(m.shape) != shape:
        raise ValueError(f"{name} must have the image's shape {shape}, got {tuple(m.shape)}")
    return m.float()[None].contiguous()


class TensorSource:
    """An in-memory image as an :class:`ImageSource` (tests, MNIST-like data, small images).

    Args:
        image: (3, H, W) or (H, W, 3) (or (H, W) grey), uint8 or float in [0, 1].
        tissue: optional (H, W) bool mask, True = tissue. The mask at a view marks a
            view pixel as tissue if *any* level-0 pixel under it is tissue, so no
            tissue is ever excluded by downsampling.
        roi: optional (H, W) bool/float mask of regions of interest for pixel
            supervision; ``read_roi`` returns the fraction of ROI pixels per output pixel.
        hard_negatives: optional (H, W) mask of annotated non-ROI regions
            (``read_hard_negatives``).

    Reads are exact slices (zero-filled outside the image) and, for ``scale < 1``,
    area downsampling (:func:`downsample_area`).  ``counter`` records what was read.
    """

    def __init__(
        self,
        image: Tensor | np.ndarray,
        tissue: Tensor | np.ndarray | None = None,
        roi: Tensor | np.ndarray | None = None,
        hard_negatives: Tensor | np.ndarray | None = None,
    ):
        self.image = _to_chw_float(image)
        shape = (int(self.image.shape[1]), int(self.image.shape[2]))
        self._tissue = _to_mask(tissue, shape, "tissue")
        self._roi = _to_mask(roi, shape, "roi")
        self._hard_negatives = _to_mask(hard_negatives, shape, "hard_negatives")
        self.counter = ReadCounter()

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    def read(self, regions: Tensor, scale: float) -> Tensor:
        regions = as_regions(regions)
        out = downsample_area(crop_regions(self.image, regions), scale)
        self.counter.add(regions, scale, tuple(out.shape[-2:]))
        return out

    def tissue_mask(self, scale: float) -> Tensor | None:
        if self._tissue is None:
            return None
        view = downsample_area(self._tissue[None], scale)[0, 0]
        return view > 0

    def read_roi(self, regions: Tensor, scale: float) -> Tensor | None:
        if self._roi is None:
            return None
        return downsample_area(crop_regions(self._roi, as_regions(regions)), scale)[:, 0]

    def read_hard_negatives(self, regions: Tensor, scale: float) -> Tensor | None:
        if self._hard_negatives is None:
            return None
        regions = as_regions(regions)
        return downsample_area(crop_regions(self._hard_negatives, regions), scale)[:, 0]
