"""Slides read by OpenSlide (Aperio, Hamamatsu, MIRAX, Leica, Ventana, Philips, DICOM, TIFF).

A DICOM slide is opened from its VOLUME instance (see ``slide/dicom.py``); OpenSlide
gathers the series' other instances (levels, label, overview, thumbnail) from its folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..slide import SCREEN_DPI
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


def background_color(properties) -> tuple[int, int, int]:
    """The slide's background, from ``openslide.background-color`` (hex RRGGBB); white if unset.

    OpenSlide gives the colour of the glass where the scanner recorded it; regions
    with no data (transparent in ``read_region``) are shown in it.
    """
    text = str(properties.get("openslide.background-color", "") or "").strip().lstrip("#")
    try:
        if len(text) == 6:
            return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
    except ValueError:
        pass
    return (255, 255, 255)


def composite_on(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """(rows, cols, 3) uint8: non-premultiplied RGBA laid over an opaque ``background``.

    openslide-python's ``read_region`` un-premultiplies OpenSlide's pixels, so a
    region the scanner did not record (alpha 0) comes back as black (0, 0, 0, 0).
    Left black it would look like dark stain; over the background it is glass.
    Edges with partial alpha (resampled levels) are blended, rounded to the nearest.
    """
    rgba = np.asarray(rgba)
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if alpha.min() == 255:  # the usual case: nothing to do
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint32)
    bg = np.asarray(background, np.uint32)
    blended = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return blended.astype(np.uint8)


def _number(text) -> float:
    """A property as a float; NaN when it is not a number."""
    try:
        return float(str(text).strip())
    except (TypeError, ValueError):
        return math.nan


def _per(microns: float, resolution: float) -> float:
    """µm per pixel from pixels per unit (a resolution of 0 is an infinite pixel)."""
    return microns / resolution if resolution else math.inf


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
        self._background = background_color(self._props)
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

    def _stated_mpp(self) -> tuple[tuple[float, float], str] | None:
        """(y, x) µm per pixel as the file states it, and where, or None.

        Aperio's ``MPP``, else OpenSlide's own ``openslide.mpp-x/y``, else the TIFF
        resolution tags.  OpenSlide leaves ``openslide.mpp-x/y`` out when the vendor's
        value is not a number or a TIFF resolution is 0: the raw property is then
        reported (NaN or infinite) so the slide can say why it has no pixel size.
        """
        p = self._props
        unit = p.get("tiff.ResolutionUnit", "").strip().lower()
        xres = _number(p.get("tiff.XResolution"))
        generic = p.get("openslide.vendor") == "generic-tiff"  # mpp from resolution tags
        if generic and unit == "inch" and math.isfinite(xres) and round(xres) in SCREEN_DPI:
            return None  # image software's default 72/96 dpi: no statement at all
        if "aperio.MPP" in p:  # what OpenSlide's mpp is read from (named as tifffile does)
            v = _number(p["aperio.MPP"])
            return (v, v), "MPP in the Aperio description"
        if "openslide.mpp-x" in p and "openslide.mpp-y" in p:
            pair = (_number(p["openslide.mpp-y"]), _number(p["openslide.mpp-x"]))
            if p.get("openslide.vendor") == "dicom":
                return pair, "PixelSpacing in the DICOM header"
            return pair, "TIFF resolution tags" if generic else "openslide.mpp-x/y"
        if unit in ("centimeter", "inch") and "tiff.XResolution" in p:
            microns = 1e4 if unit == "centimeter" else 25400.0
            yres = _number(p.get("tiff.YResolution", p["tiff.XResolution"]))
            return (_per(microns, yres), _per(microns, xres)), "TIFF resolution tags"
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
        # transparent = no data recorded there: show it as the slide's glass, not black
        return composite_on(rgba, self._background)

    def close(self) -> None:
        self._slide.close()
