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
