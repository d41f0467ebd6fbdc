"""Pyramidal TIFF writer: layout, OpenSlide/tifffile agreement, exact reduced levels."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from fixtures_data import fetch_cmu_into, session_cache_root
from napari_zoomin.geometry import mean_2x2
from napari_zoomin.samples.pyramid import (
    encode_tile,
    pyramid_shapes,
    reference_levels,
    write_array_pyramid,
    write_pyramid,
    write_tiff_pyramid,
)

SHAPE = (1500, 2100)  # not a multiple of the tile: partial edge tiles on every level
TILE = 256
N_LEVELS = 4


@pytest.fixture(scope="module")
def real_rgb(tmp_path_factory) -> np.ndarray:
    """A real 1500×2100 RGB region of CMU-1-Small-Region (tissue and glass)."""
    svs = fetch_cmu_into(session_cache_root(tmp_path_factory))
    with tifffile.TiffFile(svs) as tif:
        return np.ascontiguousarray(tif.pages[0].asarray()[700 : 700 + SHAPE[0], : SHAPE[1]])


@pytest.fixture(scope="module", params=["jpeg", "zlib"])
def pyramid(request, real_rgb, tmp_path_factory):
    path = tmp_path_factory.mktemp("pyr") / f"real-{request.param}.tif"
    info = write_array_pyramid(
        path, real_rgb, tile=TILE, compression=request.param, mpp=0.25, n_levels=N_LEVELS
    )
    return info


def _tifffile_levels(path):
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def test_layout_bigtiff_reduced_pages_tiles_resolution(pyramid):
    with tifffile.TiffFile(pyramid.path) as tif:
        assert tif.is_bigtiff
        assert len(tif.pages) == N_LEVELS
        assert len(tif.series) == 1 and len(tif.series[0].levels) == N_LEVELS
        for k, page in enumerate(tif.pages):
            assert page.subfiletype == (0 if k == 0 else 1)
            assert page.is_tiled and page.tilewidth == TILE and page.tilelength == TILE
            assert page.shape == (*pyramid.level_shapes[k], 3)
            assert page.compression == (7 if pyramid.compression == "jpeg" else 8)
            assert page.photometric == (6 if pyramid.compression == "jpeg" else 2)
            assert page.tags["ResolutionUnit"].value == 3  # centimetre
            xres = page.tags["XResolution"].value
            assert 1e4 * xres[1] / xres[0] == pytest.approx(0.25 * 2**k)
        assert tif.pages[0].description.startswith("napari-zoomin pyramid")
    assert pyramid.level_shapes == ((1500, 2100), (750, 1050), (375, 525), (187, 262))


def test_openslide_reads_it_as_generic_tiff_with_all_levels(pyramid):
    slide = openslide.OpenSlide(pyramid.path)
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count == N_LEVELS
    assert slide.level_dimensions == tuple((w, h) for h, w in pyramid.level_shapes)
    assert slide.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
    assert slide.level_downsamples[3] == pytest.approx(8.0, rel=0.01)  # floored 187×262
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_openslide_and_tifffile_decode_pixel_identical_rgb_at_every_level(pyramid):
    slide = openslide.OpenSlide(pyramid.path)
    levels = _tifffile_levels(pyramid.path)
    with tifffile.TiffFile(pyramid.path) as tif:
        group = zarr.open(tif.aszarr(), mode="r")
        for k, full in enumerate(levels):
            w, h = slide.level_dimensions[k]
            whole = np.asarray(slide.read_region((0, 0), k, (w, h)).convert("RGB"))
            assert np.array_equal(whole, full), f"level {k}"
            # an unaligned window crossing tile borders, read through zarr
            # OpenSlide resamples sub-pixel offsets when a level's downsample is not
            # an integer (level 3 here: 1500 / 187), so offset windows only there.
            ds = slide.level_downsamples[k]
            y, x = (37, 101) if ds == int(ds) else (0, 0)
            hh, ww = min(300, h - y), min(333, w - x)
            region = slide.read_region((x * int(ds), y * int(ds)), k, (ww, hh))
            assert np.array_equal(
                np.asarray(region.convert("RGB")), group[str(k)][y : y + hh, x : x + ww]
            ), f"level {k} window"


def test_zlib_levels_are_exact_2x2_area_averages(real_rgb, tmp_path):
    info = write_array_pyramid(tmp_path / "z.tif", real_rgb, TILE, "zlib", 0.5, N_LEVELS)
    stored = _tifffile_levels(info.path)
    expected = reference_levels(real_rgb, N_LEVELS)
    assert np.array_equal(stored[0], real_rgb)
    for k in range(1, N_LEVELS):
        assert np.array_equal(stored[k], expected[k]), f"level {k}"
        above = stored[k - 1]
        h, w = stored[k].shape[:2]
        block = above[: 2 * h, : 2 * w].astype(int)
        mean = (block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2]) / 4
        assert np.array_equal(stored[k], np.floor(mean + 0.5).astype(np.uint8))


def test_jpeg_levels_are_close_to_the_exact_averages(real_rgb, tmp_path):
    info = write_array_pyramid(tmp_path / "j.tif", real_rgb, TILE, "jpeg", 0.5, N_LEVELS)
    stored = _tifffile_levels(info.path)
    for k, exact in enumerate(reference_levels(real_rgb, N_LEVELS)):
        err = np.abs(stored[k].astype(int) - exact)
        assert err.mean() < 4.0, f"level {k}: mean error {err.mean():.2f}"


def test_mean_2x2_rounds_half_up_and_floors_odd_shapes():
    a = np.array([[[0], [1], [9]], [[1], [0], [9]], [[5], [5], [5]]], np.uint8)  # 3×3
    assert mean_2x2(a).tolist() == [[[1]]]  # (0+1+1+0+2)//4 = 1 (0.5 rounds up)
    b = np.full((2, 2, 3), 255, np.uint8)
    assert mean_2x2(b).tolist() == [[[255, 255, 255]]]  # no uint8 overflow


def test_keyed_tiles_are_encoded_once_and_repeated(tmp_path):
    rng = np.random.default_rng(7)
    motif = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    motif[:, :32] //= 2  # some structure
    tile = np.tile(motif, (4, 4, 1))  # 256×256, period 64 < tile
    calls = []

    def source(r, c):
        def render():
            calls.append((r, c))
            return tile

        return "same", render

    shape = (4000, 3000)
    info = write_pyramid(
        tmp_path / "rep.tif", source, shape, tile=256, compression="zlib", n_levels=4
    )
    assert calls == [(0, 0)]
    assert info.tiles_total == (16 * 12, 8 * 6, 4 * 3, 2 * 2)
    # level 0: one tile; reduced levels: a handful of distinct child combinations
    assert info.tiles_encoded[0] == 1
    assert max(info.tiles_encoded[1:]) <= 4
    expected = reference_levels(np.tile(motif, (63, 47, 1))[: shape[0], : shape[1]], 4)
    for k, level in enumerate(_tifffile_levels(info.path)):
        assert np.array_equal(level, expected[k]), f"level {k}"
    with tifffile.TiffFile(info.path) as tif:
        page = tif.pages[0]
        # the same bytes, stored once: every tile points at them (no zero byte counts)
        assert len(set(page.databytecounts)) == 1 and page.databytecounts[0] > 0
        assert len(set(page.dataoffsets)) == 1
        chunks = [set(zip(p.dataoffsets, p.databytecounts, strict=True)) for p in tif.pages]
        stored = sum(n for pairs in chunks for _, n in pairs)
        listed = sum(sum(p.databytecounts) for p in tif.pages)
        assert info.path.stat().st_size < stored + 64 * 2**10 < listed / 10
    # libtiff (through OpenSlide) reads the shared tiles like any others
    slide = openslide.OpenSlide(info.path)
    for k, want in enumerate(expected):
        w, h = slide.level_dimensions[k]
        got = np.asarray(slide.read_region((0, 0), k, (w, h)).convert("RGB"))
        assert np.array_equal(got, want), f"OpenSlide level {k}"


def test_mixed_keyed_and_unique_tiles(tmp_path, real_rgb):
    """Unique tiles among keyed ones: reduced levels stay exact."""
    t = 128
    glass = np.full((t, t, 3), 240, np.uint8)
    rows, cols = 9, 11
    full = np.empty((rows * t, cols * t, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            unique = (r + c) % 4 == 0
            full[r * t : (r + 1) * t, c * t : (c + 1) * t] = (
                real_rgb[r * 100 : r * 100 + t, c * 150 : c * 150 + t] if unique else glass
            )

    def source(r, c):
        if (r + c) % 4 == 0:
            return None, full[r * t : (r + 1) * t, c * t : (c + 1) * t]
        return ("glass",), glass

    info = write_pyramid(tmp_path / "mix.tif", source, full.shape[:2], tile=t, compression="zlib")
    assert info.tiles_encoded[0] == 1 + sum(
        (r + c) % 4 == 0 for r in range(rows) for c in range(cols)
    )
    expected = reference_levels(full, len(info.level_shapes))
    for k, level in enumerate(_tifffile_levels(info.path)):
        assert np.array_equal(level, expected[k]), f"level {k}"


def test_default_levels_go_down_to_1024():
    assert pyramid_shapes((40_000, 40_000))[-1] == (625, 625)
    assert len(pyramid_shapes((40_000, 40_000))) == 7
    assert len(pyramid_shapes((100_000, 100_000))) == 8
    assert pyramid_shapes((1000, 800)) == [(1000, 800)]
    with pytest.raises(ValueError, match="too many"):
        pyramid_shapes((100, 100), n_levels=8)


def test_encode_tile_matches_what_is_stored(tmp_path, real_rgb):
    tile = np.ascontiguousarray(real_rgb[:256, :256])
    info = write_array_pyramid(tmp_path / "one.tif", tile, 256, "jpeg", 0.5, 1)
    with tifffile.TiffFile(info.path) as tif:
        page = tif.pages[0]
        tif.filehandle.seek(page.dataoffsets[0])
        stored = tif.filehandle.read(page.databytecounts[0])
    assert stored == encode_tile(tile, "jpeg")


def test_bad_arguments_are_refused(tmp_path, real_rgb):
    with pytest.raises(ValueError, match="multiple of 16"):
        write_array_pyramid(tmp_path / "a.tif", real_rgb, tile=100)
    with pytest.raises(ValueError, match="uint8"):
        write_array_pyramid(tmp_path / "a.tif", real_rgb.astype(np.float32))
    with pytest.raises(ValueError, match="compression"):
        write_array_pyramid(tmp_path / "a.tif", real_rgb, compression="lzw")
    assert not list(tmp_path.iterdir())


def test_a_failing_source_leaves_no_file(tmp_path):
    def source(r, c):
        if r == 2:
            raise RuntimeError("boom")
        return ("glass",), np.zeros((256, 256, 3), np.uint8)

    with pytest.raises(RuntimeError, match="boom"):
        write_pyramid(tmp_path / "x.tif", source, (2048, 2048), tile=256)
    assert not list(tmp_path.iterdir())


def _rgb_levels(n: int = 3) -> list[tuple[np.ndarray, dict]]:
    rng = np.random.default_rng(0)
    levels = reference_levels(rng.integers(0, 256, (600, 520, 3), dtype=np.uint8), n)
    return [(a, {}) for a in levels]


@pytest.mark.parametrize("layout", ["generic-tiff", "ome-tiff"])
def test_write_tiff_pyramid_layouts(tmp_path, layout):
    """The one layout switch: top-level pages (OpenSlide) or OME-XML with SubIFDs (QuPath)."""
    levels = _rgb_levels()
    path = write_tiff_pyramid(
        tmp_path / "p.tif",
        iter(levels),
        layout=layout,
        n_levels=3,
        tile=(128, 128),
        photometric="rgb",
        compression="zlib",
        metadata=None,
    )
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and tif.is_ome == (layout == "ome-tiff")
        top = 3 if layout == "generic-tiff" else 1
        assert len(tif.pages) == top
        assert [lv.keyframe.subfiletype for lv in tif.series[0].levels] == [0, 1, 1]
        got = [lv.asarray() for lv in tif.series[0].levels]
    for (want, _), a in zip(levels, got, strict=True):
        assert np.array_equal(a, want)
    if layout == "generic-tiff":
        assert openslide.OpenSlide(path).level_count == 3


def test_write_tiff_pyramid_refuses_a_wrong_level_count_or_layout(tmp_path):
    with pytest.raises(ValueError, match="expected 4 levels"):
        write_tiff_pyramid(
            tmp_path / "p.tif", iter(_rgb_levels()), layout="generic-tiff", n_levels=4
        )
    with pytest.raises(ValueError, match="layout"):
        write_tiff_pyramid(tmp_path / "p.tif", iter(_rgb_levels()), layout="subifd", n_levels=3)
    assert not list(tmp_path.iterdir())  # atomic: nothing left behind
