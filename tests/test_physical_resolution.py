"""Slides are read at the model's physical pixel size (µm per pixel), not in raw pixels.

The same real tissue (a crop of the CC0 Aperio slide CMU-1-Small-Region) is written
twice, losslessly: at 0.5 µm/pixel, and at 0.25 µm/pixel with every pixel repeated
2 x 2.  The project's pyramids build each level as the 2 x 2 mean (rounded half up)
of the level above, so level ``k + 1`` of the 0.25 file holds exactly the pixels of
level ``k`` of the 0.5 file.  A model trained at 0.5 µm/pixel must therefore see the
very same inputs on both files, and give the same answer at the same places.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from napari_zoomin import open_slide
from napari_zoomin.annotations import Annotation, AnnotationIndex
from napari_zoomin.cli import build_parser
from napari_zoomin.engine.checkpoints import (
    build_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
    training_mpp,
)
from napari_zoomin.engine.dataset import RoiMask, SlideDataset, SlideRecord
from napari_zoomin.engine.inference import classify
from napari_zoomin.engine.slide_source import SlideSource
from napari_zoomin.engine.tissue import TissueMask, detect_tissue
from napari_zoomin.samples import write_array_pyramid
from napari_zoomin.training import Resolution, TrainConfig, train
from test_trainer import tiny

CROP = (2048, 1536)  # rows, cols of real tissue at 0.5 µm/pixel
CONFIG = {
    "view_scale": 1 / 16,
    "stage2_scale": 1 / 4,
    "tile_size": [128, 128],
    "subtile_size": [32, 32],
    "n_samples": 8,
    "feature_dim": 32,
    "feature_hidden": 32,
}
CLASSES = ["negative", "positive"]
#: regions of one read: aligned, not aligned to any level grid, partly outside
REGIONS = torch.tensor([[0, 0, 512, 512], [96, 161, 512, 512], [-64, 1400, 512, 512]])


@pytest.fixture(scope="module")
def tissue(cmu_svs) -> np.ndarray:
    """2048 x 1536 real H&E pixels (tissue and glass) of the Aperio slide."""
    with open_slide(cmu_svs) as slide:
        assert slide.mpp == pytest.approx((0.499, 0.499))
        return slide.read(0, 400, 200, *CROP)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, tissue) -> dict[float, object]:
    """The same tissue at 0.5 and at 0.25 µm/pixel (lossless pyramids down to 256 px)."""
    folder = tmp_path_factory.mktemp("mpp")
    fine = np.repeat(np.repeat(tissue, 2, axis=0), 2, axis=1)
    options = {"tile": 256, "compression": "zlib", "min_size": 256}
    return {
        0.5: write_array_pyramid(folder / "half.tif", tissue, mpp=0.5, **options).path,
        0.25: write_array_pyramid(folder / "quarter.tif", fine, mpp=0.25, **options).path,
    }


def _about_resolution(result) -> list[str]:
    """The result's warnings about pixel sizes (other warnings are not this file's)."""
    return [w for w in result.warnings if "µm/pixel" in w or w.startswith("Read in pixels")]


def _model(folder, mpp, name="m.safetensors"):
    torch.manual_seed(0)
    model = build_model("zoomin", CONFIG)
    with torch.no_grad():  # a non-uniform attention, so sampling has something to follow
        for net in (model.attention, model.stage2_attention):
            net.logit.weight.normal_(0, 0.5)
    info = {} if mpp is False else {"data": {"mpp": mpp}}
    return save_checkpoint(folder / name, model, CLASSES, info=info)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A small Zoom-In model whose checkpoint says it was trained at 0.5 µm/pixel."""
    return _model(tmp_path_factory.mktemp("models"), 0.5)


def test_the_two_files_hold_the_same_pixels(slides, tissue):
    with open_slide(slides[0.5]) as half, open_slide(slides[0.25]) as quarter:
        assert half.mpp == (0.5, 0.5) and quarter.mpp == (0.25, 0.25)
        assert half.level_shapes == quarter.level_shapes[1:]
        for k, (rows, cols) in enumerate(half.level_shapes):
            a = half.read(k, 0, 0, rows, cols)
            assert np.array_equal(a, quarter.read(k + 1, 0, 0, rows, cols))
        assert np.array_equal(half.read(0, 0, 0, *CROP), tissue)


def test_checkpoint_records_the_training_pixel_size(model_path, tmp_path):
    assert training_mpp(load_model(model_path)) == 0.5
    assert training_mpp(load_model(_model(tmp_path, None, "none.safetensors"))) is None
    assert training_mpp(load_model(_model(tmp_path, False, "old.safetensors"))) is None
    assert training_mpp(load_model("demo")) in (None, pytest.approx(0.499))


def test_reads_in_model_pixels_are_the_same_on_both_files(slides):
    with open_slide(slides[0.5]) as half, open_slide(slides[0.25]) as quarter:
        plain = SlideSource(half)
        virtual = SlideSource(quarter, model_mpp=0.5)
        assert virtual.factor == (2.0, 2.0) and virtual.units == "µm"
        assert virtual.shape == plain.shape == CROP
        for scale in (1.0, 0.5, 0.3, 1 / 4, 1 / 16):
            assert virtual.level_for(scale) == plain.level_for(scale) + 1
            got, want = virtual.read(REGIONS, scale), plain.read(REGIONS, scale)
            assert torch.equal(got, want), scale
        assert virtual.upsampled_reads == 0
        mask = detect_tissue(half).mask
        a = TissueMask(mask, half.shape, "given")
        b = TissueMask(mask, quarter.shape, "given")
        for scale in (1 / 16, 1 / 64, 0.3):
            assert torch.equal(
                SlideSource(quarter, b, model_mpp=0.5).tissue_mask(scale),
                SlideSource(half, a).tissue_mask(scale),
            )
        # model pixels back to the file's level 0: exact for an integer factor
        assert virtual.to_level0(REGIONS).tolist() == (REGIONS * 2).tolist()
        assert virtual.to_level0_yx((1.5, -3.25)) == (3.0, -6.5)


def test_model_pixels_equal_to_the_slides_read_exactly_as_before(slides):
    """r = 1 (or within 2 %): pixel-identical to a source without a model pixel size."""
    with open_slide(slides[0.25]) as slide:
        before = SlideSource(slide)
        assert (before.factor, before.units) == ((1.0, 1.0), "pixel")
        for mpp in (0.25, 0.252):
            same = SlideSource(slide, model_mpp=mpp)
            assert same.factor == (1.0, 1.0) and same.units == "µm"
            assert same.shape == before.shape == (4096, 3072)
            for scale in (1.0, 0.5, 0.3, 1 / 16):
                assert same.level_for(scale) == before.level_for(scale)
                assert torch.equal(same.read(REGIONS, scale), before.read(REGIONS, scale))
            assert same.to_level0(REGIONS).tolist() == REGIONS.tolist()
        assert SlideSource(slide, model_mpp=0.26).factor == (1.04, 1.04)


def test_same_probabilities_at_the_same_places_on_both_files(slides, model_path):
    ckpt = load_model(model_path)
    results = {}
    with open_slide(slides[0.5]) as half:
        mask = detect_tissue(half).mask
    for mpp, path in slides.items():
        with open_slide(path) as slide:
            given = TissueMask(mask, slide.shape, "given")  # one mask, both geometries
            results[mpp] = classify(slide, ckpt, draws=4, seed=0, device="cpu", tissue=given)
    half, quarter = results[0.5], results[0.25]
    # the model saw the same pixels and drew the same cells: identical numbers
    assert quarter.probabilities == half.probabilities
    assert quarter.spread == half.spread
    assert np.array_equal(quarter.stage1_attention, half.stage1_attention)
    # ... and everything is placed on each file's own level 0: the same micrometres
    assert len(quarter.subtiles) == len(half.subtiles) > 0
    for q, h in zip(quarter.subtiles, half.subtiles, strict=True):
        assert q["weight"] == h["weight"]
        assert np.array_equal(np.array(q["region"]) * 0.25, np.array(h["region"]) * 0.5)
    for q, h in zip(quarter.tiles, half.tiles, strict=True):
        assert np.array_equal(np.array(q["region"]) * 0.25, np.array(h["region"]) * 0.5)
        assert (
            np.multiply(q["stage2_origin"], 0.25).tolist()
            == np.multiply(h["stage2_origin"], 0.5).tolist()
        )
        assert (
            np.multiply(q["stage2_cell_size"], 0.25).tolist()
            == np.multiply(h["stage2_cell_size"], 0.5).tolist()
        )
    assert (
        np.multiply(quarter.stage1_origin, 0.25).tolist()
        == np.multiply(half.stage1_origin, 0.5).tolist()
    )
    assert (
        np.multiply(quarter.stage1_cell_size, 0.25).tolist()
        == np.multiply(half.stage1_cell_size, 0.5).tolist()
    )
    assert quarter.slide["shape"] == [4096, 3072] and half.slide["shape"] == list(CROP)
    # reads come from the levels holding the same pixels, and cost the same
    assert half.decode["read_levels"] == {"view": 3, "stage2": 2, "subtiles": 0}
    assert quarter.decode["read_levels"] == {"view": 4, "stage2": 3, "subtiles": 1}
    assert quarter.pixels_read == half.pixels_read
    assert quarter.pixels_needed == half.pixels_needed
    assert quarter.pixels_decoded == half.pixels_decoded
    assert half.resolution == {
        "slide_mpp": [0.5, 0.5],
        "model_mpp": 0.5,
        "factor": [1.0, 1.0],
        "units": "µm",
    }
    assert quarter.resolution == {
        "slide_mpp": [0.25, 0.25],
        "model_mpp": 0.5,
        "factor": [2.0, 2.0],
        "units": "µm",
    }
    assert _about_resolution(half) == []
    assert _about_resolution(quarter) == [
        "The slide (0.25 µm/pixel) was resampled to the model's 0.5 µm/pixel "
        "(2x fewer pixels per side)."
    ]
    # the result file says how it was read
    again = type(quarter).from_json(quarter.to_json())
    assert again.resolution == quarter.resolution


def test_model_without_a_pixel_size_reads_pixels_and_says_so(slides, tmp_path):
    ckpt = load_model(_model(tmp_path, None))
    with open_slide(slides[0.25]) as slide:
        r = classify(slide, ckpt, draws=1, seed=0, device="cpu", tissue=None)
    assert r.resolution == {
        "slide_mpp": [0.25, 0.25],
        "model_mpp": None,
        "factor": [1.0, 1.0],
        "units": "pixel",
    }
    assert r.stage1_attention.shape == (4096 // 16, 3072 // 16)  # the file's own pixels
    assert r.decode["read_levels"] == {"view": 4, "stage2": 2, "subtiles": 0}
    assert all(s["region"][2:] == [32, 32] for s in r.subtiles)
    (warning,) = _about_resolution(r)
    assert warning.startswith("Read in pixels, not micrometres: the model records no training")
    assert "0.25 µm/pixel" in warning


def test_slide_without_a_pixel_size_reads_pixels_and_names_mpp(tissue, model_path, slides):
    ckpt = load_model(model_path)
    with open_slide(tissue) as slide:  # an array: no pixel size
        r = classify(slide, ckpt, draws=1, seed=0, device="cpu", tissue=None)
    assert r.resolution["units"] == "pixel" and r.resolution["slide_mpp"] is None
    (warning,) = _about_resolution(r)
    assert warning.startswith("Read in pixels, not micrometres: the slide records no pixel size")
    assert "0.5 µm/pixel" in warning and "--mpp" in warning
    # a path with a pixel size given by the user (the CLI's --mpp) overrides the file's
    r = classify(slides[0.5], ckpt, draws=1, seed=0, device="cpu", tissue=None, mpp=0.25)
    assert r.resolution["slide_mpp"] == [0.25, 0.25] and r.resolution["factor"] == [2.0, 2.0]
    assert r.slide["mpp"] == [0.25, 0.25]
    with open_slide(slides[0.5]) as slide, pytest.raises(ValueError, match="open_slide"):
        classify(slide, ckpt, mpp=0.25)


def test_slide_coarser_than_the_model_is_upsampled_and_warned_about(slides, tmp_path, tissue):
    with open_slide(slides[0.5]) as half, open_slide(slides[0.25]) as quarter:
        source = SlideSource(half, model_mpp=0.25)
        assert source.factor == (0.5, 0.5) and source.coarser_than_model
        assert source.shape == (4096, 3072)
        regions = torch.tensor([[1000, 800, 64, 64], [1001, 803, 64, 64]])
        got = source.read(regions, 1.0)
        assert got.shape == (2, 3, 64, 64) and source.upsampled_reads == 2
        assert source.level_for(1.0) == 0
        assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0
        # the 0.25 file repeats each pixel; bilinear upsampling is close to it
        truth = SlideSource(quarter).read(regions, 1.0)
        assert float((got - truth).abs().mean()) < 0.02
        # a view at 1/16 is a downsample again: from a level, no upsampling
        view = source.read(torch.tensor([[0, 0, 4096, 3072]]), 1 / 16)
        assert view.shape == (1, 3, 256, 192) and source.upsampled_reads == 2
        assert source.to_level0(torch.tensor([[1001, 803, 64, 64]])).tolist() == [
            [500, 401, 33, 33]
        ]
    ckpt = load_model(_model(tmp_path, 0.25))
    r = classify(slides[0.5], ckpt, draws=1, seed=0, device="cpu", tissue=None)
    assert r.resolution["factor"] == [0.5, 0.5]
    assert r.decode["read_levels"] == {"view": 3, "stage2": 1, "subtiles": 0}
    # 32 model px cover 16 file px, 17 from an odd model pixel
    assert all(s["region"][2] in (16, 17) and s["region"][3] in (16, 17) for s in r.subtiles)
    (warning,) = _about_resolution(r)
    assert warning == (
        "The slide (0.5 µm/pixel) is 2x coarser than the model's training resolution "
        "(0.25 µm/pixel): it was upsampled, so the model looked for finer detail than the "
        "slide holds and the result is less reliable. Use a scan at 0.25 µm/pixel or finer."
    )


def test_roi_maps_follow_the_model_pixels(slides):
    """The ROI callable gets the file's level-0 regions; the maps come at model pixels."""
    square = [(300.0, 200.0), (420.0, 200.0), (420.0, 290.0), (300.0, 290.0)]  # (x, y)
    half_roi = RoiMask(AnnotationIndex([Annotation(np.array(square), "Tumor")]), CROP)
    big = np.array(square) * 2
    quarter_roi = RoiMask(AnnotationIndex([Annotation(big, "Tumor")]), (4096, 3072))
    regions = torch.tensor([[150, 250, 256, 256], [0, 0, *CROP]])
    with open_slide(slides[0.5]) as half, open_slide(slides[0.25]) as quarter:
        plain = SlideSource(half, roi=half_roi)
        virtual = SlideSource(quarter, roi=quarter_roi, model_mpp=0.5)
        for scale in (1.0, 0.25, 1 / 16):
            for region in regions:
                want = plain.read_roi(region, scale)
                got = virtual.read_roi(region, scale)
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert float(virtual.read_roi(regions[:1], 1.0).sum()) == 120 * 90
        # a slide coarser than the model: maps still come at the model's pixels
        coarse = SlideSource(half, roi=half_roi, model_mpp=0.25)
        up = coarse.read_roi(torch.tensor([[400, 600, 200, 240]]), 1.0)
        assert up.shape == (1, 200, 240)
        assert float(up.sum()) == pytest.approx(240 * 180, rel=0.01)


def test_cli_mpp_is_a_positive_number(capsys):
    parser = build_parser()
    assert parser.parse_args(["classify", "s.tif", "--mpp", "0.25"]).mpp == 0.25
    assert parser.parse_args(["batch", "d", "--out", "r.csv", "--mpp", "1"]).mpp == 1.0
    assert parser.parse_args(["classify", "s.tif"]).mpp is None
    for bad in ("0", "-0.5", "nan", "inf", "abc"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["classify", "s.tif", "--mpp", bad])
        assert exc.value.code == 2
        assert "--mpp" in capsys.readouterr().err


def test_cli_classify_with_mpp(slides, model_path, tmp_path, capsys):
    """--mpp overrides the file's pixel size: the 0.25 file said to be 0.5 is read 1:1."""
    import json

    from napari_zoomin.cli import main

    out = tmp_path / "out"
    args = ["classify", str(slides[0.25]), "--model", str(model_path), "--draws", "1"]
    assert main([*args, "--tissue", "none", "--mpp", "0.5", "--out", str(out)]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["slide"]["mpp"] == [0.5, 0.5]
    assert doc["resolution"] == {
        "slide_mpp": [0.5, 0.5],
        "model_mpp": 0.5,
        "factor": [1.0, 1.0],
        "units": "µm",
    }
    err = capsys.readouterr().err
    assert "µm/pixel" not in err and "Read in pixels" not in err


# --------------------------------------------------------------------------- training


def _tiny(**overrides) -> TrainConfig:
    """test_trainer's tiny model, one epoch on the CPU at s1 = 1/16."""
    settings = {"epochs": 1, "view_scale": 1 / 16, "val_draws": 1, "device": "cpu"}
    return tiny(**{**settings, **overrides})


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_training_on_two_pixel_sizes_records_the_median_and_reads_both_at_it(
    slides, tmp_path, one_thread
):
    records = [
        SlideRecord(slides[0.5], "negative", 0, "train"),
        SlideRecord(slides[0.25], "positive", 1, "train"),
    ]
    events = []
    data = SlideDataset(records, CLASSES, workers=1, tissue=False)
    out = tmp_path / "m.safetensors"
    train(data, _tiny(), out, progress=events.append)
    # median of 0.5 and 0.25: the higher middle value, a pixel size a slide has
    assert data.model_mpp == 0.5
    assert load_checkpoint(out).info["info"]["data"]["mpp"] == 0.5
    assert training_mpp(load_checkpoint(out)) == 0.5
    assert training_mpp(load_checkpoint(tmp_path / "m.last.safetensors")) == 0.5
    assert [e for e in events if isinstance(e, Resolution)] == []
    sources = data.sources([0, 1])
    assert [s.factor for s in sources] == [(1.0, 1.0), (2.0, 2.0)]
    assert sources[0].shape == sources[1].shape == CROP
    view = [s.read(torch.tensor([[0, 0, *CROP]]), 1 / 16) for s in sources]
    assert torch.equal(view[0], view[1])  # the same tissue, the same input
    data.close()

    # fine-tuning keeps the model's own pixel size, whatever the new slides have
    quarter2 = shutil.copy(slides[0.25], tmp_path / "quarter2.tif")
    records = [
        SlideRecord(slides[0.25], "negative", 0, "train"),
        SlideRecord(quarter2, "positive", 1, "train"),
    ]
    tuned = tmp_path / "tuned.safetensors"
    with SlideDataset(records, CLASSES, workers=1, tissue=False) as data:
        train(data, _tiny(init_from=str(out)), tuned)
        assert data.model_mpp == 0.5
    assert training_mpp(load_checkpoint(tuned)) == 0.5
    with SlideDataset(records, CLASSES, workers=1, tissue=False) as data:
        train(data, _tiny(), tmp_path / "fresh.safetensors")  # median of 0.25 and 0.25
    assert training_mpp(load_checkpoint(tmp_path / "fresh.safetensors")) == 0.25


def test_training_with_a_slide_without_pixel_size_is_in_pixels_and_says_so(
    slides, tissue, tmp_path, one_thread
):
    from PIL import Image

    png = tmp_path / "no-mpp.png"
    Image.fromarray(tissue).save(png)
    records = [
        SlideRecord(slides[0.5], "negative", 0, "train"),
        SlideRecord(png, "positive", 1, "train"),
    ]
    events = []
    out = tmp_path / "m.safetensors"
    with SlideDataset(records, CLASSES, workers=1, tissue=False) as data:
        train(data, _tiny(), out, progress=events.append)
        assert data.model_mpp is None
    said = [e for e in events if isinstance(e, Resolution)]
    assert len(said) == 1 and said[0].mpp is None and said[0].stage == "resolution"
    assert said[0].message.startswith(
        "training in pixels, not micrometres: 1 of 2 slides record no pixel size (no-mpp.png)"
    )
    assert load_checkpoint(out).info["info"]["data"]["mpp"] is None
    assert training_mpp(load_checkpoint(out)) is None
