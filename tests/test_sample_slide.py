"""Sample slides: real pixels, exact pyramid, planted tumor/distractor regions, GeoJSON.

The module's slides are built with the default recipe (2: quilted fragments) and again
with recipe 1 (mirror-tiled, kept selectable; marked slow): every structural test runs
on both, and the tests of what recipe 2 adds (no mirror lines, no repeated tile) show
recipe 1 failing them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from scipy.ndimage import binary_dilation, binary_erosion
from skimage.draw import polygon as fill_polygon

from fixtures_data import block_sums, fetch_cmu_into, session_cache_root
from napari_zoomin.geometry import mean_2x2
from napari_zoomin.samples import synthetic
from napari_zoomin.samples.synthetic import (
    GLASS_RGB,
    MAX_PLANTED_FRACTION,
    region_counts,
    sample_slide_path,
    scramble_blocks,
    write_sample_slide,
)

SIZE = 8192
TILE = 256
SEED = 11
N_LEVELS = 6  # down to 256 px, so the 1/16 view (level 4) is stored
STRIP = 1024


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = session_cache_root(tmp_path_factory)
    fetch_cmu_into(root)
    return root


@pytest.fixture(scope="module", params=[2, pytest.param(1, marks=pytest.mark.slow)])
def slides(request, cache_root, tmp_path_factory):
    """The same tissue and regions as positive, negative and region-free slides."""
    out = tmp_path_factory.mktemp(f"samples-recipe{request.param}")
    common = {
        "size": SIZE,
        "seed": SEED,
        "tile": TILE,
        "n_levels": N_LEVELS,
        "recipe": request.param,
    }
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_ZOOMIN_CACHE", str(cache_root))
        for name, label, compression, counts in [
            ("pos", "positive", "zlib", {}),
            ("neg", "negative", "zlib", {}),
            ("plain", "positive", "zlib", {"n_tumor": 0, "n_distractors": 0}),
            ("pos_jpeg", "positive", "jpeg", {}),
            ("neg_jpeg", "negative", "jpeg", {}),
        ]:
            made[name] = write_sample_slide(
                out / f"{name}.tif", label=label, compression=compression, **counts, **common
            )
    return made


def _levels(info):
    tif = tifffile.TiffFile(info.path)
    return zarr.open(tif.aszarr(), mode="r")


def _polygon_mask(region, pad: int = 0) -> np.ndarray:
    """Pixels of the region's box (plus ``pad``) whose centres lie in its polygon."""
    pts = np.array(region.polygon)
    n = region.box + 2 * pad
    rows = pts[:, 1] - 0.5 - (region.y - pad)
    cols = pts[:, 0] - 0.5 - (region.x - pad)
    mask = np.zeros((n, n), bool)
    mask[fill_polygon(rows, cols, (n, n))] = True
    return mask


def _diff_mask(a, b) -> np.ndarray:
    """Where two level-0 images differ (any channel), read in strips."""
    out = np.zeros((SIZE, SIZE), bool)
    for y in range(0, SIZE, STRIP):
        out[y : y + STRIP] = (a[y : y + STRIP] != b[y : y + STRIP]).any(axis=2)
    return out


def _box(level, region, pad=0):
    y, x, n = region.y - pad, region.x - pad, region.box + 2 * pad
    return np.asarray(level[y : y + n, x : x + n])


def test_region_counts_scale_with_the_slide():
    assert region_counts(SIZE) == (1, 1)
    assert region_counts(12_000) == (2, 2)
    assert region_counts(40_000) == (3, 3)
    assert region_counts(40_000, n_tumor=5, n_distractors=0) == (5, 0)


def test_files_geojson_and_recipe(slides):
    for name, tumors, distractors in [("pos", 1, 1), ("neg", 0, 2), ("plain", 0, 0)]:
        info = slides[name]
        assert info.path.is_file() and info.path.suffix == ".tif"
        assert info.geojson_path == info.path.with_suffix(".geojson")
        gj = json.loads(info.geojson_path.read_text())
        assert gj["type"] == "FeatureCollection"
        assert gj["properties"]["label"] == info.label
        assert gj["properties"]["size"] == SIZE and gj["properties"]["seed"] == SEED
        kinds = [f["properties"]["classification"]["name"] for f in gj["features"]]
        assert kinds.count("Tumor") == tumors and kinds.count("Distractor") == distractors
        for feature, region in zip(gj["features"], info.regions, strict=True):
            assert feature["type"] == "Feature"
            assert feature["properties"]["objectType"] == "annotation"
            color = feature["properties"]["classification"]["color"]
            assert len(color) == 3 and all(isinstance(v, int) for v in color)
            assert feature["geometry"]["type"] == "Polygon"
            (ring,) = feature["geometry"]["coordinates"]
            assert ring[0] == ring[-1] and len(ring) > 16
            assert ring == [list(p) for p in region.polygon]
            xs, ys = np.array(ring).T
            assert region.x <= xs.min() and xs.max() <= region.x + region.box
            assert region.y <= ys.min() and ys.max() <= region.y + region.box
            assert region.x % 16 == 0 and region.y % 16 == 0 and region.box % 16 == 0
        recipe = json.loads(info.recipe_path.read_text())
        assert recipe["label"] == info.label
        assert recipe["recipe_version"] == gj["properties"]["recipe_version"]
        assert recipe["recipe_version"] == (1 if "mirror" in recipe["tissue"]["method"] else 2)
        assert recipe["planted_fraction"] == pytest.approx(info.planted_fraction)
        assert len(recipe["regions"]) == len(info.regions)
        assert info.planted_fraction < MAX_PLANTED_FRACTION
    # positive and negative share tissue and region placement
    pos, neg = slides["pos"], slides["neg"]
    assert [(r.y, r.x, r.box) for r in pos.regions] == [(r.y, r.x, r.box) for r in neg.regions]


def test_openslide_reads_the_sample_identically_to_tifffile(slides):
    info = slides["pos_jpeg"]
    slide = openslide.OpenSlide(info.path)
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count == N_LEVELS
    assert slide.level_downsamples == pytest.approx(tuple(2.0**k for k in range(N_LEVELS)))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499)
    group = _levels(info)
    tumor = next(r for r in info.regions if r.kind == "Tumor")
    for k in range(N_LEVELS):
        ds = 2**k
        n = max(64, (tumor.box + 512) // ds)
        y = max(0, (tumor.y - 256) // ds)
        x = max(0, (tumor.x - 256) // ds)
        region = np.asarray(slide.read_region((x * ds, y * ds), k, (n, n)).convert("RGB"))
        assert np.array_equal(region, group[str(k)][y : y + n, x : x + n]), f"level {k}"


def test_every_level_is_the_exact_2x2_average_of_the_level_above(slides):
    group = _levels(slides["pos"])
    for k in range(1, N_LEVELS):
        above, level = group[str(k - 1)], group[str(k)]
        for y in range(0, level.shape[0], STRIP // 2):
            got = level[y : y + STRIP // 2]
            assert np.array_equal(got, mean_2x2(above[2 * y : 2 * y + STRIP])), f"level {k}"


def test_positive_and_negative_differ_only_inside_tumor_outlines(slides):
    pos, neg = slides["pos"], slides["neg"]
    diff = _diff_mask(_levels(pos)["0"], _levels(neg)["0"])
    allowed = np.zeros_like(diff)
    for region in pos.regions:
        if region.kind != "Tumor":
            continue
        pad = 4
        outline = _polygon_mask(region, pad)
        local = diff[
            region.y - pad : region.y + region.box + pad,
            region.x - pad : region.x + region.box + pad,
        ]
        # changes stay within the outline (soft edge: 2 px) and fill its inside
        assert not (local & ~binary_dilation(outline, iterations=2)).any()
        inside = binary_erosion(outline, iterations=2)
        assert local[inside].mean() > 0.9
        allowed[
            region.y - pad : region.y + region.box + pad,
            region.x - pad : region.x + region.box + pad,
        ] |= outline
    assert diff.any()
    assert not (diff & ~binary_dilation(allowed, iterations=2)).any()


def test_all_planted_regions_are_where_the_geojson_says(slides):
    pos, plain = slides["pos"], slides["plain"]
    diff = _diff_mask(_levels(pos)["0"], _levels(plain)["0"])
    allowed = np.zeros_like(diff)
    for region in pos.regions:
        pad = 4
        outline = _polygon_mask(region, pad)
        window = np.s_[
            region.y - pad : region.y + region.box + pad,
            region.x - pad : region.x + region.box + pad,
        ]
        changed = diff[window]
        assert 0.8 * region.area <= changed.sum() <= region.area
        # the polygon's area matches the changed area (within the 2-px soft edge)
        assert outline.sum() == pytest.approx(changed.sum(), rel=0.15)
        allowed[window] |= binary_dilation(outline, iterations=2)
    assert not (diff & ~allowed).any()
    assert diff.sum() / SIZE**2 < MAX_PLANTED_FRACTION


def test_tumor_and_its_distractor_agree_at_1_16_but_not_at_full_resolution(slides):
    tumor = next(r for r in slides["pos"].regions if r.kind == "Tumor")
    (twin,) = [r for r in slides["neg"].regions if r.index == tumor.index]
    assert twin.kind == "Distractor"
    real, fake = (_box(_levels(slides[s])["0"], tumor) for s in ("pos", "neg"))
    inside = _polygon_mask(tumor)
    # full resolution: different pixels ...
    assert np.abs(real.astype(int) - fake)[inside].mean() > 10
    # ... that are a permutation within every 16×16 block, so 1/16 block means are equal
    assert np.array_equal(block_sums(real, 16), block_sums(fake, 16))
    for by in range(0, tumor.box, 16):
        for bx in range(0, tumor.box, 16):
            a = real[by : by + 16, bx : bx + 16].reshape(-1, 3)
            b = fake[by : by + 16, bx : bx + 16].reshape(-1, 3)
            assert np.array_equal(np.unique(a, axis=0), np.unique(b, axis=0))
    # 1/8 view still differs
    assert not np.array_equal(block_sums(real, 8), block_sums(fake, 8))

    def level_box(name, k):
        ds = 2**k
        lv = _levels(slides[name])[str(k)]
        return lv[
            tumor.y // ds : (tumor.y + tumor.box) // ds, tumor.x // ds : (tumor.x + tumor.box) // ds
        ].astype(int)

    # stored pyramid (lossless): level 4 differs only by iterated rounding, level 3 visibly
    assert np.abs(level_box("pos", 4) - level_box("neg", 4)).max() <= 1
    assert np.abs(level_box("pos", 3) - level_box("neg", 3)).max() >= 8
    # JPEG slides: the 1/16 views agree within JPEG tolerance, full resolution does not
    assert np.abs(level_box("pos_jpeg", 4) - level_box("neg_jpeg", 4)).mean() < 1.5
    assert np.abs(level_box("pos_jpeg", 0) - level_box("neg_jpeg", 0))[inside].mean() > 10


def test_scramble_blocks_permutes_only_changed_pixels_within_blocks():
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    changed = np.zeros((48, 64), bool)
    changed[5:40, 10:50] = True
    out = scramble_blocks(patch, changed, np.random.default_rng(1))
    assert np.array_equal(out[~changed], patch[~changed])
    assert np.array_equal(block_sums(out, 16), block_sums(patch, 16))
    assert (out != patch).any(axis=2)[changed].mean() > 0.9


def test_sample_has_glass_and_tissue_and_reuses_tiles(slides):
    info = slides["pos_jpeg"]
    lowest = np.asarray(_levels(info)[str(N_LEVELS - 1)]).astype(int)
    glass = (np.abs(lowest - np.array(GLASS_RGB)) <= 3).all(axis=2)
    assert 0.3 < glass.mean() < 0.9
    assert 0.1 < info.tissue_fraction < 0.6
    assert info.tissue_fraction == pytest.approx(1 - glass.mean(), abs=0.1)
    # glass tiles are encoded once (both recipes); recipe 1 also repeats its motif tiles,
    # recipe 2's tissue tiles are all distinct.  Level 5 (1/32) of the lossless slide
    # holds each 256-px level-0 tile as an 8×8 block.
    lossless = np.asarray(_levels(slides["pos"])[str(N_LEVELS - 1)])
    blocks = (lossless == GLASS_RGB).all(axis=2).reshape(32, 8, 32, 8)
    glass_tiles = int(blocks.all(axis=(1, 3)).sum())
    tissue_tiles = int((~blocks).all(axis=(1, 3)).sum())
    tiles = info.pyramid
    assert glass_tiles > 0 and tissue_tiles > 0
    # (a few tiles near the outline are rendered, not keyed, and turn out all glass)
    assert tiles.tiles_encoded[0] < tiles.tiles_total[0] - 0.95 * glass_tiles
    recipe = json.loads(info.recipe_path.read_text())["recipe_version"]
    if recipe == 1:
        assert tiles.tiles_encoded[0] < tiles.tiles_total[0] / 4
    else:
        assert tiles.tiles_encoded[0] >= tissue_tiles + 1


def _recipe(info) -> int:
    return json.loads(info.recipe_path.read_text())["recipe_version"]


def _tissue_tiles(info, tile: int = TILE):
    """Level-0 tiles of a lossless slide at least half tissue, as ``(y, x, pixels)``."""
    level0 = _levels(info)["0"]
    for y in range(0, SIZE, tile):
        row = np.asarray(level0[y : y + tile])
        glass = (row == GLASS_RGB).all(axis=2)
        for x in range(0, SIZE, tile):
            if glass[:, x : x + tile].mean() < 0.5:
                yield y, x, row[:, x : x + tile]


def test_no_level0_tissue_tile_repeats_even_rotated_or_flipped(slides):
    """Recipe 2 never shows the same 256² tissue tile twice, under any of the 8
    rotations/flips; recipe 1's mirror tiling repeats most of its tiles."""
    seen: dict[bytes, tuple[int, int]] = {}
    repeats = n = 0
    for y, x, pixels in _tissue_tiles(slides["plain"]):
        n += 1
        forms = [np.rot90(p, k) for p in (pixels, pixels.swapaxes(0, 1)) for k in range(4)]
        key = min(np.ascontiguousarray(f).tobytes() for f in forms)
        if key in seen:
            repeats += 1
        seen.setdefault(key, (y, x))
    assert n > 150  # a real test: hundreds of tissue tiles
    if _recipe(slides["plain"]) == 1:
        assert repeats > n / 2
    else:
        assert repeats == 0


def _mirror_correlations(info, half: int = 64, rows: int = 128) -> np.ndarray:
    """Correlation of each ``rows × half`` strip of tissue with its mirror image across
    every axis on a ``half``-px grid (vertical and horizontal axes), at level 1 (1/2),
    after removing structure coarser than ~8 px (so a tissue band crossing the axis
    does not count)."""
    from scipy.ndimage import gaussian_filter

    level1 = np.asarray(_levels(info)["1"])
    glass = (level1 == GLASS_RGB).all(axis=2)
    grey = level1.mean(axis=2, dtype=np.float32)
    detail = grey - gaussian_filter(grey, 4)
    out = []
    for img, mask in ((detail, glass), (detail.T, glass.T)):
        for axis in range(half, img.shape[1] - half + 1, half):
            left = img[:, axis - half : axis]
            right = img[:, axis : axis + half][:, ::-1]
            for y in range(0, img.shape[0] - rows + 1, rows):
                if mask[y : y + rows, axis - half : axis + half].any():
                    continue
                a, b = left[y : y + rows].ravel(), right[y : y + rows].ravel()
                out.append(np.corrcoef(a, b)[0, 1])
    return np.array(out)


def test_no_mirror_symmetry(slides):
    """Recipe 1 is exactly mirror-symmetric across every 1024th column (and 2048th row)
    of level 0; recipe 2 has no mirror axis anywhere its tissue is."""
    corr = _mirror_correlations(slides["plain"])
    assert len(corr) > 200
    if _recipe(slides["plain"]) == 1:
        assert corr.max() > 0.99 and (corr > 0.99).mean() > 0.05
    else:
        assert corr.max() < 0.3


def test_stain_variants_match_scikit_image_hed(cache_root, monkeypatch):
    """The tabulated stain shift is scikit-image's HED scaling on real tissue colours
    (where its clipping of negative stain densities does not act), and small."""
    from skimage.color import hed2rgb, rgb2hed

    from napari_zoomin.samples.quilt import apply_stain, colour_bins, stain_lut
    from napari_zoomin.samples.synthetic import load_motif_source

    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(cache_root))
    rgb = load_motif_source()[:512, :512]
    out = np.empty_like(rgb)
    apply_stain(rgb, colour_bins(rgb), stain_lut(1.08, 0.92), out)
    hed = rgb2hed(rgb)
    want = np.clip(np.rint(hed2rgb(hed * [1.08, 0.92, 1]) * 255), 0, 255)
    clean = (hed > 0).all(axis=2)
    assert clean.mean() > 0.5
    error = np.abs(out.astype(int) - want)[clean]
    assert error.mean() < 0.5 and np.percentile(error, 99) <= 2
    assert 1 < np.abs(out.astype(int) - rgb).mean() < 6  # slight, but a change
    same = np.empty_like(rgb)
    apply_stain(rgb, colour_bins(rgb), stain_lut(1.0, 1.0), same)
    assert np.abs(same.astype(int) - rgb).max() <= 1


@pytest.mark.parametrize("recipe", [1, 2])
def test_same_parameters_give_identical_files(cache_root, tmp_path, monkeypatch, recipe):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(cache_root))
    kw = {"size": 4096, "tile": 256, "n_tumor": 0, "n_distractors": 0, "recipe": recipe}
    a = write_sample_slide(tmp_path / "a.tif", seed=5, workers=3, **kw)
    b = write_sample_slide(tmp_path / "b.tif", seed=5, workers=1, **kw)  # any thread count
    c = write_sample_slide(tmp_path / "c.tif", seed=6, **kw)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()


@pytest.mark.parametrize("recipe", [None, "1"])
def test_cli_sample_takes_the_recipe(cache_root, tmp_path, monkeypatch, capsys, recipe):
    from napari_zoomin.cli import main

    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(cache_root))
    out = tmp_path / "s.tif"
    args = ["sample", "--out", str(out), "--size", "8192", "--seed", "4"]
    assert main(args + ([] if recipe is None else ["--recipe", recipe])) == 0
    assert str(out) in capsys.readouterr().out
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["recipe_version"] == (2 if recipe is None else 1)
    gj = json.loads(out.with_suffix(".geojson").read_text())
    assert gj["properties"]["recipe_version"] == sidecar["recipe_version"]


def test_progress_counts_up_through_the_cuts_and_every_tile_row(cache_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(cache_root))
    heard: list[tuple[float, str]] = []
    write_sample_slide(
        tmp_path / "p.tif", size=SIZE, seed=1, progress=lambda f, m: heard.append((f, m))
    )
    fractions = [f for f, _ in heard]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert sum("cutting the tissue" in m for _, m in heard) >= 2
    assert sum("level 0" in m for _, m in heard) == SIZE // 512  # one per tile row


def test_out_folder_gets_a_default_name(cache_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(cache_root))
    info = write_sample_slide(tmp_path / "folder", size=SIZE, label="negative", seed=2, tile=512)
    assert info.path == tmp_path / "folder" / f"sample-negative-{SIZE}-seed2.tif"
    assert sorted(p.name for p in info.path.parent.iterdir()) == sorted(
        [info.path.name, info.path.stem + ".geojson", info.path.stem + ".json"]
    )


def test_bad_requests_are_refused(cache_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(cache_root))
    with pytest.raises(ValueError, match="label"):
        write_sample_slide(tmp_path / "x.tif", size=4096, label="maybe")
    with pytest.raises(ValueError, match="too small"):
        write_sample_slide(tmp_path / "x.tif", size=4096, n_tumor=3, n_distractors=3)
    with pytest.raises(ValueError, match="at least"):
        write_sample_slide(tmp_path / "x.tif", size=500)
    with pytest.raises(ValueError, match="recipe"):
        write_sample_slide(tmp_path / "x.tif", size=4096, recipe=3)
    assert not list(tmp_path.iterdir())


def test_sample_slide_path_builds_once_and_reuses(cache_root, tmp_path, monkeypatch):
    fresh = tmp_path / "cache"
    (fresh / "data").mkdir(parents=True)
    shutil.copy(cache_root / "data" / "CMU-1-Small-Region.svs", fresh / "data")
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(fresh))
    messages = []
    path = sample_slide_path(size=SIZE, label="positive", seed=3, progress=messages.append)
    assert path.parent == fresh / "samples" and path.is_file()
    assert path.with_suffix(".geojson").is_file() and path.with_suffix(".json").is_file()
    assert len(messages) == 1
    assert not [p for p in path.parent.iterdir() if "partial" in p.name or "building" in p.name]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached sample must be reused")

    with monkeypatch.context() as mp:
        mp.setattr(synthetic, "write_sample_slide", no_rebuild)
        assert sample_slide_path(size=SIZE, label="positive", seed=3) == path
    other = sample_slide_path(size=SIZE, label="negative", seed=3)
    assert other != path
    # an incomplete entry (no GeoJSON) is rebuilt, not reused
    path.with_suffix(".geojson").unlink()
    stamp = path.stat().st_mtime_ns
    assert sample_slide_path(size=SIZE, label="positive", seed=3) == path
    assert path.with_suffix(".geojson").is_file() and path.stat().st_mtime_ns != stamp


def test_reading_slides_does_not_load_the_sample_factory_or_torch():
    """``slide`` reads; ``samples`` (generator, pyramid writer, fetcher) sits beside it."""
    code = (
        "import sys, napari_zoomin.slide\n"
        "print(sorted(m for m in ('napari_zoomin.samples', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_default_40000_sample(cache_root, tmp_path, monkeypatch):
    """The default demo slide: structure only, no timing (see docs/sample-slides.md)."""
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(cache_root))
    info = write_sample_slide(tmp_path / "demo.tif")
    assert info.size == 40_000 and info.label == "positive"
    assert [r.kind for r in info.regions].count("Tumor") == 3
    assert [r.kind for r in info.regions].count("Distractor") == 3
    assert info.planted_fraction < 0.6 * MAX_PLANTED_FRACTION
    slide = openslide.OpenSlide(info.path)
    assert slide.level_dimensions[-1] == (625, 625) and slide.level_count == 7
    assert slide.level_downsamples == pytest.approx(tuple(2.0**k for k in range(7)))
    assert info.pyramid.tiles_encoded[0] < info.pyramid.tiles_total[0] / 2  # glass is keyed
    group = _levels(info)
    for region in info.regions:
        got = np.asarray(slide.read_region((region.x, region.y), 0, (region.box,) * 2))
        assert np.array_equal(got[..., :3], _box(group["0"], region))
