"""classify(): a real sample slide, a real (untrained) Zoom-In checkpoint, real output files."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import tifffile
import torch

from fixtures_data import rewrite_description
from napari_zoomin.annotations import read_annotations
from napari_zoomin.engine import inference, runtime
from napari_zoomin.engine.checkpoints import (
    build_model,
    load_model,
    read_checkpoint_info,
    save_checkpoint,
)
from napari_zoomin.engine.inference import Cancelled, classify, needed_file_tiles
from napari_zoomin.engine.places import link_of, places
from napari_zoomin.engine.results import Result, export_precision, stage2_canvas, write_outputs
from napari_zoomin.engine.tissue import TissueMask
from napari_zoomin.errors import AnnotationError, ClassificationError
from napari_zoomin.samples import write_sample_slide
from napari_zoomin.slide import open_slide

SIZE = 8192  # levels at downsamples 1, 2, 4, 8 with 512-px file tiles
TILE, SUBTILE = (128, 128), (32, 32)
#: s1 = 1/16 reads level 3 (downsample 8), s2 = 1/4 (of the tile) reads level 2
CONFIG = {
    "view_scale": 1 / 16,
    "stage2_scale": 1 / 4,
    "tile_size": list(TILE),
    "subtile_size": list(SUBTILE),
    "n_samples": 8,
    "feature_dim": 32,
    "feature_hidden": 32,
}
DRAWS = 8


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, cmu_svs):
    folder = tmp_path_factory.mktemp("slides")
    return write_sample_slide(folder, SIZE, "positive", seed=0, cmu_path=cmu_svs).path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("zoomin", CONFIG)
    with torch.no_grad():  # a non-uniform attention, so sampling has something to follow
        for net in (model.attention, model.stage2_attention):
            net.logit.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("models") / "zoomin.safetensors"
    return save_checkpoint(path, model, ["negative", "positive"])


@pytest.fixture
def ckpt(model_path):
    return load_model(model_path)


@pytest.fixture
def slide(slide_path):
    with open_slide(slide_path) as s:
        yield s


@pytest.fixture(scope="module")
def result(slide_path, model_path):
    with open_slide(slide_path) as s:
        return classify(s, load_model(model_path), draws=DRAWS, seed=0, device="cpu")


def test_result_fields(result, model_path, slide_path):
    r = result
    assert r.classes == ["negative", "positive"]
    assert r.label in r.classes and r.label == r.classes[r.label_index]
    assert math.isclose(sum(r.probabilities.values()), 1.0, abs_tol=1e-6)
    assert r.probabilities[r.label] == max(r.probabilities.values())
    assert set(r.spread) == set(r.classes) and all(v >= 0 for v in r.spread.values())
    assert (r.draws, r.mode, r.seed, r.device) == (DRAWS, "sample", 0, "cpu")
    assert r.model_sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert r.model_kind == "zoomin"
    assert r.slide["shape"] == [SIZE, SIZE] and r.slide["path"] == str(slide_path)
    assert r.slide["mpp"] == [pytest.approx(0.499)] * 2
    assert {"napari_zoomin", "torch", "python", "tifffile"} <= set(r.versions)
    assert r.tissue["source"] == "otsu" and 0 < r.tissue["fraction"] < 1
    assert r.seconds > 0 and r.timings["total"] == r.seconds
    # stage 1: a distribution over the cells of the 512 x 512 view ('same' padding)
    a = r.stage1_attention
    assert a.dtype == np.float32 and a.shape == (SIZE // 16, SIZE // 16)
    assert math.isclose(float(a.sum(dtype=np.float64)), 1.0, rel_tol=1e-4)
    # tiles most attended first, sub-tiles most support for the call first
    alphas = [t["alpha"] for t in r.tiles]
    assert alphas == sorted(alphas, reverse=True)
    support = [s["weight"] * s["scores"][r.label_index] for s in r.subtiles]
    assert support == sorted(support, reverse=True)
    assert sum(t["count"] for t in r.tiles) == DRAWS * CONFIG["n_samples"]
    for t in r.tiles:
        assert t["alpha"] == pytest.approx(float(a.reshape(-1)[t["cell"]]), rel=1e-6)
        beta = t["stage2_attention"]
        assert beta.shape == (32, 32)  # a 128-px tile at s2 = 1/4
        assert math.isclose(float(beta.sum(dtype=np.float64)), 1.0, rel_tol=1e-4)
    for s in r.subtiles:  # weight = α_c · β^c_c'
        t = r.tiles[s["tile"]]
        expected = t["alpha"] * float(t["stage2_attention"].reshape(-1)[s["cell"]])
        assert s["weight"] == pytest.approx(expected, rel=1e-5)


def test_summary_line(result):
    line = result.summary()
    pattern = (
        r"^sample-positive-8192-seed0\.tif: (positive|negative) \(p=\d\.\d\d ± \d\.\d\d over "
        r"8 draws, \d+ places?\) in \d+\.\d s, decoded \d+\.\d Mpx "
        r"\(\d+\.\dx the \d+\.\d Mpx needed\)$"
    )
    assert re.match(pattern, line), line


def test_json_round_trip(result):
    text = result.to_json()
    doc = json.loads(text)
    for key in (
        "label",
        "probabilities",
        "subtiles",
        "pixels_decoded",
        "pixels_needed",
        "pixels_read",
        "seconds",
        "model_sha256",
        "versions",
        "definitions",
    ):
        assert key in doc
    assert "NaN" not in text and "Infinity" not in text
    back = Result.from_json(text)
    assert back.to_json() == text
    assert np.array_equal(back.stage1_attention, result.stage1_attention)
    assert back.stage1_attention.dtype == np.float32
    for t0, t1 in zip(result.tiles, back.tiles, strict=True):
        assert np.array_equal(t0["stage2_attention"], t1["stage2_attention"])
        assert t1["region"] == t0["region"]
    assert back.subtiles == result.subtiles


def test_deterministic_given_seed(slide, ckpt, result):
    again = classify(slide, ckpt, draws=DRAWS, seed=0, device="cpu")
    assert again.probabilities == result.probabilities
    assert again.subtiles == result.subtiles
    assert [t["region"] for t in again.tiles] == [t["region"] for t in result.tiles]
    assert again.pixels_needed == result.pixels_needed
    other = classify(slide, ckpt, draws=DRAWS, seed=1, device="cpu")
    assert other.subtiles != result.subtiles


def test_threads_are_recorded_and_reproduce_the_result(slide, ckpt, result):
    """``threads`` runs the model in that many torch threads, says so in the result,
    and gives the same result again; torch's own setting is restored."""
    before = torch.get_num_threads()
    one = classify(slide, ckpt, draws=DRAWS, seed=0, device="cpu", threads=1)
    again = classify(slide, ckpt, draws=DRAWS, seed=0, device="cpu", threads=one.threads)
    assert one.threads == again.threads == 1 and torch.get_num_threads() == before
    assert again.probabilities == one.probabilities and again.subtiles == one.subtiles
    assert result.threads == before  # threads=None: torch's setting, recorded
    back = Result.from_json(one.to_json())
    assert back.threads == 1
    older = {k: v for k, v in json.loads(result.to_json()).items() if k != "threads"}
    assert Result.from_dict(older).threads is None  # results of earlier versions


def test_warm_up_changes_nothing_but_the_first_slides_time(slide, ckpt, result):
    """The widget warms a model it loads (a small synthetic slide classified once):
    the next result is the same to the last digit, torch's threads and global random
    state untouched, the slide's cache and counter its own."""
    before = torch.get_num_threads()
    rng = torch.get_rng_state()
    seconds = inference.warm_up(ckpt)
    assert seconds is not None and seconds > 0
    assert torch.get_num_threads() == before and torch.equal(torch.get_rng_state(), rng)
    again = classify(slide, ckpt, draws=DRAWS, seed=0, device="cpu")
    assert again.probabilities == result.probabilities and again.subtiles == result.subtiles
    assert again.pixels_decoded == result.pixels_decoded


def test_auto_threads_are_chosen_once_tissue_is_found(slide, ckpt, monkeypatch):
    """``threads="auto"`` measures the load while tissue is detected (no sleep of its
    own) and sets the model's threads after; a bad request fails before any work."""
    seen = []
    real = inference.choose_threads

    def choose(requested, ceiling=None, load=None):
        seen.append((requested, load, slide.decoded_tiles))
        return real(requested, ceiling, load)

    monkeypatch.setattr(inference, "choose_threads", choose)
    r = classify(slide, ckpt, draws=2, seed=0, device="cpu", threads="auto")
    ((requested, load, decoded),) = seen
    assert requested == "auto" and isinstance(load, runtime.CpuLoad)
    assert decoded  # tissue had been read when the threads were chosen
    assert 1 <= r.threads <= torch.get_num_threads()
    with pytest.raises(ValueError, match="threads must be 'auto' or a whole number"):
        classify(slide, ckpt, draws=2, threads="many", progress=lambda *a: seen.append(a))
    assert len(seen) == 1  # refused before the first step


def test_regions_inside_tiles_and_slide(result):
    th, tw = TILE
    for t in result.tiles:
        top, left, h, w = t["region"]
        assert (h, w) == TILE
        assert 0 <= top + th // 2 < SIZE and 0 <= left + tw // 2 < SIZE  # centre on the slide
    for s in result.subtiles:
        top, left, h, w = s["region"]
        assert (h, w) == SUBTILE
        cy, cx = top + h // 2, left + w // 2
        assert 0 <= cy < SIZE and 0 <= cx < SIZE
        ttop, tleft, _, _ = result.tiles[s["tile"]]["region"]
        assert ttop <= cy < ttop + th and tleft <= cx < tleft + tw  # centred inside its tile


def test_placement_matches_what_the_model_read(result):
    """Cell squares from the placement are centred where the model cut its regions."""
    (oy, ox), (dy, dx) = result.stage1_origin, result.stage1_cell_size
    h_a, w_a = result.stage1_attention.shape
    # the map's extent is the slide's, up to one cell
    assert abs(oy) <= dy and abs(oy + h_a * dy - SIZE) <= dy
    assert abs(ox) <= dx and abs(ox + w_a * dx - SIZE) <= dx
    for t in result.tiles:
        i, j = divmod(t["cell"], w_a)
        top, left, h, w = t["region"]
        # the cell's centre pixel is the tile's centre (top + h // 2)
        assert abs(oy + (i + 0.5) * dy - 0.5 - (top + h // 2)) <= 0.5
        assert abs(ox + (j + 0.5) * dx - 0.5 - (left + w // 2)) <= 0.5
    for s in result.subtiles:
        t = result.tiles[s["tile"]]
        (ty, tx), (cy, cx) = t["stage2_origin"], t["stage2_cell_size"]
        i, j = divmod(s["cell"], t["stage2_attention"].shape[1])
        top, left, h, w = s["region"]
        assert abs(ty + (i + 0.5) * cy - 0.5 - (top + h // 2)) <= 0.5
        assert abs(tx + (j + 0.5) * cx - 0.5 - (left + w // 2)) <= 0.5


def test_reads_come_from_the_right_levels(result, slide):
    """View from level 3, stage-2 views from level 2, level 0 only for the sub-tiles."""
    assert slide.best_level(16) == 3 and slide.best_level(4) == 2
    assert result.decode["read_levels"] == {"view": 3, "stage2": 2, "subtiles": 0}
    decoded_tiles = {int(k): v for k, v in result.decode["decoded_tiles_by_level"].items()}
    assert set(decoded_tiles) == {0, 2, 3}  # level 1 never decoded
    sub_regions = [s["region"] for s in result.subtiles]
    assert decoded_tiles[0] <= len(needed_file_tiles(slide, 0, sub_regions))
    tile_regions = [t["region"] for t in result.tiles]
    assert decoded_tiles[2] <= len(needed_file_tiles(slide, 2, tile_regions))
    assert decoded_tiles[3] == 4  # the whole 1024² level: view and tissue detection
    # view, stage-2 views and sub-tiles are on three levels here: no file tile is shared
    assert result.pixels_needed == sum(result.decode["needed_pixels_by_part"].values())
    assert result.pixels_decoded == sum(result.decode["decoded_pixels_by_level"].values())
    assert 0 < result.pixels_read < result.pixels_needed <= result.pixels_decoded
    # a whole 8192² slide would be 67 Mpx at level 0
    assert result.pixels_decoded < SIZE * SIZE / 2
    print(
        f"\ndecoded {result.pixels_decoded:,} needed {result.pixels_needed:,} "
        f"read {result.pixels_read:,} ratio {result.decode_ratio:.2f} "
        f"seconds {result.seconds:.2f} {result.timings}"
    )


def test_outputs_written_and_readable(result, tmp_path):
    files = write_outputs(result, tmp_path / "out")
    assert set(files) == {
        "stage1_attention",
        "stage2_attention",
        "geojson",
        "places",
        "maps",
        "json",
    }
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left
    back = Result.load(files["json"])
    # everything round-trips, the maps at export precision (test_export_precision.py)
    stage1 = export_precision(result.stage1_attention)[0]
    tiles = [
        {**t, "stage2_attention": export_precision(t["stage2_attention"])[0]}
        if "stage2_attention" in t
        else t
        for t in result.tiles
    ]
    assert back.to_json() == replace(result, stage1_attention=stage1, tiles=tiles).to_json()
    mpp = 0.499
    with tifffile.TiffFile(files["stage1_attention"]) as tif:
        levels = tif.series[0].levels
        assert len(levels) >= 2  # pyramidal
        assert np.array_equal(levels[0].asarray(), stage1)
        page = tif.pages[0]
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        cell_um = result.stage1_cell_size[1] * mpp
        assert page.resolution[0] == pytest.approx(1e4 / cell_um, rel=1e-6)
        assert tif.is_ome and f'PhysicalSizeX="{cell_um!r}"' in tif.ome_metadata
        # reduced levels are 2x2 maxima
        a = stage1
        assert np.array_equal(levels[1].asarray(), a.reshape(256, 2, 256, 2).max(axis=(1, 3)))
    canvas, cell = stage2_canvas(result)
    with tifffile.TiffFile(files["stage2_attention"]) as tif:
        s2 = tif.series[0].levels[0].asarray()
        assert np.array_equal(s2, export_precision(canvas.dense())[0])
        assert tif.pages[0].resolution[1] == pytest.approx(1e4 / (cell[0] * mpp), rel=1e-6)
    # the canvas holds every tile's α_c·β^c (no tile reaches past the slide here), less
    # the thin tail export precision drops (at most 0.5 %, as result.json says)
    dropped = json.loads(files["json"].read_text())["exported_maps"]["stage2_dropped_mass"]
    assert 0 <= dropped <= 0.005
    assert float(s2.sum(dtype=np.float64)) == pytest.approx(
        (1 - dropped) * sum(t["alpha"] for t in result.tiles), rel=1e-3
    )
    doc = json.loads(files["geojson"].read_text())
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    tiles = [f for f in feats if f["properties"]["classification"]["name"] == "Sampled tile"]
    subs = [f for f in feats if f["properties"]["classification"]["name"] == "Sampled sub-tile"]
    assert len(tiles) == len(result.tiles) and len(subs) == len(result.subtiles)
    for f, s in zip(subs, result.subtiles, strict=True):
        top, left, h, w = s["region"]
        ring = f["geometry"]["coordinates"][0]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert (min(xs), min(ys), max(xs), max(ys)) == (left, top, left + w, top + h)
        assert f["properties"]["weight"] == s["weight"] and f["properties"]["tile"] == s["tile"]
    assert tiles[0]["properties"]["count"] == result.tiles[0]["count"]


def test_places_group_the_subtiles_by_the_evidence_rule(result):
    found = places(result)
    assert result.evidence["link"] == 128.0  # the model's tile side, read at 1:1
    assert link_of(result) == result.evidence["link"]
    assert 1 <= len(found) < len(result.subtiles)
    assert len(found) == result.evidence["places"]
    shares = [p.share for p in found]
    assert sum(shares) == pytest.approx(100.0, abs=1e-6)
    assert shares == sorted(shares, reverse=True)
    assert [p.rank for p in found] == list(range(1, len(found) + 1))
    # every sub-tile is in exactly one place
    assert sorted(i for p in found for i in p.subtiles) == list(range(len(result.subtiles)))
    label = result.label_index
    support = [s["weight"] * s["scores"][label] for s in result.subtiles]
    total = sum(support)
    # sub-tiles come most support for the call first, each with its own class scores
    assert support == sorted(support, reverse=True)
    assert all(len(s["scores"]) == len(result.classes) for s in result.subtiles)
    mpp = result.slide["mpp"]
    for p in found:
        top, left, h, w = p.box
        regions = np.array([result.subtiles[i]["region"] for i in p.subtiles], float)
        assert (regions[:, 0] >= top).all() and (regions[:, 1] >= left).all()
        assert (regions[:, 0] + regions[:, 2] <= top + h).all()
        assert (regions[:, 1] + regions[:, 3] <= left + w).all()
        # the box is tight: each side touches a sub-tile
        assert regions[:, 0].min() == top and (regions[:, 1] + regions[:, 3]).max() == left + w
        assert p.share == pytest.approx(100 * sum(support[i] for i in p.subtiles) / total)
        assert p.weight == pytest.approx(sum(result.subtiles[i]["weight"] for i in p.subtiles))
        assert p.unit == "µm"
        assert p.centre == pytest.approx(((top + h / 2) * mpp[0], (left + w / 2) * mpp[1]))
        assert p.size == pytest.approx((h * mpp[0], w * mpp[1]))
        # the outline is inside the box and holds every sub-tile corner
        ys, xs = p.outline[:, 0], p.outline[:, 1]
        assert ys.min() == top and xs.min() == left
        assert ys.max() == top + h and xs.max() == left + w
    # without a pixel size the place is in level-0 pixels, and says so
    (first, *_) = places(replace(result, slide={**result.slide, "mpp": None}))
    top, left, h, w = first.box
    assert first.unit == "px" and first.size == (h, w)
    assert first.centre == (top + h / 2, left + w / 2)
    # results saved before the link was recorded group the same way
    older = replace(result, evidence={k: v for k, v in result.evidence.items() if k != "link"})
    assert [p.subtiles for p in places(older)] == [p.subtiles for p in found]


def test_places_rank_by_what_the_classifier_saw_not_only_by_attention(result):
    """A place that drew attention but whose sub-tiles the classifier scores against
    the call ranks below one that made the call; results without scores (MagNets,
    older files) rank by attention."""
    label = result.label_index
    subs = [dict(s) for s in result.subtiles]
    found = places(result)
    assert len(found) >= 2
    first, second = found[0], found[1]
    # make the first place's sub-tiles say the other class, the second's say the call
    for i in first.subtiles:
        subs[i]["scores"] = [float(k != label) for k in range(len(result.classes))]
    for i in second.subtiles:
        subs[i]["scores"] = [float(k == label) for k in range(len(result.classes))]
    swapped = places(replace(result, subtiles=subs))
    assert swapped[0].subtiles == second.subtiles
    assert swapped[0].share > swapped[-1].share
    # no scores at all: the share is the attention weight's
    plain = [{k: v for k, v in s.items() if k != "scores"} for s in result.subtiles]
    total = sum(s["weight"] for s in plain)
    for p in places(replace(result, subtiles=plain)):
        assert p.share == pytest.approx(100 * sum(plain[i]["weight"] for i in p.subtiles) / total)


def test_places_geojson_round_trips(result, tmp_path):
    files = write_outputs(result, tmp_path / "out")
    assert files["places"].name == "places.geojson"
    found = places(result)
    back = read_annotations(files["places"])
    assert len(back) == len(found) and {a.label for a in back} == {"Attention place"}
    for a, p in zip(back, found, strict=True):
        np.testing.assert_array_equal(a.rows_cols(), p.outline)
    feats = json.loads(files["places"].read_text())["features"]
    measured = [f["properties"]["measurements"] for f in feats]
    assert [m["rank"] for m in measured] == [p.rank for p in found]
    assert [m["subtiles"] for m in measured] == [p.n_subtiles for p in found]
    assert sum(m["share"] for m in measured) == pytest.approx(100.0, abs=1e-4)


def test_large_maps_go_to_an_npz(result, tmp_path, monkeypatch):
    import napari_zoomin.engine.results as results

    monkeypatch.setattr(results, "JSON_MAX_CELLS", 1000)
    files = write_outputs(result, tmp_path / "out")
    assert files["maps"].name == "attention_maps.npz"
    doc = json.loads(files["json"].read_text())
    # the stage-1 map is stored once, as level 0 of its OME-TIFF
    assert doc["stage1_attention"] == {"file": "stage1_attention.ome.tif", "level": 0}
    with np.load(files["maps"]) as z:
        assert "stage1" not in z.files
    back = Result.load(files["json"])
    # the files hold the maps at export precision, and say what was dropped
    stage1, dropped = results.export_precision(result.stage1_attention)
    assert np.array_equal(back.stage1_attention, stage1)
    assert doc["exported_maps"]["stage1_dropped_mass"] == pytest.approx(dropped)
    assert np.array_equal(tifffile.imread(files["stage1_attention"]), stage1)
    for t0, t1 in zip(result.tiles, back.tiles, strict=True):
        assert np.array_equal(
            results.export_precision(t0["stage2_attention"])[0], t1["stage2_attention"]
        )


def test_progress_and_paths(slide_path, model_path):
    seen = []
    r = classify(
        slide_path,
        model_path,
        draws=2,
        seed=3,
        device="cpu",
        progress=lambda f, m: seen.append((f, m)),
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    messages = " | ".join(m for _, m in seen)
    for word in ("tissue", "Stage 1", "Stage 2", "sub-tiles"):
        assert word in messages
    assert seen[-1][1] == r.summary()
    assert r.model_path == str(model_path)


def test_topk_and_no_tissue_mask(slide, ckpt):
    r = classify(slide, ckpt, mode="topk", tissue=None, device="cpu")
    assert r.mode == "topk" and r.draws == 1 and r.tissue["source"] is None
    assert all(v == 0 for v in r.spread.values())
    assert "top-k" in r.summary()
    assert classify(slide, ckpt, mode="topk", tissue=None).subtiles == r.subtiles


def test_one_stage_model(slide, tmp_path):
    model = build_model(
        "ats",
        {
            "view_scale": 1 / 16,
            "subtile_size": [32, 32],
            "n_samples": 4,
            "feature_dim": 16,
            "feature_hidden": 16,
        },
    )
    ckpt = load_model(save_checkpoint(tmp_path / "ats.safetensors", model, ["neg", "pos"]))
    r = classify(slide, ckpt, draws=2, device="cpu")
    assert "stage2" not in r.decode["read_levels"]
    assert all("stage2_attention" not in t for t in r.tiles)
    files = write_outputs(r, tmp_path / "ats")
    assert "stage2_attention" not in files
    stage1 = export_precision(r.stage1_attention)[0]
    assert Result.load(files["json"]).to_json() == replace(r, stage1_attention=stage1).to_json()


def test_older_one_stage_checkpoints_load(slide, tmp_path):
    """ATS, Uniform and REINFORCE-ATS checkpoints written while the sub-tile had two
    names say ``patch_size`` in their model config: they load in today's names."""
    settings = {"num_classes": 2, "view_scale": 1 / 16, "subtile_size": [32, 32]}
    settings.update(n_samples=4, feature_dim=16, feature_hidden=16)
    for kind in ("ats", "uniform", "reinforce-ats"):
        model = build_model(kind, settings)
        path = save_checkpoint(tmp_path / f"{kind}.safetensors", model, ["a", "b"])
        today = load_model(path)

        def older(document):
            document["config"]["patch_size"] = document["config"].pop("subtile_size")

        rewrite_description(path, older)
        old = load_model(path)
        assert "patch_size" in read_checkpoint_info(path)["config"]
        assert old.kind == kind and old.model.subtile_size == (32, 32)
        assert old.config == today.config and "patch_size" not in old.config
        for name, value in today.model.state_dict().items():
            torch.testing.assert_close(old.model.state_dict()[name], value)
    r = classify(slide, old, mode="topk", tissue=None, device="cpu")
    assert r.subtiles == classify(slide, today, mode="topk", tissue=None, device="cpu").subtiles
    assert r.model_config["subtile_size"] == [32, 32] and "patch_size" not in r.model_config


def test_user_mask(slide, ckpt, tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[8:24, 8:24] = 1  # level-0 rows/cols 1024..3072
    np.save(tmp_path / "mask.npy", mask)
    r = classify(slide, ckpt, draws=2, tissue=tmp_path / "mask.npy")
    assert r.tissue["source"] == str(tmp_path / "mask.npy")
    for t in r.tiles:  # every drawn tile is centred in (or a cell beside) the mask
        top, left, h, w = t["region"]
        assert 1024 - 128 <= top + h // 2 < 3072 + 128
        assert 1024 - 128 <= left + w // 2 < 3072 + 128


# ----------------------------------------------------------------------------- errors


def test_image_smaller_than_a_tile_runs_with_a_warning(ckpt, cmu_pixels):
    """Thinner than a tile: classified, tiles centred on it, every sub-tile inside it."""
    small = open_slide(np.ascontiguousarray(cmu_pixels[2000:2100, 600:900]))
    r = classify(small, ckpt, tissue=None, draws=4)
    assert any("smaller than one 128 x 128 tile" in w for w in r.warnings), r.warnings
    assert r.subtiles
    for s in r.subtiles:
        top, left, h, w = s["region"]
        assert top >= 0 and top + h <= 100 and left >= 0 and left + w <= 300
    for t in r.tiles:  # centred on the 100-px axis, inside along the other
        top, left, h, w = t["region"]
        assert top == (100 - h) // 2 and left >= 0 and left + w <= 300


def test_image_smaller_than_a_subtile(ckpt):
    ph, pw = ckpt.model.subtile_size
    small = open_slide(np.full((ph - 1, 300, 3), 200, np.uint8))
    with pytest.raises(
        ClassificationError, match=rf"{ph - 1} x 300 pixels, smaller than one {ph} x {pw} sub-tile"
    ):
        classify(small, ckpt, tissue=None)


def test_mask_of_the_wrong_size(slide, ckpt, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((50, 200), 255, np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(AnnotationError, match=r"50 x 200 pixels but the slide is 8192 x 8192"):
        classify(slide, ckpt, tissue=tmp_path / "mask.png")
    other = TissueMask(np.ones((8, 8), bool), (4096, 4096), "other.png")
    with pytest.raises(AnnotationError, match="4096 x 4096 slide"):
        classify(slide, ckpt, tissue=other)


def test_no_tissue(slide, ckpt, tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((32, 32), np.uint8))
    with pytest.raises(ClassificationError, match=r"no tissue.*tissue=None"):
        classify(slide, ckpt, tissue=tmp_path / "empty.npy")


@pytest.mark.parametrize("kind", ["glass", "black"])
def test_no_tissue_detected_looks_everywhere_with_a_warning(ckpt, cmu_pixels, kind):
    """Detection finds nothing: no error, no mask, and a warning that the result means little."""
    glass = np.tile(cmu_pixels[2500:2756, :256], (8, 8, 1))  # real glass, 2048 x 2048
    image = glass if kind == "glass" else np.zeros_like(glass)
    r = classify(open_slide(image), ckpt, draws=1, seed=0, device="cpu")
    assert r.tissue == {"source": "otsu", "fraction": 0.0, "od_mean": None}
    (warning,) = [w for w in r.warnings if w.startswith("No tissue was found")]
    assert "looked everywhere" in warning and "unlikely to mean anything" in warning


def test_very_little_tissue_and_the_slides_mpp_warning_are_result_warnings(
    ckpt, cmu_pixels, tmp_path
):
    image = np.tile(cmu_pixels[2500:2756, :256], (8, 8, 1))
    image[900:1050, 900:1050] = cmu_pixels[2000:2150, 1000:1150]  # 150 x 150 of tissue
    path = tmp_path / "little.tif"
    # 10 pixels per cm: the file says 1000 µm per pixel, which is not used
    tifffile.imwrite(
        path,
        image,
        tile=(256, 256),
        photometric="rgb",
        resolution=(10, 10),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as s:
        assert s.mpp is None
        r = classify(s, ckpt, draws=1, seed=0, device="cpu")
    assert r.tissue["source"] == "otsu" and 0.003 < r.tissue["fraction"] < 0.01
    (little,) = [w for w in r.warnings if w.startswith("Very little tissue found")]
    assert f"({100 * r.tissue['fraction']:.2g} % of the slide)" in little
    assert any("says 1000 µm per pixel" in w for w in r.warnings)


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 81920000000 bytes"
        ),
        MemoryError(),
    ],
)
def test_out_of_memory(slide, ckpt, monkeypatch, exc):
    def predict(*args, **kwargs):
        raise exc

    monkeypatch.setattr(ckpt.model, "predict", predict)
    with pytest.raises(ClassificationError) as info:
        classify(slide, ckpt, draws=4, device="cpu")
    message = str(info.value)
    assert "ran out of memory on cpu" in message
    assert "fewer draws (--draws, now 4)" in message and "n_samples, now 8" in message
    assert "128 x 128" in message


def test_other_errors_pass_through(slide, ckpt, monkeypatch):
    def predict(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ckpt.model, "predict", predict)
    with pytest.raises(RuntimeError, match="a bug"):
        classify(slide, ckpt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable(slide, ckpt):
    with pytest.raises(ClassificationError, match="cannot use device 'cuda'"):
        classify(slide, ckpt, device="cuda")


def test_cancel(slide, ckpt):
    seen = []

    def cancel():  # cancel once stage 1 has started
        return any(m.startswith("Stage 1") for _, m in seen)

    ckpt.model.train()
    with pytest.raises(Cancelled):
        classify(slide, ckpt, progress=lambda f, m: seen.append((f, m)), cancel=cancel)
    assert not any("sub-tiles" in m for _, m in seen)
    with pytest.raises(Cancelled):
        classify(slide, ckpt, cancel=lambda: True)
    assert ckpt.model.training is False  # classify put it in eval mode; predict restored that


@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_real_cmu_slide_with_the_demo_model_stays_inside_and_says_why_to_doubt(cmu_svs, mode):
    """The issue-16 screen: on real skin whose tissue touches the bottom edge the demo
    model read 404 of 499 sub-tiles below the slide, in the zero padding."""
    r = classify(cmu_svs, "demo", draws=16, seed=0, mode=mode)
    h, w = r.slide["shape"]
    assert (h, w) == (2967, 2220)
    assert r.subtiles and r.tiles
    for part in (*r.tiles, *r.subtiles):
        top, left, rh, rw = part["region"]
        assert top >= 0 and left >= 0 and top + rh <= h and left + rw <= w, part["region"]
    # the stage-1 attention is no longer piled on the bottom edge: the band of cells
    # centred in the last 64 level-0 px (2 % of the height; one or two rows of cells,
    # by the model's stride) holds little of it, and the most attended cell is inside
    alpha = np.asarray(r.stage1_attention, dtype=np.float64)
    centres = r.stage1_origin[0] + (np.arange(alpha.shape[0]) + 0.5) * r.stage1_cell_size[0]
    band = centres >= h - 64
    assert float(alpha[band].sum()) < 0.1
    assert not band[np.unravel_index(alpha.argmax(), alpha.shape)[0]]
    # honest about the model and the evidence
    assert any("synthetic sample slides only" in x and "not for diagnosis" in x for x in r.warnings)
    assert r.evidence["subtiles"] == len(r.subtiles) and r.evidence["places"] >= 1
    assert r.resolution == {
        "slide_mpp": [0.499, 0.499],
        "model_mpp": 0.499,
        "factor": [1.0, 1.0],
        "units": "µm",
    }
    assert not any("stain colour" in x for x in r.warnings)  # H&E like its training tissue
