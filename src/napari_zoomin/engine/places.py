"""Where the evidence is: a result's sub-tiles grouped into *places*.

A classification reads many sub-tiles, but they bunch up: the 20 most attended often
lie in two or three spots.  A **place** is a group of sub-tiles whose centres are at
most ``link`` level-0 pixels apart along both axes, chained (single linkage);
``link`` is the model's tile side in slide pixels (``Result.evidence["link"]``).
:func:`link_groups` is that one rule: :func:`napari_zoomin.engine.trust.evidence`
counts its groups and :func:`places` describes them, so ``Result.evidence["places"]``
is always ``len(places(result))``.

Each :class:`Place` has its share of the evidence (its sub-tiles' support for the
predicted class over all sub-tiles' support, in %: :func:`~.results.support`, the
attention weight times the classifier's score of the sub-tile alone, so a look-alike
that drew attention but not the call ranks below the lesion), its bounding box in
level-0 pixels, its centre and size in µm (in pixels when the slide records no pixel
size: ``unit`` says which) and an outline: the convex hull of its sub-tile squares
(sub-tiles up to one tile side apart are one place, so their union need not be one
connected polygon; the hull is).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .results import support

if TYPE_CHECKING:
    from .results import Result

__all__ = ["MAIN_SHARE", "Place", "link_groups", "link_of", "main_places", "places"]

#: the best-ranked places that together hold this share of the evidence (in %) are its
#: *main* places: the front ends mark them plainly and the rest faintly
MAIN_SHARE = 90.0


def link_groups(regions: np.ndarray, link: float) -> np.ndarray:
    """Group label (0, 1, …) of each sub-tile of ``regions`` (n, 4) ``[top, left, h, w]``.

    Two sub-tiles whose centres are at most ``link`` level-0 pixels apart along both
    axes are in the same group, chained (single linkage).  Groups are numbered in
    order of their first sub-tile.
    """
    r = np.asarray(regions, dtype=np.float64).reshape(-1, 4)
    n = len(r)
    centres = r[:, :2] + r[:, 2:] / 2.0
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = np.argsort(centres[:, 0], kind="stable")
    for a_pos, a in enumerate(order):
        for b in order[a_pos + 1 :]:
            if centres[b, 0] - centres[a, 0] > link:
                break
            if abs(centres[b, 1] - centres[a, 1]) <= link:
                ra, rb = find(int(a)), find(int(b))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, labels = np.unique(roots, return_inverse=True)  # roots are first members: in order
    return labels.reshape(-1).astype(np.int64)


def link_of(result: Result) -> float:
    """The linkage distance of a result: ``evidence["link"]``, else (results written
    before it was recorded) the drawn tiles' largest side, which is the same number."""
    link = result.evidence.get("link")
    if link is not None:
        return float(link)
    return float(max((max(t["region"][2], t["region"][3]) for t in result.tiles), default=0))


@dataclass(frozen=True)
class Place:
    """One place the evidence came from (JSON-able with :meth:`to_dict`).

    Attributes:
        rank: 1 for the place with the largest share.
        share: its sub-tiles' support over all sub-tiles' support, in % (sums to 100;
            by weight when no sub-tile supports the call).
        weight: the sum of its sub-tiles' weights (attention).
        score: the classifier's score for the predicted class of its sub-tiles alone,
            their attention-weighted mean (support / weight): near 1 where it saw the
            call's evidence, near 0 on a look-alike that only drew attention; ``None``
            when the result carries no scores.
        subtiles: indices into ``Result.subtiles``, in its order (most support first).
        box: bounding box ``[top, left, h, w]`` of its sub-tiles in level-0 pixels.
        centre: centre of ``box`` (y, x) in ``unit`` (µm from the slide's pixel size).
        size: ``box``'s (h, w) in ``unit``.
        unit: ``"µm"``, or ``"px"`` (level-0 pixels) when the slide has no pixel size.
        outline: (k, 2) (y, x) level-0 vertices of the convex hull of its sub-tiles'
            squares (an open ring).
    """

    rank: int
    share: float
    weight: float
    subtiles: tuple[int, ...]
    box: tuple[float, float, float, float]
    centre: tuple[float, float]
    size: tuple[float, float]
    unit: str
    outline: np.ndarray
    score: float | None = None

    @property
    def n_subtiles(self) -> int:
        return len(self.subtiles)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outline"] = self.outline.tolist()
        d["subtiles"] = list(self.subtiles)
        return d


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of (n, 2) points, open ring, no collinear."""
    pts = sorted({(float(a), float(b)) for a, b in points})
    if len(pts) < 3:
        return np.array(pts, dtype=np.float64)

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _score(supports: np.ndarray, weights: np.ndarray) -> float:
    total = float(weights.sum())
    return float(supports.sum()) / total if total > 0 else float("nan")


def places(result: Result) -> list[Place]:
    """The result's places, largest share first (ties: the one holding the heavier
    sub-tile first)."""
    subtiles = result.subtiles
    if not subtiles:
        return []
    regions = np.array([s["region"] for s in subtiles], dtype=np.float64).reshape(-1, 4)
    weights = np.array([float(s["weight"]) for s in subtiles], dtype=np.float64)
    labels = link_groups(regions, link_of(result))
    supports = support(subtiles, int(result.label_index))
    scored = all(s.get("scores") for s in subtiles)
    shares = supports
    if not float(shares.sum()) > 0:  # nothing supports the call: go by attention
        shares = weights
    total = float(shares.sum())
    if not total > 0:  # no weights to go by: every sub-tile counts the same
        shares, total = np.ones_like(weights), float(len(weights))
    mpp = result.slide.get("mpp")
    per_px = (1.0, 1.0) if mpp is None else (float(mpp[0]), float(mpp[1]))
    unit = "px" if mpp is None else "µm"
    groups = []
    for g in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == g)
        groups.append((float(shares[members].sum()), int(members[0]), members))
    groups.sort(key=lambda item: (-item[0], item[1]))
    out = []
    for rank, (share, _, members) in enumerate(groups, start=1):
        r = regions[members]
        top, left = r[:, 0].min(), r[:, 1].min()
        bottom, right = (r[:, 0] + r[:, 2]).max(), (r[:, 1] + r[:, 3]).max()
        h, w = bottom - top, right - left
        corners = np.concatenate(
            [
                r[:, :2],
                r[:, :2] + r[:, 2:],
                np.stack([r[:, 0], r[:, 1] + r[:, 3]], 1),
                np.stack([r[:, 0] + r[:, 2], r[:, 1]], 1),
            ]
        )
        out.append(
            Place(
                rank=rank,
                share=100.0 * share / total,
                weight=float(weights[members].sum()),
                score=_score(supports[members], weights[members]) if scored else None,
                subtiles=tuple(int(i) for i in members),
                box=(float(top), float(left), float(h), float(w)),
                centre=(float((top + h / 2) * per_px[0]), float((left + w / 2) * per_px[1])),
                size=(float(h * per_px[0]), float(w * per_px[1])),
                unit=unit,
                outline=_hull(corners),
            )
        )
    return out


def main_places(found: list[Place]) -> int:
    """How many of the best-ranked places (``places(result)``, in order) it takes to
    hold :data:`MAIN_SHARE` % of the evidence; at least one when there are any.

    Why: ten equal markers on a slide whose call rests on three places (97 % of the
    support on the packaged sample; the other seven, look-alikes the classifier
    scored 0.04-0.06, hold 3 %) read as ten findings.  Where the evidence is spread
    thin (a negative call over hundreds of places), every place is main.
    """
    total = 0.0
    for k, place in enumerate(found, start=1):
        total += place.share
        if total >= MAIN_SHARE - 1e-9:
            return k
    return len(found)
