"""The annotation data model: a labelled polygon with holes, and what one file held.

Vertices are **level-0 pixels in (x, y) order** — (column, row), as GeoJSON, QuPath and
ASAP store them — because that is the order of every file format we exchange; the
rest of napari-zoomin (slides, regions, napari shapes) speaks (y, x) = (row, col), so
:meth:`Annotation.rows_cols` and :meth:`Annotation.from_rows_cols` are the boundary.
Level-0 pixel (row ``r``, col ``c``) covers ``[c, c+1) × [r, r+1)`` in (x, y).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnnotationError
from ..fields import MAX_LABEL_CHARS, control_character
from ..geometry import ring_area

__all__ = [
    "DEFAULT_LABEL",
    "EXCLUSION_LABEL",
    "MAX_FILE_BYTES",
    "MAX_VERTICES",
    "Annotation",
    "Annotations",
    "VertexBudget",
    "check_label",
    "check_ring",
    "checked_file",
]

DEFAULT_LABEL = "Tumor"
EXCLUSION_LABEL = "Exclusion"


def _as_ring(points: Any, what: str) -> np.ndarray:
    """A read-only float64 (k, 2) ring, the closing repeat of the first vertex dropped."""
    ring = np.array(points, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2:
        raise ValueError(f"{what} must be a (k, 2) array of (x, y) vertices, got {ring.shape}")
    if len(ring) >= 2 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3:
        raise ValueError(f"{what} has {len(ring)} distinct vertices; a polygon needs at least 3")
    if not np.isfinite(ring).all():
        raise ValueError(f"{what} has a NaN or infinite coordinate")
    ring = np.ascontiguousarray(ring)
    ring.setflags(write=False)
    return ring


@dataclass(frozen=True, eq=False)
class Annotation:
    """One annotated region: a polygon with optional holes and a class label.

    ``polygon`` is a float64 (k, 2) array of **(x, y) level-0 pixels** (GeoJSON/QuPath
    order, *not* the (row, col) order of slides and napari); the ring is stored open
    (the closing repeat of the first vertex is dropped) and read-only.  ``holes`` are
    rings of the same form inside the polygon.  ``label`` is the class (QuPath
    classification, ASAP group); ``"Exclusion"`` marks an area to subtract from every
    ROI.  Equality compares labels and vertices exactly.
    """

    polygon: np.ndarray
    label: str = DEFAULT_LABEL
    holes: tuple[np.ndarray, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"label must be a non-empty string, got {self.label!r}")
        object.__setattr__(self, "polygon", _as_ring(self.polygon, "polygon"))
        holes = tuple(_as_ring(h, f"hole {i}") for i, h in enumerate(self.holes))
        object.__setattr__(self, "holes", holes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Annotation):
            return NotImplemented
        return (
            self.label == other.label
            and np.array_equal(self.polygon, other.polygon)
            and len(self.holes) == len(other.holes)
            and all(np.array_equal(a, b) for a, b in zip(self.holes, other.holes, strict=True))
        )

    def __hash__(self) -> int:
        return hash((self.label, self.polygon.tobytes(), *(h.tobytes() for h in self.holes)))

    # ---- constructors -----------------------------------------------------------

    @classmethod
    def from_rows_cols(
        cls,
        vertices: Any,
        label: str = DEFAULT_LABEL,
        holes: Iterable[Any] = (),
    ) -> Annotation:
        """An annotation from (row, col) = (y, x) vertices, e.g. napari Shapes data."""
        flip = lambda a: np.asarray(a, dtype=np.float64)[:, ::-1]  # noqa: E731
        return cls(flip(vertices), label, tuple(flip(h) for h in holes))

    @classmethod
    def rectangle(
        cls, top: float, left: float, height: float, width: float, label: str = DEFAULT_LABEL
    ) -> Annotation:
        """The axis-aligned rectangle ``x ∈ [left, left+width)``, ``y ∈ [top, top+height)``."""
        if not (height > 0 and width > 0):
            raise ValueError(f"rectangle needs a positive height and width, got {height}×{width}")
        x0, y0, x1, y1 = left, top, left + width, top + height
        return cls(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64), label)

    @classmethod
    def ellipse(
        cls, cy: float, cx: float, ry: float, rx: float, label: str = DEFAULT_LABEL, n: int = 64
    ) -> Annotation:
        """The ellipse centred at (cy, cx) with radii (ry, rx) as an n-gon inscribed in it.

        Its area is ``π·rx·ry · sin(2π/n)·n/(2π)`` (0.16 % short of the ellipse at n = 64).
        """
        if not (ry > 0 and rx > 0) or n < 3:
            raise ValueError(f"ellipse needs positive radii and n >= 3, got {ry}, {rx}, {n}")
        t = 2.0 * np.pi * np.arange(n) / n
        return cls(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1), label)

    # ---- views ------------------------------------------------------------------

    def rows_cols(self) -> np.ndarray:
        """The exterior as (row, col) = (y, x) vertices (napari Shapes order), a copy."""
        return self.polygon[:, ::-1].copy()

    @property
    def is_exclusion(self) -> bool:
        """True for an area subtracted from every ROI (label ``"Exclusion"``, any case)."""
        return self.label.casefold() == EXCLUSION_LABEL.casefold()

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of the exterior in level-0 pixels."""
        lo, hi = self.polygon.min(axis=0), self.polygon.max(axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    @property
    def area(self) -> float:
        """Exterior area minus hole areas in level-0 pixels² (exact for simple polygons)."""
        return ring_area(self.polygon) - sum(ring_area(h) for h in self.holes)


class Annotations(list):
    """The annotations read from one file (a ``list[Annotation]``), with what was skipped.

    ``skipped`` counts the features that carry no area, by kind (``"Point"``,
    ``"LineString"``, ``"Dot"``, ``"detection"``, …); ``path`` is the file read.
    """

    def __init__(
        self,
        items: Iterable[Annotation] = (),
        path: Path | None = None,
        skipped: Mapping[str, int] | None = None,
    ):
        super().__init__(items)
        self.path = path
        self.skipped: dict[str, int] = dict(skipped or {})


#: an annotation file larger than this is refused before it is parsed (QuPath exports of
#: annotations are kB to a few MB; a file of cell detections is exported separately)
MAX_FILE_BYTES = 100 * 2**20
#: vertices kept from one file (all rings): a detailed outline has 10³-10⁵
MAX_VERTICES = 1_000_000
#: how often one ring may cross a horizontal line on average (Σ|Δy| / height): 2 for a
#: convex outline, tens for a ragged one; thousands only for scrambled or random points,
#: which rasterising would pay for at every scanline
MAX_MEAN_CROSSINGS = 1_000
#: |x| and |y| of any vertex, in level-0 pixels (a slide has at most 2²¹ per side)
MAX_COORDINATE = 1e8


def checked_file(path: str | os.PathLike, fix: str) -> Path:
    """``path`` as a Path, or AnnotationError if it is missing, not a regular file, or
    larger than :data:`MAX_FILE_BYTES` (every reader)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise AnnotationError(p, "annotation file not found.", "Check the path.") from None
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a symlink loop
        why = getattr(exc, "strerror", None) or str(exc)
        if getattr(exc, "errno", None) == errno.ENAMETOOLONG:
            why = "the path is too long for the file system"
        raise AnnotationError(p, f"cannot be opened ({why}).", "Check the path.") from None
    if not stat.S_ISREG(st.st_mode):
        raise AnnotationError(p, "is not a file.", fix)
    if st.st_size > MAX_FILE_BYTES:
        raise AnnotationError(
            p,
            f"is {st.st_size / 2**20:,.0f} MB, more than the {MAX_FILE_BYTES // 2**20} MB "
            "an annotation file may be.",
            "Export only the annotations (not cell detections), or simplify the outlines.",
        )
    return p


def check_label(path: Path, label: str, where: str, fix: str) -> str:
    """``label`` if it is plain text of at most :data:`MAX_LABEL_CHARS` characters."""
    if len(label) > MAX_LABEL_CHARS:
        raise AnnotationError(
            path,
            f"{where}: the label has {len(label):,} characters (at most {MAX_LABEL_CHARS}).",
            fix,
        )
    bad = control_character(label)
    if bad is not None:
        raise AnnotationError(
            path,
            f"{where}: the label {label[:40]!r} holds a control or invisible character "
            f"(U+{ord(bad):04X}).",
            fix,
        )
    return label


class VertexBudget:
    """Counts the vertices read from one file against :data:`MAX_VERTICES`."""

    def __init__(self, path: Path, fix: str):
        self.path, self.fix, self.used = path, fix, 0

    def take(self, n: int, where: str) -> None:
        self.used += int(n)
        if self.used > MAX_VERTICES:
            raise AnnotationError(
                self.path,
                f"{where}: more than {MAX_VERTICES:,} vertices in the file.",
                "Simplify the outlines (QuPath: Objects > Annotations > Simplify shape).",
            )


def check_ring(path: Path, ring: np.ndarray, where: str, fix: str) -> np.ndarray:
    """``ring`` ((k, 2) finite float64) if its coordinates and complexity are bounded."""
    if ring.size and float(np.abs(ring).max()) > MAX_COORDINATE:
        raise AnnotationError(
            path,
            f"{where} has a coordinate of {float(np.abs(ring).max()):.3g} pixels, beyond any "
            f"slide (at most {MAX_COORDINATE:.0e}).",
            fix,
        )
    y = ring[:, 1]
    height = float(y.max() - y.min())
    if height > 0:
        crossings = float(np.abs(np.diff(y, append=y[:1])).sum()) / height
        if crossings > MAX_MEAN_CROSSINGS:
            raise AnnotationError(
                path,
                f"{where} of {len(ring):,} vertices crosses a horizontal line {crossings:,.0f} "
                f"times on average (an outline crosses it a few times; at most "
                f"{MAX_MEAN_CROSSINGS:,}): its points look scrambled or random.",
                "Check the export, or simplify the outline.",
            )
    return ring
