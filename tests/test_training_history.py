"""What training records per epoch: the share of attention on the ROIs, the history CSV
beside the checkpoint (and across a resume), the CLI's epoch line and the plot's points."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from napari_zoomin.engine.checkpoints import build_model, load_checkpoint, save_checkpoint
from napari_zoomin.engine.dataset import SlideDataset, SlideRecord
from napari_zoomin.models.source import full_region
from napari_zoomin.napari.train_controller import PlotPoint, TrainController
from napari_zoomin.training import TrainConfig, Validated, model_settings, train
from napari_zoomin.training.history import history_csv_path
from napari_zoomin.training.trainer import _seed
from test_trainer import tiny as trainer_tiny

CLASSES = ["negative", "positive"]
SIZE = 8192
#: the ROI drawn on the positive slides: a square of a quarter of the slide's area
ROI = (2048, 2048, 6144, 6144)  # top, left, bottom, right in level-0 pixels
SHARES = ("roi_attention_stage1", "roi_attention_stage2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def roi_geojson(path) -> str:
    """A GeoJSON with one 'Tumor' square (:data:`ROI`) and one 'Distractor' outside it."""
    t, left, b, r = ROI

    def square(top, lft, bottom, right, name):
        ring = [[lft, top], [right, top], [right, bottom], [lft, bottom], [lft, top]]
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": name}},
        }

    features = [square(t, left, b, r, "Tumor"), square(200, 200, 1200, 1200, "Distractor")]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[SlideRecord]:
    """Two training and two validation 8192² sample slides; the positives carry a large
    ROI (a quarter of the slide), the negatives only their distractors."""
    from napari_zoomin.samples import write_sample_slide

    folder = tmp_path_factory.mktemp("history-slides")
    out = []
    for k, split in enumerate(["train", "train", "val", "val"]):
        label = CLASSES[k % 2]
        info = write_sample_slide(folder / f"h{k}.tif", size=SIZE, label=label, seed=70 + k)
        rois = roi_geojson(folder / f"h{k}.rois.geojson") if k % 2 else info.geojson_path
        out.append(SlideRecord(info.path, label, k % 2, split, rois, k + 2))
    return out


def tiny(**overrides) -> TrainConfig:
    """test_trainer's tiny model, one epoch, with 512-px tiles."""
    return trainer_tiny(**{"epochs": 1, "tile_size": 512, **overrides})


_TISSUE: dict = {}


def dataset(records) -> SlideDataset:
    return SlideDataset(records, CLASSES, workers=1, tissue_masks=_TISSUE)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """A Zoom-In checkpoint whose attention networks are all zeros: uniform ``α`` on the
    tissue cells and uniform ``β`` on every tile's eligible sub-cells."""
    config = tiny()
    model = build_model(config.kind, model_settings(config, len(CLASSES)))
    with torch.no_grad():
        for net in (model.attention, model.stage2_attention):
            for p in net.parameters():
                p.zero_()
    path = tmp_path_factory.mktemp("flat") / "flat.safetensors"
    save_checkpoint(path, model, CLASSES)
    return path


def uniform_shares(model, source, prediction) -> tuple[float, float]:
    """Independently: what uniform attention puts on the ROI.  Stage 1: the ROI's share
    of the tissue cells.  Stage 2: the ROI's share of each drawn tile's eligible
    sub-cells, weighed by the tile's draws."""
    st = model.stage1([source])[0]
    tissue = st.mask.cpu()
    alpha = st.attention.detach().cpu()
    assert torch.allclose(alpha[tissue], alpha[tissue].mean(), rtol=1e-6)  # the premise
    view_roi = source.read_roi(full_region(source), model.config.view_scale)[0]
    roi = st.grid.cell_values(view_roi, mean=True)  # each cell's ROI fraction
    m = roi.reshape(-1).double()
    stage1 = float(m[tissue].sum() / tissue.sum())
    tiles = prediction.tiles
    n = int(tiles.cells.shape[0])
    roi2 = source.read_roi(tiles.regions, model.config.stage2_scale)
    m2 = tiles.stage2_grid.cell_values(roi2).reshape(n, -1).double()
    beta = tiles.stage2_attention.reshape(n, -1)
    shares = []
    for k in range(n):
        eligible = beta[k] > 0
        assert torch.allclose(beta[k][eligible], beta[k][eligible].mean(), rtol=1e-6)
        shares.append(float(m2[k][eligible].mean()))
    counts = tiles.counts.double()
    stage2 = float((torch.tensor(shares, dtype=torch.float64) * counts).sum() / counts.sum())
    return stage1, stage2


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
        fh.seek(0)
        header = next(csv.reader(fh))
    return header, rows


def test_uniform_attention_puts_the_rois_area_share_on_them(records, flat, tmp_path):
    """An untrained, uniform attention (lr 1e-12 keeps the zero weights): the recorded
    shares are the ROI's share of the tissue cells (stage 1) and of the drawn tiles'
    sub-cells (stage 2), on the validation slides; the CSV holds the same numbers."""
    events = []
    out = tmp_path / "flat-run.safetensors"
    data = dataset(records)
    config = tiny(lr=1e-12, init_from=str(flat))
    result = train(data, config, out, progress=events.append)
    (record,) = result.history
    model = load_checkpoint(out).model.eval()
    # validation's predictions again: the same generator, the same chunk
    generator = torch.Generator().manual_seed(_seed(config.seed, 3))
    val = data.indices("val")
    sources = data.sources(val)
    predictions = model.predict(sources, mode="sample", draws=config.val_draws, generator=generator)
    positive = val.index(next(i for i in val if data.records[i].label == "positive"))
    stage1, stage2 = uniform_shares(model, sources[positive], predictions[positive])
    # a real share, not a corner case: the ROI is a quarter of the slide, more of its tissue
    assert 0.15 < stage1 < 0.95 and 0.0 < stage2 < 1.0
    # the negative validation slide has only a distractor: it does not count
    assert record["val_roi_attention_stage1"] == pytest.approx(stage1, rel=1e-6)
    assert record["val_roi_attention_stage2"] == pytest.approx(stage2, rel=1e-6)
    assert "train_roi_attention_stage1" not in record
    final = events[-1]
    assert isinstance(final, Validated) and final.roi_attention_split == "val"
    assert (final.roi_attention_stage1, final.roi_attention_stage2) == (
        record["val_roi_attention_stage1"],
        record["val_roi_attention_stage2"],
    )
    header, rows = read_csv(history_csv_path(out))
    assert history_csv_path(out) == tmp_path / "flat-run.history.csv"
    assert header[-4:] == ["val_roi_attention_stage1", "val_roi_attention_stage2", "lr", "seconds"]
    assert [
        float(rows[0][c]) for c in ("val_roi_attention_stage1", "val_roi_attention_stage2")
    ] == [
        record["val_roi_attention_stage1"],
        record["val_roi_attention_stage2"],
    ]


def test_without_validation_slides_the_training_slides_are_measured(records, flat, tmp_path):
    """No validation split: ``train_roi_attention_*``, on the positive training slide."""
    train_only = [r for r in records if r.split == "train"]
    data = dataset(train_only)
    out = tmp_path / "no-val.safetensors"
    result = train(data, tiny(lr=1e-12, init_from=str(flat)), out)
    (record,) = result.history
    assert record["val_accuracy"] is None and "val_roi_attention_stage1" not in record
    model = load_checkpoint(out).model.eval()
    [i] = [i for i in data.indices("train") if data.records[i].label == "positive"]
    generator = torch.Generator().manual_seed(_seed(0, 7))
    [p] = model.predict(data.sources([i]), mode="sample", draws=2, generator=generator)
    stage1, stage2 = uniform_shares(model, data[i], p)
    assert record["train_roi_attention_stage1"] == pytest.approx(stage1, rel=1e-6)
    assert record["train_roi_attention_stage2"] == pytest.approx(stage2, rel=1e-6)
    header, rows = read_csv(history_csv_path(out))
    assert "train_roi_attention_stage1" in header and "val_roi_attention_stage1" not in header
    assert rows[0]["val_accuracy"] == "" and float(rows[0]["train_roi_attention_stage2"]) > 0


def test_history_csv_grows_each_epoch_and_survives_a_cancel_and_resume(records, tmp_path):
    """One row per finished epoch, columns fixed at the start (written before epoch 1),
    written atomically; a cancelled run resumed keeps its earlier rows unchanged."""
    out = tmp_path / "m.safetensors"
    path = history_csv_path(out)
    calls = {"n": 0}

    def cancel_in_epoch_2():  # polled before every step: 2 steps per epoch
        calls["n"] += 1
        return calls["n"] == 4

    config = tiny(epochs=3, batch_size=1)
    first = train(dataset(records), config, out, cancel=cancel_in_epoch_2)
    assert first.cancelled and len(first.history) == 1
    header, rows = read_csv(path)
    assert header[:5] == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert "train_roi_attention" in header and "val_roi_attention_stage2" in header
    assert [r["epoch"] for r in rows] == ["1"]
    before = rows[0]
    assert float(before["train_loss"]) == first.history[0]["train_loss"]
    for name in ("val_roi_attention_stage1", "val_roi_attention_stage2"):
        assert 0.0 <= float(before[name]) <= 1.0
    assert not list(tmp_path.glob(".*.partial"))  # atomic: no partial file left

    second = train(dataset(records), config, out)
    assert not second.cancelled and len(second.history) == 3
    header2, rows = read_csv(path)
    assert header2 == header
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[0] == before  # the earlier row, unchanged
    for row, record in zip(rows, second.history, strict=True):
        for name in ("train_loss", "val_accuracy", "val_roi_attention_stage1", "lr"):
            assert float(row[name]) == record[name]
        assert 0.0 <= float(row["val_roi_attention_stage2"]) <= 1.0

    # a fresh start replaces the file with its own epochs only
    train(dataset(records), tiny(epochs=1, batch_size=1), out, resume=False)
    assert [r["epoch"] for r in read_csv(path)[1]] == ["1"]


def test_one_stage_models_have_no_stage_2_share(records, tmp_path):
    """ATS: the stage-1 share only (``α`` is its one attention)."""
    out = tmp_path / "ats.safetensors"
    result = train(dataset(records), tiny(kind="ats", subtile_size=64), out)
    (record,) = result.history
    assert 0.0 <= record["val_roi_attention_stage1"] <= 1.0
    assert record["val_roi_attention_stage2"] is None
    row = read_csv(history_csv_path(out))[1][0]
    assert row["val_roi_attention_stage2"] == "" and row["val_roi_attention_stage1"] != ""


def test_cli_epoch_line_shows_the_roi_shares(records, tmp_path, capsys):
    from napari_zoomin.cli import main

    folder = records[0].path.parent
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide,label,split\n" + "".join(f"{r.path.name},{r.label},{r.split}\n" for r in records)
    )
    rois = tmp_path / "rois"
    rois.mkdir()
    for r in records:  # the ROI folder: <slide stem>.geojson
        (rois / f"{r.path.stem}.geojson").write_text(r.annotations.read_text())
    settings = tiny().to_dict()
    for key in ("roi_labels", "feature_channels", "model_options", "pretrain_pooling"):
        settings.pop(key)
    out = tmp_path / "cli.safetensors"
    args = ["train", "--slides", str(folder), "--labels", str(labels), "--out", str(out)]
    args += [
        "--annotations",
        str(rois),
        "--set",
        json.dumps({**settings, "feature_channels": [4, 8]}),
    ]
    assert main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    (line,) = [x for x in lines if x.startswith("validate epoch 1/1") and "val_loss" in x]
    found = re.fullmatch(
        r"validate epoch 1/1, step 1/1, loss \d\.\d{3}, val_loss \d\.\d{3}, val_accuracy "
        r"\d\.\d{3}, val_roi_attention_stage1 (\d\.\d{3}), val_roi_attention_stage2 (\d\.\d{3}), "
        r"\d+\.\d slides/min",
        line,
    )
    assert found, line
    (record,) = load_checkpoint(out).info["info"]["history"]
    assert [float(v) for v in found.groups()] == [
        round(record[f"val_{name}"], 3) for name in SHARES
    ]


def test_controller_carries_the_shares_to_the_plot(records, tmp_path):
    """Each Validated event becomes a PlotPoint with the shares; an interrupted run's
    history gives its points back when the run is prepared again."""
    controller = TrainController()
    shown = controller.progress(
        Validated(1, 4, 2, 2, 0.5, 0.75, 0.625, 0.6, True, 1, False, {}, 0.25, 0.125, "val")
    )
    assert shown.plot == PlotPoint(0.5, 0.625, 0.25, 0.125)
    assert shown.status == (
        "epoch 1/4: loss 0.5, validation accuracy 0.625 (best so far), "
        "attention on ROIs: stage 1 0.25, stage 2 0.12"
    )
    shown = controller.progress(
        Validated(2, 4, 2, 2, 0.4, 0.75, None, None, False, 1, False, {}, 0.5, None, "train")
    )
    assert shown.plot == PlotPoint(0.4, None, 0.5, None)
    assert controller.points == [PlotPoint(0.5, 0.625, 0.25, 0.125), PlotPoint(0.4, None, 0.5)]
    assert (controller.losses, controller.accuracies) == ([0.5, 0.4], [0.625, None])
    # a saved history (what prepare() plots again): val_ shares, or train_ ones
    assert PlotPoint.of_record(
        {"train_loss": 0.3, "val_accuracy": 1.0, "val_roi_attention_stage1": 0.7}
    ) == PlotPoint(0.3, 1.0, 0.7, None)
    assert PlotPoint.of_record(
        {"train_loss": 0.3, "train_roi_attention_stage1": 0.2, "train_roi_attention_stage2": 0.1}
    ) == PlotPoint(0.3, None, 0.2, 0.1)
    assert PlotPoint.of_record({"train_loss": 0.3}) == PlotPoint(0.3, None)  # older runs
    assert math.isclose(PlotPoint.of_record({"val_accuracy": 0.5}).accuracy, 0.5)
