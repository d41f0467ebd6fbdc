"""A tiny-object problem built from real handwritten digits (scikit-learn's ``load_digits``).

Each canvas hides one 16×16 digit (an 8×8 digit upscaled ×2) and two digit-sized
blobs of random strokes in a larger noisy canvas; it is positive iff the digit is a
3.  At the stage-1 scale (1/16) a digit is a single blurred pixel, as bright as a
blob (every digit's ink is jittered), so a CNN on the low-resolution view cannot
tell the class; at full resolution the digit is plain.  Canvases carry a "tissue"
mask (pixels above the background noise), as a slide carries its tissue mask.
Train and test canvases use disjoint digit images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from napari_zoomin.models import TensorSource

CANVAS = (96, 112)  # non-square on purpose
DIGIT = 16
TARGET = 3


@dataclass
class DigitsProblem:
    train: list[TensorSource]
    train_labels: torch.Tensor
    test: list[TensorSource]
    test_labels: torch.Tensor


def _canvases(images, labels, n, rng, blobs=2, noise=0.1, boxes=None):
    positives = np.flatnonzero(labels == TARGET)
    negatives = np.flatnonzero(labels != TARGET)
    h, w = CANVAS
    sources, ys = [], []
    for k in range(n):
        y = k % 2
        canvas = rng.uniform(0.0, noise, (h, w)).astype(np.float32)
        placed: list[tuple[int, int]] = []
        for j in range(1 + blobs):
            while True:
                top, left = int(rng.integers(0, h - DIGIT + 1)), int(rng.integers(0, w - DIGIT + 1))
                if all(abs(top - a) > DIGIT + 1 or abs(left - b) > DIGIT + 1 for a, b in placed):
                    break
            placed.append((top, left))
            if j == 0 and boxes is not None:
                boxes.append((top, left))
            if j == 0:
                patch = images[rng.choice(positives if y else negatives)]
            else:  # a blob of random strokes with a digit's amount of ink
                patch = (rng.uniform(size=(8, 8)) < 0.3) * rng.uniform(0.5, 1.0, (8, 8))
            patch = np.kron(patch, np.ones((2, 2))) * rng.uniform(0.6, 1.0)
            region = canvas[top : top + DIGIT, left : left + DIGIT]
            np.maximum(region, patch, out=region)
        sources.append(
            TensorSource(torch.from_numpy(canvas), tissue=torch.from_numpy(canvas > 0.25))
        )
        ys.append(y)
    return sources, torch.tensor(ys)


@pytest.fixture(scope="session")
def digits_problem() -> DigitsProblem:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target
    rng = np.random.default_rng(2024)
    order = rng.permutation(len(images))
    train_idx, test_idx = order[:1200], order[1200:]
    train, train_y = _canvases(images[train_idx], labels[train_idx], 1024, rng)
    test, test_y = _canvases(images[test_idx], labels[test_idx], 256, rng)
    return DigitsProblem(train, train_y, test, test_y)
