"""The lazy slide as the models' image source, and tissue detection, on real pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_zoomin import AnnotationError, open_slide
from napari_zoomin.engine.slide_source import SlideSource
from napari_zoomin.engine.tissue import TissueMask, detect_tissue, load_tissue_mask
from napari_zoomin.models.source import TensorSource
from pyramid_files import write_openslide_layout

REGIONS = torch.tensor([[0, 0, 512, 512], [96, 160, 512, 512], [-64, 1400, 512, 512]])


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory, real_crop):
    return write_openslide_layout(tmp_path_factory.mktemp("src") / "p.tif", real_crop, "zlib")


@pytest.mark.parametrize(
    ("scale", "level", "tolerance"), [(1.0, 0, 0), (0.5, 1, 0.5), (0.25, 2, 1.0)]
)
def test_reads_match_in_memory_source(pyramid, real_crop, scale, level, tolerance):
    """Same geometry as TensorSource; a coarser level differs only by its 8-bit rounding."""
    with open_slide(pyramid) as slide:
        source = SlideSource(slide)
        assert source.level_for(scale) == level
        got = source.read(REGIONS, scale)
        want = TensorSource(real_crop).read(REGIONS, scale)
        assert got.shape == want.shape == (3, 3, int(512 * scale), int(512 * scale))
        assert float((got - want).abs().max()) * 255 <= tolerance + 1e-3
        # the view comes from its level, not from level 0
        assert set(slide.decoded_pixels) == {level}


def test_sub_tiles_read_in_parallel_decode_each_tile_once(pyramid, real_crop):
    with open_slide(pyramid) as slide:
        source = SlideSource(slide, workers=4)
        # 16 sub-tiles of 64 px inside one 256-px file tile
        regions = torch.tensor(
            [[y, x, 64, 64] for y in range(0, 256, 64) for x in range(0, 256, 64)]
        )
        got = source.read(regions, 1.0)
        want = TensorSource(real_crop).read(regions, 1.0)
        assert torch.equal(got, want)
        assert slide.decoded_tiles == {0: 1}
        assert source.counter.full_resolution_pixels == 16 * 64 * 64


def test_view_not_aligned_to_level_grid_is_resampled(pyramid, real_crop):
    with open_slide(pyramid) as slide:
        got = SlideSource(slide).read(torch.tensor([[3, 5, 100, 100]]), 0.25)
        want = TensorSource(real_crop).read(torch.tensor([[3, 5, 100, 100]]), 0.25)
        assert got.shape == want.shape == (1, 3, 25, 25)
        assert float((got - want).abs().mean()) < 0.03  # sub-pixel shift only


def test_tissue_detection_on_sample_slide(tmp_path):
    from napari_zoomin.samples import write_sample_slide

    info = write_sample_slide(tmp_path / "s.tif", size=8192, label="negative", seed=3)
    with open_slide(info.path) as slide:
        tissue = detect_tissue(slide)
        level = len(slide.levels) - 1
        rgb = slide.read(level, 0, 0, *slide.levels[level].shape).astype(int)
        # the generator's glass is one flat colour; clearly stained pixels are tissue
        glass = np.abs(rgb - (245, 243, 243)).max(axis=-1) <= 3
        stained = (rgb.max(axis=-1) - rgb.min(axis=-1)) / np.maximum(rgb.max(axis=-1), 1) > 0.25
        assert 0.1 < tissue.fraction < 0.6
        at_level = tissue.at_scale(1 / slide.level_downsamples[level]).numpy()
        assert at_level.shape == slide.levels[level].shape
        assert at_level[stained].mean() > 0.99
        assert (~at_level[glass]).mean() > 0.9
        view = tissue.at_scale(1 / 16)
        assert view.shape == (512, 512) and view.dtype == torch.bool


def test_all_tissue_image_is_not_split_in_two(cmu_pixels):
    tissue = detect_tissue(open_slide(cmu_pixels[912:1936, 752:1776]))
    assert tissue.fraction > 0.6  # CMU crop: mostly tissue, Otsu alone would halve it


def test_user_mask_any_resolution_same_aspect(tmp_path):
    from PIL import Image

    mask = np.zeros((50, 100), np.uint8)
    mask[10:20, 30:60] = 1
    path = tmp_path / "mask.png"
    Image.fromarray(mask * 255).save(path)
    tm = load_tissue_mask(path, (5000, 10_000))
    assert isinstance(tm, TissueMask) and tm.fraction == pytest.approx(300 / 5000)
    view = tm.at_scale(0.01)  # 50 x 100, same grid as the mask
    assert torch.equal(view, torch.from_numpy(mask.astype(bool)))
    np.save(tmp_path / "labels.npy", mask.astype(np.int32) * 7)
    assert load_tissue_mask(tmp_path / "labels.npy", (5000, 10_000)).fraction == tm.fraction


def test_user_mask_wrong_size_is_a_clear_error(tmp_path):
    np.save(tmp_path / "bad.npy", np.ones((100, 100), bool))
    with pytest.raises(
        AnnotationError,
        match=r"bad.npy: the mask is 100 x 100 pixels but the "
        r"slide is 5000 x 10000",
    ):
        load_tissue_mask(tmp_path / "bad.npy", (5000, 10_000))
    with pytest.raises(AnnotationError, match="not found"):
        load_tissue_mask(tmp_path / "missing.png", (10, 10))


@pytest.mark.parametrize("scale", [1 / 16, 1 / 64, 1 / 300, 0.3])
def test_tissue_mask_at_any_scale_marks_views_pixels_over_any_tissue(scale):
    """``at_scale`` equals the definition: area resampling of the mask, then > 0."""
    import torch.nn.functional as F

    from napari_zoomin.geometry import scaled_size

    mask = np.random.default_rng(0).random((157, 123)) > 0.97
    tissue = TissueMask(mask, (10_000, 7_833), "test")
    size = (scaled_size(10_000, scale), scaled_size(7_833, scale))
    as_float = torch.from_numpy(mask.astype(np.float32))[None, None]
    expected = F.interpolate(as_float, size, mode="area")
    assert torch.equal(tissue.at_scale(scale), expected[0, 0] > 0)


# -- tissue on real slides: black borders, padding, glass, tissue at the edge ----------


def test_tissue_on_the_real_cmu_slide(cmu_svs):
    """H&E skin whose tissue runs off the bottom edge; white glass in the corners."""
    with open_slide(cmu_svs) as slide:
        tissue = detect_tissue(slide)
    mask = tissue.mask
    assert mask.shape == (2967, 2220)  # one level: detection reads level 0
    assert 0.33 < tissue.fraction < 0.43  # 0.381
    assert mask[-1].mean() > 0.3  # tissue that touches the slide's edge stays tissue
    # white glass: the top corners and the bottom left
    assert not mask[:400, :400].any() and not mask[:300, -300:].any()
    assert not mask[2400:, :400].any()


def _pad(rgb: np.ndarray, width: int, noise: int, seed: int = 0) -> np.ndarray:
    """``rgb`` inside a black border; ``noise`` > 0 adds ±noise to dark pixels (JPEG-like)."""
    padded = np.pad(rgb, ((width, width), (width, width), (0, 0))).astype(np.int16)
    if noise:
        dark = padded.max(axis=-1) <= 30
        rng = np.random.default_rng(seed)
        padded[dark] += rng.integers(-noise, noise + 1, (int(dark.sum()), 3), dtype=np.int16)
    return np.clip(padded, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("noise", [0, 8], ids=["zeros", "noisy-near-black"])
def test_black_border_is_never_tissue_and_tissue_still_is(cmu_pixels, noise):
    plain = detect_tissue(open_slide(cmu_pixels)).mask
    width = 200
    mask = detect_tissue(open_slide(_pad(cmu_pixels, width, noise))).mask
    border = mask.copy()
    border[width:-width, width:-width] = False
    assert not border.any()
    inner = mask[width:-width, width:-width]
    assert (inner == plain).mean() > 0.999
    assert inner[-1].mean() > 0.3  # the tissue next to the border is kept


def test_black_border_at_the_detection_level_of_a_jpeg_pyramid(tmp_path, cmu_pixels):
    """Real JPEG artefacts at black/tissue edges, detected at a downsample of 64."""
    from napari_zoomin.samples import write_array_pyramid

    width = 512  # black on top, left and right: the tissue still runs off the bottom
    padded = np.pad(cmu_pixels, ((width, 0), (width, width), (0, 0)))
    info = write_array_pyramid(tmp_path / "padded.tif", padded, 256, "jpeg", min_size=32)
    with open_slide(info.path) as slide:
        tissue = detect_tissue(slide)
        assert slide.level_downsamples[6] == pytest.approx(64, rel=0.02)
    mask = tissue.mask
    assert mask.shape == slide.level_shapes[6]
    edge = width // 64 - 1  # mask pixels wholly inside the black border
    assert not mask[:edge].any() and not mask[:, :edge].any() and not mask[:, -edge:].any()
    assert mask[-1].any()
    inner = tissue.at_scale(1.0)[width:, width:-width].numpy()  # back at level 0
    assert inner[detect_tissue(open_slide(cmu_pixels)).mask].mean() > 0.97


@pytest.mark.parametrize("kind", ["glass", "black", "noisy-black"])
def test_slide_without_tissue_has_an_empty_mask(cmu_pixels, kind):
    rng = np.random.default_rng(1)
    image = {
        "glass": cmu_pixels[1800:, :450],  # real glass of the CMU slide
        "black": np.zeros((1000, 800, 3), np.uint8),
        "noisy-black": rng.integers(0, 17, (1000, 800, 3)).astype(np.uint8),
    }[kind]
    tissue = detect_tissue(open_slide(image))
    assert not tissue.mask.any() and tissue.fraction == 0.0


def test_read_bytes_are_the_stored_pixels_of_read_or_nothing(pyramid):
    """``read_bytes``: exactly ``read`` × 255 as uint8 when no resampling is needed (a
    gigapixel view stays 8-bit until the attention network converts it a block at a
    time); ``None`` when the read would be resampled."""
    with open_slide(pyramid) as slide:
        source = SlideSource(slide)
        for scale in (1.0, 0.25):
            raw = source.read_bytes(REGIONS, scale)
            assert raw.dtype == torch.uint8
            assert torch.equal(raw.float().div_(255.0), source.read(REGIONS, scale))
        assert source.read_bytes(torch.tensor([[3, 5, 100, 100]]), 0.25) is None


@pytest.mark.parametrize("stride", [1, 4])
def test_stage1_from_the_8_bit_view_equals_training_stage1(pyramid, stride):
    """At inference the stage-1 view stays 8-bit and only tissue blocks are computed:
    α is the one training computes from the float view of the whole slide."""
    from torch import nn

    from napari_zoomin.models import ZoomIn, ZoomInConfig

    torch.manual_seed(0)
    model = ZoomIn(
        ZoomInConfig(
            view_scale=0.25,
            attention_stride=stride,
            tile_size=(64, 64),
            subtile_size=(16, 16),
            stage2_scale=0.5,
            feature_dim=8,
            feature_hidden=8,
            feature_channels=(4, 4),
            n_samples=4,
        )
    ).eval()
    nn.init.normal_(model.attention.logit.weight)
    with open_slide(pyramid) as slide:
        source = SlideSource(slide, tissue=detect_tissue(slide))
        trained = model.stage1([source])[0]
        with torch.no_grad():
            inferred = model.stage1([source])[0]
    assert inferred.grid.map_shape == trained.grid.map_shape
    torch.testing.assert_close(inferred.attention, trained.attention.detach(), rtol=0, atol=1e-7)
    assert float(inferred.attention.sum()) == pytest.approx(1.0)
