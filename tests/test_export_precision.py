"""The rule of the attention maps in output files (``engine.results.export_precision``):
the cells that carry >= 99.5 % of the mass, at float16's precision in float32's range."""

from __future__ import annotations

import numpy as np
import pytest

from napari_zoomin.engine.results import (
    EXPORT_KEPT_MASS,
    EXPORT_MANTISSA_BITS,
    export_precision,
)


def peaked_map(seed: int, shape=(300, 400), scale: float = 1.0) -> np.ndarray:
    """A softmax over noisy logits with a few hot spots: attention's shape."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, shape)
    for y, x in rng.integers(0, min(shape), (4, 2)):
        logits[y : y + 5, x : x + 5] += 25
    a = np.exp(logits - logits.max())
    return (scale * a / a.sum()).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1.0, 1e-30])  # a tiny map must not underflow
def test_export_keeps_the_mass_to_three_digits(seed, scale):
    a = peaked_map(seed, scale=scale)
    out, dropped = export_precision(a)
    assert out.dtype == np.float32 and out.shape == a.shape
    kept = out > 0
    total = a.sum(dtype=np.float64)
    # the dropped share is what it says, and at most 0.5 %
    assert dropped == pytest.approx(a[~kept].sum(dtype=np.float64) / total, rel=1e-9, abs=1e-15)
    assert 0 <= dropped <= 1 - EXPORT_KEPT_MASS
    # every dropped cell is smaller than every kept one (a threshold, not a sample)
    assert a[~kept].max(initial=0) < a[kept].min()
    # kept cells to 2^-11 relative precision (float16's 10 mantissa bits, rounded)
    rel = np.abs(out[kept] - a[kept]) / a[kept]
    assert rel.max() <= 2.0 ** -(EXPORT_MANTISSA_BITS + 1)
    # and the rounded values have 13 zero low bits: what makes zlib shrink them
    assert not (out[kept].view(np.uint32) & np.uint32((1 << 13) - 1)).any()
    assert kept.mean() < 0.5  # the thin tail is gone


def test_export_of_empty_negative_and_nan_maps():
    out, dropped = export_precision(np.zeros((3, 4), np.float32))
    assert not out.any() and dropped == 0.0
    a = np.array([[0.5, -1.0], [np.nan, 0.5]], np.float32)
    out, dropped = export_precision(a)
    np.testing.assert_array_equal(out, [[0.5, 0.0], [0.0, 0.5]])
    assert dropped == 0.0
    out, _ = export_precision(np.zeros((0, 5), np.float32))
    assert out.shape == (0, 5)


def test_exported_maps_compress_far_better(tmp_path):
    import tifffile

    a = peaked_map(0, shape=(1024, 1024))
    out, _ = export_precision(a)
    for name, data in (("exact", a), ("export", out)):
        tifffile.imwrite(tmp_path / f"{name}.tif", data, tile=(256, 256), compression="zlib")
    exact = (tmp_path / "exact.tif").stat().st_size
    export = (tmp_path / "export.tif").stat().st_size
    assert export * 4 < exact, (export, exact)


def test_a_mostly_empty_map_stores_its_empty_tile_once(tmp_path):
    """A slide-wide stage-2 canvas is mostly empty tiles: the OME-TIFF stores the empty
    tile's bytes once and points every empty tile at them, and reads back exactly at
    every level."""
    import tifffile

    from napari_zoomin.engine.results import SparseMap, write_attention_tiff

    rng = np.random.default_rng(3)
    shape = (3000, 2600)  # 12 × 11 tiles of 256 at level 0, partial edge tiles
    rows = rng.integers(0, 700, 400)  # non-zero cells only in the top-left corner
    cols = rng.integers(0, 500, 400)
    lin = np.unique(rows * shape[1] + cols)
    values = rng.random(lin.size).astype(np.float32) + 0.5
    sparse = SparseMap(shape, lin // shape[1], lin % shape[1], values)
    path = write_attention_tiff(
        tmp_path / "m.ome.tif", sparse, (0.0, 0.0), (4.0, 4.0), (0.5, 0.5), "stage 2"
    )
    levels, want, stored, listed = [], sparse, 0, 0
    with tifffile.TiffFile(path) as tif:
        pages = [tif.pages.first, *tif.pages.first.pages]
        for k, level in enumerate(tif.series[0].levels):
            levels.append(level.asarray())
            page = pages[k]
            assert min(page.databytecounts) > 0  # no "sparse" zero byte counts
            empties = [i for i, n in enumerate(page.databytecounts) if n == page.databytecounts[-1]]
            # the last tile lies far from the corner: empty, and shared with all others
            assert len({page.dataoffsets[i] for i in empties}) == 1
            stored += sum(
                n for _, n in set(zip(page.dataoffsets, page.databytecounts, strict=True))
            )
            listed += sum(page.databytecounts)
        assert len(pages[0].dataoffsets) == 132 and len(empties) > 0
    for k, level in enumerate(levels):
        assert np.array_equal(level, want.dense()), f"level {k}"
        want = want.pooled()
    # the file holds each distinct tile once: well under the tiles it lists
    assert path.stat().st_size < stored + 16 * 2**10 < listed
    assert listed - stored > 100 * 250  # at least 100 copies of the empty tile saved


def test_a_dense_map_reads_back_exactly_with_every_tile_plain_zlib(tmp_path):
    """Maps are encoded by zlib-ng, not zlib: every tile must still be a
    standard zlib stream (what libtiff, Bio-Formats and tifffile decode), the map read
    back exactly at every level (2×2 maxima), and its all-zero tiles stored once."""
    import zlib

    import tifffile

    from napari_zoomin.engine.results import write_attention_tiff
    from napari_zoomin.geometry import max_2x2

    a, _ = export_precision(peaked_map(1, shape=(1100, 900)))
    a[:512, :] = 0  # whole rows of empty tiles
    path = write_attention_tiff(tmp_path / "s1.ome.tif", a, (0.0, 0.0), (2.0, 2.0), None, "s1")
    want = a
    with tifffile.TiffFile(path) as tif:
        pages = [tif.pages.first, *tif.pages.first.pages]
        levels = tif.series[0].levels
        assert len(levels) == len(pages) == 4  # 1100 → 550 → 275 → 138
        for k, (level, page) in enumerate(zip(levels, pages, strict=True)):
            assert np.array_equal(level.asarray(), want), f"level {k}"
            tif.filehandle.seek(page.dataoffsets[-1])
            raw = zlib.decompress(tif.filehandle.read(page.databytecounts[-1]))
            assert len(raw) == 256 * 256 * 4  # a full (padded) little-endian float32 tile
            want = max_2x2(want)
        first = pages[0]
        assert len(set(first.dataoffsets[:8])) == 1  # the 8 empty tiles share their bytes


def test_max_2x2_is_the_maximum_of_each_2x2_block():
    from napari_zoomin.geometry import max_2x2

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (2, 3), (5, 7), (64, 33)]:
        a = rng.normal(size=shape).astype(np.float32)
        want = np.array(
            [
                [a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max() for j in range((shape[1] + 1) // 2)]
                for i in range((shape[0] + 1) // 2)
            ],
            np.float32,
        ).reshape((shape[0] + 1) // 2, (shape[1] + 1) // 2)
        assert np.array_equal(max_2x2(a), want), shape


@pytest.mark.parametrize("missing", [("ZLIBNG",), ("ZLIBNG", "DEFLATE")])
def test_maps_are_written_by_the_next_encoder_where_imagecodecs_lacks_one(
    tmp_path, monkeypatch, missing
):
    """zlib-ng, else libdeflate, else zlib: every one writes a map that reads back
    exactly."""
    import imagecodecs
    import tifffile

    from napari_zoomin.engine.results import write_attention_tiff

    a, _ = export_precision(peaked_map(2, shape=(300, 400)))
    fast = write_attention_tiff(tmp_path / "fast.ome.tif", a, (0.0, 0.0), (1.0, 1.0), None, "m")
    for name in missing:
        monkeypatch.setattr(getattr(imagecodecs, name), "available", False)
    slow = write_attention_tiff(tmp_path / "slow.ome.tif", a, (0.0, 0.0), (1.0, 1.0), None, "m")
    for path in (fast, slow):
        with tifffile.TiffFile(path) as tif:
            assert np.array_equal(tif.series[0].levels[0].asarray(), a)
    assert fast.read_bytes() != slow.read_bytes()  # the encoders did run
