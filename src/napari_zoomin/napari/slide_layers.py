"""Which napari layers are slides, the slide behind a layer, and its level-0 frame.

Every widget needs the same three answers: the image layers a user can classify or
annotate, the :class:`~napari_zoomin.slide.Slide` behind one, and how level-0 pixel
coordinates map to the layer's world coordinates (``world = translate + scale * px``),
so that overlays land on the slide at every zoom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image

from ..errors import SlideError
from ..slide import Slide, open_slide

__all__ = [
    "LARGEST_IN_MEMORY_PIXELS",
    "is_slide_layer",
    "layer_slide",
    "level0_frame",
    "show_scale_bar_when_added",
    "slide_layers",
]

#: an image layer that our reader did not open is classified from its level-0 array,
#: which is then loaded into memory; refuse beyond this many pixels (1 GB of RGB)
LARGEST_IN_MEMORY_PIXELS = 20_000 * 20_000


def is_slide_layer(layer) -> bool:
    """True for image layers opened by napari-zoomin's reader or sample data."""
    return isinstance(layer, Image) and bool(layer.metadata.get("napari_zoomin"))


def slide_layers(viewer) -> list[Image]:
    """Image layers a user can classify: ours first (top-most first), then others."""
    images = [layer for layer in reversed(viewer.layers) if isinstance(layer, Image)]
    return [lay for lay in images if is_slide_layer(lay)] + [
        lay for lay in images if not is_slide_layer(lay)
    ]


def _layer_path(layer: Image) -> Path | None:
    path = layer.metadata.get("path") if is_slide_layer(layer) else None
    path = path or getattr(layer.source, "path", None)
    return None if path is None else Path(path)


def layer_slide(layer: Image, **options) -> Slide:
    """Open the slide behind ``layer`` (``options`` go to :func:`open_slide`).

    A layer from our reader reopens its file (cheap: pyramids are lazy).  Another
    image layer with a file behind it opens that file; one without a file is used as
    an in-memory image from its level 0, up to :data:`LARGEST_IN_MEMORY_PIXELS`.
    Raises :class:`SlideError` saying what to do otherwise.
    """
    if not isinstance(layer, Image):
        raise SlideError(
            None,
            f"layer {layer.name!r} is a {type(layer).__name__.lower()} layer, not an image.",
            "Choose the slide's image layer.",
        )
    path = _layer_path(layer)
    if path is not None and path.exists():
        if is_slide_layer(layer) and layer.metadata.get("backend"):
            options.setdefault("backend", layer.metadata["backend"])
        return open_slide(path, **options)
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(int(s) for s in data.shape)
    if len(shape) < 2 or (layer.rgb and len(shape) != 3) or (not layer.rgb and len(shape) != 2):
        raise SlideError(
            path,
            f"layer {layer.name!r} has shape {shape}; a slide is a 2-D RGB or grey image.",
            "Open the slide with napari-zoomin's reader (File > Open, plugin napari-zoomin).",
        )
    if shape[0] * shape[1] > LARGEST_IN_MEMORY_PIXELS:
        raise SlideError(
            path,
            f"layer {layer.name!r} has no file behind it and is too large to load "
            f"({shape[0]:,} x {shape[1]:,} pixels).",
            "Save it as a pyramidal TIFF and open it with napari-zoomin's reader.",
        )
    scale = tuple(float(s) for s in layer.scale[-2:])
    mpp = scale if layer.units[-1] in ("micrometer", "micron", "um", "µm") else None
    return open_slide(np.asarray(data), mpp=mpp)


def show_scale_bar_when_added(layer_data: list[tuple]) -> None:
    """Turn napari's scale bar on once one of these slides in micrometres is added.

    Readers and sample functions return layer data without a viewer; napari adds it
    to the viewer that asked, which for File > Open, File > Open Sample and drag and
    drop is the active one (:func:`napari.current_viewer`).  So a one-shot handler
    on that viewer's layer list waits for one of *these* layers (same file, from our
    reader, in micrometres) and then shows the scale bar, whose unit napari takes from
    the layers' units (µm).  Slides in pixels, and layers of other readers, leave the
    scale bar as it is; so does a layer that goes to another viewer.
    """
    paths = {
        meta["metadata"]["path"]
        for _, meta, *_ in (d for d in layer_data if len(d) > 1)
        if meta.get("metadata", {}).get("units") == "micrometer"
        and meta["metadata"].get("path") is not None
    }
    if not paths:
        return
    from napari import current_viewer

    viewer = current_viewer()
    if viewer is None:
        return

    def on_inserted(event) -> None:
        layer = event.value
        if (
            is_slide_layer(layer)
            and layer.metadata.get("units") == "micrometer"
            and layer.metadata.get("path") in paths
        ):
            viewer.layers.events.inserted.disconnect(on_inserted)
            viewer.canvas.overlays.scale_bar.visible = True

    viewer.layers.events.inserted.connect(on_inserted)


def level0_frame(layer: Image) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` (y, x) of the layer's level-0 pixels in world coordinates.

    An overlay built in level-0 pixels gets ``scale = s * frame_scale`` and
    ``translate = frame_translate + frame_scale * t`` for its own pixel size ``s`` and
    offset ``t`` (both in level-0 pixels), and then lies exactly on the slide.
    """
    scale = tuple(float(s) for s in layer.scale[-2:])
    translate = tuple(float(t) for t in layer.translate[-2:])
    return scale, translate
