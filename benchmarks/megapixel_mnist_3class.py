"""Megapixel MNIST with three classes, as 003's lymphoma task: the REINFORCE-ATS rows.

    python -m benchmarks.megapixel_mnist_3class [--models reinforce,reinforce_estimate_entropy]

The images of :mod:`benchmarks.megapixel_mnist` (1500², 5 digits, 50 scribbles, ink
mask) drawn from MNIST classes 0, 1 and 2 only: the label ``k`` is uniform over
0–2, three digits are of class ``k`` and two of the other two classes, so the label is
the majority class (:func:`benchmarks.mnist_data.megapixel_mnist`, ``digit_classes``).
Same settings, networks, ``f`` initialisation and runner; ``g`` has three outputs.
Chance is 67 % error; one digit alone is of the label's class with probability 3/5.
"""

from __future__ import annotations

import sys

from benchmarks import megapixel_mnist
from benchmarks.mnist_data import megapixel_mnist as make_images
from benchmarks.mnist_runner import Bench, main

DIGIT_CLASSES = (0, 1, 2)

BENCH = Bench(
    name="Megapixel MNIST, three classes (0, 1, 2)",
    module="benchmarks.megapixel_mnist_3class",
    make_data=lambda mnist, split, n, args: make_images(
        mnist, split, n, args.seed, ink_mask=args.mask == "ink", digit_classes=DIGIT_CLASSES
    ),
    models=megapixel_mnist.reinforce_models(num_classes=len(DIGIT_CLASSES)),
    default_models=["reinforce", "reinforce_estimate_entropy"],
    defaults=megapixel_mnist.BENCH.defaults,
    quick=megapixel_mnist.BENCH.quick,
)


if __name__ == "__main__":
    sys.exit(main(BENCH))
