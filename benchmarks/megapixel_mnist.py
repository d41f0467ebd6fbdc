"""Megapixel MNIST (ATS §4.2): CNN, U-N, ATS-N with/without replacement, REINFORCE, Zoom-In.

    python -m benchmarks.megapixel_mnist [--epochs 8 --train 5000 --test 1000] [--plot p.png]
    python -m benchmarks.megapixel_mnist --quick          # the whole table in < 5 min

1500×1500 images, each with 5 real MNIST digits (3 of the label's class) and 50
digit-sized scribbles (:func:`benchmarks.mnist_data.megapixel_mnist`), composed on
the fly; ten classes.  Settings from ATS §4.2 and its reference code: view 0.12
(180×180, 32,400 cells), 50×50 patches, N = 10, entropy weight 1e-4, uniform mix
1e-5, Adam (``--lr``), gradient norm clipped to 1.  Every model gets the same epochs,
batches and seed.

What differs from the paper, so that a table fits in a few hours of CPU (ATS trained
500 epochs on a GPU; the default 8 epochs take 30–40 minutes per sampling model on
one core, and ``--models`` splits a table over processes sharing one ``--out``):

- **8 epochs, batches of 8, the learning rate decayed to 0 by a cosine**
  (``--lr-schedule``; ATS: 500 epochs of batches of 128);

- **ink mask**: the images carry a tissue mask (the view pixels holding ink, as a
  slide's tissue mask), so no draw lands on the empty canvas (``--mask none`` to drop);
- **f** is one network for all sampling models (:class:`PooledFeatureNetwork`:
  convolutions and global max pooling, like the ATS reference) **initialised on
  single MNIST digits** (:func:`pretrain_features`); trained from scratch, ATS-10
  stays at chance for thousands of steps (the ``ats_scratch`` row, not run by
  default);
- **g** is one linear layer on the features times 16 (:class:`ScaledClassifier`).

Rows run by default (the issue's six): **CNN** on the 0.12 view
(:class:`~napari_zoomin.models.LowResolutionCNN`; ATS trained its CNN on the full
1500² image, not affordable here); **U-N**: uniform attention over the ink; **ATS-N**
without replacement (ATS's default) and with (``ats_replace``); **ATS-N, REINFORCE**
(``reinforce``; 003: attention by policy gradient, 4 samples per image); **Zoom-In
(N)** (``zoomin_half_t75``): stage 1 on the 0.12 view with ``a`` computed at half
that resolution (:class:`HalfResolutionAttention`, one cell per 2×2 view pixels),
N distinct 75×75 tiles (``stage1_replace=False``), seen at 0.25 by stage 2, 50×50
sub-tiles, no contrastive loss (it pushes views towards a "negative" class, and this
task has none).

The other rows are the experiments that led there (``docs/benchmarks.md``): Zoom-In
with 100² tiles from views at ``s1`` 0.06 / 0.08 / 0.1 (``zoomin``, ``zoomin_s08``,
``zoomin_s1``); at 0.12 with half-resolution ``a`` and 000's stage 1
(``zoomin_half``), N distinct 100² tiles (``zoomin_half_distinct``), the same seen
at 0.5 by stage 2 (``zoomin_half_s2``), or with the sub-tile baseline
(``zoomin_half_cv``, ``zoomin_half_t75_cv``); ATS-10 with the half-resolution ``a``
(``ats_half``, the control) and with ``f`` from scratch (``ats_scratch``).  The
``magnet`` row is a MagNet (002, issue 20) at the same budget of N full-resolution
50² patches (:func:`_magnet`).  The ``reinforce_*`` rows (:func:`reinforce_models`,
issue 18 item 5) vary REINFORCE-ATS against its collapse onto one digit: the
estimate's reward (``reward="estimate"``), the mean aggregation, a uniform mix of
0.1, an entropy weight of 1e-2, and each draw rewarded by what it adds to its
estimate (``reward="leave_one_out"``); :mod:`benchmarks.megapixel_mnist_3class` runs
them on a three-class variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.mnist_data import DIGIT, Mnist, megapixel_mnist, noise_patterns
from benchmarks.mnist_networks import (
    HalfResolutionAttention,
    PooledFeatureNetwork,
    ScaledClassifier,
)
from benchmarks.mnist_runner import Bench, ModelSpec, main
from napari_zoomin.models import (
    ATS,
    ATSConfig,
    LowResolutionCNN,
    MagNet,
    MagNetConfig,
    ReinforceATS,
    ReinforceConfig,
    Uniform,
    ZoomIn,
    ZoomInConfig,
)

VIEW_SCALE = 0.12
SUBTILE = (50, 50)
FEATURE_DIM = 64
SHARED = {
    "num_classes": 10,
    "feature_dim": FEATURE_DIM,
    "entropy_weight": 1e-4,
    "uniform_mix": 1e-5,
}


def digit_patches(mnist: Mnist, split: str, n: int, seed: int, size: int = 50):
    """``n`` grey patches (n, 3, size, size) with one MNIST digit each, or only scribbles.

    Class ``c`` < 10: a digit of class ``c`` at a random offset, over half of them a
    scribble drawn (not pasted: the digit stays whole) at another random offset;
    class 10: one or two scribbles and no digit.  Scribbles are drawn as in
    :func:`~benchmarks.mnist_data.megapixel_mnist`.
    """
    rng = np.random.default_rng([seed, 28, 1 if split == "train" else 2])
    images, labels = mnist.images[split], mnist.labels[split]
    noise = noise_patterns(np.random.default_rng([seed, 50]), 50)
    x = np.zeros((n, size, size), dtype=np.uint8)
    y = np.full(n, 10, dtype=np.int64)
    free = size - DIGIT + 1
    for i in range(n):
        if i % 11:
            k = int(rng.integers(len(images)))
            t, lf = rng.integers(0, free, 2)
            x[i, t : t + DIGIT, lf : lf + DIGIT] = images[k]
            y[i] = labels[k]
        for _ in range(int(rng.integers(1, 3)) if i % 11 == 0 else int(rng.random() < 0.5)):
            t, lf = rng.integers(0, free, 2)
            box = x[i, t : t + DIGIT, lf : lf + DIGIT]
            np.maximum(box, noise[rng.integers(50)], out=box)
    pixels = torch.from_numpy(x).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    return pixels, torch.from_numpy(y)


def pretrain_features(
    feature: nn.Module, mnist: Mnist, seed: int, n: int = 22_000, epochs: int = 3
) -> dict:
    """Train ``f`` with a temporary 11-way head (10 digits + "scribbles only"); drop the head.

    Single MNIST training digits in 50×50 patches, not the haystack images: ``f``
    starts able to tell digits apart, and every model still learns where to look
    (and ``g``) from image labels alone.
    """
    generator = torch.Generator().manual_seed(seed)
    x, y = digit_patches(mnist, "train", n, seed)
    head = nn.Linear(feature.out.out_features, 11)
    optimiser = torch.optim.Adam([*feature.parameters(), *head.parameters()], lr=2e-3)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for batch in order.split(64):
            # unit-norm features: a temperature of 16 lets the head reach confident logits
            loss = F.cross_entropy(head(feature(x[batch]) * 16.0), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / n)
    xt, yt = digit_patches(mnist, "test", 2200, seed)
    with torch.no_grad():
        accuracy = float((head(feature(xt) * 16.0).argmax(1) == yt).float().mean())
    return {"loss": losses, "held_out_accuracy": accuracy, "patches": n, "epochs": epochs}


def _pretrain(model, data, args: argparse.Namespace) -> dict:
    """Initialise ``f`` from :func:`pretrain_features` (computed once per seed and out folder)."""
    from benchmarks.mnist_data import load_mnist

    cache = Path(args.out) / f"feature_init_seed{args.seed}{'_quick' * args.quick}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        model.feature.load_state_dict(saved["state"])
        return {**saved["report"], "reused": str(cache.name)}
    size = {"n": 2200, "epochs": 1} if args.quick else {}
    report = pretrain_features(model.feature, load_mnist(), args.seed, **size)
    torch.save({"state": model.feature.state_dict(), "report": report}, cache)
    return report


def _networks(half_resolution: bool = False, num_classes: int = 10) -> dict[str, nn.Module]:
    """``f`` and ``g`` shared by every attention-sampling model of the table, and ``a``
    when it is :class:`HalfResolutionAttention` (else the model's default)."""
    networks: dict[str, nn.Module] = {
        "feature": PooledFeatureNetwork(FEATURE_DIM),
        "classifier": ScaledClassifier(FEATURE_DIM, num_classes),
    }
    if half_resolution:
        networks["attention"] = HalfResolutionAttention()
    return networks


def _ats(replace: bool, cls=ATS, half_resolution: bool = False):
    def build(args: argparse.Namespace):
        config = ATSConfig(
            view_scale=VIEW_SCALE, subtile_size=SUBTILE, n_samples=args.n, replace=replace, **SHARED
        )
        return cls(config, **_networks(half_resolution))

    return build


def _reinforce(num_classes: int = 10, **settings):
    """REINFORCE-ATS (003) with the table's shared settings, ``settings`` overriding
    them (``reward``, ``aggregation``, ``entropy_weight``, ``uniform_mix``, ...)."""

    def build(args: argparse.Namespace):
        config = ReinforceConfig(
            view_scale=VIEW_SCALE,
            subtile_size=SUBTILE,
            n_samples=args.n,
            **{**SHARED, "num_classes": num_classes, **settings},
        )
        return ReinforceATS(config, **_networks(num_classes=num_classes))

    return build


def reinforce_models(num_classes: int = 10) -> dict[str, ModelSpec]:
    """003's REINFORCE-ATS and the variants of issue 18 item 5 (docs/benchmarks.md)."""

    def spec(label: str, **settings) -> ModelSpec:
        return ModelSpec(label, _reinforce(num_classes, **settings), _pretrain)

    return {
        "reinforce": spec("ATS-{n}, REINFORCE (003)"),
        "reinforce_estimate": spec("ATS-{n}, REINFORCE, estimate reward", reward="estimate"),
        "reinforce_estimate_mean": spec(
            "ATS-{n}, REINFORCE, estimate reward, mean aggregation",
            reward="estimate",
            aggregation="mean",
        ),
        "reinforce_entropy": spec("ATS-{n}, REINFORCE (003), entropy 1e-2", entropy_weight=1e-2),
        "reinforce_estimate_entropy": spec(
            "ATS-{n}, REINFORCE, estimate reward, entropy 1e-2",
            reward="estimate",
            entropy_weight=1e-2,
        ),
        "reinforce_estimate_mean_entropy": spec(
            "ATS-{n}, REINFORCE, estimate reward, mean aggregation, entropy 1e-2",
            reward="estimate",
            aggregation="mean",
            entropy_weight=1e-2,
        ),
        "reinforce_mix": spec("ATS-{n}, REINFORCE (003), uniform mix 0.1", uniform_mix=0.1),
        "reinforce_loo": spec("ATS-{n}, REINFORCE, leave-one-out reward", reward="leave_one_out"),
        "reinforce_loo_entropy": spec(
            "ATS-{n}, REINFORCE, leave-one-out reward, entropy 1e-2",
            reward="leave_one_out",
            entropy_weight=1e-2,
        ),
        "reinforce_distinct": spec(
            "ATS-{n}, REINFORCE, distinct draws, estimate reward",
            replace=False,
            reward="estimate",
        ),
        "reinforce_distinct_mean": spec(
            "ATS-{n}, REINFORCE, distinct draws, estimate reward, mean aggregation, plain top-k",
            replace=False,
            reward="estimate",
            aggregation="mean",
            topk_max_overlap=1.0,  # top-k as the draws go: the 0.25 rule reads empty canvas
        ),
        "reinforce_distinct_entropy": spec(
            "ATS-{n}, REINFORCE, distinct draws, estimate reward, entropy 1e-2",
            replace=False,
            reward="estimate",
            entropy_weight=1e-2,
        ),
    }


def _zoomin(
    view_scale: float,
    half_resolution: bool = False,
    stage1_replace: bool = True,
    stage2_scale: float = 0.25,
    tile: int = 100,
    subtile_baseline: bool = False,
    estimator: str = "sequential",
):
    def build(args: argparse.Namespace):
        config = ZoomInConfig(
            view_scale=view_scale,
            stage1_replace=stage1_replace,
            estimator=estimator,
            stage2_scale=stage2_scale,
            subtile_baseline=subtile_baseline,
            tile_size=(tile, tile),
            subtile_size=SUBTILE,
            n_samples=args.n,
            contrastive=False,
            **SHARED,
        )
        networks = _networks(half_resolution)
        if stage2_scale > 0.25:  # b sees the tile finer, computed at a quarter of it
            networks["stage2_attention"] = HalfResolutionAttention()
        return ZoomIn(config, **networks)

    return build


def _magnet(args: argparse.Namespace):
    """A 2-layer MagNet (002) with ``N`` = 2·(N/2) classification patches of 50², the
    sub-tile side of the other rows, so every model reads the same full-resolution
    budget.  Its encoders start from scratch (002 has no MNIST-pretrained ``f``); no
    grey filter (it would blank grey digits) and no flips or rotations (a turned 6 is
    a 9)."""
    if args.n % 2:
        raise ValueError(f"the MagNet row needs an even --n (2 boxes, then n/2 each), got {args.n}")
    config = MagNetConfig(
        num_classes=10,
        patches=(2, args.n // 2),
        classifier_size=SUBTILE[0],
        encoder_channels=(16, 32, 64),
        feature_dim=FEATURE_DIM,
        gru_hidden=FEATURE_DIM,
        head_hidden=(128, 64),
        aux_layers=(1, 2),
        grey_filter=False,
        augment=False,
    )
    return MagNet(config)


def _cnn(args: argparse.Namespace):
    return LowResolutionCNN(num_classes=10, view_scale=VIEW_SCALE, channels=(8, 8, 16))


def _models() -> dict[str, ModelSpec]:
    return {
        "cnn": ModelSpec("CNN on the 0.12 view", _cnn),
        "uniform": ModelSpec("U-{n} (uniform attention)", _ats(False, Uniform), _pretrain),
        "ats": ModelSpec("ATS-{n}, without replacement", _ats(False), _pretrain),
        "ats_replace": ModelSpec("ATS-{n}, with replacement", _ats(True), _pretrain),
        **reinforce_models(),
        "zoomin": ModelSpec("Zoom-In (N = {n}), s1 0.06", _zoomin(0.06), _pretrain),
        "zoomin_s08": ModelSpec("Zoom-In (N = {n}), s1 0.08", _zoomin(0.08), _pretrain),
        "zoomin_s1": ModelSpec("Zoom-In (N = {n}), s1 0.1", _zoomin(0.1), _pretrain),
        "zoomin_half": ModelSpec(
            "Zoom-In (N = {n}), s1 0.12, half-resolution a", _zoomin(0.12, True), _pretrain
        ),
        "zoomin_half_distinct": ModelSpec(
            "Zoom-In (N = {n}), s1 0.12, half-resolution a, distinct tiles",
            _zoomin(0.12, True, stage1_replace=False),
            _pretrain,
        ),
        "zoomin_half_s2": ModelSpec(
            "Zoom-In (N = {n}), s1 0.12, half-resolution a, distinct tiles, s2 0.5",
            _zoomin(0.12, True, stage1_replace=False, stage2_scale=0.5),
            _pretrain,
        ),
        "zoomin_half_t75": ModelSpec(
            "Zoom-In (N = {n}), s1 0.12, half-resolution a, distinct 75² tiles",
            _zoomin(0.12, True, stage1_replace=False, tile=75),
            _pretrain,
        ),
        "zoomin_half_t75_priority": ModelSpec(
            "Zoom-In (N = {n}), s1 0.12, half-resolution a, distinct 75² tiles, priority weights",
            _zoomin(0.12, True, stage1_replace=False, tile=75, estimator="priority"),
            _pretrain,
        ),
        "zoomin_half_cv": ModelSpec(
            "Zoom-In (N = {n}), s1 0.12, half-resolution a, distinct tiles, sub-tile baseline",
            _zoomin(0.12, True, stage1_replace=False, subtile_baseline=True),
            _pretrain,
        ),
        "zoomin_half_t75_cv": ModelSpec(
            "Zoom-In (N = {n}), s1 0.12, half-resolution a, distinct 75² tiles, sub-tile baseline",
            _zoomin(0.12, True, stage1_replace=False, tile=75, subtile_baseline=True),
            _pretrain,
        ),
        "ats_half": ModelSpec(
            "ATS-{n}, without replacement, half-resolution a",
            _ats(False, half_resolution=True),
            _pretrain,
        ),
        "ats_scratch": ModelSpec("ATS-{n}, without replacement, f from scratch", _ats(False)),
        "magnet": ModelSpec("MagNet (002), 2 layers, N = {n} patches, from scratch", _magnet),
    }


BENCH = Bench(
    name="Megapixel MNIST",
    module="benchmarks.megapixel_mnist",
    make_data=lambda mnist, split, n, args: megapixel_mnist(
        mnist, split, n, args.seed, ink_mask=args.mask == "ink"
    ),
    models=_models(),
    # The six rows; the others are the experiments behind docs/benchmarks.md.
    default_models=["cnn", "uniform", "ats", "ats_replace", "reinforce", "zoomin_half_t75"],
    defaults={
        "epochs": 8,
        "train": 5000,
        "test": 1000,
        "batch_size": 8,
        "lr": 1e-3,
        "lr_schedule": "cosine",
        "n": 10,
    },
    quick={"epochs": 1, "train": 96, "test": 48, "cost_steps": 4},
    notes=[
        "ATS §4.2 reports about 20% test error for ATS-5 after 500 epochs and about 40% "
        "for a CNN on the full-resolution image.",
    ],
)


if __name__ == "__main__":
    sys.exit(main(BENCH))
