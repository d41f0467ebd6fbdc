"""The ``Classify slide`` dock widget in a real napari viewer (under Xvfb), real model."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_zoomin.annotations import Annotation, read_geojson  # noqa: E402
from napari_zoomin.engine.checkpoints import DEMO_MODEL, load_model  # noqa: E402
from napari_zoomin.engine.results import Result  # noqa: E402
from napari_zoomin.engine.runtime import available_devices  # noqa: E402
from napari_zoomin.engine.tissue import detect_tissue  # noqa: E402
from napari_zoomin.errors import CheckpointError, SlideError  # noqa: E402
from napari_zoomin.napari.classify_widget import ClassifyWidget  # noqa: E402
from napari_zoomin.napari.model_choices import register_model  # noqa: E402
from napari_zoomin.napari.roi_shapes import roi_shapes_placement  # noqa: E402
from napari_zoomin.napari.slide_layers import layer_slide, level0_frame  # noqa: E402
from napari_zoomin.samples import write_sample_slide  # noqa: E402
from napari_zoomin.slide import open_slide  # noqa: E402

pytestmark = pytest.mark.viewer

NAMES = (
    "attention overview",
    "stage-1 attention",
    "stage-2 attention",
    "sampled tiles",
    "sampled sub-tiles",
    "attention places",
    "top places",
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """An 8192² positive sample slide (a 4096² one is too small for its planted regions)."""
    folder = tmp_path_factory.mktemp("classify-widget")
    return write_sample_slide(folder / "positive.tif", size=8192, label="positive", seed=1)


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def messages(seen) -> list[str]:
    return [str(n.message) for n in seen]


def viewer_with_widget(make_napari_viewer, path=None, show=False):
    viewer = make_napari_viewer(show=show)
    layer = viewer.open(path, plugin="napari-zoomin")[0] if path is not None else None
    widget = ClassifyWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Classify slide")
    return viewer, layer, widget


def run(qtbot, widget, timeout=60_000):
    widget.classify_button.native.click()
    assert widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def world_of_level0(slide_layer, points_yx):
    """napari's own placement of level-0 points (pixel c covers [c, c+1)) on the slide layer."""
    return np.asarray(slide_layer.data_to_world(np.asarray(points_yx, float) - 0.5))


def screen_of_world(viewer, shot_shape, world_yx):
    """Canvas pixel (row, col) of world points, from the camera."""
    camera = viewer.scene.camera
    centre = np.asarray(camera.center[-2:])
    half = np.asarray(shot_shape[:2]) / 2
    return (np.asarray(world_yx) - centre) * camera.zoom + half


def test_classify_from_the_manifest_widget(make_napari_viewer, qtbot, sample, tmp_path):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1200, 800)
    (slide,) = viewer.open(sample.path, plugin="napari-zoomin")
    _, widget = viewer.window.add_plugin_dock_widget("napari-zoomin", "Classify slide")
    assert isinstance(widget, ClassifyWidget)
    assert widget.slide_choice.value is slide and widget.model_choice.value == "demo"
    assert (widget.draws.value, widget.seed.value) == (16, 0)
    assert widget.device.choices[:2] == ("auto", "cpu")
    assert list(widget.device.choices) == available_devices()  # engine.runtime's list

    # heartbeat: the GUI thread keeps serving a 20 ms timer while the worker classifies
    ticks: list[float] = []
    classified: list[float] = []  # when the engine's "done" progress reached the GUI
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    widget.progress.changed.connect(
        lambda value: classified.append(time.perf_counter()) if value == 100 else None
    )
    timer.start()
    start = time.perf_counter()
    run(qtbot, widget)
    timer.stop()
    assert widget.result is not None, widget.status.value
    during = np.array([t for t in ticks if t <= classified[0]])
    gaps = np.diff([start, *during, classified[0]])
    # a classification on the GUI thread would give no tick at all until it ends
    assert len(during) >= 0.3 * (classified[0] - start) / 0.02, gaps
    assert gaps.max() < 1.5, gaps
    # the result layers are added one per event-loop turn: ticks between them too
    assert np.sum(np.array(ticks) > classified[0]) >= 3

    result = widget.result
    assert [layer.name for layer in viewer.layers] == [slide.name, *NAMES]
    assert widget.summary.value.splitlines()[0].startswith(f"Prediction: {result.label} (p = ")
    # one row per place the evidence came from: far fewer than the sub-tiles
    from napari_zoomin.engine.places import places

    found = places(result)
    table = widget.place_table
    assert table.shape == (min(20, len(found)), 7)
    assert 1 < len(found) == result.evidence["places"] < len(result.subtiles)
    assert list(table.column_headers) == [
        "rank",
        "share",
        "score",
        "sub-tiles",
        "x (µm)",
        "y (µm)",
        "size (µm)",
    ]
    first = [1, f"{found[0].share:.1f} %", f"{found[0].score:.2f}", found[0].n_subtiles]
    assert table.data[0][:4] == first
    assert table.data[0][4:6] == [f"{found[0].centre[1]:.1f}", f"{found[0].centre[0]:.1f}"]
    # and on screen the cells read as written (not re-formatted to "3058.9000")
    native = table.native
    shown = native.itemDelegate().displayText(native.item(0, 4).data(0), native.locale())
    assert shown == f"{found[0].centre[1]:.1f}"
    print("places", len(found), "sub-tiles", len(result.subtiles), table.data[:3])

    # the ROI widget's layer of this slide is exported with the result; another's is not
    frame = level0_frame(slide)
    scale, translate = roi_shapes_placement(frame)
    rect = np.array([[4000.0, 3000.0], [4000.0, 3400.0], [4300.0, 3400.0], [4300.0, 3000.0]])
    for key, corners in [("/elsewhere/other.tif", rect + 100), (str(sample.path.resolve()), rect)]:
        viewer.add_shapes(
            [corners],
            shape_type="rectangle",
            name="ROI annotations",
            scale=scale,
            translate=translate,
            features={"label": ["Tumor"]},
            metadata={"napari_zoomin_roi": key},
        )
    written = widget.export(tmp_path / "out")
    assert {p.name for p in written.values()} == {
        "result.json",
        "stage1_attention.ome.tif",
        "stage2_attention.ome.tif",
        "sampled.geojson",
        "places.geojson",
        "attention_maps.npz",
        "roi_annotations.geojson",
    }
    assert list(read_geojson(written["rois"])) == [Annotation.rectangle(4000, 3000, 300, 400)]
    saved = Result.load(written["json"])
    assert saved.subtiles == result.subtiles

    # the layers lie on the slide: checked against napari's placement of the slide's pixels
    subtiles = viewer.layers["sampled sub-tiles"]
    for k in (0, len(saved.subtiles) - 1):
        top, left, h, w = saved.subtiles[k]["region"]
        corners = [[top, left], [top, left + w], [top + h, left + w], [top + h, left]]
        np.testing.assert_allclose(
            subtiles.data_to_world(subtiles.data[k]), world_of_level0(slide, corners), atol=1e-6
        )
    alpha = viewer.layers["stage-1 attention"]
    (oy, ox), (dy, dx) = saved.stage1_origin, saved.stage1_cell_size
    for i, j in [(0, 0), (100, 250)]:
        np.testing.assert_allclose(
            alpha.data_to_world([i, j]),
            world_of_level0(slide, [oy + (i + 0.5) * dy, ox + (j + 0.5) * dx]),
            atol=1e-6,
        )
    beta = viewer.layers["stage-2 attention"]
    cy, cx = saved.tiles[0]["stage2_cell_size"]
    np.testing.assert_allclose(
        beta.data_to_world([10, 20]), world_of_level0(slide, [10.5 * cy, 20.5 * cx]), atol=1e-6
    )

    # the overlay shows over the slide; the glass stays exactly as it was (the place
    # outlines, convex hulls, may cross glass between sub-tiles: hidden for this check)
    for layer in [lay for lay in viewer.layers if lay.name.startswith("ROI annotations")]:
        viewer.layers.remove(layer)
    viewer.layers["attention places"].visible = False
    viewer.layers["top places"].visible = False  # screen-sized markers (tested apart)
    viewer.reset_view()
    on = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    for name in NAMES:
        viewer.layers[name].visible = False
    off = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    for name in NAMES:
        viewer.layers[name].visible = name != "top places"
    changed = np.abs(on - off).max(axis=-1) > 0
    rows, cols = np.indices(changed.shape)
    screen = np.stack([rows, cols], -1).reshape(-1, 2) + 0.5
    camera = viewer.scene.camera
    world_px = (screen - np.asarray(on.shape[:2]) / 2) / camera.zoom + camera.center[-2:]
    level0 = (world_px - frame[1]) / frame[0] + 0.5
    cell = np.floor((level0 - [oy, ox]) / [dy, dx]).astype(int)
    looked = np.zeros(np.add(saved.stage1_attention.shape, 2), bool)  # α > 0 or under a tile
    looked[1:-1, 1:-1] = result.stage1_attention > 0  # shown exact (files: export precision)
    for t in saved.tiles:
        top, left, h, w = t["region"]
        r0, c0 = int((top - oy) // dy), int((left - ox) // dx)
        looked[max(r0, 0) : r0 + int(h // dy) + 3, max(c0, 0) : c0 + int(w // dx) + 3] = True
    from scipy import ndimage

    looked = ndimage.binary_dilation(looked, iterations=2)
    inside = np.all((cell >= -1) & (cell <= np.asarray(saved.stage1_attention.shape)), axis=1)
    glass = np.ones(len(cell), bool)
    glass[inside] = ~looked[cell[inside, 0] + 1, cell[inside, 1] + 1]
    glass = glass.reshape(changed.shape)
    assert glass.mean() > 0.5  # most of the canvas is glass or background
    assert not changed[glass].any()
    print("canvas", on.shape, changed.sum(), glass.mean())
    assert changed.sum() > 50
    # ... and the top tile's square on screen is where the overlay changed pixels
    top, left, h, w = saved.tiles[0]["region"]
    (r0, c0), (r1, c1) = screen_of_world(
        viewer, on.shape, world_of_level0(slide, [[top, left], [top + h, left + w]])
    )
    assert changed[int(r0) : int(np.ceil(r1)) + 1, int(c0) : int(np.ceil(c1)) + 1].any()
    # the overview makes the top place visible at whole-slide zoom: around it (a 41 x 41
    # screen-pixel window) more pixels differ from the slide alone than with the raw
    # attention layers only
    top, left, h, w = found[0].box  # level-0 pixels
    cy, cx = top + h / 2, left + w / 2
    row, col = screen_of_world(viewer, on.shape, world_of_level0(slide, [cy, cx]))
    window = np.s_[max(int(row) - 20, 0) : int(row) + 21, max(int(col) - 20, 0) : int(col) + 21]
    overview = viewer.layers["attention overview"]
    assert overview.visible  # whole-slide zoom: shown
    overview.visible = False
    raw = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    overview.visible = True
    without = int((np.abs(raw - off).max(axis=-1) > 0)[window].sum())
    with_overview = int(changed[window].sum())
    print(
        "changed pixels around the top place: raw layers", without, "with overview", with_overview
    )
    assert with_overview > without
    # the raw map is exactly alpha; the overview is display only
    stage1 = viewer.layers["stage-1 attention"].data
    np.testing.assert_array_equal(np.nan_to_num(stage1), result.stage1_attention)

    # selecting a place in the table centres it, filling the canvas up to full resolution
    viewer.layers["attention places"].visible = True
    for row in (1, 0):
        widget.place_table.native.selectRow(row)
        top, left, h, w = found[row].box
        np.testing.assert_allclose(
            viewer.scene.camera.center[-2:], world_of_level0(slide, [top + h / 2, left + w / 2])
        )
        shot = viewer.screenshot(canvas_only=True, flash=False)
        zoom = viewer.scene.camera.zoom
        assert zoom * max(slide.scale[-2:]) <= 1 + 1e-9  # never past full resolution
        # the place fills most of the canvas, unless that would magnify past level 0
        assert zoom * max(slide.scale[-2:]) == pytest.approx(1) or max(
            h * slide.scale[0], w * slide.scale[1]
        ) * zoom >= 0.7 * min(shot.shape[:2])
        assert slide.data_level == 0
        places_layer = viewer.layers["attention places"]
        # outlines in screen pixels: 1.5 px, the selected place 3x as wide
        on_screen = np.asarray(places_layer.edge_width) * zoom * places_layer.scale[-1]
        expected = np.where(np.asarray(places_layer.features["rank"]) == found[row].rank, 4.5, 1.5)
        np.testing.assert_allclose(on_screen, expected, rtol=0.05)
        # zoomed in to read the raw map: the overview no longer veils the tissue
        assert not viewer.layers["attention overview"].visible

    # re-run: the layers are replaced, never stacked
    before = [viewer.layers[name] for name in NAMES]
    run(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == [slide.name, *NAMES]
    assert all(viewer.layers[n] is not old for n, old in zip(NAMES, before, strict=True))
    again = widget.result
    if again.threads == result.threads:  # same seed, same draws, same arithmetic
        assert again.subtiles == result.subtiles
    else:  # the widget takes the idle cores (threads="auto"): float rounding may differ,
        # and now and then move a draw to a neighbouring cell (docs/benchmarks.md)
        assert again.label == result.label
        for name, p in result.probabilities.items():
            assert again.probabilities[name] == pytest.approx(p, abs=0.05)


def test_the_widget_warms_its_model_while_the_user_opens_a_slide(make_napari_viewer, qtbot):
    """The chosen model is loaded and warmed up in the background when the widget opens
    (the first slide then costs what the next ones do), once; a model that cannot load
    warms nothing and says nothing until the click."""
    _viewer, _, widget = viewer_with_widget(make_napari_viewer)
    qtbot.waitUntil(lambda: widget.controller.is_warm("demo", "auto"), timeout=30_000)
    ckpt = widget.controller.checkpoint("demo", "auto")
    assert widget.controller.warm("demo", "auto")  # already warm: nothing more to do
    assert widget.controller.checkpoint("demo", "auto") is ckpt
    assert not widget.controller.warm("/nowhere/model.safetensors", "auto")
    assert not widget.controller.is_warm("/nowhere/model.safetensors", "auto")
    assert not widget.running  # the warm-up is not a classification


def test_real_slide_shows_its_warnings_under_the_prediction(make_napari_viewer, qtbot, cmu_svs):
    """The real Aperio CMU-1-Small-Region (2,967 rows x 2,220 columns) with the demo model:
    the demo model's warning is shown, and every sub-tile read lies inside the slide."""
    # shown: magicgui's ``visible`` is Qt's isVisible(), False in a hidden window
    viewer, slide, widget = viewer_with_widget(make_napari_viewer, cmu_svs, show=True)
    assert not widget.warnings.visible  # nothing to doubt before a result
    run(qtbot, widget)
    result = widget.result
    assert result is not None, widget.status.value
    assert [layer.name for layer in viewer.layers] == [slide.name, *NAMES]

    assert widget.summary.value.startswith("Prediction:")
    assert widget.warnings.visible
    assert "not for diagnosis" in widget.warnings.value
    assert widget.warnings.value.splitlines() == [f"⚠ {w}" for w in result.warnings]
    assert f"in {result.evidence['places']} place" in widget.details.value

    assert result.subtiles
    for s in result.subtiles:
        top, left, h, w = s["region"]
        assert top >= 0 and top + h <= 2967, s
        assert left >= 0 and left + w <= 2220, s


def test_cancel_mid_run_leaves_no_layers(make_napari_viewer, qtbot, sample):
    viewer, slide, widget = viewer_with_widget(make_napari_viewer, sample.path)
    progress_seen: list[int] = []

    def cancel_on_first_progress(value):
        progress_seen.append(value)
        if len(progress_seen) == 1:
            widget.cancel_button.native.click()

    widget.progress.changed.connect(cancel_on_first_progress)
    run(qtbot, widget)
    widget.progress.changed.disconnect(cancel_on_first_progress)
    assert widget.status.value == "Classification cancelled."
    assert widget.result is None and widget.progress.value == 0
    assert [layer.name for layer in viewer.layers] == [slide.name]
    assert widget.classify_button.enabled and not widget.cancel_button.enabled
    # the viewer and the widget still work
    run(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == [slide.name, *NAMES]


def test_bad_input_gives_messages_and_the_widget_stays_usable(
    make_napari_viewer, qtbot, sample, tmp_path, notifications
):
    viewer, _, widget = viewer_with_widget(make_napari_viewer)
    # no slide: the button is off, the widget says what to do, a direct call warns
    assert widget.slide_choice.value is None and not widget.classify_button.enabled
    assert widget.status.value.startswith("Open a slide")
    widget.classify()
    assert any("No slide to classify" in m for m in messages(notifications))
    # a labels layer is never offered as a slide
    viewer.add_labels(np.zeros((64, 64), np.uint8), name="labels")
    assert widget.slide_choice.choices == () and not widget.classify_button.enabled
    # an image layer that is not a slide: layer_slide's message
    stack = viewer.add_image(np.zeros((3, 64, 64), np.uint8), name="stack")
    assert widget.slide_choice.value is stack and widget.classify_button.enabled
    with pytest.raises(SlideError) as expected:
        layer_slide(stack)
    run(qtbot, widget)
    assert f"napari-zoomin: {expected.value}" in messages(notifications)
    assert all(n not in viewer.layers for n in NAMES)

    # a corrupt checkpoint: refused when chosen, with the checkpoint's own message
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage, not safetensors" * 10)
    with pytest.raises(CheckpointError) as expected:
        load_model(bad)
    assert widget.choose_checkpoint(bad) is False
    assert f"napari-zoomin: {expected.value}" in messages(notifications)
    assert widget.model_choice.value == "demo" and str(bad) not in widget.model_choice.choices

    # a good checkpoint, chosen, then damaged on disk: the cached model is not reused
    (slide,) = viewer.open(sample.path, plugin="napari-zoomin")
    # the opened slide is the active layer, and the Slide list follows it (issue 19)
    assert widget.slide_choice.value is slide
    viewer.layers.selection.active = stack
    assert widget.slide_choice.value is stack
    viewer.layers.selection.active = slide
    assert widget.slide_choice.value is slide
    mine = tmp_path / "mine.safetensors"
    shutil.copyfile(DEMO_MODEL, mine)
    assert widget.choose_checkpoint(mine) and widget.model_choice.value == str(mine)
    mine.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError) as expected:
        load_model(mine)
    run(qtbot, widget)
    assert f"napari-zoomin: {expected.value}" in messages(notifications)
    assert widget.result is None and all(n not in viewer.layers for n in NAMES)

    # a model registered by Train classifier appears in the list
    trained = tmp_path / "trained.safetensors"
    shutil.copyfile(DEMO_MODEL, trained)
    register_model(trained)
    qtbot.waitUntil(lambda: str(trained.resolve()) in widget.model_choice.choices)

    # and the demo model still classifies
    widget.model_choice.value = "demo"
    run(qtbot, widget)
    assert [layer.name for layer in viewer.layers][-len(NAMES) :] == list(NAMES)
    assert widget.result.model_kind == "zoomin"


def test_edited_tissue_mask_keeps_sampling_off_erased_tissue(make_napari_viewer, qtbot, sample):
    viewer, slide, widget = viewer_with_widget(make_napari_viewer, sample.path)
    widget.tissue_button.native.click()
    labels = viewer.layers["tissue mask"]
    with open_slide(sample.path) as s:
        detected = detect_tissue(s)
    assert np.array_equal(labels.data != 0, detected.mask)
    my, mx = 8192 / labels.data.shape[0], 8192 / labels.data.shape[1]
    np.testing.assert_allclose(labels.scale, np.asarray(slide.scale) * [my, mx])
    # mask pixel (i, j) covers level-0 [i·my, (i+1)·my): its centre on the slide
    np.testing.assert_allclose(
        labels.data_to_world([4, 7]), world_of_level0(slide, [4.5 * my, 7.5 * mx])
    )

    run(qtbot, widget)
    first = widget.result
    assert first.tissue["source"] == "tissue mask layer"
    # erase the tissue under every tile the model drew, and re-classify
    erased = np.zeros(labels.data.shape, bool)
    for t in first.tiles:
        top, left, h, w = t["region"]
        rows = slice(int(top // my), int((top + h) // my) + 1)
        erased[rows, int(left // mx) : int((left + w) // mx) + 1] = True
    edited = labels.data.copy()
    edited[erased] = 0
    labels.data = edited
    widget.tissue_button.native.click()  # a second click keeps the edited layer
    assert np.array_equal(viewer.layers["tissue mask"].data, edited)
    run(qtbot, widget)
    second = widget.result
    assert second.tissue["fraction"] == pytest.approx(float((edited != 0).mean()))
    assert second.tissue["fraction"] < first.tissue["fraction"]
    # a stage-1 cell (16 px) can be drawn only if some tissue lies under it
    cell = second.stage1_cell_size[0]
    for t in second.tiles:
        top, left, h, w = t["region"]
        cy, cx = top + h / 2, left + w / 2
        under = edited[
            int((cy - cell / 2) // my) : int((cy + cell / 2) // my) + 1,
            int((cx - cell / 2) // mx) : int((cx + cell / 2) // mx) + 1,
        ]
        assert under.any(), t["region"]
    first_centres = {(t["region"][0], t["region"][1]) for t in first.tiles}
    assert not first_centres & {(t["region"][0], t["region"][1]) for t in second.tiles}


def test_two_slides_keep_their_results_above_themselves(make_napari_viewer, qtbot, cmu_svs):
    """Two slides (the CMU-1 region twice, the second beside the first): classifying B
    leaves A's result; each set sits right above its slide, on its slide's frame; the
    latest result has the bare names, A's carry A's name; the Slide list follows the
    active layer; at whole-slide zoom of a 40,000-px slide the markers show the places."""
    from napari_zoomin.napari.result_layers import LAYER_KEY, MARKER_SIZE

    viewer, a, widget = viewer_with_widget(make_napari_viewer, cmu_svs, show=True)
    viewer.window.resize(1200, 800)
    a.name = "slide-a"
    (b,) = viewer.open(cmu_svs, plugin="napari-zoomin")
    b.name = "slide-b"
    b.translate = (0.0, 2400 * b.scale[1])  # beside A
    assert widget.slide_choice.value is b  # the new slide is active: the list follows

    viewer.layers.selection.active = a
    assert widget.slide_choice.value is a
    run(qtbot, widget)
    first = widget.result
    assert [lay.name for lay in viewer.layers] == ["slide-a", *NAMES, "slide-b"]
    viewer.layers.selection.active = b
    assert widget.slide_choice.value is b and widget.result is None  # B: nothing yet
    run(qtbot, widget)
    second = widget.result
    assert first is not None and second is not None and second is not first
    named_a = [f"{n} [slide-a]" for n in NAMES]
    assert [lay.name for lay in viewer.layers] == ["slide-a", *named_a, "slide-b", *NAMES]
    for slide, names, result in [(a, named_a, first), (b, list(NAMES), second)]:
        frame = level0_frame(slide)
        for name in names:
            layer = viewer.layers[name]
            assert layer.metadata["napari_zoomin_result"] is result
            assert layer.units == slide.units
        shape_scale, shape_translate = roi_shapes_placement(frame)
        for base in ("sampled tiles", "sampled sub-tiles", "attention places", "top places"):
            layer = next(
                lay
                for lay in viewer.layers
                if lay.name in names and lay.metadata[LAYER_KEY] == base
            )
            np.testing.assert_allclose(layer.scale, shape_scale)
            np.testing.assert_allclose(layer.translate, shape_translate)
        alpha = viewer.layers[names[0]]
        (oy, ox), (dy, dx) = result.stage1_origin, result.stage1_cell_size
        np.testing.assert_allclose(
            alpha.data_to_world([3, 5]),
            world_of_level0(slide, [oy + 3.5 * dy, ox + 5.5 * dx]),
            atol=1e-6,
        )
    # selecting a result layer chooses its slide, and shows that slide's result
    viewer.layers.selection.active = viewer.layers["sampled tiles [slide-a]"]
    assert widget.slide_choice.value is a and widget.result is first
    viewer.layers.selection.active = b
    assert widget.slide_choice.value is b and widget.result is second
    viewer.layers.selection.active = viewer.layers["stage-1 attention [slide-a]"]
    assert widget.slide_choice.value is a
    # re-classifying A replaces A's layers only, in place, and A's now have bare names
    run(qtbot, widget)
    named_b = [f"{n} [slide-b]" for n in NAMES]
    assert [lay.name for lay in viewer.layers] == ["slide-a", *NAMES, "slide-b", *named_b]
    assert viewer.layers["stage-1 attention [slide-b]"].metadata["napari_zoomin_result"] is second

    # whole-slide zoom of a 40,000-px slide: a 128-px tile is ~2.5 screen pixels
    for layer in [lay for lay in viewer.layers if lay.name in named_b]:
        layer.visible = False
    found = widget._places
    top = found[0].box
    centre = world_of_level0(a, [top[0] + top[2] / 2, top[1] + top[3] / 2])
    camera = viewer.scene.camera
    camera.center = tuple(world_of_level0(a, [1483, 1110]))
    camera.zoom = 800 / 40_000 / a.scale[0]
    on = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    for name in NAMES:
        viewer.layers[name].visible = False
    off = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    changed = np.abs(on - off).max(axis=-1) > 30  # visibly different
    rows, cols = np.indices(changed.shape)
    r, c = screen_of_world(viewer, on.shape, centre)
    near = np.hypot(rows - r, cols - c) <= MARKER_SIZE
    print("changed near the top place", changed[near].sum(), "in all", changed.sum())
    assert changed[near].sum() >= 30
    # the overview is what makes it visible: without it, far fewer pixels change there
    for name in NAMES:
        viewer.layers[name].visible = name != "attention overview"
    raw = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    without = (np.abs(raw - off).max(axis=-1) > 30)[near].sum()
    print("changed near the top place without the overview", without)
    assert changed[near].sum() > without
    # nothing changes far out on the glass: only on or just around slide A
    (r0, c0), (r1, c1) = screen_of_world(
        viewer, on.shape, world_of_level0(a, [[0, 0], [2967, 2220]])
    )
    margin = 2 * MARKER_SIZE
    far = (rows < r0 - margin) | (rows > r1 + margin) | (cols < c0 - margin) | (cols > c1 + margin)
    assert not changed[far].any()
