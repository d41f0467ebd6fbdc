"""Layers whose look follows the camera's zoom: thin outlines and a zoomed-out overview.

Outline widths that stay a fixed number of screen pixels at every zoom.

napari draws a shapes layer's ``edge_width`` in data units, so an outline of one width
is invisible on a whole slide at whole-slide zoom (a 40,000-px slide on a 1,000-px
canvas: 1 data unit = 0.025 screen px) and fat at full resolution.  A shapes layer
whose metadata holds :data:`SCREEN_WIDTH_KEY` (screen pixels: one number for every
shape, or one per shape) is kept at that width by :class:`ZoomFollower`:
``edge_width = pixels / (zoom · layer scale)``, recomputed when the camera's zoom
changes by more than :data:`MATERIAL_CHANGE` (mouse-wheel zooming fires many tiny
changes; recomputing every outline for each would be wasted work).

The layer remembers the ``zoom · scale`` it was last drawn for (under
:data:`APPLIED_KEY`), so several widgets of one viewer may each own a
:class:`ZoomFollower` without redoing each other's work.

A layer whose metadata holds :data:`SHOWN_BELOW_KEY` (screen pixels per data pixel) is
an overview for zoomed-out views: it is hidden when the zoom goes past that (one of its
pixels then spans more screen pixels, and the detailed layers are readable) and shown
again when the zoom comes back below it.  Only crossing the threshold changes its
visibility, so a user who hides or shows it by hand keeps that until the next crossing.

No Qt, no napari import: it uses only the viewer's public events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "APPLIED_KEY",
    "MATERIAL_CHANGE",
    "OUTLINE_PX",
    "SCREEN_WIDTH_KEY",
    "SHOWN_BELOW_KEY",
    "ZoomFollower",
    "apply_screen_width",
    "apply_zoom_visibility",
    "screen_widths",
    "set_screen_width",
]

#: layer metadata key: the outline width in screen pixels (a number, or one per shape)
SCREEN_WIDTH_KEY = "napari_zoomin_screen_edge_px"
#: layer metadata key: the ``zoom · scale`` the current ``edge_width`` was computed for
APPLIED_KEY = "napari_zoomin_screen_edge_zoom"
#: the default outline width on screen (pixels): thin, still a line
OUTLINE_PX = 1.5
#: a relative change of ``zoom · scale`` below this leaves the outlines as they are
MATERIAL_CHANGE = 0.02
#: layer metadata key: show the layer only while one of its data pixels spans fewer
#: screen pixels than this (an overview for zoomed-out views)
SHOWN_BELOW_KEY = "napari_zoomin_shown_below_px"
#: layer metadata key: which side of its threshold the overview was last put on
_SIDE_KEY = "napari_zoomin_shown_below_side"


def _follows(layer) -> bool:
    return SCREEN_WIDTH_KEY in layer.metadata or SHOWN_BELOW_KEY in layer.metadata


def _layer_scale(layer) -> float:
    """World units per data unit of a 2-D layer (the mean of y and x)."""
    sy, sx = (abs(float(s)) for s in layer.scale[-2:])
    return (sy + sx) / 2 or 1.0


def screen_widths(layer) -> list[float] | None:
    """The layer's outline widths in screen pixels, one per shape (``None`` if it keeps
    none).  A per-shape list whose length no longer matches (shapes were added or
    deleted) falls back to its smallest width for every shape."""
    target = layer.metadata.get(SCREEN_WIDTH_KEY)
    if target is None:
        return None
    n = len(layer.data)
    if isinstance(target, Sequence):
        if len(target) == n:
            return [float(p) for p in target]
        target = min(target, default=OUTLINE_PX)
    return [float(target)] * n


def apply_screen_width(layer, zoom: float, force: bool = False) -> bool:
    """Set ``layer.edge_width`` so its outlines are their screen width at ``zoom``
    (napari's zoom: screen pixels per world unit).  Skipped (``False``) unless the
    zoom changed materially since the last time, or ``force``."""
    widths = screen_widths(layer)
    if widths is None or zoom <= 0:
        return False
    factor = zoom * _layer_scale(layer)  # screen pixels per data unit
    applied = layer.metadata.get(APPLIED_KEY)
    if not force and applied and abs(factor / applied - 1) < MATERIAL_CHANGE:
        return False
    layer.metadata[APPLIED_KEY] = factor
    if widths:
        layer.edge_width = [p / factor for p in widths]
    target = layer.metadata[SCREEN_WIDTH_KEY]
    if getattr(layer, "editable", False) and not isinstance(target, Sequence):
        layer.current_edge_width = float(target) / factor  # shapes the user draws next
    return True


def apply_zoom_visibility(layer, zoom: float) -> bool:
    """Show an overview layer (:data:`SHOWN_BELOW_KEY`) below its threshold zoom, hide
    it above; only when the zoom crossed the threshold since the last call.  Returns
    whether the visibility was set."""
    limit = layer.metadata.get(SHOWN_BELOW_KEY)
    if limit is None or zoom <= 0:
        return False
    below = zoom * _layer_scale(layer) < float(limit)
    if layer.metadata.get(_SIDE_KEY) == below:
        return False
    layer.metadata[_SIDE_KEY] = below
    layer.visible = below
    return True


def set_screen_width(layer, pixels: float | Sequence[float], zoom: float) -> None:
    """Give ``layer`` a new screen width (one number, or one per shape) and draw it."""
    layer.metadata[SCREEN_WIDTH_KEY] = (
        [float(p) for p in pixels] if isinstance(pixels, Sequence) else float(pixels)
    )
    apply_screen_width(layer, zoom, force=True)


class ZoomFollower:
    """Keeps every layer of a viewer that asks for it at its screen width
    (:data:`SCREEN_WIDTH_KEY`) or zoom-dependent visibility (:data:`SHOWN_BELOW_KEY`):
    on insertion, and on camera zoom while such a layer exists.

    The zoom handler is connected only while the viewer has such a layer, so a viewer
    without results or ROIs pays nothing per zoom step.  :meth:`close` disconnects all.
    """

    def __init__(self, viewer) -> None:
        self._viewer = viewer
        self._zoom_connected = False
        self._connections: list[tuple[Any, Callable]] = [
            (viewer.layers.events.inserted, self._on_inserted),
            (viewer.layers.events.removed, self._on_removed),
        ]
        for emitter, callback in self._connections:
            emitter.connect(callback)
        self.update(force=True)

    def _kept(self) -> list:
        return [lay for lay in self._viewer.layers if _follows(lay)]

    @property
    def following_zoom(self) -> bool:
        """Whether the camera's zoom is being followed (some layer needs it)."""
        return self._zoom_connected

    def _follow(self, on: bool) -> None:
        if on and not self._zoom_connected:
            self._viewer.scene.camera.events.zoom.connect(self._on_zoom)
        elif not on and self._zoom_connected:
            self._viewer.scene.camera.events.zoom.disconnect(self._on_zoom)
        self._zoom_connected = on

    def update(self, force: bool = False) -> int:
        """Redraw the layers whose zoom changed materially; how many were redrawn."""
        layers = self._kept()
        self._follow(bool(layers))
        zoom = float(self._viewer.scene.camera.zoom)
        redrawn = sum(apply_screen_width(lay, zoom, force) for lay in layers)
        for lay in layers:
            apply_zoom_visibility(lay, zoom)
        return redrawn

    def _on_zoom(self, _event=None) -> None:
        self.update()

    def _on_inserted(self, event) -> None:
        layer = event.value
        if _follows(layer):
            zoom = float(self._viewer.scene.camera.zoom)
            apply_screen_width(layer, zoom)
            apply_zoom_visibility(layer, zoom)
            self._follow(True)

    def _on_removed(self, _event=None) -> None:
        self._follow(bool(self._kept()))

    def close(self) -> None:
        """Disconnect from the viewer (the widget that owns this is going away)."""
        self._follow(False)
        for emitter, callback in self._connections:
            emitter.disconnect(callback)
        self._connections = []
