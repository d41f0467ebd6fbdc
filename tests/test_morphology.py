"""Tissue detection's numpy morphology (engine/morphology.py) and Otsu threshold give
exactly what scipy.ndimage and scikit-image give, and a classification imports
neither scipy.ndimage nor scikit-image's thresholding (0.22 s of a process)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage
from skimage import filters, morphology

from napari_zoomin import open_slide
from napari_zoomin.engine.morphology import (
    binary_closing,
    disk,
    fill_holes,
    grow,
    label,
    remove_small_objects,
)
from napari_zoomin.engine.tissue import otsu_threshold, tissue_pixels


def _random_masks(seed: int, n: int, largest: int) -> list[np.ndarray]:
    """Random shapes (1-pixel rows and columns included) at random densities, plus
    the edge cases: empty, full, a diagonal, a ring with a hole, a spiral."""
    rng = np.random.default_rng(seed)
    masks = [rng.random(rng.integers(1, largest, 2)) < rng.random() for _ in range(n)]
    ring = np.ones((7, 9), bool)
    ring[2:5, 3:6] = False
    spiral = np.zeros((11, 11), bool)
    for k in range(0, 6, 2):  # nested square outlines, each open on one side
        spiral[k, k : 11 - k] = spiral[10 - k, k : 11 - k] = True
        spiral[k : 11 - k, 10 - k] = spiral[k + 2 : 11 - k, k] = True
    masks += [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.eye(6, dtype=bool)]
    masks += [ring, ~ring, spiral, ~spiral, np.ones((1, 1), bool), np.zeros((1, 1), bool)]
    return masks


@pytest.fixture(scope="module")
def real_masks(cmu_svs) -> list[np.ndarray]:
    """The real CMU slide's tissue candidates and black pixels, at level 0."""
    with open_slide(cmu_svs) as s:
        return list(tissue_pixels(s.read(0, 0, 0, *s.shape)))


def test_labels_are_scipys_numbering_and_all(real_masks):
    """The same label image and count as ``scipy.ndimage.label`` (4-connected,
    numbered in raster order), on random masks, edge cases and a real slide's."""
    for mask in _random_masks(2, 80, 70) + real_masks:
        expected, count = ndimage.label(mask)
        labels, n = label(mask)
        assert n == count
        np.testing.assert_array_equal(labels, expected)


def test_fill_holes_and_grow_are_scipys(real_masks):
    for mask in _random_masks(3, 80, 70) + real_masks:
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
        np.testing.assert_array_equal(grow(mask), ndimage.binary_dilation(mask))


def test_closing_from_shifted_copies_is_scipys_closing(real_masks):
    """Detection closes gaps with shifted copies (7x faster): the same pixels as
    ``scipy.ndimage.binary_closing``, at the image's edges too."""
    for mask in _random_masks(0, 40, 50) + real_masks[:1]:
        for radius in (1, 2, 3):
            footprint = disk(radius)
            expected = ndimage.binary_closing(mask, structure=footprint)
            np.testing.assert_array_equal(binary_closing(mask, footprint), expected)


def test_disk_and_small_objects_are_scikit_images(real_masks):
    for radius in range(6):
        np.testing.assert_array_equal(disk(radius), morphology.disk(radius).astype(bool))
    for mask in _random_masks(1, 60, 60) + real_masks:
        for max_size in (0, 1, 3, 17, mask.size):
            expected = morphology.remove_small_objects(mask, max_size=max_size)
            np.testing.assert_array_equal(remove_small_objects(mask, max_size), expected)


def test_otsu_is_scikit_images(cmu_svs):
    """The same threshold as ``skimage.filters.threshold_otsu``, to the last bit, on
    random values of several shapes and ranges, ties and constants, and the real
    slide's saturation (what detection thresholds)."""
    rng = np.random.default_rng(4)
    samples = [rng.random(rng.integers(2, 5000)).astype(np.float32) for _ in range(30)]
    samples += [(rng.normal(size=3000) * 10).astype(np.float32), rng.random(4000) ** 3]
    samples += [np.float32([0.2, 0.2, 0.7]), np.full(9, 0.3, np.float32), np.float32([5])]
    samples += [rng.integers(0, 3, 500).astype(np.float32)]
    with open_slide(cmu_svs) as s:
        rgb = s.read(0, 0, 0, *s.shape).astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    samples.append(((hi - lo) / np.maximum(hi, 1))[hi > 40])
    for values in samples:
        assert otsu_threshold(values) == float(filters.threshold_otsu(values))


def test_classification_imports_no_scipy_ndimage(tmp_path):
    """A whole classification with tissue detection, in a fresh process, leaves
    scipy.ndimage and scikit-image's filters unimported: they cost 0.22 s of every
    ``zoomin classify``."""
    code = (
        "import sys, numpy as np\n"
        "from napari_zoomin import classify, open_slide\n"
        "rgb = np.full((1536, 1536, 3), 235, np.uint8)\n"
        "rgb[300:1200, 200:1300] = (180, 90, 150)\n"
        "classify(open_slide(rgb, mpp=0.5), 'demo', draws=2)\n"
        "print(sorted(m for m in ('scipy.ndimage', 'skimage.filters') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
