"""Where a slide's ROI file is: one rule for ``zoomin train``, the train widget, the ROI widget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from napari_zoomin.annotations import (
    annotations_path_for,
    fallback_sidecar,
    find_annotations,
    sidecar,
    sidecar_for_saving,
)
from napari_zoomin.engine.dataset import SlideDataset


@pytest.fixture(autouse=True)
def user_folder(tmp_path, monkeypatch):
    """The ROI widget's per-user fallback folder, in the test's temp folder."""
    folder = tmp_path / "user"
    monkeypatch.setattr(sidecar, "fallback_annotations_dir", lambda: folder)
    return folder


def test_sidecar_paths(tmp_path):
    assert annotations_path_for(tmp_path / "slide.svs") == tmp_path / "slide.geojson"
    assert annotations_path_for(tmp_path / "x.ome.tif") == tmp_path / "x.geojson"
    assert annotations_path_for("a/b.c.tiff") == annotations_path_for("a/b.c.geojson")

    slide = tmp_path / "tumor_001.tif"
    assert find_annotations(slide) is None
    (tmp_path / "tumor_001.xml").write_text("<ASAP_Annotations/>")
    assert find_annotations(slide) == tmp_path / "tumor_001.xml"
    (tmp_path / "tumor_001.json").write_text("[]")
    assert find_annotations(slide) == tmp_path / "tumor_001.json"
    other = tmp_path / "labels"
    other.mkdir()
    assert find_annotations(slide, other) == tmp_path / "tumor_001.json"
    (other / "tumor_001.geojson").write_text("[]")
    assert find_annotations(slide, other) == other / "tumor_001.geojson"
    ome = tmp_path / "y.ome.tiff"
    (tmp_path / "y.geojson").write_text("[]")
    assert find_annotations(ome) == tmp_path / "y.geojson"


def test_sidecar_beside_the_slide_or_in_the_user_folder(tmp_path, monkeypatch, user_folder):
    slide = tmp_path / "slides" / "case 1.ome.tif"
    slide.parent.mkdir()
    slide.write_bytes(b"")
    assert sidecar_for_saving(slide) == (tmp_path / "slides" / "case 1.geojson", False)
    assert find_annotations(slide) is None

    monkeypatch.setattr(sidecar, "_is_writable", lambda path: False)
    fallback, is_fallback = sidecar_for_saving(slide)
    assert is_fallback and fallback.name == "case 1.geojson"
    assert fallback.parent.parent == user_folder
    assert fallback == fallback_sidecar(slide)
    beside = tmp_path / "slides" / "case 1.xml"
    beside.write_text("<ASAP_Annotations/>")
    assert find_annotations(slide) == beside  # the file beside the slide until edits were saved
    fallback.parent.mkdir(parents=True)
    fallback.write_text("{}")
    assert find_annotations(slide) == fallback  # then the edited copy


def test_lookup_order_folder_then_fallback_then_beside(tmp_path):
    slide = tmp_path / "slides" / "case.svs"
    slide.parent.mkdir()
    slide.write_bytes(b"")
    beside = slide.with_suffix(".geojson")
    beside.write_text("[]")
    fallback = fallback_sidecar(slide)
    fallback.parent.mkdir(parents=True)
    fallback.write_text("[]")
    rois = tmp_path / "rois"
    rois.mkdir()
    assert find_annotations(slide, rois) == fallback  # nothing in the folder
    (rois / "case.xml").write_text("<ASAP_Annotations/>")
    assert find_annotations(slide, rois) == rois / "case.xml"
    assert find_annotations(slide) == fallback
    fallback.unlink()
    assert find_annotations(slide) == beside


def _write_training_set(folder):
    """Four (empty) slides: ROI file in the fallback only, in both places, beside, none."""
    slides = folder / "slides"
    slides.mkdir()
    for name in ("a", "b", "c", "d"):
        (slides / f"{name}.tif").write_bytes(b"")
    (slides / "labels.csv").write_text(
        "slide,label,split\na,positive,train\nb,negative,train\nc,positive,val\nd,negative,val\n"
    )
    expected = []
    for name, in_fallback, beside in [("a", 1, 0), ("b", 1, 1), ("c", 0, 1), ("d", 0, 0)]:
        slide = (slides / f"{name}.tif").resolve()
        if beside:
            annotations_path_for(slide).write_text("[]")
        if in_fallback:
            fallback_sidecar(slide).parent.mkdir(parents=True)
            fallback_sidecar(slide).write_text("[]")
        if in_fallback:
            expected.append(fallback_sidecar(slide))  # the widget's edits win
        else:
            expected.append(annotations_path_for(slide) if beside else None)
    return slides, expected


def test_zoomin_train_and_the_train_widget_find_the_same_roi_files(tmp_path, monkeypatch):
    slides, expected = _write_training_set(tmp_path)
    # as ``zoomin train`` builds its data (cli._cmd_train)
    cli = SlideDataset.from_csv(slides / "labels.csv", slides, None, roi_labels=("Tumor",))
    assert [r.annotations for r in cli.records] == expected

    # as the train widget builds its data (train_widget._run_job), training stubbed out
    pytest.importorskip("napari")
    from napari_zoomin.napari import train_widget

    seen = {}

    def fake_train(dataset, config, out_path, **kwargs):
        seen["records"] = list(dataset.records)
        return "trained"

    monkeypatch.setattr(train_widget, "train", fake_train)
    job = train_widget._Job(
        labels_csv=slides / "labels.csv",
        slides_dir=slides,
        annotations_dir=None,
        config=SimpleNamespace(seed=0, roi_labels=("Tumor",), num_workers=1),
        out_path=tmp_path / "model.safetensors",
        resume=False,
    )
    relay = SimpleNamespace(event=SimpleNamespace(emit=lambda event: None))
    assert train_widget._run_job(job, relay, lambda: False) == "trained"
    assert [r.annotations for r in seen["records"]] == expected
    assert seen["records"] == cli.records
