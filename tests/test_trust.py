"""engine/trust.py: training profiles, slide comparison, evidence concentration."""

from __future__ import annotations

import numpy as np
import pytest

from napari_zoomin.engine.tissue import detect_tissue
from napari_zoomin.engine.trust import (
    BLACK,
    GLASS_OD,
    SlideProfile,
    evidence,
    evidence_warnings,
    model_warnings,
    optical_density_mean,
    profile_slide,
    resolution_warnings,
    slide_warnings,
    tissue_warnings,
    training_profile,
)
from napari_zoomin.slide import open_slide


@pytest.fixture(scope="module")
def cmu_profile(cmu_svs):
    slide = open_slide(cmu_svs)
    try:
        return profile_slide(slide, detect_tissue(slide))
    finally:
        slide.close()


def _profile(od, fraction=0.3, synthetic=False, mpp=0.5):
    return SlideProfile(mpp, fraction, od, 1000, synthetic)


def test_cmu_profile_is_h_and_e(cmu_profile):
    """Real H&E: eosin-pink tissue absorbs green most (OD_G > OD_R, OD_B)."""
    p = cmu_profile
    assert p.mpp == pytest.approx(0.499)
    assert p.synthetic is False
    assert 0.2 < p.tissue_fraction < 0.6
    r, g, b = p.od_mean
    assert g > r and g > b
    assert p.stained_pixels > 10000


def test_a_slide_like_training_gives_no_warning_and_an_ihc_stain_does(cmu_profile):
    profile = training_profile([cmu_profile, cmu_profile], 0.499)
    assert profile["slides"] == 2 and profile["od_std"] == [0.0, 0.0, 0.0]
    assert slide_warnings(profile, cmu_profile) == []
    # a 10 % colour cast is within tolerance
    from skimage import data

    ihc = data.immunohistochemistry()  # DAB + haematoxylin: brown and blue, not pink
    od, _ = optical_density_mean(ihc)
    warnings = slide_warnings(profile, _profile(tuple(od)))
    assert len(warnings) == 1
    assert "stain colour is unlike the training slides'" in warnings[0]
    assert "green" in warnings[0]


def _pixels_and_tissue(path):
    """A slide's level-0 pixels and its detected tissue mask."""
    slide = open_slide(path)
    try:
        return slide.read(0, 0, 0, *slide.shape), detect_tissue(slide).mask
    finally:
        slide.close()


def test_colour_cast_within_tolerance(cmu_svs):
    rgb, mask = _pixels_and_tissue(cmu_svs)
    od, _ = optical_density_mean(rgb, mask)
    cast = np.clip(rgb * np.array([1.0, 0.9, 1.0]), 0, 255).astype(np.uint8)
    od_cast, _ = optical_density_mean(cast, mask)
    profile = {"od_mean": list(od), "od_std": [0.0] * 3}
    assert slide_warnings(profile, _profile(tuple(od_cast))) == []


def test_black_and_glass_are_not_stain():
    black = np.zeros((50, 50, 3), np.uint8)
    glass = np.full((50, 50, 3), 242, np.uint8)
    assert optical_density_mean(black) == (None, 0)
    assert optical_density_mean(glass) == (None, 0)
    assert "No tissue was found" in tissue_warnings(None, found=False)[0]
    (little,) = tissue_warnings(0.004)
    assert little.startswith("Very little tissue found (0.4 % of the slide)")
    assert tissue_warnings(0.2) == []


def test_resolution_warnings():
    assert resolution_warnings((0.5, 0.5), 0.5, (1.0, 1.0)) == []
    (w,) = resolution_warnings((0.5, 0.5), 0.25, (0.5, 0.5))
    assert "2x coarser" in w and "upsampled" in w
    (w,) = resolution_warnings((0.25, 0.25), 0.5, (2.0, 2.0))
    assert "resampled to the model's 0.5 µm/pixel (2x fewer pixels per side)" in w
    (w,) = resolution_warnings(None, 0.5, (1.0, 1.0))
    assert "slide records no pixel size" in w and "--mpp" in w
    (w,) = resolution_warnings((0.5, 0.5), None, (1.0, 1.0))
    assert "model records no training pixel size" in w
    # the file's own warning replaces "records no pixel size" and is capitalised
    (w,) = resolution_warnings(None, 0.5, (1.0, 1.0), "the file says 1000 µm per pixel")
    assert w == "The file says 1000 µm per pixel"


def test_model_warnings_say_synthetic_and_missing_profile():
    synthetic = {"info": {"data": {"profile": {"synthetic": True}}}}
    assert "not for diagnosis" in model_warnings(synthetic)[0]
    assert "does not describe its training slides" in model_warnings({"info": {}})[0]
    real = {"info": {"data": {"profile": {"synthetic": False}}}}
    assert model_warnings(real) == []


def test_evidence_counts_places_by_single_linkage():
    # three sub-tiles chained within 100 px, one far away, one duplicate
    regions = np.array(
        [
            [0, 0, 32, 32],
            [90, 0, 32, 32],
            [180, 50, 32, 32],
            [5000, 5000, 32, 32],
            [5000, 5000, 32, 32],
        ]
    )
    assert evidence(regions, 100) == {"subtiles": 5, "places": 2}
    assert evidence(regions, 10) == {"subtiles": 5, "places": 4}
    assert evidence(np.zeros((0, 4)), 100) == {"subtiles": 0, "places": 0}


def test_places_use_the_evidence_rule():
    from napari_zoomin.engine.places import link_groups

    regions = np.array(
        [[5000, 5000, 32, 32], [0, 0, 32, 32], [90, 0, 32, 32], [5005, 5005, 16, 16]]
    )
    # numbered by first member; the same grouping evidence() counts
    assert link_groups(regions, 100).tolist() == [0, 1, 1, 0]
    assert link_groups(regions, 10).tolist() == [0, 1, 2, 0]
    assert link_groups(np.zeros((0, 4)), 100).tolist() == []
    assert evidence(regions, 100)["places"] == 2


def test_evidence_warning_says_agreement_is_not_certainty():
    (w,) = evidence_warnings({"subtiles": 2, "places": 1}, "sample", 16, 0.0)
    assert "All 16 draws read 2 sub-tiles in one place" in w
    assert "± 0.00" in w
    (w,) = evidence_warnings({"subtiles": 3, "places": 2}, "topk", 1, 0.0)
    assert "two places" in w
    assert evidence_warnings({"subtiles": 30, "places": 5}, "sample", 16, 0.0) == []
    # a small image is one or two places in all: nothing to warn about
    assert evidence_warnings({"subtiles": 2, "places": 1}, "sample", 16, 0.0, (512, 400), 128) == []
    assert len(evidence_warnings({"subtiles": 2, "places": 1}, "sample", 16, 0.0, (513, 4), 128))


def test_optical_density_mean_is_the_per_pixel_definition(cmu_svs):
    """The histogram shortcut gives the mean of −log10((v + 1) / 256) over the stained
    pixels (OD sum above glass, not black) inside the mask, computed pixel by pixel."""
    rgb, mask = _pixels_and_tissue(cmu_svs)
    od = -np.log10((rgb.astype(np.float64) + 1.0) / 256.0)
    keep = (od.sum(axis=-1) > GLASS_OD) & (rgb.max(axis=-1) > BLACK)
    rows = np.arange(rgb.shape[0]) * mask.shape[0] // rgb.shape[0]
    cols = np.arange(rgb.shape[1]) * mask.shape[1] // rgb.shape[1]
    keep &= mask[rows][:, cols].astype(bool)
    got, n = optical_density_mean(rgb, mask)
    assert n == int(keep.sum()) > 10000
    np.testing.assert_allclose(got, od[keep].mean(axis=0), rtol=1e-6)
