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

__all__ = ["LossTerms", "Prediction", "SubtileSet", "TileSet"]


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

    def as_floats(self) -> dict[str, float]:
        """The scalar terms as Python floats (for logs)."""
        names = ("total", "classification", "contrastive", "entropy", "pixel", "policy")
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
    """

    tile: Tensor
    cells: Tensor
    regions: Tensor
    weights: Tensor


@dataclass
class Prediction:
    """A model's answer for one image.

    Attributes:
        probabilities: (C,) class probabilities, the mean over the draws.
        spread: (C,) their standard deviation over the draws (zeros for one draw or top-k).
        draw_probabilities: (K, C) per draw.
        mode: ``"sample"`` (K independent sampled estimates) or ``"topk"`` (deterministic).
        attention: (h_a, w_a) the stage-1 attention ``α``.
        attention_grid: where the cells of ``α`` lie in level-0 pixels.
        tiles: the drawn stage-1 cells.
        subtiles: what the feature network saw, with their weights.
        stage2_views: (V, 4) level-0 regions whose stage-2 views were read, when they
            are more than ``tiles.regions`` (top-k reads the views of N tiles and keeps
            those with a chosen sub-tile); ``None``: exactly the tiles'.
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

    @property
    def label(self) -> int:
        """The most probable class."""
        return int(self.probabilities.argmax())

    @property
    def draws(self) -> int:
        """K, the number of sampled estimates (1 for top-k)."""
        return int(self.draw_probabilities.shape[0])
