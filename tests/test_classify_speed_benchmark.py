"""benchmarks/classify_speed.py's output-size measure: repeated tissue tiles (an
artefact of the benchmark slides) are counted back, empty tiles are not."""

from __future__ import annotations

import numpy as np
import tifffile
from benchmarks.classify_speed import _repeated_tissue_bytes

from napari_zoomin.engine.results import write_attention_tiff


def test_repeated_tissue_tiles_are_counted_back_and_empty_ones_not(tmp_path):
    rng = np.random.default_rng(0)
    tile = rng.random((256, 256)).astype(np.float32) + 0.1
    a = np.zeros((1024, 768), np.float32)  # 4 × 3 tiles of 256
    a[:256, :256] = a[:256, 256:512] = a[512:768, :256] = tile  # one tile, three times
    a[256:512, 512:] = rng.random((256, 256))  # one distinct tile; the other 8 empty
    path = write_attention_tiff(tmp_path / "m.ome.tif", a, (0.0, 0.0), (1.0, 1.0), None, "m")
    with tifffile.TiffFile(path) as tif:
        level0 = tif.pages.first
        counts = level0.databytecounts
        assert len(set(level0.dataoffsets)) == 3  # the repeated, the distinct, the empty
        # only level 0 repeats tissue (its reduced levels mix the tiles)
        assert _repeated_tissue_bytes(path) == 2 * counts[0]
    empty_only = np.zeros((1024, 768), np.float32)
    empty_only[0, 0] = 1.0
    path = write_attention_tiff(
        tmp_path / "e.ome.tif", empty_only, (0.0, 0.0), (1.0, 1.0), None, "e"
    )
    assert _repeated_tissue_bytes(path) == 0
