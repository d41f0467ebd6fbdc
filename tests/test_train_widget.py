"""The Train classifier dock widget in a real viewer: a run, cancel and resume, bad input."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from magicgui.widgets import Container, Label  # noqa: E402
from napari.utils.notifications import NotificationSeverity, notification_manager  # noqa: E402

from napari_zoomin.annotations import Annotation, read_annotations  # noqa: E402
from napari_zoomin.engine.checkpoints import load_checkpoint, load_model  # noqa: E402
from napari_zoomin.napari import model_choices  # noqa: E402
from napari_zoomin.napari.roi_widget import RoiWidget  # noqa: E402
from napari_zoomin.napari.train_widget import (  # noqa: E402
    FROM_FOLDER,
    FROM_VIEWER,
    LossAccuracyPlot,
    TrainWidget,
    _Split,
)

pytestmark = pytest.mark.viewer

#: a model of a few thousand parameters (as tests/test_trainer.py's ``tiny``)
TINY = {
    "feature_dim": 8,
    "feature_hidden": 16,
    "feature_channels": [4, 8],
    "pretrain_epochs": 0,
    "val_draws": 2,
    "num_workers": 1,
    "early_stopping_patience": 0,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three 4096² sample slides (2 positive, 1 negative) and their labels CSV."""
    from napari_zoomin.samples import write_sample_slide

    folder = tmp_path_factory.mktemp("train-widget-slides")
    for name, label, seed in [
        ("pos1", "positive", 21),
        ("pos2", "positive", 22),
        ("neg1", "negative", 23),
    ]:
        write_sample_slide(
            folder / f"{name}.tif",
            size=4096,
            label=label,
            seed=seed,
            tile=256,
            n_tumor=0,
            n_distractors=0,
        )
    (folder / "labels.csv").write_text(
        "slide,label,split\npos1,positive,train\nneg1,negative,train\npos2,positive,val\n"
    )
    return folder


def tiny_widget(viewer, out, epochs=1) -> TrainWidget:
    """The dock widget (from the manifest) with a tiny model typed into its form."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-zoomin", "Train classifier")
    assert isinstance(widget, TrainWidget)
    widget.epochs.value = epochs
    widget.batch_size.value = 2
    widget.lr.value = "1e-3"
    widget.n_samples.value = 4
    widget.view_scale.value = "1/64"
    widget.stage2_scale.value = "1/4"
    widget.tile_size.value = 128
    widget.subtile_size.value = 16
    widget.warmup.value = 1
    widget.other_settings.value = json.dumps(TINY)
    widget.device.value = "cpu"
    widget.out_path.value = out
    return widget


def from_folder(widget, slides, csv_name="labels.csv") -> None:
    widget.source.value = FROM_FOLDER
    widget.slides_dir.value = slides
    widget.labels_csv.value = slides / csv_name


def wait_done(qtbot, widget, timeout=60_000) -> float:
    t0 = time.perf_counter()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)
    return time.perf_counter() - t0


def messages(severity) -> list[str]:
    return [str(n.message) for n in notification_manager.records if n.severity == severity]


def near_colour(image, colour, tolerance=40) -> int:
    """Pixels of a QImage within ``tolerance`` of a QColor (RGB distance per channel)."""
    from qtpy.QtGui import QImage

    image = image.convertToFormat(QImage.Format.Format_RGB888)
    w, h, stride = image.width(), image.height(), image.bytesPerLine()
    data = np.frombuffer(image.constBits().asstring(stride * h), np.uint8)
    rgb = data.reshape(h, stride)[:, : w * 3].reshape(h, w, 3).astype(int)
    target = np.array([colour.red(), colour.green(), colour.blue()])
    return int((np.abs(rgb - target).max(axis=2) <= tolerance).sum())


def test_train_one_epoch_from_a_labels_csv(make_napari_viewer, qtbot, slides, tmp_path):
    viewer = make_napari_viewer()
    out = tmp_path / "model.safetensors"
    widget = tiny_widget(viewer, out)
    from_folder(widget, slides)
    widget.train_button.native.click()
    assert widget.worker is not None
    assert not widget.train_button.enabled and widget.cancel_button.enabled
    wait_done(qtbot, widget)

    assert widget.result is not None and not widget.result.cancelled
    checkpoint = load_model(out)
    assert checkpoint.kind == "zoomin" and checkpoint.classes == ["negative", "positive"]
    info = checkpoint.info["info"]
    assert info["data"]["labels_csv"] == str(slides / "labels.csv")
    assert info["data"]["per_split"] == {
        "train": {"negative": 1, "positive": 1},
        "val": {"negative": 0, "positive": 1},
    }
    assert info["trainer_config"]["n_samples"] == 4 and info["trainer_config"]["tile_size"] == 128
    assert info["metrics"]["best_epoch"] == 1
    assert str(out.resolve()) in model_choices.known_models()
    assert widget.split_note.value == "Split: 2 slides for training, 1 for validation."
    # the progress bar reached the end; the plot has one point per epoch, the run's values
    assert widget.progress.value == widget.progress.max
    (record,) = info["history"]
    assert widget.plot.losses == [pytest.approx(record["train_loss"])]
    assert widget.plot.accuracies == [record["val_accuracy"]]
    # the plot paints its points: more of each colour than the legend of an empty plot
    drawn, blank = LossAccuracyPlot(), LossAccuracyPlot()
    for loss, accuracy in zip(widget.plot.losses, widget.plot.accuracies, strict=True):
        drawn.add_epoch(loss, accuracy)
    images = []
    for plot in (drawn, blank):
        plot.resize(480, 120)
        images.append(plot.grab().toImage())
    for colour in (LossAccuracyPlot.LOSS_COLOUR, LossAccuracyPlot.ACCURACY_COLOUR):
        assert near_colour(images[0], colour) > near_colour(images[1], colour) + 4
    assert any(str(out) in m for m in messages(NotificationSeverity.INFO))
    assert widget.train_button.enabled and not widget.cancel_button.enabled


def test_train_the_slides_open_in_the_viewer(make_napari_viewer, qtbot, slides, tmp_path):
    viewer = make_napari_viewer()
    for name in ("pos1", "pos2", "neg1"):
        viewer.open(slides / f"{name}.tif", plugin="napari-zoomin")
    viewer.open(slides / "pos1.tif", plugin="napari-zoomin")  # the same slide twice: one row
    roi = RoiWidget(viewer)
    viewer.window.add_dock_widget(roi)
    roi.slide.value = viewer.layers["pos1"]
    roi.shapes_layer.add_rectangles(np.array([[512.0, 1024.0], [768.0, 1536.0]]))  # level 0

    out = tmp_path / "viewer-model.safetensors"
    widget = tiny_widget(viewer, out)
    widget.source.value = FROM_VIEWER
    assert sorted(p.name for p, _, _ in widget.slide_rows()) == ["neg1.tif", "pos1.tif", "pos2.tif"]
    widget.set_slide_label("pos1", "positive")
    widget.set_slide_label("pos2", "positive")
    widget.set_slide_label("neg1", "negative")
    widget.train_button.native.click()
    # pending ROI edits were saved before the run read the ROI files
    rectangle = Annotation.rectangle(top=512, left=1024, height=256, width=512)
    assert list(read_annotations(slides / "pos1.geojson")) == [rectangle]
    wait_done(qtbot, widget)

    labels_csv = tmp_path / "viewer-model.labels.csv"
    with open(labels_csv, newline="") as f:
        rows = sorted((r["slide"], r["label"], r["split"]) for r in csv.DictReader(f))
    # "auto" splits: a seeded fifth of every class with two or more slides is validation
    assert [(p.split("/")[-1], lab) for p, lab, _ in rows] == [
        ("neg1.tif", "negative"),
        ("pos1.tif", "positive"),
        ("pos2.tif", "positive"),
    ]
    # named relative to the folder that holds them all, the slides folder of the run
    assert all((slides / p).is_file() and not p.startswith("/") for p, _, _ in rows)
    assert [s for _, lab, s in rows if lab == "negative"] == ["train"]
    assert sorted(s for _, lab, s in rows if lab == "positive") == ["train", "val"]
    info = load_model(out).info["info"]
    assert info["data"]["labels_csv"] == str(labels_csv)
    assert info["data"]["annotated"] == 3  # every sample slide has its ROI file
    assert str(out.resolve()) in model_choices.known_models()


def test_cancel_keeps_the_checkpoint_and_train_resumes(make_napari_viewer, qtbot, slides, tmp_path):
    viewer = make_napari_viewer()
    out = tmp_path / "long.safetensors"
    widget = tiny_widget(viewer, out, epochs=200)
    from_folder(widget, slides)
    widget.train_button.native.click()
    qtbot.waitUntil(lambda: "epoch" in widget.status.value, timeout=60_000)  # first event
    widget.cancel_button.native.click()
    assert wait_done(qtbot, widget) < 8.0  # the current step (and validation) finish first
    result = widget.result
    assert result.cancelled and 1 <= len(result.history) < 200
    done = len(result.history)
    last = load_checkpoint(result.last_checkpoint_path)  # the training state loads
    assert last.info["info"]["trainer"]["state"]["epoch"] == done
    assert load_model(out).info["info"]["metrics"]["best_epoch"] <= done
    assert str(out.resolve()) in model_choices.known_models()
    assert "Cancelled" in widget.status.value
    assert f"({done} of 200 epochs done)" in widget.resume_note.value

    # Train again with one more epoch: the widget resumes and says so
    widget.epochs.value = done + 1
    widget.train_button.native.click()
    assert widget.resumed_from == done
    assert widget.status.value.startswith("Resumed the interrupted run at epoch")
    wait_done(qtbot, widget)
    assert not widget.result.cancelled
    assert [r["epoch"] for r in widget.result.history] == list(range(1, done + 2))
    assert len(widget.plot.losses) == done + 1  # the earlier epochs came from the checkpoint
    assert widget.progress.value == widget.progress.max
    assert f"holds a finished run ({done + 1} epochs)" in widget.resume_note.value

    # another run's settings: refused before anything runs (training.resume_plan), and how
    # to start over is said
    widget.epochs.value = done + 3
    widget.lr.value = "2e-3"
    assert widget.start() is False and widget.worker is None
    refusal = messages(NotificationSeverity.ERROR)[-1]
    assert "other settings or data (lr: 0.001 → 0.002)" in refusal
    assert "untick 'Resume an interrupted run'" in refusal
    assert widget.status.value.startswith("Stopped:")

    # a finished run is started over, and the widget says so
    widget.lr.value = "1e-3"
    widget.epochs.value = 1
    widget.train_button.native.click()
    assert widget.resumed_from is None
    assert widget.status.value == f"The run in {out.name} had finished; training from the start."
    wait_done(qtbot, widget)
    assert [r["epoch"] for r in widget.result.history] == [1]


def test_form_settings_for_other_kinds_and_devices(make_napari_viewer, tmp_path):
    """The Sub-tile box sizes every kind's feature-network input; devices as everywhere."""
    from napari_zoomin.engine.runtime import available_devices

    viewer = make_napari_viewer()
    widget = tiny_widget(viewer, tmp_path / "m.safetensors")
    assert widget.config().subtile_size == 16
    widget.kind.value = "ats"
    config = widget.config()
    assert (config.kind, config.subtile_size) == ("ats", 16)
    assert list(widget.device.choices) == available_devices()


def test_progress_events_drive_the_status_bar_and_plot(make_napari_viewer, tmp_path):
    """The engine's typed events (napari_zoomin.training.events), as the worker relays them."""
    from napari_zoomin.training import (
        EpochStep,
        Pretrained,
        Pretraining,
        PretrainProgress,
        Resolution,
        Validated,
        Validating,
    )

    viewer = make_napari_viewer()
    widget = tiny_widget(viewer, tmp_path / "m.safetensors")
    widget._on_progress(Pretraining(0, 4, 0, 5, 2))
    # pre-training is said, and the bar moves without a percentage (its start and end are
    # all the engine reports)
    assert widget.status.value == (
        "pre-training on ROI patches before epoch 1 (5 epochs, 2 annotated slide(s))…"
    )
    assert widget.progress.native.maximum() == 0
    # each pre-training epoch: a determinate bar over all of pre-training, and a message
    widget._on_progress(PretrainProgress(0, 4, 4, 10, "feature", 2, 5, 0.75))
    assert widget.status.value == (
        "pre-training the feature network on ROI patches: epoch 2/5 (step 4/10), loss 0.75"
    )
    assert widget.progress.native.maximum() == widget.progress.max > 0
    assert widget.progress.value == round(widget.progress.max * 4 / 10)
    assert widget.progress.native.format() == "pre-training: %p%"
    widget._on_progress(Pretrained(0, 4, 5, 5, 0.5, {"feature": 0.5}))
    assert widget.progress.value == 0  # the bar now counts the training
    assert widget.status.value == "pre-training done (loss 0.5); training epoch 1…"
    assert widget.progress.native.maximum() == widget.progress.max > 0
    widget._on_progress(EpochStep(2, 4, 1, 2, 0.25, 1.0))
    assert widget.status.value == "epoch 2/4, step 1/2, loss 0.25"
    assert widget.progress.value == round(widget.progress.max * 1.5 / 4)
    widget._on_progress(Validating(2, 4, 1, 3))
    assert widget.status.value == "epoch 2/4: validating (1/3)…"
    widget._on_progress(Validated(2, 4, 2, 2, 0.5, 0.75, 0.625, 0.6, True, 2, False))
    assert widget.status.value == "epoch 2/4: loss 0.5, validation accuracy 0.625 (best so far)"
    assert widget.progress.value == widget.progress.max // 2
    assert (widget.plot.losses, widget.plot.accuracies) == ([0.5], [0.625])
    widget._on_progress(Resolution(0, 4, None, "training in pixels, not micrometres: …"))
    assert "Train classifier: training in pixels" in messages(NotificationSeverity.WARNING)[-1]

    # the split, said before training: validation gets its share of each epoch's bar
    widget = TrainWidget(viewer)  # a fresh bar
    widget._on_progress(_Split(train=3, val=1, test=0))
    assert widget.split_note.value == "Split: 3 slides for training, 1 for validation."
    widget._on_progress(EpochStep(1, 2, 2, 2, 0.25, 1.0))
    assert widget.progress.value == round(widget.progress.max * 0.75 / 2)
    widget._on_progress(Validating(1, 2, 1, 1))
    assert widget.progress.value == widget.progress.max // 2


def test_bad_input_is_a_notification_and_the_widget_stays_usable(
    make_napari_viewer, qtbot, slides, tmp_path
):
    viewer = make_napari_viewer()
    widget = tiny_widget(viewer, tmp_path / "m.safetensors")
    empty = slides / "empty.csv"
    empty.write_text("")
    from_folder(widget, slides, "empty.csv")
    widget.train_button.native.click()
    wait_done(qtbot, widget)
    errors = messages(NotificationSeverity.ERROR)
    assert str(empty) in errors[-1] and "the labels CSV is empty" in errors[-1]
    assert widget.train_button.enabled and not widget.cancel_button.enabled
    assert not (tmp_path / "m.safetensors").exists()

    widget.slides_dir.value = tmp_path / "no-such-folder"
    widget.labels_csv.value = slides / "labels.csv"
    assert widget.start() is False and widget.worker is None
    assert "no-such-folder does not exist" in messages(NotificationSeverity.ERROR)[-1]

    widget.slides_dir.value = slides
    widget.lr.value = "fast"
    assert widget.start() is False
    assert "Learning rate: 'fast' is not a number" in messages(NotificationSeverity.ERROR)[-1]

    widget.lr.value = "1e-3"  # fixed: it trains
    assert widget.start() is True
    wait_done(qtbot, widget)
    assert widget.result is not None and (tmp_path / "m.safetensors").is_file()


def test_the_dock_fits_a_laptop_screen_beside_classify(make_napari_viewer, qtbot):
    """Issue 19: both docks open in a 1600 x 1000 window; the form scrolls, Train shows."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    qtbot.wait(50)
    viewer.window.add_plugin_dock_widget("napari-zoomin", "Classify slide")
    _, widget = viewer.window.add_plugin_dock_widget("napari-zoomin", "Train classifier")
    qtbot.wait(200)
    assert window.frameGeometry().height() <= 1000
    button = widget.train_button.native
    assert button.isVisible() and not button.visibleRegion().isEmpty()
    bottom = button.mapTo(window, button.rect().bottomLeft()).y()
    assert 0 < bottom <= window.height()
    # the rarely changed settings are folded under Advanced, and unfold
    assert not widget.advanced_shown
    assert not widget.lr.native.isVisible() and widget.epochs.native.isVisible()
    widget.advanced_button.native.click()
    qtbot.wait(50)
    assert widget.advanced_shown and widget.lr.native.isVisible()
    assert window.frameGeometry().height() <= 1000  # the form scrolls instead
    assert not button.visibleRegion().isEmpty()
    # every setting says what it does, in words
    settings = [w for w in widget.form if not isinstance(w, (Container, Label))]
    assert len(settings) >= 20
    assert all(len(w.tooltip or "") > 20 for w in settings), [
        w.label for w in settings if len(w.tooltip or "") <= 20
    ]
    assert "16x smaller" in widget.view_scale.tooltip
    assert "Entropy weight" in widget.entropy_weight.tooltip


def test_progress_moves_and_the_split_is_said(make_napari_viewer, qtbot, slides, tmp_path):
    """Two slides, both for training: the widget says so and warns; the bar moves per
    step, pre-training is said."""
    (slides / "two.csv").write_text("slide,label,split\npos1,positive,train\nneg1,negative,train\n")
    viewer = make_napari_viewer()
    widget = tiny_widget(viewer, tmp_path / "two.safetensors", epochs=2)
    from_folder(widget, slides, "two.csv")
    widget.batch_size.value = 1
    widget.other_settings.value = json.dumps({**TINY, "pretrain_epochs": 1, "pretrain_patches": 2})
    seen = []  # after the widget handled each event: (event, status, bar value, bar maximum)
    widget._relay.event.connect(
        lambda e: seen.append(
            (type(e).__name__, widget.status.value, widget.progress.value, widget.progress.max)
        )
    )
    widget.train_button.native.click()
    wait_done(qtbot, widget)
    assert widget.result is not None and not widget.result.cancelled

    kinds = [k for k, *_ in seen]
    assert kinds[0] == "Split" and kinds[1] == "Pretraining"  # said before training
    assert widget.split_note.value.startswith("Split: 2 slides for training, 0 for validation.")
    assert "validation accuracy will not be measured" in widget.split_note.value
    assert "early stopping is off" in widget.split_note.value
    warnings = messages(NotificationSeverity.WARNING)
    assert any("validation accuracy will not be measured" in m for m in warnings)
    top = widget.progress.max
    status, maximum = seen[1][1], seen[1][3]
    assert status.startswith("pre-training on ROI patches before epoch 1") and maximum == 0
    # pre-training: one event per network epoch (ZoomIn pre-trains three networks),
    # the bar filling up to the end of pre-training
    pretraining = [(v, st) for k, st, v, m in seen if k == "PretrainProgress"]
    assert [v for v, _ in pretraining] == [top // 3, round(2 * top / 3), top]
    assert "feature network on ROI patches: epoch 1/1 (step 3/3)" in pretraining[-1][1]
    skipped = ("Split", "Pretrained", "PretrainProgress")
    values = [v for k, _, v, m in seen if m > 0 and k not in skipped]
    assert values == sorted(values)
    assert [v for v in values if 0 < v < top] == [top // 4, top // 2, top // 2, 3 * top // 4]
    assert widget.progress.value == top


def test_the_plot_shows_the_share_of_attention_on_the_rois(
    make_napari_viewer, qtbot, slides, tmp_path
):
    """A run with ROIs (a Tumor square on each positive slide): the plot holds the
    epoch's stage-1 and stage-2 shares from the history and paints them in their own
    colours, with a second legend row."""
    viewer = make_napari_viewer()
    rois = tmp_path / "rois"
    rois.mkdir()
    square = [[1024, 1024], [3072, 1024], [3072, 3072], [1024, 3072], [1024, 1024]]
    for name in ("pos1", "pos2"):
        feature = {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {"classification": {"name": "Tumor"}},
        }
        (rois / f"{name}.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": [feature]})
        )
    out = tmp_path / "model.safetensors"
    widget = tiny_widget(viewer, out)
    from_folder(widget, slides)
    widget.annotations_dir.value = rois
    widget.train_button.native.click()
    wait_done(qtbot, widget)
    assert widget.result is not None and not widget.result.cancelled
    (record,) = load_checkpoint(out).info["info"]["history"]
    shares = [record["val_roi_attention_stage1"], record["val_roi_attention_stage2"]]
    assert all(0.0 <= s <= 1.0 for s in shares)
    plot = widget.plot
    assert (plot.roi_stage1, plot.roi_stage2) == ([shares[0]], [shares[1]])
    assert [label for label, _, _ in plot.curves()] == [
        "validation accuracy",
        "ROI attention, stage 1",
        "stage 2",
    ]
    # painted: the ROI colours appear (curve points and the legend's second row); an
    # epoch without shares has neither
    drawn, blank = LossAccuracyPlot(), LossAccuracyPlot()
    drawn.add_epoch(0.7, 0.5, 0.25, 0.75)
    drawn.add_epoch(0.6, 1.0, 0.5, 0.5)
    blank.add_epoch(0.7, 0.5)
    blank.add_epoch(0.6, 1.0)
    images = []
    for p in (drawn, blank):
        p.resize(480, 140)
        images.append(p.grab().toImage())
    for colour in (LossAccuracyPlot.ROI_STAGE1_COLOUR, LossAccuracyPlot.ROI_STAGE2_COLOUR):
        assert near_colour(images[1], colour, tolerance=20) == 0
        assert near_colour(images[0], colour, tolerance=20) > 20
    # a resumed run's earlier epochs come back with their shares (prepare → plot)
    widget.epochs.value = 2
    widget.train_button.native.click()
    wait_done(qtbot, widget)
    history = load_checkpoint(widget.result.last_checkpoint_path).info["info"]["history"]
    assert widget.controller.resumed_from == 1
    assert len(history) == 2 and widget.plot.roi_stage1 == [
        r["val_roi_attention_stage1"] for r in history
    ]
