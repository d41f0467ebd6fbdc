"""The reader and sample-data contributions in a real napari viewer (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

pytestmark = pytest.mark.viewer


def test_reader_gives_one_multiscale_layer_in_micrometres(make_napari_viewer, pyramids):
    viewer = make_napari_viewer()
    path = pyramids["openslide", "jpeg"]
    layers = viewer.open(path, plugin="napari-zoomin")
    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = layers[0]
    assert layer.rgb and layer.multiscale
    assert [lv.shape for lv in layer.data] == [(2048, 1536, 3), (1024, 768, 3), (512, 384, 3)]
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    md = layer.metadata
    assert md["path"] == str(path)
    assert md["mpp"] == [0.5, 0.5] and md["units"] == "micrometer"
    assert md["level_shapes"] == [[2048, 1536], [1024, 768], [512, 384]]
    assert md["vendor"] == "generic-tiff"
    # the slide spans its physical size in world coordinates
    extent = layer.extent.world
    np.testing.assert_allclose(extent[1] - extent[0], (1024.0, 768.0), atol=0.5)


def test_ome_and_single_level_svs(make_napari_viewer, pyramids, cmu_svs):
    viewer = make_napari_viewer()
    (ome,) = viewer.open(pyramids["ome", "zlib"], plugin="napari-zoomin")
    assert ome.multiscale and len(ome.data) == 3 and ome.metadata["vendor"] == "ome"
    (svs,) = viewer.open(cmu_svs, plugin="napari-zoomin")
    assert not svs.multiscale and svs.data.shape == (2967, 2220, 3)
    np.testing.assert_allclose(svs.scale, (0.499, 0.499))
    assert svs.metadata["vendor"] == "aperio"
    assert len(viewer.layers) == 2  # label/macro images are not layers


def test_slide_without_mpp_stays_in_pixels(make_napari_viewer, tmp_path, real_crop):
    import tifffile

    path = tmp_path / "no-resolution.tif"  # tiled TIFF without physical resolution tags
    tifffile.imwrite(path, real_crop[:512, :512], tile=(256, 256), photometric="rgb")
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin="napari-zoomin")
    assert layers[0].metadata["units"] == "pixel" and layers[0].metadata["mpp"] is None
    np.testing.assert_allclose(layers[0].scale, (1.0, 1.0))


def test_screenshot_shows_slide_pixels(make_napari_viewer, pyramids, real_crop):
    viewer = make_napari_viewer(show=True)
    viewer.open(pyramids["openslide", "jpeg"], plugin="napari-zoomin")
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    # a tissue image, not a uniform canvas: many distinct colours, real contrast
    assert shot.std() > 10
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000
    # the slide's mean colour (pink H&E) dominates the middle of the canvas
    h, w = shot.shape[:2]
    middle = shot[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(middle, real_crop.reshape(-1, 3).mean(axis=0), atol=40)


def test_bad_file_gives_notification_and_viewer_stays_usable(
    make_napari_viewer, tmp_path, pyramids
):
    from napari.utils.notifications import notification_manager

    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide")
    viewer = make_napari_viewer()
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        layers = viewer.open(bad, plugin="napari-zoomin")
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert layers == [] and len(viewer.layers) == 0
    messages = [str(n.message) for n in seen]
    assert any("broken.svs" in m and "not a readable slide" in m for m in messages), messages
    # still usable
    assert len(viewer.open(pyramids["openslide", "zlib"], plugin="napari-zoomin")) == 1


@pytest.mark.slow
def test_sample_data_menu_entry(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-zoomin", "sample_slide")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    rows, cols, _ = layer.data[0].shape
    assert 39_000 <= rows <= 41_000 and 39_000 <= cols <= 41_000
    assert layer.metadata["mpp"] is not None


def _scale_bar(viewer):
    return viewer.canvas.overlays.scale_bar


def _scale_bar_texts(viewer) -> list[str]:
    canvas = viewer.window._qt_viewer.canvas
    return [v.node.text.text for v in canvas._viewer_overlay_to_visual[_scale_bar(viewer)]]


def test_slide_in_micrometres_turns_the_scale_bar_on(make_napari_viewer, cmu_svs):
    viewer = make_napari_viewer(show=True)
    assert not _scale_bar(viewer).visible
    viewer.open(cmu_svs, plugin="napari-zoomin")  # the real Aperio slide, 0.499 µm/px
    assert _scale_bar(viewer).visible
    assert str(viewer.layers.units[-1]) == "micrometer"
    viewer.reset_view()
    texts = _scale_bar_texts(viewer)
    assert texts and all(t.endswith("µm") for t in texts), texts


def test_images_in_pixels_leave_the_scale_bar_off(make_napari_viewer, tmp_path, real_crop, cmu_svs):
    import tifffile
    from PIL import Image

    png = tmp_path / "no-dpi.png"
    Image.fromarray(real_crop[:256, :256]).save(png)  # no dpi: pixels only
    tif = tmp_path / "no-resolution.tif"
    tifffile.imwrite(tif, real_crop[:512, :512], tile=(256, 256), photometric="rgb")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(tif, plugin="napari-zoomin")
    assert layer.metadata["units"] == "pixel"
    viewer.open(png, plugin="napari")  # napari-zoomin does not claim PNGs
    assert not _scale_bar(viewer).visible
    # a slide in micrometres turns it on in the viewer that opened it, not in others
    other = make_napari_viewer()
    other.open(cmu_svs, plugin="napari-zoomin")
    assert _scale_bar(other).visible and not _scale_bar(viewer).visible
