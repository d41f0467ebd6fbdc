"""What every attention-sampling model shares: configuration, networks, stage 1, reading.

A model is given a *batch of image sources* (:mod:`.source`), never pixels: it reads
the low-resolution view, computes the stage-1 attention ``α``, and reads at full
resolution only the regions it draws.  Sampling passes work on *rows*: one row per
(image, draw), so K independent draws of one image at inference and one draw per
image in training use the same code.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fields import (
    MAX_CLASSES,
    MAX_KERNEL,
    MAX_LAYERS,
    MAX_SAMPLES,
    MAX_SIDE,
    MAX_WEIGHT,
    MAX_WIDTH,
    MIN_SCALE,
    field_problems,
)
from .coordinates import CellGrid, outside_image
from .device import autocast
from .distributions import attention_distribution
from .networks import (
    STRIDES,
    AttentionNetwork,
    Classifier,
    FeatureNetwork,
    as_float_view,
    class_probabilities,
)
from .outputs import Prediction
from .source import ImageSource, read_view, tissue_mask

__all__ = ["AttentionSamplingModel", "SamplingConfig", "Stage1"]


@dataclass
class SamplingConfig:
    """Settings shared by all attention-sampling models (defaults: 000's colon-cancer set-up).

    Attributes:
        num_classes: 2 gives one sigmoid logit; more give a softmax.
        view_scale: ``s1``, scale of the low-resolution view the attention network sees.
        n_samples: ``N``, draws per image.
        feature_dim, feature_channels, feature_kernels, feature_hidden, feature_dropout:
            the LeNet feature network ``f`` (Ilse et al. 2018 sizes by default).
        feature_standardise: scaled weight standardisation in every layer of ``f``
            (:class:`~.networks.FeatureNetwork`): for training from image labels alone,
            where the plain LeNet's units die in Adam's first steps.  Off here, so a
            checkpoint saved without it loads plain; ``train()`` turns it on where
            ``f`` trains (:func:`~napari_zoomin.training.config.train_recipe`).
        attention_channels, attention_layers, attention_padding, attention_norm,
        attention_activation: the attention network(s) (000 §2.4 by default).
        attention_stride: view pixels per stage-1 cell (1, 2 or 4; see
            :class:`~.networks.AttentionNetwork`).  Zoom-In's stage-2 network keeps 1:
            its tile views are small and its cells are the sub-tiles.
        uniform_mix: uniform mass mixed into ``α`` over unmasked cells (ATS); 0 = off.
        entropy_weight: ``λ`` of the entropy regulariser (000: 1e-5; ATS MNIST: 1e-4).
        pixel_weight: weight of the attention-map MSE of 000 eq. (11), applied to images
            whose source has ROI annotations.
        negative_class: the reference class of the contrastive loss (000 §2.3).
        estimator: how distinct draws from ``α`` are weighed (ATS without
            replacement, Zoom-In's stage 1 with ``stage1_replace=False``):
            ``"sequential"`` (ATS eqs. 14–17, the papers'), which weighs the first
            cells drawn more than the last, or ``"priority"`` (our option: each cell
            ``α_c / q_c``, with ``q_c`` the probability that its Gumbel key beats the
            largest key left out; :func:`~napari_zoomin.sampling.estimators.priority_weights`),
            close to the exact sum once the cells that hold ``α`` are all drawn.  Both
            are unbiased for the same sum, so a model trained with one may be read
            with the other.
        topk_max_overlap: top-k inference skips a region (tile or sub-tile) that
            overlaps a better-ranked chosen one by more than this fraction of its area
            (:func:`~.topk.distinct_top_k`); 1 = the plain N largest attention values.
        topk_weights: how top-k inference weighs the features of the regions it read
            (:func:`~.topk.topk_weights`): ``"attention"`` (default here), their
            attention renormalised to sum to 1; ``"draws"``, the training estimator's
            weights for a draw sequence that took them in rank order (the same for
            draws with replacement).  :class:`~.zoomin.ZoomInConfig` defaults to
            ``"draws"``: on held-out Megapixel MNIST images it erred 2.5–4.6 % where
            ``"attention"`` erred 9–11 % for Zoom-In with distinct stage-1 tiles, and
            6.7 % against 5.0 % for ATS (docs/benchmarks.md).
    """

    num_classes: int = 2
    view_scale: float = 0.1
    n_samples: int = 10
    feature_dim: int = 512
    feature_channels: tuple[int, int] = (36, 48)
    feature_kernels: tuple[int, int] = (4, 3)
    feature_hidden: int = 512
    feature_dropout: float = 0.0
    feature_standardise: bool = False
    attention_channels: int = 8
    attention_layers: int = 3
    attention_padding: Literal["same", "valid"] = "same"
    attention_norm: Literal["batch"] | None = None
    attention_activation: Literal["relu", "leaky_relu"] = "relu"
    attention_stride: int = 1
    uniform_mix: float = 0.0
    entropy_weight: float = 1e-5
    pixel_weight: float = 1.0
    negative_class: int = 0
    estimator: Literal["sequential", "priority"] = "sequential"
    topk_max_overlap: float = 0.25
    topk_weights: Literal["draws", "attention"] = "attention"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these settings (types first, then ranges); empty when none.

        Settings come from files and JSON (checkpoints, ``--set``): each is checked
        before a network is built, so a feature size of 10⁹ or a million layers is
        refused instead of allocated.  A subclass extends the list with its own fields.
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        problems = field_problems(type(self), values)
        if problems:  # ranges need the right types
            return problems
        checks = [
            ("num_classes", 2, MAX_CLASSES),
            ("n_samples", 1, MAX_SAMPLES),
            ("feature_dim", 1, MAX_WIDTH),
            ("feature_hidden", 1, MAX_WIDTH),
            ("attention_channels", 1, MAX_WIDTH),
            ("attention_layers", 0, MAX_LAYERS),
        ]
        for name, low, high in checks:
            if not low <= getattr(self, name) <= high:
                problems.append(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        for name, high in (("feature_channels", MAX_WIDTH), ("feature_kernels", MAX_KERNEL)):
            if not all(1 <= v <= high for v in getattr(self, name)):
                problems.append(f"{name} must be in [1, {high}] each, got {getattr(self, name)}")
        problems += scale_problems(self, ("view_scale",))
        for name, low, high in (
            ("feature_dropout", 0.0, 0.99),
            ("uniform_mix", 0.0, 1.0),
            ("topk_max_overlap", 0.0, 1.0),
            ("entropy_weight", 0.0, MAX_WEIGHT),
            ("pixel_weight", 0.0, MAX_WEIGHT),
        ):
            if not low <= getattr(self, name) <= high:
                problems.append(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        if not 0 <= self.negative_class < self.num_classes:
            problems.append(f"negative_class must be a class index, got {self.negative_class}")
        for name, allowed in (
            ("attention_padding", ("same", "valid")),
            ("attention_norm", ("batch", None)),
            ("attention_activation", ("relu", "leaky_relu")),
            ("attention_stride", STRIDES),
            ("topk_weights", ("draws", "attention")),
            ("estimator", ("sequential", "priority")),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.attention_stride in STRIDES[1:]:
            halvings = STRIDES.index(self.attention_stride)
            if self.attention_padding != "same":
                problems.append("attention_stride above 1 needs attention_padding 'same'")
            if self.attention_layers < halvings:
                problems.append(
                    f"attention_stride {self.attention_stride} needs attention_layers of at "
                    f"least {halvings}, got {self.attention_layers}"
                )
        return problems

    def to_dict(self) -> dict:
        """Plain-Python form (for checkpoints)."""
        return asdict(self)


def scale_problems(config, names) -> list[str]:
    """Scales in ``[MIN_SCALE, 1]``: a view of 10⁻⁹ of a slide is no view."""
    return [
        f"{name} must be in [1/{round(1 / MIN_SCALE)}, 1], got {getattr(config, name)}"
        for name in names
        if not MIN_SCALE <= getattr(config, name) <= 1
    ]


def side_problems(config, name: str, high: int = MAX_SIDE) -> list[str]:
    """A region size ``(h, w)`` of 1 to ``high`` pixels a side."""
    value = getattr(config, name)
    if all(1 <= v <= high for v in value):
        return []
    return [f"{name} must be 1 to {high} pixels a side, got {tuple(value)}"]


@dataclass(eq=False)
class Stage1:
    """Stage-1 attention of one image.

    Attributes:
        logits: (h_a, w_a) attention logits.
        attention: (K,) ``α``, masked cells exactly 0 (differentiable).
        mask: (K,) bool, True = tissue, or ``None`` when the source has no tissue mask.
        grid: where the cells lie in level-0 pixels.
        view_tissue: (h_v, w_v) the source's tissue mask at the view, or ``None``.
    """

    logits: Tensor
    attention: Tensor
    mask: Tensor | None
    grid: CellGrid
    view_tissue: Tensor | None


def apply_grouped(net: Callable[[Tensor], Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
    """Run ``net`` on same-shaped tensors as one batch each; returns outputs in input order."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[tuple(t.shape)].append(i)
    out: list[Tensor | None] = [None] * len(tensors)
    for idx in groups.values():
        y = net(torch.stack([tensors[i] for i in idx]))
        for k, i in enumerate(idx):
            out[i] = y[k]
    return out  # type: ignore[return-value]


def stack_rows(vectors: Sequence[Tensor], rows: Sequence[int]) -> Tensor:
    """(R, K_max): row r is ``vectors[rows[r]]`` zero-padded (padding cells are never drawn).

    Rows of one image only (K draws of one slide) are a view, not K copies: a gigapixel
    slide's map has tens of millions of cells.
    """
    if len(set(rows)) == 1:
        return vectors[rows[0]][None].expand(len(rows), -1)
    k = max(int(v.shape[-1]) for v in vectors)
    padded = [F.pad(v, (0, k - int(v.shape[-1]))) for v in vectors]
    return torch.stack([padded[i] for i in rows])


def unique_pairs(images: Tensor, cells: Tensor, valid: Tensor | None = None):
    """Distinct ``(image, cell)`` pairs among draws, so each region is read and featurised once.

    Args:
        images, cells: LongTensor (…) of the same shape.
        valid: optional bool (…): entries to consider.

    Returns:
        ``pair_images`` (S,), ``pair_cells`` (S,) and ``inverse`` (…) mapping every entry
        to its pair (0 for invalid entries).
    """
    images = images.cpu().long()
    cells = cells.cpu().long()
    if valid is None:
        valid = torch.ones_like(cells, dtype=torch.bool)
    valid = valid.cpu()
    base = int(cells.max()) + 1 if cells.numel() else 1
    keys = images * base + cells
    uniq, inverse_valid = torch.unique(keys[valid], return_inverse=True)
    inverse = torch.zeros_like(cells)
    inverse[valid] = inverse_valid
    return uniq // base, uniq % base, inverse


class AttentionSamplingModel(nn.Module):
    """Base class: the attention network ``a``, feature network ``f`` and classifier ``g``."""

    config: SamplingConfig

    def __init__(
        self,
        config: SamplingConfig,
        attention: nn.Module | None = None,
        feature: nn.Module | None = None,
        classifier: nn.Module | None = None,
    ):
        """Build the default networks of ``config``, or use the ones given.

        A replacement attention network must offer ``offset``, ``stride`` and
        ``map_shape(view_shape)`` like :class:`AttentionNetwork`; a feature network
        must map (S, 3, h, w) sub-tiles of :attr:`subtile_size` to (S, feature_dim).
        """
        super().__init__()
        if not 0 < config.view_scale <= 1:
            raise ValueError(f"view_scale must be in (0, 1], got {config.view_scale}")
        if config.n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {config.n_samples}")
        if not 0 <= config.negative_class < config.num_classes:
            raise ValueError("negative_class must be one of the classes")
        if not 0 <= config.topk_max_overlap <= 1:
            raise ValueError(f"topk_max_overlap must be in [0, 1], got {config.topk_max_overlap}")
        if config.topk_weights not in ("draws", "attention"):
            raise ValueError(
                f"topk_weights must be 'draws' or 'attention', got {config.topk_weights!r}"
            )
        self.config = config
        self.attention = (
            attention
            if attention is not None
            else self.make_attention_network(self.config.attention_stride)
        )
        self.feature = (
            feature
            if feature is not None
            else FeatureNetwork(
                self.subtile_size,
                channels=tuple(config.feature_channels),
                kernel_sizes=tuple(config.feature_kernels),
                hidden=config.feature_hidden,
                out_features=config.feature_dim,
                dropout=config.feature_dropout,
                standardise=config.feature_standardise,
            )
        )
        self.classifier = (
            classifier
            if classifier is not None
            else Classifier(config.feature_dim, config.num_classes)
        )

    # -- construction ------------------------------------------------------------------

    @property
    def subtile_size(self) -> tuple[int, int]:
        """Size (h, w) of the full-resolution regions the feature network sees."""
        raise NotImplementedError

    def make_attention_network(self, stride: int = 1) -> nn.Module:
        c = self.config
        return AttentionNetwork(
            channels=c.attention_channels,
            layers=c.attention_layers,
            padding=c.attention_padding,
            norm=c.attention_norm,
            activation=c.attention_activation,
            stride=stride,
        )

    @property
    def device(self) -> torch.device:
        """Where the parameters live (CPU for a model without any)."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # -- stage 1 ----------------------------------------------------------------------

    def stage1(self, sources: Sequence[ImageSource]) -> list[Stage1]:
        """Views at ``view_scale``, attention logits and ``α`` for every image (000 eq. 1).

        Without gradients (inference) and with a tissue mask, logits are computed only
        for blocks holding tissue cells (:meth:`AttentionNetwork.forward_blocks`,
        identical values): the other cells get ``α = 0`` whatever their logit.
        """
        scale = self.config.view_scale
        blockwise = not torch.is_grad_enabled() and hasattr(self.attention, "forward_blocks")
        tissues = [tissue_mask(src, scale) for src in sources]
        # computed a block at a time (below): the view may stay 8-bit until then
        views = [
            read_view(src, scale, exact_bytes=blockwise and t is not None).to(self.device)
            for src, t in zip(sources, tissues, strict=True)
        ]
        grids, masks = [], []
        for k, (src, view) in enumerate(zip(sources, views, strict=True)):
            h, w = src.shape
            view_shape = (int(view.shape[-2]), int(view.shape[-1]))
            map_shape = self.attention.map_shape(view_shape)
            grid = CellGrid(
                origins=torch.zeros(1, 2, dtype=torch.int64),
                region_size=(int(h), int(w)),
                view_shape=view_shape,
                map_shape=(int(map_shape[0]), int(map_shape[1])),
                offset=tuple(self.attention.offset),
                stride=tuple(self.attention.stride),
                bounds=(int(h), int(w)),
            )
            tissue = tissues[k]
            mask = None
            if tissue is not None:
                tissues[k] = tissue = tissue.to(torch.bool).cpu()
                mask = grid.cell_values(tissue).reshape(-1).to(self.device)
            grids.append(grid)
            masks.append(mask)
        logits: list[Tensor | None] = [
            self.attention.forward_blocks(view, mask.reshape(grid.map_shape))
            if blockwise and mask is not None and bool(mask.any())  # no tissue: unmasked
            else None
            for view, mask, grid in zip(views, masks, grids, strict=True)
        ]
        rest = [k for k, lg in enumerate(logits) if lg is None]
        computed = apply_grouped(self.attention, [as_float_view(views[k]) for k in rest])
        for k, lg in zip(rest, computed, strict=True):
            logits[k] = lg
        del views, computed  # a gigapixel slide's view is large: free it before the softmax
        out = []
        for lg, mask, grid, tissue in zip(logits, masks, grids, tissues, strict=True):
            alpha = attention_distribution(
                lg[None], None if mask is None else mask[None], self.config.uniform_mix
            )[0]
            out.append(Stage1(lg, alpha, mask, grid, tissue))
        return out

    # -- reading and featurising ------------------------------------------------------

    def read_regions(
        self, sources: Sequence[ImageSource], images: Tensor, regions: Tensor, scale: float
    ) -> Tensor:
        """Read ``regions[s]`` of ``sources[images[s]]`` at ``scale``, one read per image.

        Every read of a model passes here, so the edge rule is enforced here: a region
        that could lie inside its image but does not is a bug, never zero fill
        silently handed to a network (:mod:`.coordinates`).
        """
        n = int(images.shape[0])
        if n == 0:
            raise ValueError("nothing to read")
        order: dict[int, list[int]] = defaultdict(list)
        for s, b in enumerate(images.tolist()):
            order[b].append(s)
        out: Tensor | None = None
        for b, idx in order.items():
            outside = outside_image(regions[idx], sources[b].shape)
            if outside:
                raise RuntimeError(
                    f"{outside} region(s) reach outside the {sources[b].shape} image though "
                    "they fit in it: the edge rule (models/coordinates.py) was bypassed"
                )
            pixels = sources[b].read(regions[idx], scale)
            if len(order) == 1 and idx == list(range(n)):  # one image, in order: no copy
                return pixels.to(self.device)
            if out is None:
                out = pixels.new_zeros((n, *pixels.shape[1:]))
            out[idx] = pixels
        assert out is not None
        return out.to(self.device)

    def featurise(self, sources: Sequence[ImageSource], images: Tensor, regions: Tensor) -> Tensor:
        """``f`` of full-resolution regions: (S, 4) → (S, D) float32, L2-normalised."""
        return self.feature(self.read_regions(sources, images, regions, 1.0)).float()

    @torch.no_grad()
    def subtile_scores(self, features: Tensor) -> Tensor:
        """(S, D) sub-tile features → (S, C) class probabilities of ``g`` on each alone
        (:attr:`~.outputs.SubtileSet.scores`), on the CPU."""
        return class_probabilities(self.classifier(features.detach())).cpu()

    def class_probabilities(self, logits: Tensor) -> Tensor:
        return class_probabilities(logits)

    # -- shared API -------------------------------------------------------------------

    def forward(
        self, sources: Sequence[ImageSource], generator: torch.Generator | None = None
    ) -> Tensor:
        """Logits (B, 1 or C) of one sampled estimate per image."""
        with autocast(self.device):
            return self.sampled_logits(sources, generator)

    def sampled_logits(
        self, sources: Sequence[ImageSource], generator: torch.Generator | None = None
    ) -> Tensor:
        raise NotImplementedError

    #: the reads one classification makes, in order (progress messages name them)
    read_steps: tuple[str, ...] = ("stage 1", "sub-tiles")

    @torch.no_grad()
    def predict(
        self,
        sources: Sequence[ImageSource],
        mode: str = "sample",
        draws: int = 16,
        generator: torch.Generator | None = None,
    ) -> list[Prediction]:
        """Classify images and report where the model looked (one template for all models).

        Args:
            mode: ``"sample"``: ``draws`` (K) independent sampled estimates per image;
                the prediction is their mean probability and ``spread`` their standard
                deviation; the regions read are the union over the draws.  ``"topk"``:
                deterministic, the model's most attended distinct regions
                (:meth:`_predict_topk` of each model says which).
            draws: K for ``"sample"``.
        """
        if mode not in ("sample", "topk"):
            raise ValueError(f"mode must be 'sample' or 'topk', got {mode!r}")
        if int(draws) < 1:
            raise ValueError(f"draws must be at least 1, got {draws}")
        was_training = self.training
        self.eval()
        try:
            with autocast(self.device):
                stage1 = self.stage1(sources)
                if mode == "topk":
                    return [self._predict_topk(sources, stage1, b) for b in range(len(sources))]
                return self._predict_sampled(sources, stage1, int(draws), generator)
        finally:
            self.train(was_training)

    def _predict_sampled(
        self,
        sources: Sequence[ImageSource],
        stage1: Sequence[Stage1],
        draws: int,
        generator: torch.Generator | None,
    ) -> list[Prediction]:
        raise NotImplementedError

    def _predict_topk(
        self, sources: Sequence[ImageSource], stage1: Sequence[Stage1], b: int
    ) -> Prediction:
        raise NotImplementedError
