"""Outlines keep their width in screen pixels at every zoom, in a real napari viewer."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_zoomin.napari.zoom_follow import (  # noqa: E402
    SCREEN_WIDTH_KEY,
    ZoomFollower,
    set_screen_width,
)

pytestmark = pytest.mark.viewer


def squares(n: int, side: float = 100.0) -> list[np.ndarray]:
    return [
        np.array([[0, k * side], [0, (k + 1) * side], [side, (k + 1) * side], [side, k * side]])
        for k in range(n)
    ]


def on_screen(layer, zoom: float) -> np.ndarray:
    """The drawn outline widths in screen pixels: data width x zoom x layer scale."""
    return np.asarray(layer.edge_width) * zoom * float(layer.scale[-1])


@pytest.mark.parametrize("scale", [1.0, 0.2527, 16.0])
def test_outlines_stay_their_screen_width_at_zooms_100x_apart(make_napari_viewer, scale):
    viewer = make_napari_viewer()
    keeper = ZoomFollower(viewer)
    thin = viewer.add_shapes(
        squares(3),
        shape_type="rectangle",
        scale=(scale, scale),
        edge_width=7.0,
        metadata={SCREEN_WIDTH_KEY: 1.5},
    )
    other = viewer.add_shapes(  # a second slide's layer, on another scale
        squares(2),
        shape_type="rectangle",
        scale=(2 * scale, 2 * scale),
        metadata={SCREEN_WIDTH_KEY: [1.0, 4.0]},
    )
    plain = viewer.add_shapes(squares(1), shape_type="rectangle", edge_width=3.0)
    assert keeper.following_zoom
    for zoom in (0.01 / scale, 1.0 / scale):  # whole slide, then 100x closer
        viewer.scene.camera.zoom = zoom
        np.testing.assert_allclose(on_screen(thin, zoom), 1.5, rtol=0.05)
        np.testing.assert_allclose(on_screen(other, zoom), [1.0, 4.0], rtol=0.05)
        assert plain.edge_width == [3.0]  # layers that did not ask are left alone
    # a small zoom step is not worth redrawing every outline: nothing changes ...
    before = list(thin.edge_width)
    viewer.scene.camera.zoom = viewer.scene.camera.zoom * 1.01
    assert thin.edge_width == before
    # ... and a new per-shape width (a selected place) is drawn at once
    set_screen_width(thin, [1.5, 4.5, 1.5], viewer.scene.camera.zoom)
    np.testing.assert_allclose(
        on_screen(thin, viewer.scene.camera.zoom), [1.5, 4.5, 1.5], rtol=0.05
    )
    # a shape added later (its list no longer fits) falls back to the thinnest width
    thin.add_rectangles(squares(1)[0] + 500)
    viewer.scene.camera.zoom = viewer.scene.camera.zoom * 3
    np.testing.assert_allclose(on_screen(thin, viewer.scene.camera.zoom), 1.5, rtol=0.05)


def test_zoom_is_followed_only_while_such_layers_exist(make_napari_viewer):
    viewer = make_napari_viewer()
    keeper = ZoomFollower(viewer)
    assert not keeper.following_zoom
    layer = viewer.add_shapes(squares(1), metadata={SCREEN_WIDTH_KEY: 2.0})
    assert keeper.following_zoom
    viewer.layers.remove(layer)
    assert not keeper.following_zoom
    viewer.add_shapes(squares(1), metadata={SCREEN_WIDTH_KEY: 2.0})
    keeper.close()
    assert not keeper.following_zoom
    callbacks = [getattr(c, "__self__", c) for c in viewer.scene.camera.events.zoom.callbacks]
    assert not any(c is keeper or (isinstance(c, tuple) and c[0]() is keeper) for c in callbacks)


def test_an_editable_layer_draws_new_shapes_at_the_screen_width(make_napari_viewer):
    viewer = make_napari_viewer()
    follower = ZoomFollower(viewer)  # noqa: F841 (kept alive: napari holds weak refs)
    layer = viewer.add_shapes(scale=(0.5, 0.5), metadata={SCREEN_WIDTH_KEY: 2.0})
    viewer.scene.camera.zoom = 0.05
    layer.add_rectangles(squares(1)[0])
    np.testing.assert_allclose(on_screen(layer, 0.05), 2.0, rtol=0.05)
