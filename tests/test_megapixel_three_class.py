"""The three-class Megapixel MNIST (003's task has three classes): labels by construction.

The label must be the majority class of the five digits actually pasted on the
canvas: read back here from the MNIST index of each pasted object (and its pixels),
not from the generator's own bookkeeping.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# The benchmarks are a top-level package beside src/ (``python -m benchmarks.…``).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mnist_data import DIGIT, load_mnist, megapixel_mnist


@pytest.fixture(scope="module")
def mnist(zoomin_cache):
    return load_mnist()


def test_three_class_labels_are_the_majority_of_the_pasted_digits(mnist):
    classes = (0, 1, 2)
    data = megapixel_mnist(mnist, "train", 30, seed=4, ink_mask=True, digit_classes=classes)
    again = megapixel_mnist(mnist, "train", 30, seed=4, ink_mask=True, digit_classes=classes)
    assert data.labels.tolist() == again.labels.tolist()  # seeded
    assert set(data.labels.tolist()) == {0, 1, 2}
    mnist_labels = mnist.labels["train"]
    for image, label in zip(data.images, data.labels.tolist(), strict=True):
        assert image.shape == (1500, 1500) and len(image.ids) == 55  # 5 digits + 50 scribbles
        assert (image.ids[5:] >= len(mnist_labels)).all()  # the rest come from the noise bank
        pasted = mnist_labels[image.ids[:5]]
        assert set(pasted.tolist()) <= set(classes)
        counts = np.bincount(pasted, minlength=10)
        assert counts[classes[label]] == 3 and counts.max() == 3
        assert (counts[[c for c in classes if c != label]] <= 2).all()
        for k in range(5):  # a digit no scribble was pasted over shows that MNIST image
            top, left = int(image.tops[k]), int(image.lefts[k])
            dy, dx = np.abs(image.tops[5:] - top), np.abs(image.lefts[5:] - left)
            if not ((dy < DIGIT) & (dx < DIGIT)).any():
                box = image.compose(top, left, DIGIT, DIGIT)
                assert np.array_equal(np.round(box * 255), mnist.images["train"][image.ids[k]])
    ten = megapixel_mnist(mnist, "train", 30, seed=4, ink_mask=True)
    assert not set(mnist_labels[np.concatenate([i.ids[:5] for i in ten.images])]) <= set(classes)


def test_three_class_refuses_bad_digit_classes(mnist):
    with pytest.raises(ValueError, match="distinct"):
        megapixel_mnist(mnist, "train", 1, digit_classes=(1, 1, 2))
    with pytest.raises(ValueError, match="0–9"):
        megapixel_mnist(mnist, "train", 1, digit_classes=(0, 10))
