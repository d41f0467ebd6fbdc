"""Result → napari layer data, without Qt or a viewer: exact placements on the slide.

The slide frame used throughout is deliberately not the identity (µm-like scale that
differs per axis, non-zero translate), so a missing factor or offset shows.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from napari_zoomin.engine.inference import classify
from napari_zoomin.engine.results import Result, grid_placement
from napari_zoomin.engine.tissue import TissueMask, detect_tissue
from napari_zoomin.napari.result_layers import (
    RESULT_KEY,
    STAGE1_LAYER,
    STAGE2_LAYER,
    SUBTILES_LAYER,
    TILES_LAYER,
    TISSUE_SOURCE,
    map_placement,
    markers_layer_data,
    place_rows,
    place_view,
    places_layer_data,
    result_layer_data,
    result_layer_name,
    stage1_layer_data,
    stage2_canvas_raw,
    stage2_layer_data,
    subtiles_layer_data,
    summary_lines,
    tiles_layer_data,
    tissue_layer_data,
    tissue_mask_from_labels,
    warning_lines,
)
from napari_zoomin.samples import write_sample_slide
from napari_zoomin.slide import open_slide

FRAME = ((0.5, 0.25), (100.0, -30.0))  # (scale, translate) of level-0 pixels in world


def world(points_yx):
    """Where napari shows the level-0 point (y, x) (pixel c covers [c, c+1))."""
    (sy, sx), (ty, tx) = FRAME
    p = np.asarray(points_yx, dtype=np.float64)
    return np.stack([ty + sy * (p[..., 0] - 0.5), tx + sx * (p[..., 1] - 0.5)], axis=-1)


def data_to_world(kwargs, index_yx):
    """napari's data → world map of a layer: translate + scale · index."""
    return np.asarray(kwargs["translate"]) + np.asarray(kwargs["scale"]) * np.asarray(index_yx)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("result-layers")
    return write_sample_slide(folder / "positive.tif", size=8192, label="positive", seed=1).path


@pytest.fixture(scope="module")
def result(slide_path) -> Result:
    return classify(slide_path, "demo", draws=16, seed=0)


def test_stage1_cells_sit_where_the_model_read_them(result):
    data, kwargs, kind = stage1_layer_data(result, FRAME)
    assert kind == "image" and kwargs["name"] == STAGE1_LAYER
    alpha = result.stage1_attention
    assert data.shape == alpha.shape
    # background (alpha exactly 0: off the tissue, never sampled) is NaN = transparent
    assert np.array_equal(np.isnan(data), alpha == 0)
    assert np.array_equal(data[alpha > 0], alpha[alpha > 0])
    (oy, ox), (dy, dx) = result.stage1_origin, result.stage1_cell_size
    np.testing.assert_allclose(kwargs["scale"], (0.5 * dy, 0.25 * dx))
    # the centre of cell (i, j) covers origin + (i + 1/2) * cell in level-0 pixels
    cells = np.array([[0, 0], [3, 7], [alpha.shape[0] - 1, alpha.shape[1] - 1]])
    expected = world(np.stack([oy + (cells[:, 0] + 0.5) * dy, ox + (cells[:, 1] + 0.5) * dx], 1))
    np.testing.assert_allclose(data_to_world(kwargs, cells), expected, atol=1e-9)
    # independent check: the most attended cell's centre is the centre of its drawn
    # tile (the model centres a tile on its cell), to within a pixel
    i, j = np.unravel_index(np.argmax(alpha), alpha.shape)
    top = next(t for t in result.tiles if t["cell"] == i * alpha.shape[1] + j)
    ty, tx, th, tw = top["region"]
    np.testing.assert_allclose(
        data_to_world(kwargs, [i, j]), world([ty + th / 2, tx + tw / 2]), atol=0.5
    )
    assert kwargs["metadata"][RESULT_KEY] is result
    assert kwargs["contrast_limits"] == (0.0, pytest.approx(float(alpha.max())))


def test_map_placement_matches_grid_placement_convention():
    """A 1-cell-per-pixel map at origin 0 is the slide itself: same scale and translate."""
    scale, translate = map_placement((0.0, 0.0), (1.0, 1.0), FRAME)
    assert scale == FRAME[0] and translate == FRAME[1]

    class Grid:  # the model's cell grid of a 64-px region read as a 16-px view, stride 4
        origins = np.array([[32, 48]])
        region_size = (64, 64)
        view_shape = (16, 16)
        stride = (4, 4)
        offset = (1.5, 1.5)

    origin, cell = grid_placement(Grid)
    scale, translate = map_placement(origin, cell, FRAME)
    # the model reads cell (i, j) around the level-0 pixel whose centre is
    # region_origin + offset·span + (i, j)·stride·span, span = (h − 1)/(h_v − 1)
    span = 63 / 15
    for i, j in [(0, 0), (2, 3)]:
        centre_pixel = np.array([32 + 1.5 * span + 4 * i * span, 48 + 1.5 * span + 4 * j * span])
        np.testing.assert_allclose(
            np.asarray(translate) + np.asarray(scale) * [i, j],
            world(centre_pixel + 0.5),  # the pixel's centre in continuous coordinates
            atol=1e-9,
        )


def _toy_result(tiles: list[dict]) -> Result:
    """A minimal two-stage result over a 256 × 256 slide (hand-made tiles)."""
    return Result(
        slide={"path": None, "name": "toy", "shape": [256, 256], "mpp": None},
        label="positive",
        label_index=1,
        classes=["negative", "positive"],
        probabilities={"negative": 0.25, "positive": 0.75},
        spread={"negative": 0.05, "positive": 0.05},
        draws=4,
        mode="sample",
        seed=0,
        stage1_attention=np.full((16, 16), 1 / 256, np.float32),
        stage1_origin=(0.0, 0.0),
        stage1_cell_size=(16.0, 16.0),
        tiles=tiles,
        subtiles=[],
        pixels_decoded=2_000_000,
        pixels_needed=1_000_000,
        pixels_read=500_000,
        seconds=1.25,
        model_sha256="0" * 64,
        model_kind="zoomin",
        device="cpu",
        versions={},
        tissue={"source": "otsu", "fraction": 0.5},
    )


def _beta(seed: int, shape=(8, 8)) -> np.ndarray:
    b = np.random.default_rng(seed).random(shape).astype(np.float32)
    return b / b.sum()


def test_stage2_each_tile_sums_to_one_in_its_region():
    """Non-overlapping tiles on a 4-px stage-2 grid: each β lands whole at its tile."""
    tiles = [
        {"region": [r, c, 32, 32], "cell": 0, "count": 1, "alpha": a, "stage2_attention": _beta(k),
         "stage2_origin": (float(r), float(c)), "stage2_cell_size": (4.0, 4.0)}
        for k, (r, c, a) in enumerate([(0, 0, 0.5), (64, 128, 0.3), (200, 40, 0.2)])
    ]  # fmt: skip
    data, kwargs, kind = stage2_layer_data(_toy_result(tiles), FRAME)
    assert kind == "image" and kwargs["multiscale"] and kwargs["name"] == STAGE2_LAYER
    level0 = np.asarray(data[0])
    assert level0.shape == (64, 64)
    for t in tiles:
        r, c = t["region"][0] // 4, t["region"][1] // 4
        block = level0[r : r + 8, c : c + 8]
        assert np.array_equal(block, t["stage2_attention"])  # raw β, not α·β
        assert block.sum() == pytest.approx(1.0, abs=1e-6)
        # canvas cell centres are the tile's own cell centres in world
        np.testing.assert_allclose(
            data_to_world(kwargs, [r, c]), world([t["region"][0] + 2, t["region"][1] + 2])
        )
    assert np.isnan(level0).sum() == level0.size - 3 * 64  # NaN outside the tiles
    # coarser levels are 2×2 maxima, NaN where nothing was drawn
    level1 = np.asarray(data[1])
    quads = level0.reshape(32, 2, 32, 2).transpose(0, 2, 1, 3).reshape(32, 32, 4)
    expected = np.fmax.reduce(quads, axis=-1)  # NaN only where all four are NaN
    assert np.array_equal(level1, expected, equal_nan=True)


def test_stage2_overlaps_show_the_more_attended_tile_and_snap_at_most_half_a_cell(result):
    level, (dy, dx) = stage2_canvas_raw(result)
    dense = level.dense()
    best = result.tiles[0]  # most attended: it wins every overlap, so it is whole
    oy, ox = best["stage2_origin"]
    r0, c0 = int(np.floor(oy / dy + 0.5)), int(np.floor(ox / dx + 0.5))
    u, v = best["stage2_attention"].shape
    assert np.array_equal(dense[r0 : r0 + u, c0 : c0 + v], best["stage2_attention"])
    assert dense[r0 : r0 + u, c0 : c0 + v].sum() == pytest.approx(1.0, abs=1e-5)
    for t in result.tiles:  # every tile within half a stage-2 cell of its exact origin
        oy, ox = t["stage2_origin"]
        assert abs(np.floor(oy / dy + 0.5) * dy - oy) <= dy / 2
        assert abs(np.floor(ox / dx + 0.5) * dx - ox) <= dx / 2
    # the lazy level 0 equals the sparse map (NaN for "no tile here")
    data, _, _ = stage2_layer_data(result, FRAME)
    window = np.asarray(data[0][r0 - 40 : r0 + 40, c0 - 40 : c0 + 40])
    present = np.zeros(level.shape, bool)
    present[level.rows, level.cols] = True
    expected = np.where(present, dense, np.nan)[r0 - 40 : r0 + 40, c0 - 40 : c0 + 40]
    assert np.array_equal(window, expected, equal_nan=True)
    assert np.isnan(window).any() and not np.isnan(window).all()
    assert max(data[-1].shape) <= 256 and len(data) >= 2


def test_rectangles_are_level0_regions_on_the_slide(result):
    data, kwargs, kind = subtiles_layer_data(result, FRAME)
    assert kind == "shapes" and kwargs["name"] == SUBTILES_LAYER
    assert len(data) == len(result.subtiles)
    for rect, s in zip(data, result.subtiles, strict=True):
        top, left, h, w = s["region"]
        corners = data_to_world(kwargs, rect)
        # the corners are the pixel edges of the region: half a pixel before the
        # centre of level-0 pixel (top, left), which napari puts at translate + scale·index
        expected = world([[top, left], [top, left + w], [top + h, left + w], [top + h, left]])
        np.testing.assert_allclose(corners, expected, atol=1e-9)
        np.testing.assert_allclose(corners[0], np.asarray(FRAME[1]) + np.asarray(FRAME[0]) * (
            np.array([top, left]) - 0.5))  # fmt: skip
    assert np.array_equal(kwargs["features"]["weight"], [s["weight"] for s in result.subtiles])
    assert np.array_equal(kwargs["features"]["tile"], [s["tile"] for s in result.subtiles])
    assert kwargs["edge_color"] == "weight" and kwargs["face_color"] == "transparent"

    data, kwargs, _ = tiles_layer_data(result, FRAME)
    assert kwargs["name"] == TILES_LAYER and len(data) == len(result.tiles)
    assert np.array_equal(kwargs["features"]["count"], [t["count"] for t in result.tiles])
    assert np.array_equal(kwargs["features"]["alpha"], [t["alpha"] for t in result.tiles])
    top, left, h, w = result.tiles[0]["region"]
    np.testing.assert_allclose(data_to_world(kwargs, data[0][0]), world([top, left]))


def test_result_layer_data_names_and_order(result):
    layers = result_layer_data(result, FRAME)
    assert [kw["name"] for _, kw, _ in layers] == [
        "attention overview",
        "stage-1 attention",
        "stage-2 attention",
        "sampled tiles",
        "sampled sub-tiles",
        "attention places",
        "top places",
    ]
    assert all(kw["metadata"][RESULT_KEY] is result for _, kw, _ in layers)
    assert [kw["metadata"]["napari_zoomin_result_layer"] for _, kw, _ in layers] == [
        kw["name"] for _, kw, _ in layers
    ]
    assert result_layer_name("sampled tiles") == "sampled tiles"
    assert result_layer_name("sampled tiles", "slide-a") == "sampled tiles [slide-a]"


def test_markers_are_numbered_places_of_fixed_screen_size(result):
    from napari.layers import Points

    from napari_zoomin.engine.places import main_places, places
    from napari_zoomin.napari.result_layers import MARKER_SIZE

    found = places(result)[:10]
    data, kwargs, kind = markers_layer_data(result, FRAME)
    assert kind == "points" and len(data) == len(found) > 1
    top, left, h, w = found[0].box
    np.testing.assert_allclose(data_to_world(kwargs, data[0]), world([top + h / 2, left + w / 2]))
    assert list(kwargs["features"]["rank"]) == [p.rank for p in found]
    layer = Points(data, **kwargs)
    assert tuple(layer.canvas_size_limits) == (MARKER_SIZE, MARKER_SIZE)  # any zoom
    # the main places (MAIN_SHARE % of the evidence) numbered; the rest faint, unnumbered
    k = main_places(places(result))
    assert list(layer.text.values) == [str(p.rank) if p.rank <= k else "" for p in found]
    alpha = layer.face_color[:, 3]
    assert (alpha[:k] == 1.0).all() and (alpha[k:] < 0.5).all()


def test_main_places_hold_the_main_share_of_the_evidence(result):
    from napari_zoomin.engine.places import MAIN_SHARE, main_places, places

    found = places(result)
    k = main_places(found)
    shares = [p.share for p in found]
    assert 1 <= k <= len(found)
    assert sum(shares[:k]) >= MAIN_SHARE - 1e-6 or k == len(found)
    assert k == 1 or sum(shares[: k - 1]) < MAIN_SHARE  # the fewest that do
    assert main_places([]) == 0
    one = replace(found[0], share=95.0)
    assert main_places([one, *found[1:]]) == 1
    thin = [replace(p, share=100.0 / len(found)) for p in found]  # spread evidence: all
    assert main_places(thin) == math.ceil(len(found) * MAIN_SHARE / 100 - 1e-9)
    # the stage-2 map lets the tissue of the top place read through
    assert stage2_layer_data(result, FRAME)[1]["opacity"] <= 0.5


def test_summary_lines(result):
    lines = summary_lines(result)
    p = result.probabilities[result.label]
    sd = result.spread[result.label]
    assert lines[0] == f"Prediction: {result.label} (p = {p:.3f} ± {sd:.3f} over 16 draws)"
    for c in result.classes:
        assert f"{c} {result.probabilities[c]:.3f} ± {result.spread[c]:.3f}" in lines[1]
    assert f"{result.pixels_decoded / 1e6:.1f} Mpx" in lines[3]
    assert f"{result.pixels_needed / 1e6:.1f} Mpx needed" in lines[3]
    assert f"{len(result.subtiles)} sub-tiles" in lines[4]


def test_warning_lines_and_places_in_the_summary(result):
    warned = replace(
        result,
        warnings=["Pixel size unknown.", "Stain unlike training."],
        evidence={"subtiles": 7, "places": 2},
    )
    assert warning_lines(warned) == ["⚠ Pixel size unknown.", "⚠ Stain unlike training."]
    assert "sub-tiles in 2 places;" in summary_lines(warned)[4]
    one = replace(result, evidence={"subtiles": 3, "places": 1})
    assert "sub-tiles in 1 place;" in summary_lines(one)[4]
    none = replace(result, warnings=[], evidence={})
    assert warning_lines(none) == []
    assert " place" not in summary_lines(none)[4]


def test_places_rows_and_layer(result):
    from napari_zoomin.engine.places import places

    found = places(result)
    rows = place_rows(result, 20)
    assert len(rows) == min(20, len(found)) and len(found) < len(result.subtiles)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["share"] for r in rows] == [p.share for p in found[:20]]
    # each place's score: the weight-averaged score of its sub-tiles for the call
    for r, p in zip(rows, found, strict=False):
        subs = [result.subtiles[i] for i in p.subtiles]
        w = sum(s["weight"] for s in subs)
        want = sum(s["weight"] * s["scores"][result.label_index] for s in subs) / w
        assert r["score"] == pytest.approx(want) and 0 <= r["score"] <= 1
    mpp = result.slide["mpp"]
    top, left, h, w = found[0].box
    assert rows[0]["unit"] == "µm"
    assert (rows[0]["x"], rows[0]["y"]) == pytest.approx(
        ((left + w / 2) * mpp[1], (top + h / 2) * mpp[0])
    )
    assert (rows[0]["w"], rows[0]["h"]) == pytest.approx((w * mpp[1], h * mpp[0]))
    data, kwargs, kind = places_layer_data(result, FRAME)
    assert kind == "shapes" and kwargs["shape_type"] == "polygon"
    assert len(data) == len(found) == result.evidence["places"]
    np.testing.assert_array_equal(data[0], found[0].outline)
    assert list(kwargs["features"]["rank"]) == [p.rank for p in found]
    # level-0 outlines placed like the sub-tile rectangles
    sub = subtiles_layer_data(result, FRAME)[1]
    assert (kwargs["scale"], kwargs["translate"]) == (sub["scale"], sub["translate"])


def test_place_view_fills_the_canvas_but_not_past_full_resolution():
    # a 1200 x 800 px place: 600 world units tall at scale 0.5, fills 80 % of 600 px
    centre, zoom = place_view([1000, 2000, 1200, 800], FRAME, (600, 800), fill=0.8)
    np.testing.assert_allclose(centre, world([1600, 2400]))
    assert zoom == pytest.approx(0.8 * 600 / 600)
    # a one-sub-tile place is not blown up: at most one screen pixel per level-0 pixel
    _, zoom = place_view([1000, 2000, 32, 32], FRAME, (600, 800))
    assert zoom == pytest.approx(1 / 0.5)
    assert zoom * 0.5 <= 1 and zoom * 0.25 <= 1


def test_tissue_layer_round_trip(slide_path):
    with open_slide(slide_path) as slide:
        mask = detect_tissue(slide)
    data, kwargs, kind = tissue_layer_data(mask, FRAME, "positive")
    assert kind == "labels" and kwargs["name"] == "tissue mask"
    assert data.dtype == np.uint8 and np.array_equal(data != 0, mask.mask)
    dy = 8192 / mask.mask.shape[0]
    dx = 8192 / mask.mask.shape[1]
    np.testing.assert_allclose(kwargs["scale"], (0.5 * dy, 0.25 * dx))
    # mask pixel (i, j) covers level-0 [i·dy, (i+1)·dy): its centre in world
    np.testing.assert_allclose(data_to_world(kwargs, [5, 9]), world([5.5 * dy, 9.5 * dx]))
    assert kwargs["metadata"]["napari_zoomin_tissue"]["level0_shape"] == [8192, 8192]

    edited = data.copy()
    edited[:10] = 0
    back = tissue_mask_from_labels(edited, (8192, 8192))
    assert isinstance(back, TissueMask) and back.source == TISSUE_SOURCE
    assert back.level0_shape == (8192, 8192)
    assert np.array_equal(back.mask, edited != 0)


def test_the_overview_is_alpha_blurred_on_the_tissue_for_display_only(result):
    """Blurred by a gaussian of 1/300 of the slide's long side, NaN off the tissue, its
    top colour at the 99th percentile; the stored alpha is untouched."""
    from scipy.ndimage import gaussian_filter

    from napari_zoomin.napari.result_layers import (
        OVERVIEW_SHOWN_BELOW_PX,
        overview_layer_data,
        stage1_layer_data,
    )
    from napari_zoomin.napari.zoom_follow import SHOWN_BELOW_KEY

    alpha = np.array(result.stage1_attention, copy=True)
    data, kwargs, kind = overview_layer_data(result, FRAME)
    assert kind == "image" and kwargs["name"] == "attention overview"
    tissue = alpha > 0
    assert np.isnan(data[~tissue]).all() and np.isfinite(data[tissue]).all()
    sigma = max(result.slide["shape"]) / 300
    (dy, dx) = result.stage1_cell_size
    expected = gaussian_filter(alpha.astype(np.float64), (sigma / dy, sigma / dx), mode="constant")
    np.testing.assert_allclose(data[tissue], expected[tissue], rtol=1e-5)
    assert kwargs["contrast_limits"] == (0.0, pytest.approx(np.percentile(expected[tissue], 99)))
    assert kwargs["metadata"][SHOWN_BELOW_KEY] == OVERVIEW_SHOWN_BELOW_PX
    # same placement as the raw map, whose values stay alpha
    raw, raw_kwargs, _ = stage1_layer_data(result, FRAME)
    assert (kwargs["scale"], kwargs["translate"]) == (raw_kwargs["scale"], raw_kwargs["translate"])
    np.testing.assert_array_equal(np.nan_to_num(raw), alpha)
    np.testing.assert_array_equal(result.stage1_attention, alpha)
