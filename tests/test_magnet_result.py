"""A MagNet (002) through classify(): what the result says, records and writes.

A MagNet makes one deterministic pass, so its result must not speak of draws; it
records every box it magnified (level-0 pixels, zoom, the slide level read) and the
per-patch probability trace, round-trips them through result.json, and exports the
boxes for QuPath.  The pixels it decoded are counted as for the other kinds.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_zoomin.engine.checkpoints import load_model, save_checkpoint
from napari_zoomin.engine.inference import classify
from napari_zoomin.engine.results import Result, write_outputs
from napari_zoomin.engine.slide_source import SlideSource
from napari_zoomin.engine.trust import evidence_warnings
from napari_zoomin.models.magnet import MagNet
from napari_zoomin.slide import open_slide

sys.path.insert(0, str(Path(__file__).resolve().parent / "core"))
from test_magnet import tiny

from pyramid_files import write_openslide_layout

SHAPE = (512, 384)  # three levels (downsamples 1, 2, 4) of 64-pixel file tiles
FILE_TILE = 64


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*SHAPE, 3), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("magslide")
    return write_openslide_layout(folder / "p.tif", image, "zlib", tile=FILE_TILE)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """An untrained MagNet whose localisers are sharpened (scores × 300), so the
    sparsemax is sparse and the boxes shrink: layer 1 reads level 2, layer 2 level 1.
    No read margin, so what is read is exactly the boxes (for the pixel counts)."""
    torch.manual_seed(0)
    model = MagNet(tiny(read_margin=0, view_size=16, sample_size=64, classifier_size=128))
    with torch.no_grad():
        for net in model.localisers.values():
            net.out.weight.mul_(300)
    path = tmp_path_factory.mktemp("magmodel") / "magnet.safetensors"
    return save_checkpoint(path, model, ["negative", "positive"])


@pytest.fixture(scope="module")
def result(slide_path, model_path) -> Result:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return classify(slide_path, load_model(model_path), draws=16, tissue=None, device="cpu")
    finally:
        torch.set_num_threads(previous)  # the tests after this module keep torch's own


def test_the_result_says_one_pass_not_draws(result):
    boxes = result.magnified["boxes"]
    assert len(boxes) == 2 + 2 * 3
    assert result.mode == "magnify" and result.draws == 1
    assert set(result.spread.values()) == {0.0}
    zoom = max(b["zoom"] for b in boxes)
    line = result.summary()
    p = result.probability
    expected = (
        f"p.tif: {result.label} (p={p:.2f}, one pass, 8 magnified regions at depths 1-2 "
        f"(zoom up to {zoom:.3g}x)"
    )
    assert line.startswith(expected + ") in "), line  # no "places": nothing is weighed
    assert "draw" not in line
    assert not [w for w in result.warnings if "draw" in w], result.warnings


def test_evidence_warning_for_a_magnet_speaks_of_one_pass_and_others_are_unchanged():
    ev = {"places": 1, "subtiles": 6}
    (magnet,) = evidence_warnings(ev, "magnify", 1, 0.0, (5000, 5000), 224)
    assert magnet == (
        "The prediction rests on 6 magnified patches in one place (one deterministic pass "
        "chose where to zoom; nothing else of the slide was read at full detail). Look at "
        "it yourself."
    )
    (ats,) = evidence_warnings(ev, "sample", 16, 0.01, (5000, 5000), 224)
    assert ats.startswith("All 16 draws read 6 sub-tiles in one place: their agreement")
    (topk,) = evidence_warnings(ev, "topk", 1, 0.0, (5000, 5000), 224)
    assert topk == "The prediction rests on 6 sub-tiles in one place. Look at it yourself."


def test_the_result_records_the_boxes_levels_and_trace_of_the_models_own_pass(
    result, slide_path, model_path
):
    model = load_model(model_path).model
    with open_slide(slide_path) as slide:
        (pred,) = model.predict([SlideSource(slide)])
        downsamples = [lv.downsample[0] for lv in slide.levels]
    mag = pred.magnified
    boxes = result.magnified["boxes"]
    assert [b["depth"] for b in boxes] == mag.depth.tolist() == [1, 1] + [2] * 6
    assert [b["parent"] for b in boxes] == [-1, -1, 0, 0, 0, 1, 1, 1]
    side = max(SHAPE)
    for m, b in enumerate(boxes):
        top, left, s, _ = mag.boxes[m].tolist()
        assert b["box"] == [top, left, s, s]  # no resampling: model pixels are level 0
        assert b["zoom"] == pytest.approx(side / s, rel=1e-12)
        assert b["read_scale"] == pytest.approx(min(1.0, (64 if b["depth"] == 1 else 128) / s))
        # the finest level whose downsample does not exceed 1/read_scale
        level = max(k for k, d in enumerate(downsamples) if d <= 1 / b["read_scale"] + 1e-9)
        assert b["level"] == level
    assert sorted({b["level"] for b in boxes}) == [1, 2]  # zoomed: finer for layer 2
    trace = result.magnified["trace"]
    assert len(trace) == 6 and result.magnified["patches"] == [2, 3]
    assert [list(row.values()) for row in trace] == mag.trace.double().tolist()
    assert trace[-1] == pytest.approx(result.probabilities)


def _tiles(box, downsample: float, shape=SHAPE) -> set[tuple[int, int, int]]:
    """File tiles (downsample, row, col) of a level-0 float box clipped to the image."""
    top, left, h, w = box
    y0, x0 = max(0, math.floor(top)), max(0, math.floor(left))
    y1, x1 = min(shape[0], math.ceil(top + h)), min(shape[1], math.ceil(left + w))
    r0, r1 = math.floor(y0 / downsample), math.ceil(y1 / downsample)
    c0, c1 = math.floor(x0 / downsample), math.ceil(x1 / downsample)
    return {
        (int(downsample), r, c)
        for r in range(r0 // FILE_TILE, (r1 - 1) // FILE_TILE + 1)
        for c in range(c0 // FILE_TILE, (c1 - 1) // FILE_TILE + 1)
    }


def test_pixels_needed_are_the_file_tiles_of_the_boxes_and_all_were_decoded(result):
    """Counted independently: the whole image at the view's level, then every box at
    its own level; 64² pixels per file tile.  Without a read margin and without tissue
    detection, the decoder produced exactly those tiles."""
    view_level = 2  # layer 1 reads the 512-pixel square at 64/512 = 1/8: downsample 4
    needed = _tiles((0, 0, *SHAPE), 2**view_level)
    for b in result.magnified["boxes"]:
        needed |= _tiles(b["box"], 2 ** b["level"])
    assert result.pixels_needed == len(needed) * FILE_TILE**2
    assert result.pixels_decoded == result.pixels_needed
    assert result.decode["read_levels"] == {"view": 2, "layer 1": 2, "subtiles": 1}
    # the areas asked for, in pixels of the level each came from: the whole image,
    # then every box (clipped to the image), overlaps counted once per read
    boxes = result.magnified["boxes"]
    asked = SHAPE[0] * SHAPE[1] / 4**view_level
    for b in boxes:
        top, left, h, w = b["box"]
        rows = min(SHAPE[0], math.ceil(top + h)) - max(0, math.floor(top))
        cols = min(SHAPE[1], math.ceil(left + w)) - max(0, math.floor(left))
        asked += rows * cols / 4 ** b["level"]
    assert result.pixels_read == pytest.approx(asked, abs=len(boxes))


def test_result_json_round_trip_and_the_qupath_export(result, tmp_path):
    written = write_outputs(result, tmp_path / "out")
    assert "places" not in written  # patches read in order carry no shares to rank
    again = Result.load(written["json"])
    assert again.magnified == result.magnified
    assert again.mode == "magnify" and again.draws == 1
    assert again.summary() == result.summary()
    doc = json.loads(written["magnified"].read_text())
    features = doc["features"]
    boxes = result.magnified["boxes"]
    assert len(features) == len(boxes)
    for m, (f, b) in enumerate(zip(features, boxes, strict=True)):
        props = f["properties"]
        assert props["classification"]["name"] == f"Magnified layer {b['depth']}"
        meas = props["measurements"]
        assert meas["depth"] == b["depth"] and meas["level"] == b["level"]
        assert meas["zoom"] == pytest.approx(b["zoom"], abs=1e-6)
        top, left, h, w = b["box"]
        ring = np.array(f["geometry"]["coordinates"][0])
        assert ring.min(0).tolist() == pytest.approx([left, top])  # (x, y) as QuPath
        assert ring.max(0).tolist() == pytest.approx([left + w, top + h])
        if b["depth"] == 2:
            k = m - 2
            assert meas["patch"] == k
            p = result.magnified["trace"][k][result.label]
            assert meas[f"p {result.label}"] == pytest.approx(p, abs=1e-6)
    assert written["magnified"].name == "magnified.geojson"


def test_without_magnified_boxes_the_files_and_summary_are_the_other_kinds(result, tmp_path):
    """A result.json of before this field (no ``magnified`` key) loads with None; a
    sampled result without boxes writes no magnified.geojson and speaks of draws."""
    doc = result.to_dict()
    del doc["magnified"]
    assert Result.from_dict(doc).magnified is None
    sampled = replace(result, magnified=None, mode="sample", draws=16)
    written = write_outputs(sampled, tmp_path / "out")
    assert "magnified" not in written and not (tmp_path / "out" / "magnified.geojson").exists()
    assert f"p={result.probability:.2f} ± 0.00 over 16 draws" in sampled.summary()
