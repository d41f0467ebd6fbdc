"""The edge rule (models/coordinates.py): nothing outside the image is ever drawn or read.

Exact assertions on coordinates, for every model kind, both stages, training and
inference, on images of awkward sizes, with attention networks that *want* the
border (the demo model's failure on real H&E: its attention sat on the last row and
its sub-tiles hung below the slide in the zero padding).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_zoomin.models import (
    ATS,
    ATSConfig,
    ReinforceATS,
    ReinforceConfig,
    Uniform,
    ZoomIn,
    ZoomInConfig,
)
from napari_zoomin.models.coordinates import CellGrid, outside_image, place_regions
from napari_zoomin.models.source import TensorSource

SIZES = [(961, 1283), (2967, 2220), (4097, 3001), (300, 20000), (333, 517)]
SEEDS = range(100)
TINY = {
    "feature_dim": 8,
    "feature_channels": (4, 4),
    "feature_hidden": 8,
    "attention_channels": 2,
    "n_samples": 6,
}


class BorderAttention(nn.Module):
    """Logits that peak on the map's outer rows and columns (and a little noise)."""

    offset = (0.0, 0.0)
    stride = (1, 1)

    def map_shape(self, view_shape):
        return (int(view_shape[0]), int(view_shape[1]))

    def forward(self, view):
        b, _, h, w = view.shape
        rows = torch.arange(h, device=view.device)
        cols = torch.arange(w, device=view.device)
        edge = ((rows == 0) | (rows == h - 1))[:, None] | ((cols == 0) | (cols == w - 1))[None]
        noise = torch.rand(b, h, w, generator=torch.Generator().manual_seed(h * w)).to(view)
        return 8.0 * edge.to(view.dtype) + noise + 0.0 * view.mean()


def _models(view_scale: float):
    zoom = ZoomIn(
        ZoomInConfig(
            view_scale=view_scale,
            stage2_scale=0.25,
            tile_size=(128, 128),
            subtile_size=(32, 32),
            contrastive_warmup_epochs=0,
            **TINY,
        ),
        attention=BorderAttention(),
        stage2_attention=BorderAttention(),
    )
    zoom_distinct = ZoomIn(
        ZoomInConfig(
            view_scale=view_scale,
            stage2_scale=0.25,
            tile_size=(128, 128),
            subtile_size=(32, 32),
            stage1_replace=False,
            contrastive_warmup_epochs=0,
            **TINY,
        ),
        attention=BorderAttention(),
        stage2_attention=BorderAttention(),
    )
    ats = ATS(
        ATSConfig(view_scale=view_scale, subtile_size=(64, 64), **TINY), attention=BorderAttention()
    )
    uniform = Uniform(ATSConfig(view_scale=view_scale, subtile_size=(64, 64), **TINY))
    reinforce = ReinforceATS(
        ReinforceConfig(view_scale=view_scale, subtile_size=(64, 64), num_classes=2, **TINY),
        attention=BorderAttention(),
    )
    return {
        "zoomin": zoom,
        "zoomin-distinct": zoom_distinct,
        "ats": ats,
        "uniform": uniform,
        "reinforce-ats": reinforce,
    }


def _image(h: int, w: int) -> TensorSource:
    """Noise with tissue touching all four borders (a hole in the middle is glass)."""
    g = torch.Generator().manual_seed(h + w)
    image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
    tissue = torch.ones(h, w, dtype=torch.bool)
    tissue[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = False
    return TensorSource(image, tissue=tissue)


def _assert_inside(regions: torch.Tensor, shape, what: str) -> None:
    """Inside along every axis where the region fits; centred along an axis where it cannot."""
    r = regions.reshape(-1, 4)
    h, w = shape
    for axis, length in ((0, h), (1, w)):
        size = r[:, 2 + axis]
        start = r[:, axis]
        fits = size <= length
        assert bool((start[fits] >= 0).all()), f"{what} starts before the image"
        assert bool((start[fits] + size[fits] <= length).all()), f"{what} ends after the image"
        centred = torch.div(length - size[~fits], 2, rounding_mode="floor")
        assert torch.equal(start[~fits], centred), f"{what} longer than the image is not centred"
    assert outside_image(r, shape) == 0


def _assert_fits(regions: torch.Tensor, shape, what: str) -> None:
    r = regions.reshape(-1, 4)
    assert bool((r[:, :2] >= 0).all()), what
    assert bool((r[:, :2] + r[:, 2:] <= torch.tensor(shape)).all()), what


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_nothing_outside_the_image_for_every_model_and_100_seeds(size):
    h, w = size
    src = _image(h, w)
    view_scale = 1 / 16 if max(h, w) < 3000 else 1 / 32
    if max(h, w) > 10000:
        view_scale = 1 / 64
    for name, model in _models(view_scale).items():
        model.eval()
        with torch.no_grad():
            stage1 = model.stage1([src])
        st = stage1[0]
        # the border attention does put its mass on the outer cells
        a = st.attention.reshape(st.grid.map_shape)
        edge = a[0].sum() + a[-1].sum() + a[1:-1, 0].sum() + a[1:-1, -1].sum()
        if name != "uniform":
            assert float(edge) > 0.5
        # every stage-1 cell is eligible: its centre is inside the image
        assert bool(st.grid.inside(torch.arange(st.grid.n_cells)).all())
        for seed in SEEDS:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                if isinstance(model, ZoomIn):
                    run = model.two_stage([src], stage1, [0, 0], seed % 2 == 1, gen)
                    _assert_inside(run.table_regions, (h, w), f"{name} tile (seed {seed})")
                    _assert_fits(run.sub_regions, (h, w), f"{name} sub-tile (seed {seed})")
                    # sub-cells drawn have their centres inside the image
                    centres = run.stage2_grid.select(run.sub_tiles).centres(run.sub_cells[:, None])
                    assert bool(((centres >= 0) & (centres < torch.tensor([h, w]))).all())
                else:
                    run = model.one_stage([src], stage1, [0, 0], gen)
                    _assert_fits(run.table_regions, (h, w), f"{name} sub-tile (seed {seed})")
        # inference, both modes, and one training step (contrastive draws included)
        for mode in ("sample", "topk"):
            (pred,) = model.predict([src], mode=mode, draws=3, generator=gen)
            _assert_inside(pred.tiles.regions, (h, w), f"{name} {mode} tile")
            _assert_fits(pred.subtiles.regions, (h, w), f"{name} {mode} sub-tile")
        model.train()
        terms = model.loss([src], [1], epoch=5, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(terms.total)


def test_a_slide_narrower_than_a_tile_never_draws_outside_it():
    """300 px high, tiles of 512: tiles are centred on the strip, sub-cells outside it
    are ineligible, sub-tiles lie inside."""
    h, w = 300, 4000
    src = _image(h, w)
    model = ZoomIn(
        ZoomInConfig(
            view_scale=1 / 32,
            stage2_scale=1 / 8,
            tile_size=(512, 512),
            subtile_size=(32, 32),
            **TINY,
        ),
        attention=BorderAttention(),
        stage2_attention=BorderAttention(),
    ).eval()
    with torch.no_grad():
        stage1 = model.stage1([src])
        for seed in SEEDS:
            run = model.two_stage([src], stage1, [0], False, torch.Generator().manual_seed(seed))
            assert bool((run.table_regions[:, 0] == (h - 512) // 2).all())
            _assert_inside(run.table_regions, (h, w), "tile")
            _assert_fits(run.sub_regions, (h, w), "sub-tile")
            # the border attention wants the tile view's outer rows, which are outside
            beta = run.beta.reshape(-1, *run.stage2_grid.map_shape)
            centres = run.stage2_grid.centres(
                torch.arange(run.stage2_grid.n_cells).expand(len(beta), -1)
            )
            outside = (centres[..., 0] < 0) | (centres[..., 0] >= h)
            assert bool(outside.any())
            assert float(run.beta[outside].abs().sum()) == 0.0


def test_place_regions_shifts_the_least_and_centres_what_cannot_fit():
    centres = torch.tensor([[0, 0], [5, 99], [50, 50], [99, 3]])
    r = place_regions(centres, (20, 10), (100, 100))
    assert r.tolist() == [[0, 0, 20, 10], [0, 90, 20, 10], [40, 45, 20, 10], [80, 0, 20, 10]]
    # longer than the image along rows: centred, overhanging equally
    r = place_regions(torch.tensor([[3, 50]]), (40, 10), (30, 100))
    assert r.tolist() == [[-5, 45, 40, 10]]


def test_masks_never_clamp_an_outside_point_onto_the_edge():
    grid = CellGrid(torch.zeros(1, 2), (100, 80), (10, 8), (10, 8), bounds=(100, 80))
    inside = torch.tensor([[0, 0], [99, 79]])
    assert grid.nearest_view_pixels(inside).tolist() == [[0, 0], [9, 7]]
    with pytest.raises(ValueError, match="outside"):
        grid.nearest_view_pixels(torch.tensor([[100, 10]]))
    with pytest.raises(ValueError, match="outside"):
        grid.nearest_view_pixels(torch.tensor([[-1, 10]]))


def test_a_read_that_breaks_the_edge_rule_is_refused():
    src = _image(200, 300)
    model = ATS(ATSConfig(view_scale=1 / 8, subtile_size=(32, 32), **TINY))
    bad = torch.tensor([[190, 10, 32, 32]])
    with pytest.raises(RuntimeError, match="edge rule"):
        model.featurise([src], torch.zeros(1, dtype=torch.int64), bad)


def test_same_padding_replicates_the_border():
    """A uniform view gives uniform logits: the border cells see no black padding."""
    from napari_zoomin.models.networks import AttentionNetwork

    torch.manual_seed(0)
    net = AttentionNetwork(channels=4, layers=3, padding="same")
    nn.init.normal_(net.logit.weight)
    with torch.no_grad():
        logits = net(torch.full((1, 3, 12, 17), 0.8))[0]
    assert torch.allclose(logits, logits[6, 8].expand_as(logits), atol=1e-6)
