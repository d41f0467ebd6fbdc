"""Write test pyramids in the layouts slides come in, independently of the product's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def mean_pyramid(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """A 2× pyramid by 2×2 means (rounded half up), finest first."""
    levels = [image]
    for _ in range(n_levels - 1):
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        s = a[:h, :w].astype(np.uint16).reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))
        levels.append(((s + 2) // 4).astype(np.uint8))
    return levels


def write_openslide_layout(path, image, compression="jpeg", tile=256, n_levels=3, mpp=0.5):
    """Levels as top-level tiled pages, reduced ones with subfiletype=1 (generic-tiff)."""
    options = {
        "jpeg": {"compression": "jpeg", "compressionargs": {"level": 90}},
        "zlib": {"compression": "zlib"},
    }[compression]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, level in enumerate(mean_pyramid(image, n_levels)):
            res = 1e4 / (mpp * 2**k)
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                subfiletype=int(k > 0),
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                **options,
            )
    return Path(path)


def write_ome_subifd(path, image, compression="jpeg", tile=256, n_levels=3, mpp=0.5):
    """OME-TIFF with the reduced levels in sub-IFDs of the full-resolution page."""
    options = {
        "jpeg": {"compression": "jpeg", "compressionargs": {"level": 90}},
        "zlib": {"compression": "zlib"},
    }[compression]
    levels = mean_pyramid(image, n_levels)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(
            levels[0],
            subifds=n_levels - 1,
            tile=(tile, tile),
            photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
            **options,
        )
        for level in levels[1:]:
            tw.write(level, subfiletype=1, tile=(tile, tile), photometric="rgb", **options)
    return Path(path)
