"""Training data: the labels CSV, every way it can be wrong, the split, ROI masks on slides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_zoomin.engine.dataset import (
    SlideDataset,
    SlideRecord,
    order_classes,
    read_labels,
    stratified_split,
)
from napari_zoomin.errors import DataError, LabelsError, ZoominError
from napari_zoomin.models.source import full_region, read_hard_negatives, read_roi


def _slides(folder: Path, names) -> Path:
    """Empty stand-ins: ``read_labels`` checks files exist, it does not open them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    names = [f"pos{i}.tif" for i in range(5)] + [f"neg{i}.svs" for i in range(5)]
    return _slides(tmp_path / "slides", names)


def test_reads_rows_classes_and_splits(folder, tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "pos0.geojson").write_text("{}")
    csv = _csv(
        tmp_path / "labels.csv",
        "Slide;Label;Split\npos0.tif;positive;train\n\nneg0;negative;val\n./pos1.tif;positive;"
        "test\nneg1.svs;negative;train\n",
    )
    records, classes = read_labels(csv, folder, ann)
    assert classes == ["negative", "positive"]  # the negative class first
    assert [r.path.name for r in records] == ["pos0.tif", "neg0.svs", "pos1.tif", "neg1.svs"]
    assert [r.label_index for r in records] == [1, 0, 1, 0]
    assert [r.split for r in records] == ["train", "val", "test", "train"]
    assert [r.line for r in records] == [2, 4, 5, 6]  # CSV lines, blank line skipped
    assert records[0].annotations == ann / "pos0.geojson"
    assert all(r.annotations is None for r in records[1:])


def test_class_order_puts_a_conventional_negative_first():
    assert order_classes(["tumor", "normal", "tumor"]) == ["normal", "tumor"]
    assert order_classes(["b", "a", "Negative"]) == ["Negative", "a", "b"]
    assert order_classes(["1", "0"]) == ["0", "1"]
    assert order_classes(["lymphoma", "cll", "fl"]) == ["cll", "fl", "lymphoma"]


def test_fixed_classes_keep_their_order(folder, tmp_path):
    csv = _csv(tmp_path / "l.csv", "slide,label\npos0.tif,positive\nneg0.svs,negative\n")
    records, classes = read_labels(csv, folder, classes=["positive", "negative"])
    assert classes == ["positive", "negative"]
    assert [r.label_index for r in records] == [0, 1]


def test_automatic_split_is_stratified_and_deterministic(folder, tmp_path):
    rows = "".join(f"pos{i}.tif,positive\n" for i in range(5))
    rows += "".join(f"neg{i}.svs,negative\n" for i in range(5))
    csv = _csv(tmp_path / "l.csv", "slide,label\n" + rows)
    a, _ = read_labels(csv, folder, seed=3)
    b, _ = read_labels(csv, folder, seed=3)
    assert [r.split for r in a] == [r.split for r in b]
    for cls in (0, 1):
        splits = [r.split for r in a if r.label_index == cls]
        assert splits.count("val") == 1 and splits.count("train") == 4
    others = {tuple(r.split for r in read_labels(csv, folder, seed=s)[0]) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_stratified_split_rules():
    assert stratified_split([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], 0.2, 0).count("val") == 3
    # a single slide of a class stays in training; two give one to validation
    split = stratified_split([0, 1, 1], 0.2, 0)
    assert split[0] == "train" and sorted(split[1:]) == ["train", "val"]
    assert stratified_split([0, 1], 0.0, 0) == ["train", "train"]
    with pytest.raises(ValueError):
        stratified_split([0, 1], 1.0, 0)


def test_extension_may_be_omitted_unless_ambiguous(tmp_path):
    folder = _slides(tmp_path / "s", ["a.tif", "b.svs", "b.tif"])
    csv = _csv(tmp_path / "l.csv", "slide,label,split\na,x,train\nb.svs,y,train\n")
    records, _ = read_labels(csv, folder)
    assert [r.path.name for r in records] == ["a.tif", "b.svs"]
    csv = _csv(tmp_path / "l.csv", "slide,label,split\na,x,train\nb,y,train\n")
    with pytest.raises(LabelsError, match=r"line 3: 'b' matches several slides \(b.svs, b.tif\)"):
        read_labels(csv, folder)


BAD = [
    ("", r"labels CSV is empty"),
    ("slide,label\n", r"has a header but no slides"),
    ("name,label\npos0.tif,positive\n", r"line 1: the header has no 'slide' column"),
    ("slide,class\npos0.tif,positive\n", r"line 1: the header has no 'label' column"),
    ("slide,label\npos0.tif,positive\n,negative\n", r"line 3: the slide name is empty"),
    ("slide,label\npos0.tif,positive\nneg0.svs,\n", r"line 3: slide 'neg0.svs' has no label"),
    (
        "slide,label\npos0.tif,positive\nneg0.svs,negative\npos0.tif,positive\n",
        r"line 4: slide 'pos0.tif' is listed twice \(also line 2\)",
    ),
    (
        "slide,label,split\npos0.tif,positive,train\nneg0.svs,negative,validation\n",
        r"line 3: split 'validation' is not train, val or test",
    ),
    (
        "slide,label,split\npos0.tif,positive,train\nneg0.svs,negative,val\n",
        r"class\(es\) 'negative' have no training slide",
    ),
    ("slide,label\npos0.tif,positive\npos1.tif,positive\n", r"needs at least two classes"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_csv_is_refused_with_line_and_fix(folder, tmp_path, text, message):
    csv = _csv(tmp_path / "labels.csv", text)
    with pytest.raises(LabelsError, match=message) as info:
        read_labels(csv, folder)
    assert str(csv) in str(info.value)  # names the file
    assert isinstance(info.value, DataError) and isinstance(info.value, ZoominError)


def test_missing_slides_are_listed_up_to_five(folder, tmp_path):
    rows = "".join(f"missing{i}.tif,positive\n" for i in range(7))
    csv = _csv(tmp_path / "l.csv", "slide,label\npos0.tif,positive\nneg0.svs,negative\n" + rows)
    with pytest.raises(LabelsError) as info:
        read_labels(csv, folder)
    message = str(info.value)
    assert "7 slide(s) not found" in message and "and 2 more" in message
    assert "'missing0.tif' (line 4)" in message and "'missing4.tif' (line 8)" in message
    assert "missing5" not in message and "--slides" in message


def test_unknown_labels_against_fixed_classes(folder, tmp_path):
    csv = _csv(tmp_path / "l.csv", "slide,label\npos0.tif,tumour\nneg0.svs,negative\n")
    with pytest.raises(LabelsError, match=r"unknown label\(s\) 'tumour' \(line 2\)"):
        read_labels(csv, folder, classes=["negative", "positive"])


def test_missing_files_and_folders(folder, tmp_path):
    with pytest.raises(LabelsError, match="labels CSV not found"):
        read_labels(tmp_path / "nope.csv", folder)
    csv = _csv(tmp_path / "l.csv", "slide,label\npos0.tif,a\nneg0.svs,b\n")
    with pytest.raises(LabelsError, match="slides folder not found"):
        read_labels(csv, tmp_path / "nothing")
    with pytest.raises(LabelsError, match="annotations folder not found"):
        read_labels(csv, folder, tmp_path / "nothing")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LabelsError, match="cannot be read as UTF-8"):
        read_labels(tmp_path / "bin.csv", folder)


# -- real slides --------------------------------------------------------------------


@pytest.fixture(scope="module")
def positive_slide(tmp_path_factory):
    from napari_zoomin.samples import write_sample_slide

    return write_sample_slide(
        tmp_path_factory.mktemp("ds") / "pos.tif", size=8192, label="positive", seed=11
    )


def test_roi_masks_reach_the_model(positive_slide):
    """The source's ROI is > 0 over the planted tumour only (distractors are not ROI)."""
    info = positive_slide
    record = SlideRecord(info.path, "positive", 1, "train", info.geojson_path)
    with SlideDataset([record], ["negative", "positive"], workers=1) as dataset:
        source = dataset[0]
        assert source.tissue is not None and 0.1 < source.tissue.fraction < 0.6
        tumour = next(r for r in info.regions if r.kind == "Tumor")
        distractor = next(r for r in info.regions if r.kind == "Distractor")
        box = tumour.box
        regions = torch.tensor(
            [[r.y, r.x, box, box] for r in (tumour, distractor)] + [[0, 0, box, box]]
        )
        roi = read_roi(source, regions, 1.0)
        assert roi.shape == (3, box, box)
        assert float(roi[0].sum()) == pytest.approx(tumour.area, rel=0.1)
        assert float(roi[1:].abs().max()) == 0.0
        view = read_roi(source, full_region(source), 1 / 16)[0]
        assert view.shape == (512, 512)
        assert float(view.sum()) * 256 == pytest.approx(tumour.area, rel=0.1)
        # whole-slide masks are cached: same values, independent tensors
        again = read_roi(source, full_region(source), 1 / 16)[0]
        assert torch.equal(view, again) and again.data_ptr() != view.data_ptr()

    # the distractor becomes ROI only when asked for
    record = SlideRecord(info.path, "positive", 1, "train", info.geojson_path)
    with SlideDataset(
        [record], ["negative", "positive"], roi_labels=("Tumor", "Distractor"), workers=1
    ) as dataset:
        roi = read_roi(dataset[0], torch.tensor([[distractor.y, distractor.x, 64, 64]]), 1.0)
        assert float(roi.max()) == 1.0
        # ... and then nothing annotated is left over as a hard negative
        assert read_hard_negatives(dataset[0], full_region(dataset[0]), 1 / 16) is None


def test_annotated_non_roi_regions_are_hard_negatives(positive_slide):
    """The distractor (annotated, not ROI) is where the hard-negative mask is > 0."""
    info = positive_slide
    tumour = next(r for r in info.regions if r.kind == "Tumor")
    distractor = next(r for r in info.regions if r.kind == "Distractor")
    record = SlideRecord(info.path, "positive", 1, "train", info.geojson_path)
    with SlideDataset([record], ["negative", "positive"], workers=1) as dataset:
        source = dataset[0]
        regions = torch.tensor([[r.y, r.x, r.box, r.box] for r in (tumour, distractor)])
        hard = read_hard_negatives(source, regions[1:], 1.0)[0]
        assert float(hard.sum()) == pytest.approx(distractor.area, rel=0.1)
        assert float(read_hard_negatives(source, regions[:1], 1.0).abs().max()) == 0.0
        view = read_hard_negatives(source, full_region(source), 1 / 16)[0]
        assert float(view.sum()) * 256 == pytest.approx(distractor.area, rel=0.1)


def test_unannotated_slide_has_no_roi_and_opens_lazily(positive_slide, tmp_path):
    info = positive_slide
    records = [SlideRecord(info.path, "positive", 1, "train", None)] * 3
    dataset = SlideDataset(records, ["negative", "positive"], workers=1, max_open=1)
    assert dataset._open == {}  # nothing opened yet
    sources = dataset.sources([0, 1])  # a batch keeps all its slides open
    assert len(dataset._open) == 2 and sources[0].read_roi(full_region(sources[0]), 0.1) is None
    dataset.sources([2])
    assert list(dataset._open) == [2]
    mask = dataset.tissue_mask(0)
    assert mask is not None and dataset.tissue_mask(0) is mask  # detected once
    summary = dataset.summary()
    assert summary["per_split"] == {"train": {"negative": 0, "positive": 3}}
    assert summary["annotated"] == 0 and len(summary["fingerprint"]) == 64
    dataset.close()
    assert dataset._open == {}


def test_from_csv_records_its_source(positive_slide, tmp_path):
    info = positive_slide
    csv = _csv(tmp_path / "l.csv", f"slide,label\n{info.path.name},positive\npos,negative\n")
    with pytest.raises(LabelsError, match=r"line 3: slide 'pos' is listed twice \(also line 2\)"):
        SlideDataset.from_csv(csv, info.path.parent)
    other = info.path.parent / "copy.tif"
    other.write_bytes(info.path.read_bytes())
    csv = _csv(tmp_path / "l.csv", f"slide,label\n{info.path.name},positive\ncopy,negative\n")
    dataset = SlideDataset.from_csv(csv, info.path.parent, workers=1)
    assert dataset.labels_csv == csv
    assert [r.annotations for r in dataset.records] == [info.geojson_path, None]
    assert json.loads(info.geojson_path.read_text())["type"] == "FeatureCollection"
