"""In-memory images: numpy arrays and plain PNG/JPEG files, so small images work too."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..slide import SCREEN_DPI
from .base import SlideBackend

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

#: virtual decode unit used to chunk and count reads of in-memory images
ARRAY_TILE = 512


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as (rows, cols, 3) uint8; accepts grey, RGB, RGBA, float in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected a (rows, cols[, 3|4]) image, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return (a.astype(np.float64) * (255.0 / info.max)).round().clip(0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {a.dtype}")


class ArrayBackend(SlideBackend):
    """A single-level image held in memory (a numpy array, or a decoded PNG/JPEG)."""

    name = "array"

    def __init__(
        self,
        image: np.ndarray,
        path: Path | None = None,
        mpp: tuple[float, float] | None = None,
        vendor: str = "array",
        mpp_source: str = "",
    ):
        super().__init__(path)
        self._image = as_rgb_uint8(image)
        self._mpp = mpp
        self._mpp_source = mpp_source
        self._vendor = vendor

    @classmethod
    def from_file(cls, path: Path) -> ArrayBackend:
        """Decode a plain image file with Pillow (whose decompression-bomb guard stays on)."""
        from PIL import Image

        with Image.open(path) as im:
            mpp = None
            dpi = im.info.get("dpi")
            # image software's default (72 or 96, rounded by PNG's pixels per metre) says nothing
            if dpi and round(float(dpi[0])) not in SCREEN_DPI:
                # as stated, 0 included (an infinite pixel): the slide judges it
                mpp = tuple(25400.0 / float(d) if float(d) else math.inf for d in (dpi[1], dpi[0]))
            array = np.asarray(im.convert("RGB"))
        return cls(array, path=path, mpp=mpp, vendor="image", mpp_source="the image's dpi")

    @property
    def vendor(self) -> str:
        return self._vendor

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [self._image.shape[:2]]

    @property
    def tile_shapes(self) -> list[tuple[int, int]]:
        rows, cols = self._image.shape[:2]
        return [(min(ARRAY_TILE, rows), min(ARRAY_TILE, cols))]

    def _stated_mpp(self) -> tuple[tuple[float, float], str] | None:
        return None if self._mpp is None else (self._mpp, self._mpp_source)

    def read_level(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        return self._image[y : y + height, x : x + width].copy()
