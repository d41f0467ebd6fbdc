"""Slides read by OpenSlide (Aperio, Hamamatsu, MIRAX, Leica, Ventana, Philips, generic TIFF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import SlideBackend

#: extensions OpenSlide is the first choice for
OPENSLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".bif",
    ".svslide",
)


class OpenSlideBackend(SlideBackend):
    """OpenSlide via ``openslide-python`` and the ``openslide-bin`` C library.

    OpenSlide addresses regions in level-0 coordinates and resamples when a
    level's downsample is not an integer, so reads of such levels at non-zero
    offsets can differ by a sub-pixel shift from the raw tiles (the tifffile
    backend returns raw tiles).  Level 0, and levels with integral downsamples,
    are exact.
    """

    name = "openslide"

    def __init__(self, path: Path):
        super().__init__(path)
        import openslide  # local: importing the C library is not free

        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self._props = dict(props)
        self._level_shapes = [(h, w) for (w, h) in self._slide.level_dimensions]
        self._tiles = []
        for i, (h, w) in enumerate(self._level_shapes):
            th = int(props.get(f"openslide.level[{i}].tile-height", 0) or 0)
            tw = int(props.get(f"openslide.level[{i}].tile-width", 0) or 0)
            # formats without a tile size (e.g. MIRAX's, or stripped TIFF) decode in
            # units OpenSlide does not report: count 256-pixel blocks.
            self._tiles.append((th or min(256, h), tw or min(256, w)))

    @property
    def vendor(self) -> str:
        return self._props.get("openslide.vendor", "unknown")

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return list(self._level_shapes)

    @property
    def tile_shapes(self) -> list[tuple[int, int]]:
        return list(self._tiles)

    @property
    def mpp(self) -> tuple[float, float] | None:
        try:
            return (float(self._props["openslide.mpp-y"]), float(self._props["openslide.mpp-x"]))
        except (KeyError, ValueError):
            return None

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    @property
    def associated_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._slide.associated_images.keys()))

    def associated_image(self, name: str) -> np.ndarray:
        return np.asarray(self._slide.associated_images[name].convert("RGB"))

    def read_level(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        h0, w0 = self._level_shapes[0]
        hl, wl = self._level_shapes[level]
        # level-0 location of the level pixel (y, x); exact for integral downsamples
        y0 = round(y * h0 / hl) if level else y
        x0 = round(x * w0 / wl) if level else x
        rgba = np.asarray(self._slide.read_region((x0, y0), level, (width, height)))
        # OpenSlide returns premultiplied RGBA: transparent (no data) is already 0.
        return np.ascontiguousarray(rgba[..., :3])

    def close(self) -> None:
        self._slide.close()
