"""Where a slide's ROI file is: one rule for ``zoomin train``, the train widget, the ROI widget."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from napari_zoomin.annotations import (
    Annotation,
    annotations_path_for,
    fallback_sidecar,
    find_annotations,
    sidecar,
    sidecar_for_saving,
    write_geojson,
)
from napari_zoomin.annotations.sidecar import answer_key_for, in_cache, is_answer_key
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

    # as the train widget builds its data (train_controller.run_job), training stubbed out
    from napari_zoomin.napari import train_controller

    seen = {}

    def fake_train(dataset, config, out_path, **kwargs):
        seen["records"] = list(dataset.records)
        return "trained"

    monkeypatch.setattr(train_controller, "train", fake_train)
    job = train_controller.Job(
        labels_csv=slides / "labels.csv",
        slides_dir=slides,
        annotations_dir=None,
        config=SimpleNamespace(seed=0, roi_labels=("Tumor",), lookalike_labels=(), num_workers=1),
        out_path=tmp_path / "model.safetensors",
        resume=False,
    )
    assert train_controller.run_job(job, lambda event: None, lambda: False) == "trained"
    assert [r.annotations for r in seen["records"]] == expected
    assert seen["records"] == cli.records


def _answer_key(path):
    """A GeoJSON as the sample generator writes it (its top-level properties)."""
    from napari_zoomin.samples.synthetic import _geojson

    props = {"label": "positive", "recipe_version": 1, "generator": "napari-zoomin 0.0"}
    doc = _geojson([], props)
    doc["features"] = json.loads(
        write_geojson(path, [Annotation.rectangle(0, 0, 9, 9)]).read_text()
    )["features"]
    path.write_text(json.dumps(doc))
    return path


def test_what_is_an_answer_key(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "mine"
    mine.mkdir()
    drawn = write_geojson(mine / "a.geojson", [Annotation.rectangle(0, 0, 8, 8)])
    assert not is_answer_key(drawn)  # what the ROI widget (or QuPath) writes
    assert is_answer_key(_answer_key(mine / "b.geojson"))  # the generator's marker, anywhere
    assert not is_answer_key(mine / "missing.geojson")
    (mine / "bad.geojson").write_text("{not json")
    assert not is_answer_key(mine / "bad.geojson")
    (mine / "c.xml").write_text("<ASAP_Annotations/>")
    assert not is_answer_key(mine / "c.xml")
    cached = tmp_path / "cache" / "samples" / "x.geojson"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(drawn.read_bytes())
    assert in_cache(cached) and is_answer_key(cached)  # nothing in the cache is the user's
    assert not in_cache(drawn)


def test_a_real_samples_geojson_is_its_answer_key(tmp_path):
    from napari_zoomin.samples import write_sample_slide

    info = write_sample_slide(
        tmp_path / "s.tif",
        size=4096,
        label="negative",
        seed=1,
        tile=512,
        n_tumor=0,
        n_distractors=0,
    )
    # region-free: an empty file, not protected outside the cache
    assert not is_answer_key(info.geojson_path) and not is_answer_key(info.recipe_path)
    doc = json.loads(info.geojson_path.read_text())
    doc["features"] = [{"type": "Feature", "geometry": None, "properties": {}}]
    info.geojson_path.write_text(json.dumps(doc))  # as if it had planted regions
    assert is_answer_key(info.geojson_path)
    assert answer_key_for(info.path) == info.geojson_path


@pytest.mark.parametrize("where", ["cache", "copied out"])
def test_rois_of_a_sample_are_saved_to_the_user_folder(tmp_path, monkeypatch, user_folder, where):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / ("cache/samples" if where == "cache" else "slides")
    folder.mkdir(parents=True)
    slide = folder / "sample.tif"
    slide.write_bytes(b"")
    key = _answer_key(folder / "sample.geojson")
    saving, is_fallback = sidecar_for_saving(slide)
    assert is_fallback and saving == fallback_sidecar(slide)
    assert saving.is_relative_to(user_folder)  # never the cache, never the answer key
    assert find_annotations(slide) == key  # the answer key until the user saved ROIs
    saving.parent.mkdir(parents=True)
    write_geojson(saving, [Annotation.rectangle(0, 0, 8, 8)])
    assert find_annotations(slide) == saving  # then the user's ROIs
    assert find_annotations(slide, folder) == key  # unless the answer key is asked for


def test_a_cached_slide_without_answer_key_saves_to_the_user_folder(
    tmp_path, monkeypatch, user_folder
):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(tmp_path / "cache"))
    slide = tmp_path / "cache" / "CMU-1.svs"
    slide.parent.mkdir(parents=True)
    slide.write_bytes(b"")
    assert sidecar_for_saving(slide) == (fallback_sidecar(slide), True)
