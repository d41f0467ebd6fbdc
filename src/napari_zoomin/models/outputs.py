"""What the models return: loss terms for training, and everything a viewer needs.

All tensors in :class:`Prediction` are detached and on the CPU; coordinates are
int64 level-0 pixels ``[top, left, height, width]``; cell indices are flat,
row-major, into the attention map they belong to (turn them into ``(i, j)`` with the
matching :class:`~napari_zoomin.models.coordinates.CellGrid`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .coordinates import CellGrid

__all__ = ["LossTerms", "MagnifiedRegions", "Prediction", "SubtileSet", "TileSet"]


@dataclass
class LossTerms:
    """One training step's objective and its parts (scalars; zero when a term is off).

    ``logits`` (R, 1 or C) and ``labels`` (R,) are those of the main sampled
    prediction (R = images × repeats), for accuracy bookkeeping.
    """

    total: Tensor
    classification: Tensor
    contrastive: Tensor
    entropy: Tensor
    pixel: Tensor
    policy: Tensor
    logits: Tensor
    labels: Tensor
    auxiliary: Tensor | None = None
    paradoxical: Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        """The scalar terms as Python floats (for logs); MagNets' two extra terms when set."""
        names = ("total", "classification", "contrastive", "entropy", "pixel", "policy")
        names += tuple(k for k in ("auxiliary", "paradoxical") if getattr(self, k) is not None)
        return {k: float(getattr(self, k).detach()) for k in names}


@dataclass
class TileSet:
    """The stage-1 cells that were drawn (Zoom-In's tiles; a one-stage model's sub-tiles).

    Attributes:
        cells: (T,) flat indices into the stage-1 attention map.
        regions: (T, 4) level-0 regions of the tiles.
        counts: (T,) how often each was drawn, summed over all draws (top-k: the number
            of selected sub-tiles of a tile; 1 for a one-stage model).
        attention: (T,) ``α_c``.
        stage2_attention: (T, u_a, v_a) ``β^c`` per tile (Zoom-In), else ``None``.
        stage2_grid: the cells of every ``β^c`` in level-0 pixels (one origin per tile).
    """

    cells: Tensor
    regions: Tensor
    counts: Tensor
    attention: Tensor
    stage2_attention: Tensor | None = None
    stage2_grid: CellGrid | None = None


@dataclass
class SubtileSet:
    """The sub-tiles: the full-resolution regions the feature network saw.

    Attributes:
        tile: (S,) index into :attr:`Prediction.tiles` of the tile each came from.
        cells: (S,) flat cell index in that tile's ``β^c`` (Zoom-In) or in ``α`` (ATS).
        regions: (S, 4) level-0 regions.
        weights: (S,) attention relative to the whole image: ``α_c · β^c_c'``
            (Zoom-In, 000 §2.2) or ``α_c`` (one stage).
        scores: (S, C) class probabilities of ``g(f(x))`` for each sub-tile alone, what
            the classifier says of that sub-tile by itself (``g`` is linear, so a
            slide's logit is the weighted mean of its sub-tiles' logits); attention
            says where the model looked, the score says what it saw there.  ``None``
            for MagNets (their patches are read by a GRU, not pooled linearly).
    """

    tile: Tensor
    cells: Tensor
    regions: Tensor
    weights: Tensor
    scores: Tensor | None = None


@dataclass
class MagnifiedRegions:
    """Where a MagNet (002) looked: every box of every magnifying layer, in tree order.

    Box ``m`` was chosen by magnifying layer ``depth[m]`` inside box ``parent[m]`` (-1:
    the whole image's square frame); the boxes of the last layer are the classification
    patches, in the order the GRU read them (:attr:`Prediction.subtiles` in that order).

    Attributes:
        depth: (M,) 1-based layer that chose the box.
        parent: (M,) index of the box it lies in, -1 for layer 1's.
        boxes: (M, 4) float64 ``[top, left, side, side]`` in level-0 pixels; a box may
            reach beyond the image (that part reads black, as the paper's padding).
        scale: (M,) ``s`` of ``θ`` (box side / parent side).
        translation: (M, 2) ``(t_y, t_x)`` of ``θ`` (box centre, parent-normalised).
        zoom: (M,) magnification relative to the whole image (frame side / box side).
        read_scale: (M,) output pixels per level-0 pixel of the read that sampled it
            (≤ 1; 1 = full resolution).
        level: (M,) pyramid level that read came from (-1: the source has no levels;
            -2: the box lies wholly outside the image, nothing was read).
        trace: (P, C) class probabilities after each classification patch (figure 5
            of 002): row ``k`` is the GRU's prediction having read patches ``0..k``.
        view_scale: the scale the whole image (layer 1's input) was read at.
    """

    depth: Tensor
    parent: Tensor
    boxes: Tensor
    scale: Tensor
    translation: Tensor
    zoom: Tensor
    read_scale: Tensor
    level: Tensor
    trace: Tensor
    view_scale: float


@dataclass
class Prediction:
    """A model's answer for one image.

    Attributes:
        probabilities: (C,) class probabilities, the mean over the draws.
        spread: (C,) their standard deviation over the draws (zeros for one draw or top-k).
        draw_probabilities: (K, C) per draw.
        mode: ``"sample"`` (K independent sampled estimates), ``"topk"`` (deterministic)
            or ``"magnify"`` (a MagNet's one deterministic pass: nothing is sampled).
        attention: (h_a, w_a) the stage-1 attention ``α``.
        attention_grid: where the cells of ``α`` lie in level-0 pixels.
        tiles: the drawn stage-1 cells.
        subtiles: what the feature network saw, with their weights.
        stage2_views: (V, 4) level-0 regions whose stage-2 views were read, when they
            are more than ``tiles.regions`` (top-k reads the views of N tiles and keeps
            those with a chosen sub-tile); ``None``: exactly the tiles'.
        magnified: a MagNet's boxes per layer and per-patch probability trace
            (``None`` for the attention-sampling models).
    """

    probabilities: Tensor
    spread: Tensor
    draw_probabilities: Tensor
    mode: str
    attention: Tensor
    attention_grid: CellGrid
    tiles: TileSet
    subtiles: SubtileSet
    stage2_views: Tensor | None = None
    magnified: MagnifiedRegions | None = None

    @property
    def label(self) -> int:
        """The most probable class."""
        return int(self.probabilities.argmax())

    @property
    def draws(self) -> int:
        """K, the number of sampled estimates (1 for top-k)."""
        return int(self.draw_probabilities.shape[0])
