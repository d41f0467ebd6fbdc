"""The ``Classify slide`` widget's Qt-free controller, driven without a viewer."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from napari_zoomin.napari.classify_controller import ClassifyController, Job
from napari_zoomin.napari.result_layers import LAYER_KEY, RESULT_LAYER_NAMES
from napari_zoomin.samples import write_sample_slide
from napari_zoomin.slide import open_slide

FRAME = ((0.5, 0.5), (10.0, 20.0))  # µm per level-0 pixel, and an offset


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controller")
    return write_sample_slide(folder / "positive.tif", size=8192, label="positive", seed=1)


def job(sample, **overrides) -> Job:
    settings = {
        "slide": SimpleNamespace(name="positive", metadata={}),
        "open_slide": lambda: open_slide(sample.path),
        "frame": FRAME,
        "model": "demo",
        "device": "cpu",
        "draws": 4,
        "seed": 0,
    }
    return Job(**{**settings, **overrides})


def test_a_classification_without_a_viewer(sample):
    controller = ClassifyController()
    seen: list[tuple[float, str]] = []
    outcome = controller.run(job(sample), lambda f, m: seen.append((f, m)))
    assert outcome.error is None and not outcome.cancelled, outcome.error
    result = outcome.result
    assert seen and seen[-1][0] == pytest.approx(1.0)
    # the layer data: every result layer, bottom to top, placed on the frame
    names = [kwargs["name"] for _, kwargs, _ in outcome.layer_data]
    assert names == list(RESULT_LAYER_NAMES)
    stage1 = next(d for d, k, _ in outcome.layer_data if k["name"] == "stage-1 attention")
    np.testing.assert_array_equal(np.nan_to_num(stage1), result.stage1_attention)
    # what the widget shows
    text = controller.text(result)
    assert text.prediction.startswith(f"Prediction: {result.label} (p = ")
    assert "draws" in text.prediction and text.details.startswith("Probabilities")
    table = controller.table(result)
    assert table.columns[4:] == ["x (µm)", "y (µm)", "size (µm)"]
    assert table.columns[:4] == ["rank", "share", "score", "sub-tiles"]
    assert 0 < len(table.rows) == len(table.places) < len(result.subtiles)
    assert [row[0] for row in table.rows] == list(range(1, len(table.rows) + 1))
    # the camera for a place: centred, never past full resolution (2 px per µm here)
    old, shown = controller.replace(job(sample).slide, result, FRAME)
    assert old is None and controller.shown is shown
    top, left, h, w = table.places[0].box
    centre, zoom = controller.place_camera(table.places[0], (800, 600))
    np.testing.assert_allclose(
        centre, [10 + 0.5 * (top + h / 2 - 0.5), 20 + 0.5 * (left + w / 2 - 0.5)]
    )
    assert 0 < zoom <= 1 / 0.5
    assert controller.highlight_widths([1, 2, 3], 2) == [1.5, 4.5, 1.5]
    # the controller and its imports need neither Qt nor napari (a fresh interpreter:
    # napari's pytest plugin has imported napari into this one)
    probe = (
        "import sys, napari_zoomin.napari.classify_controller as c; "
        "gui = ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in gui))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cancel_and_a_bad_model_come_back_as_outcomes(sample, tmp_path):
    controller = ClassifyController()
    controller.cancel_event.set()
    assert controller.run(job(sample), lambda *a: None).cancelled
    controller.cancel_event.clear()
    missing = tmp_path / "nowhere.safetensors"
    outcome = controller.run(job(sample, model=str(missing)), lambda *a: None)
    assert outcome.result is None and str(missing) in outcome.error


def layer(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, metadata={LAYER_KEY: name})


def test_results_are_kept_per_slide():
    """Slide A, then slide B: A's layers get A's name, B's keep the bare names; a new
    result of A replaces only A's; removing a slide forgets its results."""
    controller = ClassifyController()
    a, b = SimpleNamespace(name="slide-a"), SimpleNamespace(name="slide-b")
    _, set_a = controller.replace(a, "result-a", FRAME)
    set_a.layers = [layer("stage-1 attention"), layer("top places")]
    _, set_b = controller.replace(b, "result-b", FRAME)
    set_b.layers = [layer("stage-1 attention")]
    assert [lay.name for lay in set_a.layers] == [
        "stage-1 attention [slide-a]",
        "top places [slide-a]",
    ]
    assert set_b.layers[0].name == "stage-1 attention"
    assert controller.set_of(set_a.layers[1]) is set_a and controller.slide_of(set_a.layers[0]) is a
    assert controller.slide_of(b) is b
    old, again = controller.replace(a, "result-a2", FRAME)
    assert old is set_a and controller.sets == [set_b, again] and controller.shown is again
    again.layers = [layer("stage-1 attention")]
    assert not controller.forget(b)  # B's result was not the one shown
    assert controller.sets == [again]
    assert controller.forget(a) and controller.sets == []


def test_a_model_file_that_changes_is_cold_again(tmp_path):
    """The cached model is reloaded when its file changes on disk; the new one is not
    warm until warmed (warm-ups are remembered by file version, never by ``id()``,
    which a new object may reuse)."""
    import os
    import shutil

    from napari_zoomin.engine.checkpoints import DEMO_MODEL

    path = tmp_path / "model.safetensors"
    shutil.copy(DEMO_MODEL, path)
    controller = ClassifyController()
    assert controller.warm(str(path), "cpu") and controller.is_warm(str(path), "cpu")
    first = controller.checkpoint(str(path), "cpu")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version
    second = controller.checkpoint(str(path), "cpu")
    assert second is not first
    assert not controller.is_warm(str(path), "cpu")
    assert not controller._warmed  # the old version is forgotten
    assert controller.warm(str(path), "cpu") and controller.is_warm(str(path), "cpu")
