"""MagNets (002): reads through the pyramid, the tree of boxes, gradients, training, files."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_zoomin import open_slide
from napari_zoomin.engine.checkpoints import build_model, load_checkpoint, save_checkpoint
from napari_zoomin.engine.slide_source import SlideSource
from napari_zoomin.models import TensorSource
from napari_zoomin.models.magnet import (
    MagNet,
    MagNetConfig,
    _turn,
    _unturn,
    grey_filter,
    moments_to_theta,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyramid_files import write_openslide_layout


def tiny(**overrides) -> MagNetConfig:
    """A MagNet small enough to train in seconds on a CPU."""
    settings = {
        "patches": (2, 3),
        "view_size": 8,
        "sample_size": 16,
        "classifier_size": 16,
        "localiser_channels": 2,
        "encoder_channels": (4, 8),
        "feature_dim": 8,
        "gru_hidden": 8,
        "head_hidden": (8, 8),
        "grey_filter": False,
        "aux_layers": (1, 2),
    }
    settings.update(overrides)
    return MagNetConfig(**settings)


def images(n: int, seed: int = 0, shape=(40, 56)) -> list[TensorSource]:
    gen = torch.Generator().manual_seed(seed)
    return [TensorSource(torch.rand(3, *shape, generator=gen)) for _ in range(n)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: one thread is faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(512, 384, 3), dtype=np.uint8)
    return write_openslide_layout(tmp_path_factory.mktemp("mag") / "p.tif", image, "zlib")


@pytest.mark.parametrize("margin", [0, 2])
def test_a_magnified_box_is_the_slides_pixels_at_the_level_that_gives_full_detail(pyramid, margin):
    """A 64-pixel box sampled at 16 × 16 is read at scale 1/4: level 2 of the file, and
    the grid lands on that level's pixel centres, so the sample is Slide.read's pixels."""
    model = MagNet(tiny(read_margin=margin, sampler="bilinear"))
    with open_slide(pyramid) as slide:
        source = SlideSource(slide)
        top, left, side = 128, 64, 64
        centre = torch.tensor([top + side / 2, left + side / 2], dtype=torch.float64)
        out, scale, level = model.sample_box(
            source, centre, torch.tensor(side, dtype=torch.float64), 16
        )
        assert scale == 0.25 and level == 2
        expected = slide.read(2, top // 4, left // 4, 16, 16)
    got = np.rint(out.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert float((out * 255 - torch.from_numpy(expected).permute(2, 0, 1)).abs().max()) < 1e-3


def test_a_box_reaching_outside_the_image_reads_black_there_and_nothing_outside(pyramid):
    model = MagNet(tiny(read_margin=2, sampler="bilinear"))
    with open_slide(pyramid) as slide:
        source = SlideSource(slide)
        centre = torch.tensor([8.0, 8.0], dtype=torch.float64)  # box [-8, 24)
        out, scale, level = model.sample_box(source, centre, torch.tensor(32.0), 16)
        assert level == 1 and scale == 0.5
        reads = dict(source.counter.level0_pixels)
    # grid points 0-3 lie at level-0 −7, −5, −3, −1: outside (zero up to float rounding)
    assert out[:, :4, :].abs().max() < 1e-6 and out[:, :, :4].abs().max() < 1e-6
    assert out[:, 4:, 4:].amax(dim=0).min() > 0  # the image's pixels (random, not black)
    assert reads == {0.5: 28 * 28}  # the window [0, 28)², clipped: nothing outside asked


def test_moments_give_the_documented_scale_and_translation():
    n = 8
    centres = (2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1
    point = torch.zeros(1, n, n, dtype=torch.float64)
    point[0, 2, 5] = 1
    s, t = moments_to_theta(point, 0.05)
    assert s.item() == 0.05  # a single cell: the lower bound of 002 eq. 1
    assert t[0].tolist() == pytest.approx([math.tanh(centres[2]), math.tanh(centres[5])])
    uniform = torch.full((1, n, n), 1 / n**2, dtype=torch.float64)
    s, t = moments_to_theta(uniform, 0.05)
    # discrete uniform on n centres: variance (1 − 1/n²)/3 per axis
    assert s.item() == pytest.approx(math.sqrt(1 - 1 / n**2 + 1e-8))
    assert t.abs().max().item() < 1e-15


def test_the_eight_turns_are_undone_and_the_grey_filter_blanks_grey():
    x = torch.arange(12.0).reshape(1, 3, 4)[:, :3, :3]
    for k in range(4):
        for flip in (False, True):
            assert torch.equal(_unturn(_turn(x, k, flip), k, flip), x)
    pixels = torch.tensor([[[0.5, 0.2]], [[0.52, 0.6]], [[0.51, 0.3]]])  # (3, 1, 2)
    out = grey_filter(pixels, 15)
    assert out[:, 0, 0].abs().max() == 0  # spread 0.02·255 = 5.1 ≤ 15: grey
    assert torch.equal(out[:, 0, 1], pixels[:, 0, 1])


@pytest.mark.parametrize("patches", [(2, 3), (3, 2, 2)])
def test_the_tree_has_prod_p_leaves_and_a_frozen_first_patch_in_layer_2(patches):
    model = MagNet(tiny(patches=patches))
    (pred,) = model.predict(images(1))
    mag = pred.magnified
    counts = [int((mag.depth == d).sum()) for d in range(1, len(patches) + 1)]
    assert counts == [math.prod(patches[: d + 1]) for d in range(len(patches))]
    leaves = math.prod(patches)
    assert pred.subtiles.regions.shape == (leaves, 4)
    assert mag.trace.shape == (leaves, 2)
    assert torch.equal(mag.trace[-1], pred.probabilities)
    # slot 0 of layer 2 is its parent box, exactly
    layer2 = torch.nonzero(mag.depth == 2)[:, 0]
    for m in layer2[:: patches[1]].tolist():
        assert torch.equal(mag.boxes[m], mag.boxes[mag.parent[m]])
    # every region inside the image
    h, w = 40, 56
    r = pred.subtiles.regions
    assert (r[:, :2] >= 0).all() and (r[:, 0] + r[:, 2] <= h).all()
    assert (r[:, 1] + r[:, 3] <= w).all()


@pytest.mark.parametrize("sampler", ["lms", "bilinear"])
def test_gradients_reach_every_layers_theta(sampler):
    torch.manual_seed(0)
    model = MagNet(tiny(patches=(2, 2, 2), sampler=sampler, aux_layers=(1, 3)))
    terms = model.loss(
        images(2, shape=(24, 32)), [0, 1], generator=torch.Generator().manual_seed(0)
    )
    terms.total.backward()
    assert len(model.localisers) == 2 + 2 + 8  # layer 2's first slot (of 2 frames) is frozen
    for key, net in model.localisers.items():
        g = torch.cat([p.grad.flatten() for p in net.parameters()])
        assert torch.isfinite(g).all() and g.abs().sum() > 0, key
    assert terms.auxiliary is not None and terms.paradoxical is not None


def test_a_short_run_lowers_the_loss():
    """Positive images hold a bright red square somewhere, negatives do not."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    sources, labels = [], []
    for k in range(6):
        img = torch.rand(3, 48, 48, generator=gen) * 0.3
        if k % 2:
            y, x = torch.randint(0, 40, (2,), generator=gen).tolist()
            img[0, y : y + 8, x : x + 8] = 1.0
        sources.append(TensorSource(img))
        labels.append(k % 2)
    model = MagNet(tiny(patches=(2, 2), augment=False))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss() -> float:  # deterministic: no augmentation, LMS's forward is bilinear's
        with torch.no_grad():
            return float(model.loss(sources, labels).total)

    before = loss()
    for step in range(35):
        opt.zero_grad()
        model.loss(sources, labels, generator=torch.Generator().manual_seed(step)).total.backward()
        opt.step()
    after = loss()
    assert after < 0.9 * before, (before, after)


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(3)
    model = MagNet(tiny(num_classes=3, patches=(2, 2)))
    path = save_checkpoint(tmp_path / "m.safetensors", model, ["a", "b", "c"])
    loaded = load_checkpoint(path)
    assert loaded.kind == "magnet" and isinstance(loaded.model, MagNet)
    src = images(2, seed=5)
    p1, p2 = model.predict(src), loaded.model.predict(src)
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a.probabilities, b.probabilities)
        assert torch.equal(a.magnified.boxes, b.magnified.boxes)
        assert torch.equal(a.magnified.trace, b.magnified.trace)
    with pytest.raises(ValueError, match="patches"):
        build_model("magnet", {"patches": [8, 8, 8, 8, 8]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_as_on_the_cpu():
    torch.manual_seed(0)
    model = MagNet(tiny(sampler="bilinear"))
    src = images(2)
    cpu = model.predict(src)
    gpu = model.to("cuda").predict(src)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(a.probabilities, b.probabilities, atol=2e-3, rtol=0)
    terms = model.train().loss(src, [0, 1], generator=torch.Generator().manual_seed(0))
    terms.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class _Trap:
    """Unpickling this creates ``marker``: proof that a file was (not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_encoders_start_from_a_users_safetensors_file_checked_and_never_unpickled(tmp_path):
    from safetensors.torch import save_file

    from napari_zoomin.engine.encoder_weights import load_encoder_weights
    from napari_zoomin.errors import CheckpointError
    from napari_zoomin.models.magnet import PatchEncoder

    torch.manual_seed(0)
    model = MagNet(tiny())
    donor = PatchEncoder((4, 8), 8)  # the tiny MagNet's encoder architecture
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    plain = save_file(state, tmp_path / "enc.safetensors") or tmp_path / "enc.safetensors"
    assert load_encoder_weights(model, plain) == ["encoder", "aux_encoders.1", "aux_encoders.2"]
    for encoder in (model.encoder, *model.aux_encoders.values()):
        for name, value in encoder.state_dict().items():
            assert torch.equal(value, state[name])
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"encoder.{k}": v for k, v in state.items()}, prefixed)
    fresh = MagNet(tiny())
    load_encoder_weights(fresh, prefixed)
    assert torch.equal(fresh.encoder.fc.weight, state["fc.weight"])

    before = {k: v.clone() for k, v in fresh.state_dict().items()}

    def refused(tensors: dict, match: str, name: str = "bad.safetensors") -> None:
        path = tmp_path / name
        save_file(tensors, path)
        with pytest.raises(CheckpointError, match=match) as info:
            load_encoder_weights(fresh, path)
        assert str(path) in str(info.value)

    wider = {k: v.contiguous() for k, v in PatchEncoder((4, 8), 16).state_dict().items()}
    refused(wider, r"fc.weight has shape \(16, 8\); the MagNet encoder's fc.weight is \(8, 8\)")
    refused({k: v for k, v in state.items() if k != "fc.bias"}, "lacks fc.bias")
    refused({**state, "head.weight": torch.zeros(2)}, "holds head.weight, which it has not")
    refused({**state, "fc.bias": torch.full((8,), float("nan"))}, "fc.bias holds NaN")
    refused({**state, "fc.bias": torch.zeros(8, dtype=torch.int64)}, "holds I64, not floating")
    with pytest.raises(CheckpointError, match="no such file of encoder weights"):
        load_encoder_weights(fresh, tmp_path / "absent.safetensors")
    # a pickle (what torch.save writes) is refused without being unpickled
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "enc.pt"
    torch.save({"trap": _Trap(marker), **state}, pickled)
    with pytest.raises(CheckpointError, match=r"is not a safetensors file .* never unpickles"):
        load_encoder_weights(fresh, pickled)
    assert not marker.exists()
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refusals change nothing
