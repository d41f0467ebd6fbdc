"""Look-alike annotations: attention is pulled to ROIs and look-alikes, ``f`` tells them apart.

On a real sample slide (one tumour, one distractor: the same 1/16 view, different
cells), with the annotations its generator writes.
"""

from __future__ import annotations

import pytest
import torch

from napari_zoomin.engine.dataset import SlideDataset, SlideRecord
from napari_zoomin.errors import TrainingError
from napari_zoomin.models import ZoomIn, ZoomInConfig
from napari_zoomin.models.pretrain import _patches
from napari_zoomin.models.source import (
    full_region,
    read_attention_target,
    read_hard_negatives,
    read_roi,
)
from napari_zoomin.training import TrainConfig
from napari_zoomin.training.losses import roi_attention_loss

CLASSES = ["negative", "positive"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from napari_zoomin.samples import write_sample_slide

    folder = tmp_path_factory.mktemp("lookalike")
    return write_sample_slide(
        folder / "s.tif", size=8192, label="positive", seed=7, n_tumor=1, n_distractors=1
    )


def _dataset(info, lookalikes=()):
    record = SlideRecord(info.path, "positive", 1, "train", info.geojson_path)
    return SlideDataset(
        [record], CLASSES, roi_labels=("Tumor",), lookalike_labels=lookalikes, workers=1
    )


def _tiny_model(**settings) -> ZoomIn:
    """A small Zoom-In of the sample slides' scales (1/16 view, 128-px tiles, 32-px sub-tiles)."""
    return ZoomIn(
        ZoomInConfig(
            view_scale=1 / 16,
            tile_size=(128, 128),
            subtile_size=(32, 32),
            stage2_scale=0.25,
            feature_dim=8,
            feature_hidden=8,
            feature_channels=(4, 4),
            n_samples=4,
            **settings,
        )
    )


def _mass(mask, region, scale):
    """Sum of a whole-slide mask at ``scale`` inside a planted region's box."""
    y0, x0 = int(region.y * scale), int(region.x * scale)
    b = int(region.box * scale) + 1
    return float(mask[0, y0 : y0 + b, x0 : x0 + b].sum())


def test_the_attention_target_holds_rois_and_lookalikes_the_roi_only_rois(slide):
    tumour = next(r for r in slide.regions if r.kind == "Tumor")
    distractor = next(r for r in slide.regions if r.kind == "Distractor")
    s = 1 / 16
    with _dataset(slide, ("Distractor",)) as data:
        src = data[0]
        whole = full_region(src)
        roi, target = read_roi(src, whole, s), read_attention_target(src, whole, s)
        hard = read_hard_negatives(src, whole, s)
    assert _mass(roi, tumour, s) > 0 and _mass(roi, distractor, s) == 0
    assert _mass(target, tumour, s) == pytest.approx(_mass(roi, tumour, s))
    assert _mass(target, distractor, s) > 0
    assert _mass(hard, distractor, s) > 0 and _mass(hard, tumour, s) == 0
    # without look-alike labels the target is the ROI
    with _dataset(slide) as data:
        src = data[0]
        assert torch.equal(read_attention_target(src, whole, s), read_roi(src, whole, s))


def test_attention_losses_pull_towards_lookalikes_too(slide):
    """With a uniform α, the KL to the target grows when the target spreads over the
    distractor as well (a larger support): exactly log(cells) − H-like terms differ."""
    torch.manual_seed(0)
    model = _tiny_model(attention_stride=4).eval()
    with _dataset(slide) as data, torch.no_grad():
        only_roi = float(roi_attention_loss(model, [data[0]]))
    with _dataset(slide, ("Distractor",)) as data, torch.no_grad():
        both = float(roi_attention_loss(model, [data[0]]))
    # α uniform over n tissue cells: KL(M̃‖α) = log n − H(M̃); spreading M̃ over two
    # regions raises its entropy, so the loss falls
    assert both < only_roi


def test_pretraining_labels_f_by_the_roi_and_attention_by_the_target(slide, monkeypatch):
    distractor = next(r for r in slide.regions if r.kind == "Distractor")
    g = torch.Generator().manual_seed(0)
    with _dataset(slide, ("Distractor",)) as data:
        src = data[0]
        # patches centred on the distractor only: move the ROI/hard-negative draws there
        centre = torch.tensor(
            [[distractor.y + distractor.box // 2, distractor.x + distractor.box // 2]]
        )
        from napari_zoomin.models import pretrain

        monkeypatch.setattr(pretrain, "_centres", lambda src, n, s, g: centre.expand(n, 2))
        _, y_f = _patches([src], (32, 32), 1.0, 4, 1 / 16, g)
        _, y_a = _patches([src], (128, 128), 1 / 16, 4, 1 / 16, g, read_attention_target)
    assert y_f.tolist() == [0.0] * 4  # a look-alike is a negative for f
    assert y_a.tolist() == [1.0] * 4  # and a place to look for a and b


def test_a_label_cannot_be_roi_and_lookalike():
    with pytest.raises(TrainingError, match="both ROI and look-alike: Tumor"):
        TrainConfig(roi_labels=("Tumor",), lookalike_labels=("Tumor", "Mimic"))
    assert TrainConfig(lookalike_labels=["Mimic"]).lookalike_labels == ("Mimic",)


def test_the_trainers_pretraining_sources_read_lookalikes(slide):
    """The trainer pre-trains on slides it reopens on every read (``_LazySource``); it
    must expose the look-alike reads too.  It once had only ``read_roi``: the attention
    target fell back to the ROI and ``f`` never saw a hard negative, so pre-training
    taught ``f`` "brown region or not" and a tumour and its distractor got the same
    features (measured: 0.003 apart on the unit sphere, against 1.03 with them)."""
    from napari_zoomin.models.pretrain import _centres
    from napari_zoomin.training.trainer import _LazySource

    s = 1 / 16
    with _dataset(slide, ("Distractor",)) as data:
        src, lazy = data[0], _LazySource(data, 0)
        whole = full_region(src)
        for read in (read_roi, read_attention_target, read_hard_negatives):
            assert torch.equal(read(lazy, whole, s), read(src, whole, s)), read.__name__
        assert read_hard_negatives(lazy, whole, s).sum() > 0
        # so pre-training draws its quarter of hard negatives through it
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(_centres(lazy, 16, s, g1), _centres(src, 16, s, g2))


def test_feature_lr_zero_keeps_f_while_g_and_attention_learn():
    """``feature_lr`` puts ``f`` in a group of its own: at 0 an Adam step leaves it
    exactly as it was while ``g`` (at ``lr``) and the attention (``attention_lr``) move."""
    from napari_zoomin.training.trainer import _parameter_groups

    torch.manual_seed(0)
    model = _tiny_model()
    config = TrainConfig(lr=1e-3, attention_lr=1e-2, feature_lr=0.0)
    groups = _parameter_groups(model, config)
    assert [g.get("lr") for g in groups] == [None, 1e-2, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("feature.") for p in groups[2]["params"])
    assert {names[id(p)].split(".")[0] for p in groups[0]["params"]} == {"classifier"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("feature."), n
    # without feature_lr the groups are as before (checkpoints keep their order)
    assert len(_parameter_groups(model, TrainConfig(lr=1e-3, attention_lr=1e-2))) == 2
    with pytest.raises(TrainingError, match="feature_lr must be 0 or a positive number"):
        TrainConfig(feature_lr=-1.0)
