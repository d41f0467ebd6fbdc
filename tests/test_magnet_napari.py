"""A MagNet (002) in napari: its layers, summary, patch trace and Train form choice.

A tiny MagNet checkpoint classifies a small sample slide: the controller's words and
table are checked without a viewer, the ``magnified regions`` layer and the trace in a
real viewer (under Xvfb), and the Train form's MagNet defaults against ``zoomin train
--kind magnet``'s.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_zoomin.engine.checkpoints import load_model, save_checkpoint
from napari_zoomin.engine.inference import classify
from napari_zoomin.models.magnet import MagNet
from napari_zoomin.napari.classify_controller import (
    ClassifyController,
    magnified_words,
    summary_lines,
    trace_values,
)
from napari_zoomin.napari.result_layers import (
    MAGNET_LAYER_NAMES,
    result_layer_data,
)
from napari_zoomin.napari.train_controller import (
    MODEL_KINDS,
    config_from_form,
    form_value,
    kind_switch,
    unused_settings,
)
from napari_zoomin.samples import write_sample_slide

sys.path.insert(0, str(Path(__file__).resolve().parent / "core"))
from test_magnet import tiny

FRAME = ((0.5, 0.5), (10.0, 20.0))  # world units per level-0 pixel, and an offset
#: the colours the layer promises: layer 1 cyan, the classification patches magenta
LAYER1, PATCHES = "#00e5ff", "#ff3df2"


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    """A 2048² sample slide (0.499 µm per pixel, two levels), no planted regions."""
    folder = tmp_path_factory.mktemp("magnet-napari")
    info = write_sample_slide(
        folder / "tiny.tif",
        size=2048,
        label="negative",
        seed=1,
        n_tumor=0,
        n_distractors=0,
        tile=256,
    )
    return info.path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """An untrained two-layer MagNet (P = 2, 3) whose localisers are sharpened, so its
    boxes shrink and zoom (as tests/test_magnet_result.py)."""
    torch.manual_seed(0)
    model = MagNet(tiny(read_margin=0, view_size=16, sample_size=64, classifier_size=128))
    with torch.no_grad():
        for net in model.localisers.values():
            net.out.weight.mul_(300)
    path = tmp_path_factory.mktemp("magnet-model") / "magnet.safetensors"
    return save_checkpoint(path, model, ["negative", "positive"])


@pytest.fixture(scope="module")
def result(slide_path, model_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return classify(slide_path, load_model(model_path), draws=16, device="cpu")
    finally:
        torch.set_num_threads(threads)


def expected_patch_rows(result) -> list[list]:
    """The patch table, computed here from result.json's fields."""
    boxes = result.magnified["boxes"]
    leaves = [b for b in boxes if b["depth"] == 2]
    trace = [row[result.label] for row in result.magnified["trace"]]
    mpp = result.slide["mpp"]
    rows = []
    for k, b in enumerate(leaves):
        top, left, h, w = b["box"]
        change = "–" if k == 0 else f"{trace[k] - trace[k - 1]:+.3f}".replace("-0.000", "0.000")
        rows.append(
            [
                k + 1,
                f"{trace[k]:.3f}",
                change.replace("+0.000", "0.000"),
                f"{b['zoom']:.3g}x",
                f"{(left + w / 2) * mpp[1]:.1f}",
                f"{(top + h / 2) * mpp[0]:.1f}",
                f"{w * mpp[1]:.1f} x {h * mpp[0]:.1f}",
            ]
        )
    return rows


# ----------------------------------------------------------------- without a viewer


def test_the_summary_speaks_of_one_pass_as_the_result_does(result):
    assert result.mode == "magnify" and len(result.magnified["boxes"]) == 2 + 6
    lines = summary_lines(result)
    p = result.probabilities
    assert lines[0] == f"Prediction: {result.label} (p = {result.probability:.3f}, one pass)"
    assert lines[1] == (
        "Probabilities (one deterministic pass; Draws (K) does not apply): "
        f"negative {p['negative']:.3f}, positive {p['positive']:.3f}"
    )
    zoom = max(b["zoom"] for b in result.magnified["boxes"])
    words = f"8 magnified regions at depths 1-2 (zoom up to {zoom:.3g}x)"
    assert magnified_words(result) == words
    assert words in result.summary()  # the core's wording, word for word
    first = result.magnified["trace"][0][result.label]
    assert lines[4] == (
        f"Looked at {words}; read 6 patches in order; p {result.label} {first:.3f} after "
        f"the first patch; tissue: {result.tissue['fraction']:.1%} of the slide (otsu)"
    )
    text = ClassifyController.text(result)
    assert text.prediction == lines[0] and text.details == "\n".join(lines[1:])
    assert "±" not in text.prediction + text.details
    assert "over 1 draw" not in text.details


def test_the_table_lists_the_patches_in_reading_order(result):
    table = ClassifyController.table(result)
    assert table.kind == "patches"
    assert table.columns == [
        "patch",
        f"p {result.label}",
        "change",
        "zoom",
        "x (µm)",
        "y (µm)",
        "size (µm)",
    ]
    assert table.rows == expected_patch_rows(result)
    assert table.places == [b["box"] for b in result.magnified["boxes"] if b["depth"] == 2]
    assert trace_values(result) == [row[result.label] for row in result.magnified["trace"]]
    assert trace_values(result)[-1] == pytest.approx(result.probability)


def test_the_magnet_layers_leave_out_what_a_magnet_has_not(result):
    layers = result_layer_data(result, FRAME)
    assert [k["name"] for _, k, _ in layers] == list(MAGNET_LAYER_NAMES)
    data, kwargs, kind = layers[-1]
    assert kind == "shapes" and kwargs["name"] == "magnified regions"
    boxes = result.magnified["boxes"]
    for rect, b in zip(data, boxes, strict=True):
        top, left, h, w = b["box"]
        np.testing.assert_array_equal(
            rect, [[top, left], [top, left + w], [top + h, left + w], [top + h, left]]
        )
    assert kwargs["edge_color"] == [LAYER1] * 2 + [PATCHES] * 6
    assert kwargs["features"]["depth"].tolist() == [1, 1, 2, 2, 2, 2, 2, 2]
    assert kwargs["features"]["patch"].tolist() == [0, 0, 1, 2, 3, 4, 5, 6]
    p = kwargs["features"]["p"]
    assert np.isnan(p[:2]).all()
    assert p[2:].tolist() == trace_values(result)
    assert ClassifyController.legend(result) == [
        ("layer 1", LAYER1),
        ("patches read by the classifier (layer 2)", PATCHES),
    ]
    stage1 = layers[1][1]["metadata"]["values"]
    assert stage1.startswith("MagNet: layer 1's spatial-sparsemax distribution")


# ----------------------------------------------------------------- the Train form


def test_picking_magnet_gives_the_cli_settings_unless_the_user_changed_them():
    from napari_zoomin.cli import _train_config, build_parser

    assert MODEL_KINDS["MagNet"] == "magnet"
    start = {"kind": "zoomin", "lr": form_value("lr"), "batch_size": form_value("batch_size")}
    changes = kind_switch("zoomin", "magnet", start)
    assert changes == {"lr": "3e-05", "batch_size": 16}
    form = {**start, **changes, "kind": "magnet"}
    args = ["train", "--slides", "s", "--labels", "l.csv", "--out", "m.safetensors"]
    cli = _train_config(build_parser().parse_args([*args, "--kind", "magnet"]))
    assert config_from_form(form) == cli
    assert (cli.lr, cli.batch_size, cli.lr_schedule, cli.pretrain_epochs) == (
        3e-5,
        16,
        "cosine",
        0,
    )
    # a learning rate the user typed stays, the batch still follows the kind
    assert kind_switch("zoomin", "magnet", {**start, "lr": "0.001"}) == {"batch_size": 16}
    # back to Zoom-In: its defaults return, and nothing of MagNet's lingers
    back = {**form, **kind_switch("magnet", "zoomin", form), "kind": "zoomin"}
    assert config_from_form(back) == _train_config(build_parser().parse_args(args))
    # what JSON settings give wins over the kind's hidden settings, as --set does
    constant = config_from_form(form, '{"lr_schedule": "constant"}')
    assert constant.lr_schedule == "constant"
    # the settings a MagNet's model has not (greyed out on the form)
    assert unused_settings("magnet") == (
        "n_samples",
        "view_scale",
        "stage2_scale",
        "tile_size",
        "subtile_size",
        "entropy_weight",
        "contrastive",
        "contrastive_warmup_epochs",
        "pixel_weight",
    )
    assert unused_settings("zoomin") == ()


# ----------------------------------------------------------------- in a real viewer


def world_of_level0(slide_layer, points_yx):
    """napari's own placement of level-0 points (pixel c covers [c, c + 1))."""
    return np.asarray(slide_layer.data_to_world(np.asarray(points_yx, float) - 0.5))


@pytest.mark.viewer
def test_a_magnet_in_the_classify_widget(make_napari_viewer, qtbot, slide_path, model_path):
    pytest.importorskip("napari")
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_zoomin.napari.classify_widget import ClassifyWidget
    from napari_zoomin.napari.slide_layers import level0_frame

    viewer = make_napari_viewer()
    (slide,) = viewer.open(slide_path, plugin="napari-zoomin")
    widget = ClassifyWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Classify slide")
    assert not widget.trace_plot.isVisibleTo(widget.native)  # no result: no trace
    assert widget.choose_checkpoint(model_path)
    widget.device.value = "cpu"
    widget.classify_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    result = widget.result
    assert result is not None and result.mode == "magnify", widget.status.value
    assert [lay.name for lay in viewer.layers] == [slide.name, *MAGNET_LAYER_NAMES]

    # every box where the result says, on the slide (napari's own placement)
    layer = viewer.layers["magnified regions"]
    boxes = result.magnified["boxes"]
    assert layer.nshapes == len(boxes) == 8
    for m, b in enumerate(boxes):
        top, left, h, w = b["box"]
        corners = [[top, left], [top, left + w], [top + h, left + w], [top + h, left]]
        np.testing.assert_allclose(
            layer.data_to_world(layer.data[m]), world_of_level0(slide, corners), atol=1e-9
        )
    colours = transform_color([LAYER1] * 2 + [PATCHES] * 6)
    np.testing.assert_allclose(layer.edge_color, colours)
    assert layer.features["depth"].tolist() == [b["depth"] for b in boxes]
    assert widget.legend.native.isVisibleTo(widget.native) and "layer 1" in widget.legend.value

    # the summary and the trace (002 figure 5)
    assert widget.summary.value == summary_lines(result)[0]
    assert "Draws (K) does not apply" in widget.details.value
    trace = [row[result.label] for row in result.magnified["trace"]]
    assert widget.trace_plot.isVisibleTo(widget.native)
    assert widget.trace_plot.values == trace
    assert [list(row) for row in widget.place_table.data] == expected_patch_rows(result)

    # choosing a patch centres it, fits it (never past full resolution), rings it
    viewer.window._qt_window.resize(1200, 800)
    qtbot.wait(50)
    k = 2
    widget.select_row(k)
    top, left, h, w = boxes[2 + k]["box"]
    centre = world_of_level0(slide, [top + h / 2, left + w / 2])
    camera = viewer.scene.camera
    np.testing.assert_allclose(camera.center[-2:], centre, atol=1e-6)
    (sy, sx), _ = level0_frame(slide)
    fit = 0.8 * min(viewer.canvas.size) / max(h * sy, w * sx)
    assert camera.zoom == pytest.approx(min(fit, 1 / max(sy, sx)))
    assert widget.trace_plot.selected == k
    widths = np.asarray(layer.edge_width) * camera.zoom * float(layer.scale[-1])  # screen px
    assert widths[2 + k] == pytest.approx(3 * widths[0])
    assert math.isclose(widths[0], widths[1]) and math.isclose(widths[3 + k], widths[0])
    # the plot draws a dot of the patches' colour per patch, and a click on the first
    # goes to the first patch
    from qtpy.QtCore import Qt
    from qtpy.QtGui import QColor

    plot = widget.trace_plot
    plot.grab()  # rendering first delivers the plot's pending resize (from the dock)
    image = plot.grab().toImage()  # the widget at its settled size, as painted
    assert (image.width(), image.height()) == (plot.width(), plot.height())
    for i in range(len(trace)):
        dot = plot.point(i).toPoint()  # rounded: look at the pixels around it too
        around = {
            QColor(image.pixel(dot.x() + dx, dot.y() + dy)).name()
            for dx in (-1, 0, 1)
            for dy in (-1, 0, 1)
        }
        assert PATCHES in around, (i, around)
    qtbot.mouseClick(plot, Qt.MouseButton.LeftButton, pos=plot.point(0).toPoint())
    top, left, h, w = boxes[2]["box"]
    centre = world_of_level0(slide, [top + h / 2, left + w / 2])
    np.testing.assert_allclose(camera.center[-2:], centre, atol=1e-6)
    assert plot.selected == 0


@pytest.mark.viewer
def test_the_train_form_offers_magnet_with_its_papers_settings(make_napari_viewer):
    pytest.importorskip("napari")
    from napari_zoomin.napari.train_widget import TrainWidget

    widget = TrainWidget(make_napari_viewer())
    assert "magnet" in widget.kind.choices
    assert "MagNet:" in widget.kind.tooltip
    widget.kind.value = "magnet"
    assert (widget.lr.value, widget.batch_size.value) == ("3e-05", 16)
    greyed = [name for name, w in widget.settings.items() if not w.enabled]
    assert greyed == list(unused_settings("magnet"))
    config = widget.config()
    assert (config.kind, config.lr, config.batch_size, config.lr_schedule) == (
        "magnet",
        3e-5,
        16,
        "cosine",
    )
    widget.batch_size.value = 4  # the user's own batch stays through a change of kind
    widget.kind.value = "zoomin"
    assert (widget.lr.value, widget.batch_size.value) == (form_value("lr"), 4)
    assert all(w.enabled for w in widget.settings.values())
    assert widget.config().lr_schedule == "constant"
