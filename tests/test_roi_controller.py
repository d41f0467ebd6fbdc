"""The ``ROI annotations`` widget's Qt-free controller, driven without a viewer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from napari_zoomin.annotations import Annotation, find_annotations, read_annotations
from napari_zoomin.annotations.sidecar import fallback_sidecar
from napari_zoomin.napari.roi_controller import RoiController, destination, slide_key
from napari_zoomin.napari.roi_shapes import roi_shapes_placement

FRAME = ((0.5, 0.5), (10.0, 20.0))  # µm per level-0 pixel, and an offset
LEVELS = [(5500, 5500)]
UNITS = ("µm", "µm")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A positive sample slide with one planted region and its answer key."""
    from napari_zoomin.samples import write_sample_slide

    folder = tmp_path_factory.mktemp("roi-controller")
    return write_sample_slide(
        folder / "sample.tif",
        size=5500,
        label="positive",
        seed=3,
        tile=512,
        n_tumor=1,
        n_distractors=0,
    )


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A fresh cache and per-user data folder."""
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NAPARI_ZOOMIN_DATA", str(tmp_path / "data"))
    return tmp_path / "cache", tmp_path / "data"


def drawn(*boxes, label="Tumor"):
    """A shapes layer's public data holding rectangles ``(top, left, height, width)``
    drawn on a slide placed by ``FRAME`` (what napari's Shapes layer exposes)."""
    scale, translate = roi_shapes_placement(FRAME)
    data = [
        np.array([[t, x], [t, x + w], [t + h, x + w], [t + h, x]], float) for t, x, h, w in boxes
    ]
    features = pd.DataFrame({"label": [label] * len(boxes), "rings": [""] * len(boxes)})
    return SimpleNamespace(
        data=data,
        shape_type=["rectangle"] * len(boxes),
        features=features,
        scale=scale,
        translate=translate,
    )


def open_session(controller, path, name="sample"):
    return controller.open(name, path, FRAME, LEVELS, UNITS)


def test_a_samples_rois_go_to_the_users_folder_never_the_cache_or_the_key(sample, folders):
    cache, data = folders
    (cache / "samples").mkdir(parents=True)
    slide = cache / "samples" / "sample.tif"
    shutil.copy(sample.path, slide)
    key_file = Path(shutil.copy(sample.geojson_path, cache / "samples" / "sample.geojson"))
    key_bytes = key_file.read_bytes()

    controller = RoiController()
    session = open_session(controller, slide)
    assert session.key == str(slide.resolve()) and controller.sessions == {session.key: session}
    assert open_session(controller, slide) is session  # one session per slide
    # saved to the per-user folder: not into the cache, not over the answer key
    assert session.sidecar == fallback_sidecar(slide) and session.fallback
    assert session.sidecar.is_relative_to(data / "annotations")
    assert session.answer_key_path == cache / "samples" / "sample.geojson"
    assert session.where() == (
        f"Annotations are saved to {session.sidecar} (the slide's sample.geojson is its "
        "answer key, shown read-only as 'answer key (sample)')."
    )
    # the answer key is not the user's: nothing of it is loaded as their ROIs
    assert controller.read_existing(session).annotations == []

    session.shapes = drawn((0, 0, 64, 64))
    assert controller.pending() == []
    controller.mark(session)
    assert controller.pending() == [session]
    saved = controller.save(session)
    assert saved.path == session.sidecar and saved.error is None
    assert saved.status == f"Saved 1 annotation(s) to {session.sidecar}."
    assert list(read_annotations(saved.path)) == [Annotation.rectangle(0, 0, 64, 64)]
    assert controller.pending() == [] and controller.save(session).path is None  # nothing new
    assert key_file.read_bytes() == key_bytes
    assert sorted(os.listdir(cache / "samples")) == ["sample.geojson", "sample.tif"]
    assert find_annotations(slide) == saved.path  # training reads the user's ROIs

    # next time: the user's ROIs are loaded, the answer key is still beside them
    again = open_session(RoiController(), slide)
    existing = RoiController().read_existing(again)
    assert existing.annotations == [Annotation.rectangle(0, 0, 64, 64)]
    assert existing.note == f"Loaded 1 annotation(s) from {again.sidecar}"
    assert again.answer_key_path == session.answer_key_path


def test_a_users_slide_saves_beside_itself(sample, tmp_path, folders):
    slide = tmp_path / "mine" / "case.tif"
    slide.parent.mkdir()
    shutil.copy(sample.path, slide)  # a slide of the user's own: no GeoJSON beside it
    controller = RoiController()
    session = open_session(controller, slide, "case")
    assert (session.sidecar, session.fallback) == (tmp_path / "mine" / "case.geojson", False)
    assert session.answer_key_path is None
    assert session.where() == f"Annotations are saved to {session.sidecar}."
    assert controller.read_existing(session).annotations == []

    session.shapes = drawn((10, 20, 30, 40), (100, 100, 8, 8), label="Stroma")
    controller.mark(session)
    assert controller.save(session).path == tmp_path / "mine" / "case.geojson"
    assert list(read_annotations(session.sidecar)) == [
        Annotation.rectangle(10, 20, 30, 40, label="Stroma"),
        Annotation.rectangle(100, 100, 8, 8, label="Stroma"),
    ]
    assert not (folders[1] / "annotations").exists()  # nothing in the per-user folder


def test_a_sample_outside_the_cache_keeps_its_key_too(sample, tmp_path, folders):
    """A copied sample: its GeoJSON beside it is still its answer key, never saved over."""
    slide = shutil.copy(sample.path, tmp_path / "copy.tif")
    key_file = Path(shutil.copy(sample.geojson_path, tmp_path / "copy.geojson"))
    session = open_session(RoiController(), slide, "copy")
    assert session.fallback and session.sidecar.is_relative_to(folders[1])
    assert session.answer_key_path == key_file
    assert "is its answer key" in session.where()


def test_an_unreadable_roi_file_turns_autosave_off(tmp_path, folders):
    slide = tmp_path / "bad.tif"
    slide.write_bytes(b"")
    (tmp_path / "bad.geojson").write_text("{not json")
    controller = RoiController()
    session = open_session(controller, slide, "bad")
    existing = controller.read_existing(session)
    assert existing.annotations == [] and not session.autosave
    assert existing.note == f"Autosave is off: {tmp_path / 'bad.geojson'} could not be read"
    assert "are not saved automatically until the file is fixed" in existing.error
    session.shapes = drawn((0, 0, 8, 8))
    controller.mark(session)
    assert controller.save(session).path is None
    assert (tmp_path / "bad.geojson").read_text() == "{not json"  # never replaced unseen


def test_a_layer_without_a_file_and_the_label_values(tmp_path, folders):
    assert slide_key(None, "my image") == "layer:my image"
    sidecar, fallback = destination(None, "my image/1")
    assert sidecar == folders[1] / "annotations" / "images" / "my_image_1.geojson" and fallback
    controller = RoiController()
    session = controller.open("pasted", tmp_path / "gone.tif", FRAME, LEVELS, UNITS)
    assert session.key == str((tmp_path / "gone.tif").resolve()) and session.slide_path is None
    assert session.sidecar == folders[1] / "annotations" / "images" / "pasted.geojson"

    assert controller.label_names == ["Tumor", "Exclusion"]
    assert controller.add_label_name("Stroma") and not controller.add_label_name("Tumor")
    assert controller.label_names == ["Tumor", "Exclusion", "Stroma"]
    assert controller.label_value(session, "Tumor") == (1, True)
    assert controller.label_value(session, "Stroma") == (2, True)
    assert controller.label_value(session, "Tumor") == (1, False)
    assert session.label_names == {1: "Tumor", 2: "Stroma"}
    controller.close(session)
    assert controller.sessions == {}


def test_the_controller_needs_neither_qt_nor_napari():
    probe = (
        "import sys, napari_zoomin.napari.roi_controller as c; "
        "gui = ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in gui))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
