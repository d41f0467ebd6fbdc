"""Turn a :class:`~napari_zoomin.slide.Slide` into napari layer data (no napari import needed)."""

from __future__ import annotations

from typing import Any

from ..slide import Slide


def slide_layer_kwargs(slide: Slide, name: str | None = None) -> dict[str, Any]:
    """Layer keyword arguments that place a slide in micrometres when its mpp is known.

    Without mpp the layer stays in level-0 pixels and says so in its metadata
    (``metadata["units"] == "pixel"``), so attention overlays built later use the
    same frame either way.
    """
    mpp = slide.mpp
    kwargs: dict[str, Any] = {
        "name": name or (slide.path.stem if slide.path else "slide"),
        "rgb": True,
        "multiscale": slide.level_count > 1,
        # uint8 RGB: fixed limits, so napari never computes them from the pixels
        "contrast_limits": (0, 255),
        "metadata": {
            "napari_zoomin": True,
            "path": None if slide.path is None else str(slide.path),
            "mpp": None if mpp is None else list(mpp),
            "units": "micrometer" if mpp else "pixel",
            "level_shapes": [list(s) for s in slide.level_shapes],
            "level_downsamples": list(slide.level_downsamples),
            "vendor": slide.vendor,
            "backend": slide.backend,
        },
    }
    if mpp:
        kwargs["scale"] = tuple(mpp)
        kwargs["units"] = ("micrometer", "micrometer")
    return kwargs


def slide_layer_data(slide: Slide, name: str | None = None) -> tuple[Any, dict[str, Any], str]:
    """One napari LayerData tuple: the pyramid (or the single level) as dask arrays."""
    pyramid = slide.pyramid()
    data = pyramid if len(pyramid) > 1 else pyramid[0]
    return (data, slide_layer_kwargs(slide, name), "image")
