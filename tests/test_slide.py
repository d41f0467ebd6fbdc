"""Slide and backends on the real CMU slide and on generated pyramids of real pixels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile

from napari_zoomin import open_slide
from napari_zoomin.errors import SlideError
from napari_zoomin.slide import SlideWarning
from pyramid_files import mean_pyramid, write_openslide_layout

REGIONS = [(0, 0, 240, 240), (100, 200, 500, 600), (2900, 2100, 200, 300), (-50, -70, 300, 400)]


class TestCMU:
    def test_facts(self, cmu_svs):
        with open_slide(cmu_svs) as s:
            assert s.backend == "tifffile"
            assert s.vendor == "aperio"
            assert s.shape == (2967, 2220)
            assert s.level_shapes == ((2967, 2220),)
            assert s.level_downsamples == (1.0,)
            assert s.mpp == pytest.approx((0.499, 0.499))
            assert s.levels[0].tile == (240, 240)
            assert s.associated_names == ("label", "macro", "thumbnail")
            assert s.associated_image("label").shape == (463, 387, 3)
            assert s.associated_image("thumbnail").shape == (768, 574, 3)

    def test_backends_agree_on_facts_and_pixels(self, cmu_svs, cmu_pixels):
        with open_slide(cmu_svs, backend="openslide") as a, open_slide(cmu_svs) as b:
            assert (a.backend, b.backend) == ("openslide", "tifffile")
            assert (a.shape, a.mpp, a.vendor) == (b.shape, b.mpp, b.vendor)
            assert a.associated_names == b.associated_names
            for name in a.associated_names:
                np.testing.assert_array_equal(a.associated_image(name), b.associated_image(name))
            for y, x, h, w in REGIONS:
                ra, rb = a.read(0, y, x, h, w), b.read(0, y, x, h, w)
                assert ra.shape == (h, w, 3) and ra.dtype == np.uint8
                np.testing.assert_array_equal(ra, rb)
                # and both equal plain numpy slicing of the decoded image, zero outside
                expect = np.zeros((h, w, 3), np.uint8)
                y0, x0 = max(y, 0), max(x, 0)
                y1, x1 = min(y + h, 2967), min(x + w, 2220)
                expect[y0 - y : y1 - y, x0 - x : x1 - x] = cmu_pixels[y0:y1, x0:x1]
                np.testing.assert_array_equal(ra, expect)

    def test_border_zero_fill(self, cmu_svs):
        with open_slide(cmu_svs) as s:
            r = s.read(0, 2960, 2215, 20, 10)
            assert r[:7, :5].any() and not r[7:].any() and not r[:, 5:].any()
            assert not s.read(0, 5000, 5000, 10, 10).any()
            assert s.decoded_pixels.get(0, 0) == 240 * 240  # only the corner tile was decoded

    @pytest.mark.parametrize("cached", [True, False])
    def test_decode_counter_counts_tiles_decoded(self, cmu_svs, cached):
        with open_slide(cmu_svs, cache_bytes=64 * 2**20 if cached else 0) as s:
            s.read(0, 0, 0, 240, 240)  # exactly one tile
            assert s.decoded_pixels == {0: 240 * 240}
            assert s.decoded_tiles == {0: 1}
            s.read(0, 239, 239, 2, 2)  # straddles four tiles, one of them decoded already
            assert s.decoded_tiles == {0: 4 if cached else 5}
            s.read(0, 100, 200, 500, 600)  # rows 0..2, cols 0..3: 3 x 4 tiles
            assert s.decoded_tiles == {0: 12 if cached else 17}
            assert s.total_decoded_pixels == s.decoded_tiles[0] * 240 * 240
            s.reset_decoded()
            assert s.decoded_pixels == {}
            s.read(0, 0, 0, 480, 480)
            assert s.decoded_tiles == ({} if cached else {0: 4})
            s.clear_cache()
            s.read(0, 0, 0, 480, 480)
            assert s.decoded_tiles == {0: 4 if cached else 8}

    def test_tile_cache_is_bounded(self, cmu_svs):
        tile_bytes = 240 * 240 * 3
        with open_slide(cmu_svs, cache_bytes=3 * tile_bytes) as s:
            s.read(0, 0, 0, 240, 4 * 240)  # four tiles through a three-tile cache
            s.reset_decoded()
            s.read(0, 0, 240, 240, 3 * 240)  # the last three are still there
            assert s.decoded_tiles == {}
            s.read(0, 0, 0, 240, 240)  # the first was evicted
            assert s.decoded_tiles == {0: 1}

    def test_dask_pyramid_is_chunked_on_tiles(self, cmu_svs):
        with open_slide(cmu_svs) as s:
            (level0,) = s.pyramid()
            assert level0.shape == (2967, 2220, 3) and level0.dtype == np.uint8
            assert level0.chunksize == (240, 240, 3)
            assert s.decoded_pixels == {}  # building the arrays decodes nothing
            block = level0[250:700, 300:1000].compute()
            np.testing.assert_array_equal(block, s.read(0, 250, 300, 450, 700))
            assert level0[10, 20].compute().tolist() == s.read(0, 10, 20, 1, 1)[0, 0].tolist()


def test_dask_names_are_never_reused_by_another_slide(cmu_svs):
    """Dask and napari's chunk cache key chunks by array name.  The names came from
    ``id(slide)``, which Python reuses once a slide is collected: a test then saw a
    256-px tile of an earlier slide in a 128-px edge chunk (and with equal shapes
    would have been shown the earlier slide's pixels)."""
    import gc

    names = []
    for _ in range(20):
        with open_slide(cmu_svs) as s:
            names += [a.name for a in s.pyramid()]
        del s
        gc.collect()
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("layout", ["openslide", "ome"])
@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_generated_pyramids(pyramids, real_crop, layout, compression):
    path = pyramids[layout, compression]
    with open_slide(path) as s:
        assert s.backend == "tifffile"
        assert s.vendor == ("ome" if layout == "ome" else "generic-tiff")
        assert s.level_shapes == ((2048, 1536), (1024, 768), (512, 384))
        assert s.level_downsamples == (1.0, 2.0, 4.0)
        assert s.mpp == pytest.approx((0.5, 0.5))
        assert [lv.tile for lv in s.levels] == [(256, 256)] * 3
        expected = mean_pyramid(real_crop, 3)
        for level, ref in enumerate(expected):
            got = s.read(level, 0, 0, *ref.shape[:2])
            if compression == "zlib":  # lossless: the exact pixels written
                np.testing.assert_array_equal(got, ref)
            else:  # JPEG at quality 90: close to what was written (PSNR over 30 dB)
                mse = ((got.astype(float) - ref) ** 2).mean()
                assert 10 * np.log10(255**2 / mse) > 30


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_backends_pixel_identical_on_generated_pyramid(pyramids, compression):
    path = pyramids["openslide", compression]
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tifffile") as b:
        assert a.level_shapes == b.level_shapes and a.mpp == b.mpp
        for level in range(3):
            for y, x, h, w in [(0, 0, 256, 256), (37, 91, 300, 200), (-20, 300, 100, 700)]:
                np.testing.assert_array_equal(a.read(level, y, x, h, w), b.read(level, y, x, h, w))


def test_backend_order():
    from pathlib import Path

    from napari_zoomin.slide.open import _backend_order

    order = {
        ext: _backend_order(Path("slide" + ext))
        for ext in (".svs", ".tif", ".ome.tif", ".ndpi", ".scn", ".mrxs", ".png")
    }
    assert order == {
        ".svs": ["tifffile", "openslide"],
        ".tif": ["tifffile", "openslide"],
        ".ome.tif": ["tifffile"],
        ".ndpi": ["openslide", "tifffile"],
        ".scn": ["openslide", "tifffile"],
        ".mrxs": ["openslide"],
        ".png": ["array"],
    }


def test_ome_pyramid_readable_by_forced_openslide_is_only_level0(pyramids):
    """Why OME goes to tifffile: OpenSlide sees no sub-IFD levels."""
    with open_slide(pyramids["ome", "zlib"], backend="openslide") as s:
        assert s.level_count == 1


@pytest.mark.parametrize("cached", [True, False])
def test_parallel_read_is_pixel_identical_and_decodes_each_tile_once(cmu_svs, cached):
    """``workers`` > 1 (a stage-1 view's hundreds of tiles) changes nothing but speed."""
    cache = 64 * 2**20 if cached else 0
    for y, x, h, w in [*REGIONS, (-30, -20, 3000, 2300)]:
        with (
            open_slide(cmu_svs, cache_bytes=cache) as a,
            open_slide(cmu_svs, cache_bytes=cache) as b,
        ):
            one, many = a.read(0, y, x, h, w), b.read(0, y, x, h, w, workers=4)
            np.testing.assert_array_equal(one, many)
            assert a.decoded_tiles == b.decoded_tiles  # no tile decoded twice


def test_parallel_read_reports_a_damaged_tile(tmp_path, pyramids):
    """A tile that fails in a worker thread is the same clear SlideError, not a hang."""
    src = pyramids["openslide", "jpeg"]
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offset = int(tif.pages[0].dataoffsets[3])
    data[offset : offset + 64] = b"\x00" * 64  # wipe the JPEG header of one tile
    bad = tmp_path / "damaged.tif"
    bad.write_bytes(bytes(data))
    with open_slide(bad, backend="tifffile") as s, pytest.raises(SlideError) as info:
        s.read(0, 0, 0, *s.shape, workers=4)
    assert "damaged.tif" in str(info.value) and "level 0" in str(info.value)


def test_prefetched_tiles_are_read_from_the_cache_and_never_decoded_twice(cmu_svs):
    """A prefetch (a classification decodes its stage-1 view while it detects tissue)
    fills the tile cache: a read racing it, or after it, has the same pixels, and every
    tile is decoded once."""
    y, x, h, w = -30, -20, 3000, 2300
    with open_slide(cmu_svs) as plain:
        expected = plain.read(0, y, x, h, w)
        tiles = plain.decoded_tiles
    with open_slide(cmu_svs) as s:
        stop = s.prefetch(0, y, x, h, w, workers=2)
        racing = s.read(0, y, x, h, w, workers=2)  # while the prefetch runs
        stop()
        np.testing.assert_array_equal(racing, expected)
        assert s.decoded_tiles == tiles
        np.testing.assert_array_equal(s.read(0, y, x, h, w), expected)
        assert s.decoded_tiles == tiles  # all from the cache
    with open_slide(cmu_svs) as s:
        s.prefetch(0, y, x, h, w, workers=2)()  # stopped at once (a cancel): the tiles
        assert s.decoded_tiles[0] < tiles[0]  # not started are left to the read
        np.testing.assert_array_equal(s.read(0, y, x, h, w), expected)
        assert s.decoded_tiles == tiles


def test_a_prefetch_that_would_not_fit_the_cache_decodes_nothing(cmu_svs):
    """Tiles that would evict each other are not prefetched; the read decodes them."""
    with open_slide(cmu_svs, cache_bytes=2**20) as s:
        stop = s.prefetch(0, 0, 0, *s.shape, workers=2)
        stop()
        assert s.decoded_tiles == {}
    with open_slide(cmu_svs, cache_bytes=0) as s:
        s.prefetch(0, 0, 0, 1000, 1000, workers=2)()
        assert s.decoded_tiles == {}


def test_a_damaged_tile_met_by_a_prefetch_is_raised_by_the_read(tmp_path, pyramids):
    """The prefetch swallows nothing the user needs to know: the read that needs the
    damaged tile decodes it again and raises the clear SlideError."""
    src = pyramids["openslide", "jpeg"]
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offset = int(tif.pages[0].dataoffsets[3])
    data[offset : offset + 64] = b"\x00" * 64
    bad = tmp_path / "damaged.tif"
    bad.write_bytes(bytes(data))
    with open_slide(bad, backend="tifffile") as s:
        s.prefetch(0, 0, 0, *s.shape, workers=2)()
        with pytest.raises(SlideError, match="level 0"):
            s.read(0, 0, 0, *s.shape)


def test_best_level(pyramids):
    with open_slide(pyramids["openslide", "zlib"]) as s:
        assert [s.best_level(d) for d in (1, 1.9, 2, 3.9, 4, 16)] == [0, 0, 1, 1, 2, 2]


def test_decode_counter_per_level(pyramids):
    with open_slide(pyramids["openslide", "zlib"]) as s:
        s.read(2, 0, 0, 512, 384)  # whole level 2: 2 x 2 tiles of 256
        s.read(0, 300, 300, 10, 10)  # one tile of level 0
        assert s.decoded_tiles == {2: 4, 0: 1}
        assert s.decoded_pixels == {2: 4 * 256 * 256, 0: 256 * 256}


def test_non_integral_downsamples_agree_at_level0_and_origin(tmp_path, real_crop):
    """Odd sizes give downsamples like 1.9993; OpenSlide then resamples off-origin reads."""
    odd = real_crop[:2001, :1503]
    path = write_openslide_layout(tmp_path / "odd.tif", odd, "zlib")
    with open_slide(path) as a, open_slide(path, backend="tifffile") as b:
        assert a.level_shapes == b.level_shapes == ((2001, 1503), (1000, 751), (500, 375))
        np.testing.assert_array_equal(a.read(0, 33, 44, 500, 400), b.read(0, 33, 44, 500, 400))
        for level in (1, 2):
            np.testing.assert_array_equal(a.read(level, 0, 0, 64, 64), b.read(level, 0, 0, 64, 64))


def test_plain_images_and_arrays(tmp_path, real_crop):
    from PIL import Image

    png = tmp_path / "crop.png"
    Image.fromarray(real_crop[:300, :400]).save(png)
    with open_slide(png) as s:
        assert (s.backend, s.vendor, s.shape, s.level_count) == ("array", "image", (300, 400), 1)
        np.testing.assert_array_equal(s.read(0, 0, 0, 300, 400), real_crop[:300, :400])
    jpg = tmp_path / "crop.jpg"
    Image.fromarray(real_crop[:300, :400]).save(jpg, quality=95)
    with open_slide(jpg) as s:
        np.testing.assert_array_equal(s.read(0, 0, 0, 300, 400), np.asarray(Image.open(jpg)))
    grey = open_slide(real_crop[:50, :60, 0], mpp=0.25)
    assert grey.mpp == (0.25, 0.25)
    np.testing.assert_array_equal(grey.read(0, 0, 0, 50, 60)[..., 2], real_crop[:50, :60, 0])


def test_huge_single_level_gets_derived_levels_with_warning(tmp_path):
    """A 20,000 × 12,000 single-level file: never viewed whole, derived levels on demand."""
    path = tmp_path / "flat.tif"
    rows, cols, tile = 20_000, 12_000, 512
    tile_pattern = np.zeros((tile, tile, 3), np.uint8)
    tile_pattern[::2, ::2] = 200  # 2x2 mean = 50 everywhere

    def tiles():
        for _ in range(-(-rows // tile) * -(-cols // tile)):
            yield tile_pattern

    tifffile.imwrite(
        path,
        tiles(),
        shape=(rows, cols, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="zlib",
        bigtiff=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = open_slide(path)
    assert any(
        issubclass(w.category, SlideWarning) and "no pyramid" in str(w.message) for w in caught
    )
    assert s.level_shapes[:3] == ((20_000, 12_000), (10_000, 6_000), (5_000, 3_000))
    assert max(s.level_shapes[-1]) <= 1024
    assert s.info()["derived_levels"] == list(range(1, s.level_count))
    assert s.decoded_pixels == {}  # nothing decoded by opening
    block = s.read(1, 100, 100, 64, 64)
    assert (block == 50).all()
    assert (s.read(2, 0, 0, 8, 8) == 50).all()  # 50 is a fixed point of 2x2 means
    pyramid = s.pyramid()
    assert len(pyramid) == s.level_count and pyramid[1].chunksize == (512, 512, 3)
    s.close()


def test_file_tiles_are_the_tiles_a_read_decodes(tmp_path, pyramids, monkeypatch):
    """``Slide.file_tiles`` (what a classification counts as needed) lists exactly the
    file tiles :meth:`Slide.read` decodes: on stored levels, on derived levels (read
    from the level above), and for regions partly or wholly outside the slide."""
    from collections import Counter

    import napari_zoomin.slide.slide as slide_module

    monkeypatch.setattr(slide_module, "MAX_COARSEST_SIDE", 2048)  # a small file derives
    flat = tmp_path / "flat.tif"  # one level, no pyramid: levels 1 to 3 are derived
    pixels = np.random.default_rng(0).integers(0, 255, (2900, 4100, 3), dtype=np.uint8)
    tifffile.imwrite(flat, pixels, tile=(256, 256), photometric="rgb", compression="zlib")
    regions = [(0, 0, 1, 1), (100, 250, 300, 20), (-50, -70, 400, 300), (2800, 4000, 500, 500)]
    regions += [(5000, 5000, 10, 10), (255, 255, 2, 2), (0, 0, 2900, 4100)]
    for path in (flat, pyramids["openslide", "zlib"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlideWarning)  # no pyramid: said at open
            slide = open_slide(path, cache_bytes=0)  # every read decodes what it touches
        with slide:
            derived = slide.info()["derived_levels"]
            assert derived == ([1, 2, 3] if path == flat else [])
            for level in range(slide.level_count):
                h, w = slide.level_shapes[level]
                for y, x, height, width in [*regions, (h // 3, w // 3, h // 2, w // 2)]:
                    slide.reset_decoded()
                    slide.read(level, y, x, height, width)
                    tiles = slide.file_tiles(level, y, x, height, width)
                    assert Counter(s for s, _, _ in tiles) == Counter(slide.decoded_tiles)
                    assert len(tiles) == sum(slide.decoded_tiles.values())


def test_info_is_json(cmu_svs):
    import json

    with open_slide(cmu_svs) as s:
        info = json.loads(json.dumps(s.info()))
    assert info["level_shapes"] == [[2967, 2220]]
    assert info["mpp"] == [0.499, 0.499]
    assert info["vendor"] == "aperio"


def _sparse_tiff(path, image, missing, tile=256):
    """A tiled TIFF of ``image`` whose tiles ``missing`` (row-major indices) are not stored.

    A tile offset and byte count of 0 is how scanners leave out areas they did not
    scan; OpenSlide returns such regions transparent.
    """
    import struct

    tifffile.imwrite(path, image, tile=(tile, tile), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        where = [
            (tags[name].valueoffset, int(tags[name].dtype))
            for name in ("TileOffsets", "TileByteCounts")
        ]
    data = bytearray(path.read_bytes())
    for offset, dtype in where:
        code = {3: "H", 4: "I", 16: "Q"}[dtype]
        for i in missing:
            struct.pack_into("<" + code, data, offset + i * struct.calcsize(code), 0)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_unscanned_tiles_read_as_white_glass_not_black(tmp_path, real_crop, backend):
    """OpenSlide's transparent (alpha 0) regions, and tifffile's missing tiles, are glass."""
    from napari_zoomin.engine.tissue import detect_tissue

    image = np.ascontiguousarray(real_crop[:1024, :1024])
    path = _sparse_tiff(tmp_path / "sparse.tif", image, missing=[5, 6, 9, 10])  # the centre
    with open_slide(path, backend=backend) as s:
        got = s.read(0, 0, 0, 1024, 1024)
        assert (got[256:768, 256:768] == 255).all()
        kept = np.ones((1024, 1024), bool)
        kept[256:768, 256:768] = False
        np.testing.assert_array_equal(got[kept], image[kept])
        assert not detect_tissue(s).mask[300:700, 300:700].any()


def test_transparent_pixels_are_composited_on_the_background():
    from napari_zoomin.slide.backends.openslide_backend import background_color, composite_on

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0] = [[200, 100, 50, 255], [0, 0, 0, 0], [200, 100, 50, 128]]
    rgba[1] = [[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 1]]
    background = (240, 230, 220)
    out = composite_on(rgba, background)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])  # opaque: as read
    np.testing.assert_array_equal(out[0, 1], background)  # transparent: the background
    np.testing.assert_array_equal(out[1, 1], background)
    # half transparent: the blend, rounded to the nearest
    expect = [
        (v * 128 + c * 127 + 127) // 255 for v, c in zip((200, 100, 50), background, strict=True)
    ]
    np.testing.assert_array_equal(out[0, 2], expect)
    opaque = np.full((4, 4, 4), 255, np.uint8)
    np.testing.assert_array_equal(composite_on(opaque, background), opaque[..., :3])
    assert background_color({"openslide.background-color": "F0E6DC"}) == (240, 230, 220)
    assert background_color({}) == (255, 255, 255)
    assert background_color({"openslide.background-color": "nonsense"}) == (255, 255, 255)
