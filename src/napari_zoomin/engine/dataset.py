"""Training data: a labels CSV, the slides it names, their ROI annotations.

A training set is a folder of slides plus a CSV with one row per slide::

    slide,label,split
    case_001.svs,tumor,train
    case_002.svs,normal,val

- ``slide``: a file name or a path relative to the slides folder (an absolute path
  inside it also works; a path that leads outside it, ``../x.svs`` or ``/etc/passwd``,
  is refused; a symbolic link in the folder may point anywhere).  The extension may
  be left out when exactly one slide file in that folder has that stem (``case_001``
  finds ``case_001.svs``).
- ``label``: any text; the classes are the sorted distinct labels with a
  conventional negative (``negative``, ``normal``, ``benign``, ``0``, any case) first,
  because class 0 is the reference class of the contrastive loss (000 §2.3), unless
  the caller fixes the classes.
- ``split`` (optional): ``train``, ``val`` or ``test``.  Without the column, a
  deterministic stratified 20 % of every class (at least one slide of each class
  that has two or more) is held out for validation.

Header names are case-insensitive, the delimiter may be ``,``, ``;`` or a tab, blank
lines are skipped.  Every problem raises :class:`~napari_zoomin.errors.LabelsError`
naming the CSV, the line and the fix.

ROI annotations (000 §2.5) are looked up per slide with
:func:`~napari_zoomin.annotations.find_annotations`, the one rule ``zoomin train``,
the train widget and the ROI widget share (``<stem>.geojson|.json|.xml`` in the
annotations folder, then the ROI widget's per-user fallback copy, then beside the
slide).  :class:`SlideDataset` turns a record into the models'
:class:`~.slide_source.SlideSource`, with its tissue mask and, for an annotated
slide, an ROI callable rasterising the annotations whose label is in ``roi_labels``
(default ``{"Tumor"}``; the sample slides' ``"Distractor"`` regions are
deliberately *not* ROI).  An annotated slide without any ROI polygon is an
annotated negative: its ROI masks are all zero.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import stat
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..annotations import AnnotationIndex, find_annotations, rasterize_region, read_annotations
from ..errors import LabelsError
from ..fields import MAX_LABEL_CHARS, control_character
from ..slide import SLIDE_EXTENSIONS, Slide, open_slide, slide_of
from .slide_source import SlideSource
from .tissue import TissueMask, detect_tissue
from .view_cache import ViewCache

__all__ = [
    "DEFAULT_ROI_LABELS",
    "NEGATIVE_NAMES",
    "SPLITS",
    "RoiMask",
    "SlideDataset",
    "SlideRecord",
    "order_classes",
    "read_labels",
    "stratified_split",
]

SPLITS = ("train", "val", "test")
#: labels taken as the negative (reference) class and put first, compared case-insensitively
NEGATIVE_NAMES = ("negative", "normal", "benign", "0")
#: annotation labels that are ROI for pixel supervision unless configured otherwise
DEFAULT_ROI_LABELS = ("Tumor",)
_CSV_FIX = "Fix the labels CSV (columns: slide,label[,split])."
#: a labels CSV larger than this is refused before it is read
MAX_CSV_BYTES = 64 * 2**20
#: slides one labels CSV may list
MAX_ROWS = 100_000


@dataclass(frozen=True)
class SlideRecord:
    """One labelled slide.

    Attributes:
        path: the slide file (resolved).
        label: the class name as written in the CSV.
        label_index: its index in the class list.
        split: ``"train"``, ``"val"`` or ``"test"``.
        annotations: the slide's ROI annotation file, or ``None``.
        line: the CSV line it came from (0 when built in code).
    """

    path: Path
    label: str
    label_index: int
    split: str
    annotations: Path | None = None
    line: int = 0


def order_classes(labels: Iterable[str]) -> list[str]:
    """Sorted distinct labels, a conventional negative (:data:`NEGATIVE_NAMES`) first."""
    distinct = sorted(set(labels))
    for name in NEGATIVE_NAMES:
        for label in distinct:
            if label.casefold() == name:
                distinct.remove(label)
                return [label, *distinct]
    return distinct


def stratified_split(labels: Sequence[int], fraction: float = 0.2, seed: int = 0) -> list[str]:
    """``"train"``/``"val"`` for every item: a seeded ``fraction`` of each class held out.

    Each class with at least two items gives ``max(1, round(fraction · n))`` items to
    validation (never all of them); a class with one item keeps it for training.  The
    choice depends only on ``labels``, ``fraction`` and ``seed``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    labels = list(labels)
    out = ["train"] * len(labels)
    if fraction == 0.0:
        return out
    for cls in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == cls]
        if len(members) < 2:
            continue
        n_val = min(len(members) - 1, max(1, round(fraction * len(members))))
        rng = np.random.default_rng([seed, int(cls)])
        for i in rng.permutation(members)[:n_val].tolist():
            out[i] = "val"
    return out


def _sniff_dialect(text: str) -> str:
    first = text.lstrip("\ufeff").splitlines()[0] if text.strip() else ""
    for delimiter in (",", ";", "\t"):
        if delimiter in first:
            return delimiter
    return ","


def _inside(candidate: Path, folder: Path) -> bool:
    """Whether ``candidate`` is in ``folder`` by its written path (``..`` resolved, symbolic
    links not followed: a link in the slides folder may point to storage elsewhere)."""
    inner = os.path.normpath(os.path.abspath(candidate))
    outer = os.path.normpath(os.path.abspath(folder))
    return os.path.commonpath([inner, outer]) == outer


def _resolve_slide(name: str, slides_dir: Path) -> Path | None:
    """The slide file or DICOM folder a CSV cell names, or ``None``; raises on an ambiguous stem."""
    p = Path(name).expanduser()
    candidate = p if p.is_absolute() else slides_dir / p
    if not _inside(candidate, slides_dir):  # ../x.svs, /etc/passwd, ~/x.svs
        raise PermissionError(name)
    if candidate.is_file() or (candidate.is_dir() and candidate.suffix):
        return candidate
    if candidate.is_dir() and slide_of(candidate) == candidate:  # a DICOM slide's folder
        return candidate
    folder = candidate.parent
    if not folder.is_dir():
        return None
    matches = sorted(
        f
        for f in folder.iterdir()
        if f.is_file()
        and f.name.lower().endswith(SLIDE_EXTENSIONS)
        and (f.stem == candidate.name or f.name.split(".")[0] == candidate.name)
    )
    if len(matches) > 1:
        raise ValueError(", ".join(m.name for m in matches))
    return matches[0] if matches else None


def _check_cells(csv_path: Path, line: int, values: dict[str, str]) -> None:
    """Refuse control or invisible characters (a NUL, an escape, a bidi override) in the
    cells read, and labels longer than :data:`MAX_LABEL_CHARS`: they would become class
    names or file names that look like other ones."""
    for column in ("slide", "label", "split"):
        text = values.get(column, "")
        bad = control_character(text)
        if bad is not None:
            raise LabelsError(
                csv_path,
                f"line {line}: the {column} {text[:60]!r} holds a control or invisible "
                f"character (U+{ord(bad):04X}).",
                "Retype the cell as plain text.",
            )
    if len(values.get("label", "")) > MAX_LABEL_CHARS:
        raise LabelsError(
            csv_path,
            f"line {line}: the label has {len(values['label']):,} characters "
            f"(at most {MAX_LABEL_CHARS}).",
            _CSV_FIX,
        )


def read_labels(
    csv_path: str | os.PathLike,
    slides_dir: str | os.PathLike,
    annotations_dir: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[SlideRecord], list[str]]:
    """Read a labels CSV and find its slides and their annotations.

    Args:
        csv_path: ``slide,label[,split]`` (see the module docstring).
        slides_dir: where relative slide names are looked up.
        annotations_dir: where ROI annotation files are looked up first (then as
            :func:`~napari_zoomin.annotations.find_annotations` says: the ROI widget's
            fallback copy, beside each slide); ``None`` skips this first place.
        classes: fix the class list (e.g. a model's); labels outside it are an error.
        val_fraction, seed: the stratified validation split when the CSV has no
            ``split`` column.

    Returns:
        ``(records, classes)``, records in CSV order.

    Raises:
        LabelsError: naming the CSV (and line) for a missing or empty file, missing
            columns, slides not found, duplicate slides, empty or unknown labels, bad
            split values, fewer than two classes, or a class without a training slide.
    """
    csv_path = Path(csv_path)
    slides_dir = Path(slides_dir)
    try:
        st = csv_path.stat()
    except (OSError, ValueError):
        raise LabelsError(csv_path, "labels CSV not found.", "Check the path.") from None
    if not stat.S_ISREG(st.st_mode):
        raise LabelsError(csv_path, "is not a regular file.", "Give the labels CSV file.")
    if st.st_size > MAX_CSV_BYTES:
        raise LabelsError(
            csv_path,
            f"is {st.st_size / 2**20:,.0f} MB, more than the {MAX_CSV_BYTES // 2**20} MB a "
            "labels CSV may be.",
            _CSV_FIX,
        )
    if not slides_dir.is_dir():
        raise LabelsError(slides_dir, "slides folder not found.", "Check the --slides path.")
    if annotations_dir is not None and not Path(annotations_dir).is_dir():
        raise LabelsError(
            annotations_dir, "annotations folder not found.", "Check the --annotations path."
        )
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(csv_path, f"cannot be read as UTF-8 text ({exc}).", _CSV_FIX) from None
    if not text.strip():
        raise LabelsError(csv_path, "the labels CSV is empty.", _CSV_FIX)
    reader = csv.reader(io.StringIO(text), delimiter=_sniff_dialect(text))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().casefold() for cell in row]
                missing = [c for c in ("slide", "label") if c not in header]
                if missing:
                    raise LabelsError(
                        csv_path,
                        f"line {reader.line_num}: the header has no "
                        f"{' and no '.join(repr(m) for m in missing)} column "
                        f"(found: {', '.join(repr(h) for h in header)}).",
                        "The first line must name the columns: slide,label[,split].",
                    )
                continue
            values = {
                name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header)
            }
            _check_cells(csv_path, reader.line_num, values)
            rows.append((reader.line_num, values))
            if len(rows) > MAX_ROWS:
                raise LabelsError(
                    csv_path,
                    f"lists more than {MAX_ROWS:,} rows (slides).",
                    "Split the data set, or check that this is a labels CSV.",
                )
    except csv.Error as exc:
        raise LabelsError(
            csv_path, f"line {reader.line_num}: not valid CSV ({exc}).", _CSV_FIX
        ) from None
    assert header is not None
    if not rows:
        raise LabelsError(csv_path, "the labels CSV has a header but no slides.", _CSV_FIX)
    has_split = "split" in header

    paths: list[Path] = []
    missing_slides: list[str] = []
    seen: dict[Path, int] = {}
    for line, values in rows:
        name = values["slide"]
        if not name:
            raise LabelsError(csv_path, f"line {line}: the slide name is empty.", _CSV_FIX)
        if not values["label"]:
            raise LabelsError(csv_path, f"line {line}: slide {name!r} has no label.", _CSV_FIX)
        try:
            path = _resolve_slide(name, slides_dir)
        except ValueError as exc:
            raise LabelsError(
                csv_path,
                f"line {line}: {name!r} matches several slides ({exc}).",
                "Write the slide's file name with its extension.",
            ) from None
        except PermissionError:
            raise LabelsError(
                csv_path,
                f"line {line}: slide {name[:80]!r} is outside the slides folder {slides_dir}.",
                "Put the slide in the slides folder (a symbolic link is fine) and name it "
                "relative to that folder.",
            ) from None
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.ENAMETOOLONG:
                why = "the name is too long for the file system"
            raise LabelsError(
                csv_path, f"line {line}: slide {name[:80]!r} cannot be looked up ({why}).", _CSV_FIX
            ) from None
        if path is None:
            missing_slides.append(f"{name!r} (line {line})")
            paths.append(slides_dir / name)
            continue
        path = path.resolve()
        if path in seen:
            raise LabelsError(
                csv_path,
                f"line {line}: slide {name!r} is listed twice (also line {seen[path]}).",
                "List every slide once.",
            )
        seen[path] = line
        paths.append(path)
    if missing_slides:
        shown = ", ".join(missing_slides[:5])
        more = f" and {len(missing_slides) - 5} more" if len(missing_slides) > 5 else ""
        raise LabelsError(
            csv_path,
            f"{len(missing_slides)} slide(s) not found in {slides_dir}: {shown}{more}.",
            "Check the slide names against the slides folder (--slides).",
        )

    labels = [values["label"] for _, values in rows]
    if classes is not None:
        classes = [str(c) for c in classes]
        known = set(classes)
        unknown = [
            (line, lab) for (line, _), lab in zip(rows, labels, strict=True) if lab not in known
        ]
        if unknown:
            shown = ", ".join(f"{lab!r} (line {line})" for line, lab in unknown[:5])
            raise LabelsError(
                csv_path,
                f"unknown label(s) {shown}; the classes are {', '.join(map(repr, classes))}.",
                "Use the model's class names, or train a new model.",
            )
    else:
        classes = order_classes(labels)
    if len(classes) < 2:
        raise LabelsError(
            csv_path,
            f"needs at least two classes, found only {', '.join(map(repr, classes))}.",
            "Label slides of both classes (e.g. positive and negative).",
        )
    index = {c: i for i, c in enumerate(classes)}
    label_idx = [index[lab] for lab in labels]

    if has_split:
        splits = []
        for line, values in rows:
            split = values["split"].casefold()
            if split not in SPLITS:
                raise LabelsError(
                    csv_path,
                    f"line {line}: split {values['split']!r} is not train, val or test.",
                    "Use train, val or test (or drop the split column for an automatic "
                    "stratified validation split).",
                )
            splits.append(split)
    else:
        splits = stratified_split(label_idx, val_fraction, seed)

    train_counts = Counter(y for y, s in zip(label_idx, splits, strict=True) if s == "train")
    empty = [c for c in classes if train_counts[index[c]] == 0]
    if empty:
        raise LabelsError(
            csv_path,
            f"class(es) {', '.join(map(repr, empty))} have no training slide.",
            "Put at least one slide of every class in the train split.",
        )

    records = []
    for (line, _), path, lab, y, split in zip(rows, paths, labels, label_idx, splits, strict=True):
        ann = find_annotations(path, annotations_dir)
        records.append(SlideRecord(path, lab, y, split, ann, line))
    return records, list(classes)


def data_summary(records: Sequence[SlideRecord], classes: Sequence[str]) -> dict:
    """Counts per split and class, annotated slides, and a fingerprint of the data.

    The fingerprint hashes every record's path, label and split, so a resumed run can
    tell whether it is given the same data.
    """
    per_split: dict[str, dict[str, int]] = {}
    for r in records:
        per_split.setdefault(r.split, dict.fromkeys(classes, 0))[classes[r.label_index]] += 1
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.path}|{r.label_index}|{r.split}|{r.annotations}\n".encode())
    return {
        "slides": len(records),
        "per_split": per_split,
        "annotated": sum(r.annotations is not None for r in records),
        "annotated_per_split": dict(Counter(r.split for r in records if r.annotations is not None)),
        "fingerprint": digest.hexdigest(),
    }


class RoiMask:
    """The ``roi`` callable of a :class:`SlideSource`: ROI fraction of regions at a scale.

    ``(regions (n, 4) int64 level-0 [top, left, height, width], scale) -> (n, h', w')``
    float32, pixel-aligned with ``SlideSource.read`` (:func:`rasterize_region`).
    :meth:`hard_negatives` does the same for the annotations that are not ROI.
    Whole-slide masks (the stage-1 target, read every step) are cached per scale.
    """

    def __init__(
        self,
        index: AnnotationIndex,
        shape_level0: tuple[int, int],
        labels: Iterable[str] | None = DEFAULT_ROI_LABELS,
        lookalikes: Iterable[str] = (),
    ):
        self.index = index
        self.shape_level0 = (int(shape_level0[0]), int(shape_level0[1]))
        self.labels = None if labels is None else frozenset(labels)
        self.lookalikes = frozenset(lookalikes)
        self._whole: OrderedDict[tuple, Tensor] = OrderedDict()

    @property
    def has_roi(self) -> bool:
        """True when at least one annotation carries an ROI label."""
        return bool(self.index._positive(self.labels).any()) if len(self.index) else False

    @property
    def other_labels(self) -> frozenset[str]:
        """Labels of the annotations that are neither ROI nor exclusions."""
        if self.labels is None:
            return frozenset()
        return frozenset(
            lab
            for lab, excluded in zip(self.index.labels, self.index.exclusion, strict=True)
            if not excluded and lab not in self.labels
        )

    def __call__(self, regions: Tensor, scale: float) -> Tensor:
        return self._read(regions, scale, self.labels)

    def attention_target(self, regions: Tensor, scale: float) -> Tensor:
        """Fractions of ROI and look-alike area: where attention should go (a look-alike
        is what the low-resolution view cannot tell from an ROI, so the model must read
        it at full resolution to rule it out).  The ROI alone without look-alikes."""
        if not self.lookalikes or self.labels is None:
            return self(regions, scale)
        return self._read(regions, scale, self.labels | self.lookalikes)

    def hard_negatives(self, regions: Tensor, scale: float) -> Tensor | None:
        """Fractions of annotated non-ROI area (``None`` if the slide has none)."""
        others = self.other_labels
        return self._read(regions, scale, others) if others else None

    def _read(self, regions: Tensor, scale: float, labels: frozenset[str] | None) -> Tensor:
        regions = torch.as_tensor(regions, dtype=torch.int64).reshape(-1, 4)
        rows = [tuple(int(v) for v in r) for r in regions.tolist()]
        whole = (0, 0, *self.shape_level0)
        if len(rows) == 1 and rows[0] == whole:
            key = (float(scale), labels)
            if key not in self._whole:
                self._whole[key] = self._rasterize(rows, scale, labels)
                while len(self._whole) > 6:
                    self._whole.popitem(last=False)
            self._whole.move_to_end(key)
            return self._whole[key].clone()
        return self._rasterize(rows, scale, labels)

    def _rasterize(self, rows: list[tuple[int, ...]], scale: float, labels) -> Tensor:
        masks = [
            rasterize_region(self.index, r, scale, labels=labels, shape_level0=self.shape_level0)
            for r in rows
        ]
        return torch.from_numpy(np.stack(masks))


class SlideDataset:
    """Slides of labelled records as the models' image sources, opened lazily.

    Args:
        records: the slides (:func:`read_labels`).
        classes: class names (index = ``label_index``).
        roi_labels: annotation labels that count as ROI (``None``: every non-exclusion
            label).
        lookalike_labels: annotation labels of look-alikes (``TrainConfig.lookalike_labels``):
            attention targets beside the ROIs, hard negatives for pre-training ``f``.
        workers: threads a :class:`SlideSource` decodes regions with.
        max_open: slides kept open at once (least recently used are closed; opening a
            pyramid again is cheap, and tissue masks and annotations stay cached).
        cache_bytes: decoded-tile cache per open slide.
        tissue: detect tissue (cells on glass are never sampled); False = no mask.
        labels_csv: where the records came from (recorded in checkpoints).
        tissue_masks: a dict (slide path → :class:`TissueMask`) to share detected masks
            between datasets of the same slides; a new one by default.
        model_mpp: the pixel size (µm) every slide is read at (``SlideSource``'s
            ``model_mpp``); ``None`` reads slides in their own pixels.  :func:`train`
            sets it to the training pixel size it chooses.
        view_cache: the run's stage-1 views on disk (:class:`~.view_cache.ViewCache`),
            handed to every source; :func:`train` sets it (``TrainConfig.cache_views``).

    Tissue masks and annotation indexes are computed once per slide and kept in
    memory for the dataset's lifetime (one training run); with a ``view_cache``, each
    slide's stage-1 view is decoded from its pyramid once per run, not once per epoch.
    """

    def __init__(
        self,
        records: Sequence[SlideRecord],
        classes: Sequence[str],
        *,
        roi_labels: Iterable[str] | None = DEFAULT_ROI_LABELS,
        lookalike_labels: Iterable[str] = (),
        workers: int = 4,
        max_open: int = 8,
        cache_bytes: int = 64 * 2**20,
        tissue: bool = True,
        labels_csv: str | os.PathLike | None = None,
        tissue_masks: dict[Path, TissueMask] | None = None,
        model_mpp: float | None = None,
        view_cache: ViewCache | None = None,
    ):
        self.records = list(records)
        self.view_cache = view_cache
        self.model_mpp = model_mpp
        self._mpp: dict[Path, tuple[float, float] | None] = {}
        self.labels_csv = None if labels_csv is None else Path(labels_csv)
        self.classes = list(classes)
        self.roi_labels = None if roi_labels is None else tuple(roi_labels)
        self.lookalike_labels = tuple(lookalike_labels)
        self.workers = max(1, int(workers))
        self.max_open = max(1, int(max_open))
        self.cache_bytes = int(cache_bytes)
        self.use_tissue = tissue
        self._open: OrderedDict[int, Slide] = OrderedDict()
        self._tissue: dict[Path, TissueMask] = {} if tissue_masks is None else tissue_masks
        self._roi: dict[int, RoiMask | None] = {}

    @classmethod
    def from_csv(
        cls,
        csv_path: str | os.PathLike,
        slides_dir: str | os.PathLike,
        annotations_dir: str | os.PathLike | None = None,
        classes: Sequence[str] | None = None,
        *,
        val_fraction: float = 0.2,
        seed: int = 0,
        **options,
    ) -> SlideDataset:
        """:func:`read_labels` then a dataset of its records (``options``: see the class)."""
        records, classes = read_labels(
            csv_path, slides_dir, annotations_dir, classes, val_fraction=val_fraction, seed=seed
        )
        return cls(records, classes, labels_csv=csv_path, **options)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> Tensor:
        """(n,) int64 class index of every record."""
        return torch.tensor([r.label_index for r in self.records], dtype=torch.int64)

    def indices(self, split: str) -> list[int]:
        """Record indices of one split, in record order."""
        return [i for i, r in enumerate(self.records) if r.split == split]

    def summary(self) -> dict:
        """See :func:`data_summary`."""
        return data_summary(self.records, self.classes)

    def _slide(self, i: int, pinned: set[int]) -> Slide:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        slide = open_slide(self.records[i].path, cache_bytes=self.cache_bytes)
        self._open[i] = slide
        limit = max(self.max_open, len(pinned))
        for j in list(self._open):
            if len(self._open) <= limit:
                break
            if j not in pinned:
                self._open.pop(j).close()
        return slide

    def slide_mpp(self, i: int) -> tuple[float, float] | None:
        """The slide's pixel size (y, x) in µm, or ``None`` (read once, then cached)."""
        path = self.records[i].path
        if path not in self._mpp:
            mpp = self._slide(i, {i}).mpp
            self._mpp[path] = None if mpp is None else (float(mpp[0]), float(mpp[1]))
        return self._mpp[path]

    def tissue_mask(self, i: int) -> TissueMask | None:
        """The slide's tissue mask (detected once, then cached)."""
        if not self.use_tissue:
            return None
        path = self.records[i].path
        if path not in self._tissue:
            self._tissue[path] = detect_tissue(self._slide(i, {i}))
        return self._tissue[path]

    def profile(self, i: int):
        """The slide's :class:`~napari_zoomin.engine.trust.SlideProfile` (colour, tissue,
        pixel size), computed after tissue detection from the same cached level."""
        from .trust import profile_slide

        return profile_slide(self._slide(i, {i}), self.tissue_mask(i))

    def set_lookalikes(self, labels: Iterable[str]) -> None:
        """Use these look-alike labels from now on (the training settings' own)."""
        labels = tuple(labels)
        if labels != self.lookalike_labels:
            self.lookalike_labels = labels
            self._roi.clear()  # built with the old ones

    def roi_mask(self, i: int) -> RoiMask | None:
        """The slide's ROI callable, or ``None`` when it has no annotation file."""
        if i not in self._roi:
            record = self.records[i]
            if record.annotations is None:
                self._roi[i] = None
            else:
                index = AnnotationIndex(read_annotations(record.annotations))
                shape = self._slide(i, {i}).shape
                self._roi[i] = RoiMask(index, shape, self.roi_labels, self.lookalike_labels)
        return self._roi[i]

    def sources(self, indices: Sequence[int]) -> list[SlideSource]:
        """Sources of several slides, all open together (a training batch)."""
        pinned = set(indices)
        out = []
        for i in indices:
            slide = self._slide(i, pinned)
            roi = self.roi_mask(i)
            out.append(
                SlideSource(
                    slide,
                    tissue=self.tissue_mask(i),
                    roi=roi,
                    workers=self.workers,
                    hard_negatives=None if roi is None else roi.hard_negatives,
                    attention_target=None if roi is None else roi.attention_target,
                    model_mpp=self.model_mpp,
                    view_cache=self.view_cache,
                )
            )
        return out

    def __getitem__(self, i: int) -> SlideSource:
        return self.sources([i])[0]

    def close(self) -> None:
        """Close every open slide (caches of tissue masks and annotations are kept)."""
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> SlideDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
