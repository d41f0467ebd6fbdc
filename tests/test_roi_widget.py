"""The ROI annotations dock widget in a real viewer: placement, autosave, loading, painting."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity, notification_manager  # noqa: E402

from napari_zoomin.annotations import (  # noqa: E402
    Annotation,
    find_annotations,
    rasterize,
    read_annotations,
    write_geojson,
)
from napari_zoomin.engine.dataset import SlideDataset, SlideRecord  # noqa: E402
from napari_zoomin.napari import roi_controller  # noqa: E402
from napari_zoomin.napari.roi_shapes import (  # noqa: E402
    ANSWER_KEY_LAYER_NAME,
    ROI_LABELS_LAYER_NAME,
    ROI_LAYER_NAME,
)
from napari_zoomin.napari.roi_widget import RoiWidget  # noqa: E402

pytestmark = pytest.mark.viewer

SCALE, TRANSLATE = (0.5, 0.5), (100.0, -60.0)  # a slide layer at 0.5 µm/px, shifted


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A 4096² sample slide (levels 1, 2, 4) without planted regions; copied per test."""
    from napari_zoomin.samples import write_sample_slide

    folder = tmp_path_factory.mktemp("roi-template")
    info = write_sample_slide(
        folder / "case.tif",
        size=4096,
        label="negative",
        seed=5,
        tile=256,
        n_tumor=0,
        n_distractors=0,
    )
    return info.path


@pytest.fixture
def slide(template, tmp_path):
    """A fresh copy of the slide, without a ROI file."""
    path = tmp_path / "case.tif"
    shutil.copy(template, path)
    return path


def open_slide_layer(viewer, path):
    (layer,) = viewer.open(path, plugin="napari-zoomin")
    layer.scale, layer.translate = SCALE, TRANSLATE
    return layer


def docked_widget(viewer) -> RoiWidget:
    widget = RoiWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return widget


def to_data(layer, world_points):
    """napari's own world → data mapping of a layer, point by point."""
    return np.array([layer.world_to_data(p) for p in np.asarray(world_points, float)])


def level0_world(points_yx):
    """World coordinates of level-0 points (annotation convention: pixel c = [c, c + 1))."""
    return np.asarray(TRANSLATE) + np.asarray(SCALE) * (np.asarray(points_yx, float) - 0.5)


def errors() -> list[str]:
    return [
        str(n.message)
        for n in notification_manager.records
        if n.severity == NotificationSeverity.ERROR
    ]


def test_drawn_shapes_are_exact_level0_annotations_saved_beside_the_slide(
    make_napari_viewer, qtbot, slide
):
    viewer = make_napari_viewer()
    slide_layer = open_slide_layer(viewer, slide)
    _, widget = viewer.window.add_plugin_dock_widget("napari-zoomin", "ROI annotations")
    assert isinstance(widget, RoiWidget)  # from the manifest, with napari's proxied viewer
    shapes = widget.shapes_layer
    assert shapes.name == ROI_LAYER_NAME and viewer.layers.selection.active is shapes
    assert tuple(shapes.scale) == SCALE and tuple(shapes.translate) == (99.75, -60.25)

    # drawn in world coordinates, as a user would: a rectangle, a triangle, an ellipse
    rect_world = level0_world([[1024, 512], [1280, 1024]])
    shapes.add_rectangles(to_data(shapes, rect_world))
    shapes.add_polygons([to_data(shapes, level0_world([[2048, 2048], [2048, 2560], [2560, 2048]]))])
    box = level0_world([[840, 2680], [840, 3320], [1160, 3320], [1160, 2680]])
    shapes.add_ellipses(to_data(shapes, box))
    expected = [
        Annotation.rectangle(top=1024, left=512, height=256, width=512),
        Annotation(np.array([[2048.0, 2048.0], [2560.0, 2048.0], [2048.0, 2560.0]])),
        Annotation.ellipse(1000, 3000, 160, 320, n=64),
    ]
    assert widget.session.annotations() == expected
    # the rectangle's corner is the boundary of the level-0 pixels napari shows there
    corner = rect_world[0]
    inside = np.round(slide_layer.world_to_data(corner + 0.01))
    outside = np.round(slide_layer.world_to_data(corner - 0.01))
    assert tuple(inside) == (1024, 512) and tuple(outside) == (1023, 511)

    # the label combo relabels the selected shape (the ellipse) and colours it
    shapes.selected_data = {2}
    widget.label.value = "Exclusion"
    assert list(shapes.features["label"]) == ["Tumor", "Tumor", "Exclusion"]
    np.testing.assert_allclose(shapes.edge_color[2], [180 / 255, 180 / 255, 180 / 255, 1])
    np.testing.assert_allclose(shapes.edge_color[0], [200 / 255, 0, 0, 1])

    # saved one second after the last edit, not before; the file is the layer
    sidecar = slide.with_suffix(".geojson")
    assert not sidecar.exists()
    qtbot.waitUntil(sidecar.exists, timeout=3000)
    saved = read_annotations(sidecar)
    assert list(saved) == widget.session.annotations()
    assert [a.label for a in saved] == ["Tumor", "Tumor", "Exclusion"]
    assert str(sidecar) in widget.status.value

    # training reads the same file: the dataset's ROI masks at 1/16 and 1/4
    record = SlideRecord(slide, "negative", 0, "train", sidecar)
    roi = SlideDataset([record], ["negative", "positive"]).roi_mask(0)
    mask16 = roi(np.array([[0, 0, 4096, 4096]]), 1 / 16)[0].numpy()
    expected16 = np.zeros((256, 256), np.float32)
    expected16[64:80, 32:64] = 1.0
    np.testing.assert_array_equal(mask16[:100, :100], expected16[:100, :100])
    assert mask16[50:75, 160:215].sum() == 0  # the exclusion ellipse is no ROI
    mask4 = roi(np.array([[1000, 500, 300, 540]]), 1 / 4)[0].numpy()
    assert mask4.sum() == 64 * 128 and mask4[6:70, 3:131].min() == 1.0

    # reopening the widget on the slide loads its ROI file into a new layer
    viewer.window.remove_dock_widget(widget.native)
    viewer.layers.remove(shapes)
    again = docked_widget(viewer)
    assert again.shapes_layer is not shapes
    assert again.session.annotations() == list(saved)
    assert list(again.shapes_layer.features["label"]) == ["Tumor", "Tumor", "Exclusion"]
    assert "Loaded 3 annotation(s)" in again.status.value


def test_existing_roi_file_is_loaded_first_and_kept(make_napari_viewer, qtbot, slide):
    sidecar = slide.with_suffix(".geojson")
    hole = np.array([[120.0, 120.0], [140.0, 120.0], [140.0, 140.0]])
    qupath = Annotation(
        np.array([[100.0, 100.0], [200.0, 100.0], [200.0, 200.0], [100.0, 200.0]]), "Tumor", (hole,)
    )
    write_geojson(sidecar, [qupath, Annotation.rectangle(300, 300, 50, 50, "Stroma")])
    before = sidecar.read_bytes()
    viewer = make_napari_viewer()
    open_slide_layer(viewer, slide)
    widget = docked_widget(viewer)
    assert len(widget.shapes_layer.data) == 2
    assert "Stroma" in widget.label.choices
    qtbot.wait(1200)
    assert sidecar.read_bytes() == before  # opening alone writes nothing

    widget.shapes_layer.add_rectangles(np.array([[0.0, 0.0], [64.0, 64.0]]))
    viewer.close()  # closing before the autosave delay still saves
    saved = list(read_annotations(sidecar))
    assert saved[:2] == [qupath, Annotation.rectangle(300, 300, 50, 50, "Stroma")]  # holes kept
    assert saved[2] == Annotation.rectangle(0, 0, 64, 64)


def test_unreadable_roi_file_is_never_overwritten(make_napari_viewer, qtbot, slide):
    sidecar = slide.with_suffix(".geojson")
    sidecar.write_text("{not json")
    viewer = make_napari_viewer()
    open_slide_layer(viewer, slide)
    widget = docked_widget(viewer)
    assert str(sidecar) in errors()[-1] and "not valid JSON" in errors()[-1]
    widget.shapes_layer.add_rectangles(np.array([[0.0, 0.0], [64.0, 64.0]]))
    widget.flush()
    assert sidecar.read_text() == "{not json"
    assert "Autosave is off" in widget.status.value


def test_asap_xml_loads_as_shapes_with_labels_and_colours(
    make_napari_viewer, qtbot, slide, tmp_path
):
    xml = tmp_path / "camelyon.xml"
    xml.write_text(
        """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="1500.5" Y="900" />
        <Coordinate Order="0" X="1000" Y="800.25" />
        <Coordinate Order="1" X="1600" Y="820" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Rectangle" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="1100" Y="830" />
        <Coordinate Order="1" X="1200" Y="860" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Dot" Type="Dot" PartOfGroup="None"><Coordinates>
      <Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>
  </Annotations>
</ASAP_Annotations>
"""
    )
    viewer = make_napari_viewer()
    open_slide_layer(viewer, slide)
    widget = docked_widget(viewer)
    assert widget.load_annotations(xml) == 2
    shapes = widget.shapes_layer
    assert list(shapes.features["label"]) == ["Tumor", "Exclusion"]
    # layer data are level-0 (y, x); in world they sit on the slide's pixels
    np.testing.assert_array_equal(
        shapes.data[0], [[800.25, 1000.0], [820.0, 1600.0], [900.0, 1500.5]]
    )
    np.testing.assert_array_equal(
        shapes.data[1], [[830, 1100], [830, 1200], [860, 1200], [860, 1100]]
    )
    world = np.array([shapes.data_to_world(v) for v in shapes.data[0]])
    np.testing.assert_allclose(world, level0_world(shapes.data[0]))
    np.testing.assert_allclose(
        shapes.edge_color, [[200 / 255, 0, 0, 1], [180 / 255, 180 / 255, 180 / 255, 1]]
    )
    widget.flush()  # and the ROI file now holds them (GeoJSON, QuPath classes)
    doc = json.loads(slide.with_suffix(".geojson").read_text())
    assert [f["properties"]["classification"]["name"] for f in doc["features"]] == [
        "Tumor",
        "Exclusion",
    ]
    assert doc["features"][0]["geometry"]["coordinates"][0][:3] == [
        [1000.0, 800.25],
        [1600.0, 820.0],
        [1500.5, 900.0],
    ]


def test_painted_labels_at_a_low_level_cover_the_painted_level0_area(
    make_napari_viewer, qtbot, slide
):
    viewer = make_napari_viewer()
    open_slide_layer(viewer, slide)
    widget = docked_widget(viewer)
    assert widget.paint_level.value == 2  # the level nearest 1/16 of 1, 1/2, 1/4
    labels = widget.paint_labels()
    assert labels.name == ROI_LABELS_LAYER_NAME and labels.data.shape == (1024, 1024)
    assert tuple(labels.scale) == (2.0, 2.0)
    assert tuple(labels.translate) == (100.0 + 0.5 * 1.5, -60.0 + 0.5 * 1.5)
    assert labels.selected_label == 1 and labels.mode == "paint"

    rows, cols = np.meshgrid(np.arange(100, 110), np.arange(200, 205), indexing="ij")
    labels.data_setitem((rows.ravel(), cols.ravel()), labels.selected_label)

    # napari's own picking: the painted level pixels cover level-0 rows [400, 440), cols [800, 820)
    def value_at_level0(r, c):
        return labels.get_value(level0_world([r + 0.5, c + 0.5]), world=True)

    assert value_at_level0(400, 800) == 1 and value_at_level0(439, 819) == 1
    assert value_at_level0(399, 800) == 0 and value_at_level0(440, 819) == 0
    assert value_at_level0(420, 799) == 0 and value_at_level0(420, 820) == 0

    sidecar = slide.with_suffix(".geojson")
    qtbot.waitUntil(sidecar.exists, timeout=3000)
    (painted,) = read_annotations(sidecar)
    assert painted == Annotation.rectangle(top=400, left=800, height=40, width=20)
    mask = rasterize([painted], (4096, 4096), 1 / 4)
    np.testing.assert_array_equal(np.argwhere(mask > 0).min(0), [100, 200])
    np.testing.assert_array_equal(np.argwhere(mask > 0).max(0), [109, 204])
    assert mask.sum() == 50

    # deleting the labels layer keeps its regions, as shapes
    viewer.layers.remove(labels)
    assert widget.session.annotations() == [painted]
    widget.flush()
    assert list(read_annotations(sidecar)) == [painted]


def test_fallback_folder_when_the_slide_folder_is_not_writable(
    make_napari_viewer, qtbot, slide, tmp_path, monkeypatch
):
    from napari_zoomin.annotations import sidecar

    monkeypatch.setattr(sidecar, "_is_writable", lambda path: False)
    monkeypatch.setattr(roi_controller, "fallback_annotations_dir", lambda: tmp_path / "user")
    monkeypatch.setattr(sidecar, "fallback_annotations_dir", lambda: tmp_path / "user")
    viewer = make_napari_viewer()
    open_slide_layer(viewer, slide)
    widget = docked_widget(viewer)
    assert "not writable" in widget.status.value
    widget.shapes_layer.add_rectangles(np.array([[0.0, 0.0], [64.0, 64.0]]))
    widget.flush()
    assert not slide.with_suffix(".geojson").exists()
    (saved,) = (tmp_path / "user").rglob("case.geojson")
    assert list(read_annotations(saved)) == [Annotation.rectangle(0, 0, 64, 64)]
    assert find_annotations(slide) == saved  # where training looks too


def test_pending_saves_skip_a_widget_whose_qt_side_is_gone(make_napari_viewer, slide):
    """Train asks every ROI widget to save; one from a closed viewer must not crash it."""
    from PyQt6 import sip  # the test extra's binding
    from qtpy.QtCore import QTimer

    from napari_zoomin.napari.roi_widget import _widgets, flush_pending_saves

    viewer = make_napari_viewer()
    open_slide_layer(viewer, slide)
    widget = docked_widget(viewer)
    timer, widget._timer = widget._timer, QTimer()
    sip.delete(widget._timer)  # what closing its viewer does before Python lets go of it
    flush_pending_saves()
    assert widget not in _widgets
    widget._timer = timer  # let the fixture close the viewer normally


@pytest.fixture(scope="module")
def sample_template(tmp_path_factory):
    """An 8192² positive sample slide with two planted regions and its answer key (GeoJSON)."""
    from napari_zoomin.samples import write_sample_slide

    folder = tmp_path_factory.mktemp("roi-sample")
    return write_sample_slide(
        folder / "sample.tif",
        size=8192,
        label="positive",
        seed=3,
        tile=512,
        n_tumor=1,
        n_distractors=1,
    )


@pytest.fixture
def cached_sample(sample_template, tmp_path, monkeypatch):
    """The sample slide inside a fresh cache folder, as the sample menu opens it."""
    from napari_zoomin.paths import cache_dir

    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NAPARI_ZOOMIN_DATA", str(tmp_path / "data"))
    folder = cache_dir("samples")
    shutil.copy(sample_template.path, folder / "sample.tif")
    shutil.copy(sample_template.geojson_path, folder / "sample.geojson")
    return folder / "sample.tif"


def test_a_samples_answer_key_is_read_only_and_the_users_rois_are_their_own(
    make_napari_viewer, qtbot, cached_sample, sample_template, tmp_path
):
    slide = cached_sample
    seen_errors = len(errors())
    answer_key = slide.with_suffix(".geojson")
    key_bytes = answer_key.read_bytes()
    planted = list(read_annotations(answer_key))
    assert [a.label for a in planted] == [r.kind for r in sample_template.regions]
    assert find_annotations(slide) == answer_key  # before the user saved anything

    viewer = make_napari_viewer()
    slide_layer = open_slide_layer(viewer, slide)
    widget = docked_widget(viewer)
    # the answer key: its own layer, the planted regions, not editable
    key_layer = widget.session.answer_key
    assert key_layer is not None and key_layer.name == ANSWER_KEY_LAYER_NAME
    assert viewer.layers[ANSWER_KEY_LAYER_NAME] is key_layer
    assert len(key_layer.data) == len(planted) > 0
    assert list(key_layer.features["label"]) == [a.label for a in planted]
    assert not key_layer.editable and key_layer.mode == "pan_zoom"
    key_layer.editable = True  # napari does this on a 3D → 2D switch
    assert not key_layer.editable
    # the user's layer: empty, editable, active, saved to the user's folder
    shapes = widget.shapes_layer
    assert shapes is not key_layer and shapes.name == ROI_LAYER_NAME
    assert len(shapes.data) == 0 and shapes.editable
    assert viewer.layers.selection.active is shapes
    data_folder = tmp_path / "data" / "annotations"
    assert widget.session.sidecar.is_relative_to(data_folder)
    assert "answer key" in widget.status.value

    shapes.add_rectangles(np.array([[0.0, 0.0], [64.0, 64.0]]))
    widget.flush()
    (saved,) = data_folder.rglob("sample.geojson")
    assert saved == widget.session.sidecar
    assert list(read_annotations(saved)) == [Annotation.rectangle(0, 0, 64, 64)]
    assert answer_key.read_bytes() == key_bytes  # the answer key untouched
    assert sorted(p.name for p in slide.parent.iterdir()) == ["sample.geojson", "sample.tif"]
    assert find_annotations(slide) == saved  # training now uses the user's ROIs
    assert find_annotations(slide, slide.parent) == answer_key  # unless pointed at the key
    assert errors()[seen_errors:] == []

    # next time: the user's ROIs in the editable layer, the answer key beside them
    viewer.layers.remove(shapes)
    viewer.layers.remove(key_layer)
    widget.activate(slide_layer)
    assert len(widget.shapes_layer.data) == 1
    assert widget.session.annotations() == [Annotation.rectangle(0, 0, 64, 64)]
    assert len(widget.session.answer_key.data) == len(planted)
    assert answer_key.read_bytes() == key_bytes


def test_a_plugins_proxied_viewer_works_without_napari_internals(make_napari_viewer, qtbot, slide):
    """napari gives a plugin widget a public-only proxy of the viewer (its layers are new
    proxies at every access): edits are still saved, the ROI outlines still follow the
    zoom, and no private attribute is touched (napari warns on each)."""
    import warnings

    from napari.utils._proxies import PublicOnlyProxy

    viewer = make_napari_viewer()
    open_slide_layer(viewer, slide)
    sidecar = slide.with_suffix(".geojson")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # napari's private-access warning
        widget = RoiWidget(PublicOnlyProxy(viewer))
        viewer.window.add_dock_widget(widget)
        shapes = widget.shapes_layer
        assert shapes.unique_id == viewer.layers["ROI annotations"].unique_id
        widget._on_layers_changed()  # new proxies of the same layers: same session
        assert widget.session is not None and len(widget._sessions) == 1
        viewer.layers["ROI annotations"].add_rectangles(np.array([[0.0, 0.0], [64.0, 64.0]]))
        qtbot.waitUntil(sidecar.exists, timeout=5000)  # the edit was seen and saved
        assert list(read_annotations(sidecar)) == [Annotation.rectangle(0, 0, 64, 64)]
        for zoom in (0.01, 1.0):  # 2 screen pixels wide at both zooms
            viewer.scene.camera.zoom = zoom
            layer = viewer.layers["ROI annotations"]
            width = np.asarray(layer.edge_width) * zoom * layer.scale[-1]
            np.testing.assert_allclose(width, 2.0, rtol=0.05)
