"""Magnifying Networks (MagNets, 002 §3): zoom through the slide pyramid, layer by layer.

A MagNet is a tree of *magnifying layers* and a classification layer.  Every layer
input is a square **frame** of the image in level-0 pixels (layer 1: the whole image,
a square of side ``max(H, W)`` centred on it, so a non-square image is padded
symmetrically with black, 002 §3.1 "Resize and pad").  For each frame and each of its
``P_l`` patch slots, a stack of three Inception-like convolution blocks (own weights
per frame position and slot, 002 §3.1) maps the frame's ``view_size`` × ``view_size``
view ``I`` to a map of the same size; a **spatial sparsemax** (:mod:`.sparsemax`)
makes it a sparse distribution ``p``; its moments give ``θ``:

* cell centres ``u_j = (2j + 1)/n − 1`` (x) and ``v_i`` (y), in the frame's
  normalised coordinates ``[−1, 1]``;
* ``μ = (Σ p v, Σ p u)`` — the expected position — and ``t = tanh(μ)`` (002 eqs. 2–3);
* ``σ² = ½ Σ p ((u − μ_x)² + (v − μ_y)²)`` and ``s = √(3 σ² + 10⁻⁸)``, clamped to
  ``[min_scale, 1]`` (002 eq. 1: ``max(s, 0.05)``).  ``√3 σ`` is the half-width of the
  square whose uniform distribution has the spread of ``p``: a box that covers the
  pixels the sparsemax selected.  The paper says only "the expected value translates
  to the scaling parameter and expected L2 over both axes to the translation"; a
  *size* needs a second moment, so we use the spread for ``s`` and the mean for ``t``.
  The upper clamp keeps every box inside its frame's extent (a layer only magnifies).
* ``θ = [[s, 0, t_x], [0, s, t_y]]`` (002 eq. 4): the child box has centre
  ``c + t·S/2`` and side ``s·S`` for a frame of centre ``c`` and side ``S``.

**Magnifying from the file.**  Each chosen box is the next layer's frame.  It is not
upsampled from the parent's pixels: the box, plus a margin of ``read_margin`` read
pixels, clipped to the image (the edge rule: nothing outside the image is asked of
the source; what lies outside reads black), is read through the image-source
protocol at ``σ = min(1, n / side)`` output pixels per level-0 pixel — the pyramid
level that gives the next layer's ``n`` × ``n`` input (``sample_size``, the paper's
112 × 112 ``I′``; ``classifier_size``, 224, for the last layer) its full detail — and
sampled onto the box's grid with :func:`~.lms.grid_sample`.  The grid is a
differentiable function of every ``θ`` on the path from the root, so gradients reach
``s`` and ``t`` of every layer.  The next layer's ``I`` is ``I′`` area-averaged to
``view_size``.  Linearized multi-sampling (:mod:`.lms`, the default) keeps those
gradients alive under strong zoom; bilinear is the option.

**The frozen patch** (002 §4): slot 0 of layer 2 has ``θ = [[1, 0, 0], [0, 1, 0]]``,
its whole input, re-read at the next layer's finer resolution.

**Classification layer** (002 §3.2): the last layer's boxes (``Π P_l`` patches, depth
first) are encoded by a CNN, read in order by a GRU, and a head (512, 256) gives the
prediction after every patch; the last is the image's.  **Auxiliary classifiers**
(002 §3.3) on the patches of layers ``aux_layers`` (paper: 1 and 3): an encoder of
their own, mean-pooled over the layer's patches, a linear layer; cross-entropy to the
image label.  **Paradoxical loss** (002 §3.3, Maksoud et al.): the deepest auxiliary
layer must predict at least as well as the first, ``mean(relu(CE_deep − sg(CE_1)))``
per image (the first layer's loss is the target, not pushed up).

Preprocessing: the **grey filter** (002 §4.2: pixels whose R, G and B lie within
``grey_threshold``/255 of each other become black) on every read, at training and
inference alike (it defines the input, it is not an augmentation); **flips and 90°
rotations** in training only: every layer sees its input turned by one of the 8
symmetries of the square (one per image and step), and its map is turned back before
the moments, so boxes stay in image coordinates.

Encoders start from scratch (no pretrained weights offline).  Everything runs on
CPU or CUDA; coordinates are float64 level-0 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fields import field_problems
from .base import MAX_CLASSES, MAX_LAYERS, MAX_WEIGHT, MAX_WIDTH
from .coordinates import CellGrid, outside_image
from .device import autocast
from .lms import grid_sample
from .losses import classification_loss
from .networks import class_probabilities
from .outputs import LossTerms, MagnifiedRegions, Prediction, SubtileSet, TileSet
from .source import ImageSource
from .sparsemax import spatial_sparsemax

__all__ = ["MagNet", "MagNetConfig", "MagPass", "grey_filter", "moments_to_theta"]

#: at most this many magnifying layers (002 trains up to 4)
MAX_MAGNIFYING_LAYERS = 6
#: at most this many boxes in the last layer (002: 18 for 3 layers)
MAX_PATCHES = 1024


@dataclass
class MagNetConfig:
    """MagNet settings (defaults: 002's 3-layer MagNet, 2·3·3 = 18 patches, figure 4).

    Attributes:
        num_classes: 2 gives one sigmoid logit; more give a softmax (as every kind).
        patches: ``P_l``, boxes per frame for each magnifying layer (002: 2 or 3).
        view_size: side of a layer's input ``I`` (002: 56).
        sample_size: side of ``I′`` a box is sampled at for the next layer (002: 112);
            a multiple of ``view_size``.
        classifier_size: side of the classification patches (002: 224).
        localiser_channels: channels of each kernel size (1, 3, 5) in the Inception-like
            blocks of the localisation nets.
        encoder_channels: stride-2 convolutions of the patch encoders (from scratch).
        feature_dim: a patch's feature vector (the encoder's output).
        gru_hidden: GRU state size.
        head_hidden: the head's two hidden layers (002: 512, 256).
        sampler: ``"lms"`` (linearized multi-sampling, 002's choice) or ``"bilinear"``.
        lms_copies, lms_radius: jittered grid copies and their distance (input pixels).
        min_scale: the lower bound of ``s`` (002 eq. 1: 0.05).
        read_margin: read pixels around every box, so the grid (and LMS's jitter)
            stays on real pixels as ``θ`` moves.
        frozen_patch: slot 0 of layer 2 is the identity (002 §4).
        aux_layers: layers (1-based) whose patches feed auxiliary classifiers (002: 1, 3);
            layers beyond the last are ignored.
        aux_weight, paradoxical_weight: weights of those losses (002 gives none: 1).
        grey_filter, grey_threshold: 002 §4.2's filter and its threshold (0–255 units).
            Switch it off for grey images (Megapixel MNIST), which it would blank.
        augment: flips and 90° rotations in training.
    """

    num_classes: int = 2
    patches: tuple[int, ...] = (2, 3, 3)
    view_size: int = 56
    sample_size: int = 112
    classifier_size: int = 224
    localiser_channels: int = 8
    encoder_channels: tuple[int, ...] = (16, 32, 64, 128)
    feature_dim: int = 512
    gru_hidden: int = 256
    head_hidden: tuple[int, int] = (512, 256)
    sampler: Literal["lms", "bilinear"] = "lms"
    lms_copies: int = 8
    lms_radius: float = 0.5
    min_scale: float = 0.05
    read_margin: int = 2
    frozen_patch: bool = True
    aux_layers: tuple[int, ...] = (1, 3)
    aux_weight: float = 1.0
    paradoxical_weight: float = 1.0
    grey_filter: bool = True
    grey_threshold: int = 15
    augment: bool = True

    def to_dict(self) -> dict:
        """Plain-Python form (for checkpoints)."""
        return asdict(self)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these settings (types, then ranges); empty when none.

        Settings come from checkpoints and ``--set``: a tree of a million boxes or a
        10⁹-wide layer is refused here, before anything is built."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        problems = field_problems(type(self), values)
        if problems:
            return problems
        if not 2 <= self.num_classes <= MAX_CLASSES:
            problems.append(f"num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")
        if not 1 <= len(self.patches) <= MAX_MAGNIFYING_LAYERS or not all(
            1 <= p <= 8 for p in self.patches
        ):
            problems.append(
                f"patches must be 1 to {MAX_MAGNIFYING_LAYERS} counts in [1, 8], got {self.patches}"
            )
        elif math.prod(self.patches) > MAX_PATCHES:
            problems.append(f"patches give more than {MAX_PATCHES} boxes: {self.patches}")
        for name in ("view_size", "sample_size", "classifier_size"):
            if not 4 <= getattr(self, name) <= 1024:
                problems.append(f"{name} must be in [4, 1024], got {getattr(self, name)}")
        if not problems and self.sample_size % self.view_size:
            problems.append(
                f"sample_size ({self.sample_size}) must be a multiple of view_size "
                f"({self.view_size})"
            )
        for name in ("localiser_channels", "feature_dim", "gru_hidden", "lms_copies"):
            if not 1 <= getattr(self, name) <= MAX_WIDTH:
                problems.append(f"{name} must be in [1, {MAX_WIDTH}], got {getattr(self, name)}")
        for name in ("encoder_channels", "head_hidden"):
            if (
                not all(1 <= v <= MAX_WIDTH for v in getattr(self, name))
                or len(getattr(self, name)) > MAX_LAYERS
            ):
                problems.append(
                    f"{name} must be in [1, {MAX_WIDTH}] each, got {getattr(self, name)}"
                )
        if len(self.head_hidden) != 2:
            problems.append(f"head_hidden needs two sizes, got {self.head_hidden}")
        if self.lms_copies < 3:
            problems.append(f"lms_copies must be at least 3, got {self.lms_copies}")
        if not 0 < self.lms_radius <= 8:
            problems.append(f"lms_radius must be in (0, 8] pixels, got {self.lms_radius}")
        if not 0 < self.min_scale <= 1:
            problems.append(f"min_scale must be in (0, 1], got {self.min_scale}")
        if not 0 <= self.read_margin <= 64:
            problems.append(f"read_margin must be in [0, 64], got {self.read_margin}")
        if not 0 <= self.grey_threshold <= 255:
            problems.append(f"grey_threshold must be in [0, 255], got {self.grey_threshold}")
        for name in ("aux_weight", "paradoxical_weight"):
            if not 0 <= getattr(self, name) <= MAX_WEIGHT:
                problems.append(f"{name} must be in [0, {MAX_WEIGHT:g}], got {getattr(self, name)}")
        return problems


# -- networks ---------------------------------------------------------------------------


class InceptionBlock(nn.Module):
    """1×1, 3×3 and 5×5 convolutions side by side (Inception-v3-like, 002 §3.1), ReLU.

    'Same' size with replicated borders: a box near the black padding must not see a
    zero rim that the convolutions invented (the project's edge rule)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, channels, k, padding=k // 2, padding_mode="replicate")
            for k in (1, 3, 5)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(torch.cat([b(x) for b in self.branches], dim=1))


class Localiser(nn.Module):
    """Three Inception-like blocks and a 1×1 convolution: (B, 3, n, n) → (B, n, n) scores."""

    def __init__(self, channels: int):
        super().__init__()
        width = 3 * channels
        self.blocks = nn.Sequential(
            InceptionBlock(3, channels),
            InceptionBlock(width, channels),
            InceptionBlock(width, channels),
        )
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.blocks(x))[:, 0]


class PatchEncoder(nn.Module):
    """Stride-2 convolutions, global average pooling, a linear layer: (N, 3, h, w) → (N, D)."""

    def __init__(self, channels: Sequence[int], feature_dim: int):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, int(c), 3, stride=2, padding=1), nn.ReLU()]
            c_in = int(c)
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.convs(x).mean(dim=(-2, -1))))


# -- helpers ----------------------------------------------------------------------------


def grey_filter(pixels: Tensor, threshold: int = 15) -> Tensor:
    """Pixels whose R, G and B lie within ``threshold``/255 of each other become black
    (002 §4.2: background, pen-free glass, grey artefacts).  (…, 3, h, w) in [0, 1]."""
    spread = pixels.amax(dim=-3, keepdim=True) - pixels.amin(dim=-3, keepdim=True)
    return pixels * (spread * 255.0 > threshold + 1e-3)


def moments_to_theta(p: Tensor, min_scale: float = 0.05) -> tuple[Tensor, Tensor]:
    """``s`` (B,) and ``t = (t_y, t_x)`` (B, 2) from distributions ``p`` (B, n, n) over a
    frame (module docstring: mean → ``t = tanh(μ)``, spread → ``s = √(3σ²)`` clamped to
    ``[min_scale, 1]``)."""
    n_y, n_x = p.shape[-2:]
    p = p.to(torch.float64)
    v = (2 * torch.arange(n_y, device=p.device, dtype=p.dtype) + 1) / n_y - 1
    u = (2 * torch.arange(n_x, device=p.device, dtype=p.dtype) + 1) / n_x - 1
    py, px = p.sum(dim=-1), p.sum(dim=-2)  # marginals (B, n)
    mu_y, mu_x = (py * v).sum(-1), (px * u).sum(-1)
    var = 0.5 * ((py * (v - mu_y[:, None]) ** 2).sum(-1) + (px * (u - mu_x[:, None]) ** 2).sum(-1))
    s = torch.sqrt(3 * var + 1e-8).clamp(min=min_scale, max=1.0)
    return s, torch.tanh(torch.stack((mu_y, mu_x), dim=-1))


def _turn(x: Tensor, k: int, flip: bool) -> Tensor:
    """One of the 8 symmetries of the square on the last two axes."""
    x = torch.rot90(x, k, dims=(-2, -1)) if k else x
    return x.flip(-1) if flip else x


def _unturn(x: Tensor, k: int, flip: bool) -> Tensor:
    x = x.flip(-1) if flip else x
    return torch.rot90(x, -k, dims=(-2, -1)) if k else x


@dataclass(eq=False)
class MagPass:
    """One forward pass over B images (tensors on the model's device).

    Attributes:
        logits: (B, 1 or C) the GRU's last prediction.
        trace: (B, P, 1 or C) its prediction after every patch.
        aux_logits: layer → (B, 1 or C) auxiliary predictions.
        maps: layer-1 distributions ``p``, (B, P_1, n, n).
        frame1: (B, 3) the layer-1 frames ``[top, left, side]``.
        centres, sides: per layer, (Q_l·P_l, B, 2) and (Q_l·P_l, B) boxes chosen by it.
        scales, translations: per layer, ``s`` (Q·P, B) and ``t`` (Q·P, B, 2).
        read_scale, level: per layer, (Q·P, B) float / int of the reads of its boxes.
    """

    logits: Tensor
    trace: Tensor
    aux_logits: dict[int, Tensor]
    maps: Tensor
    frame1: Tensor
    centres: list[Tensor]
    sides: list[Tensor]
    scales: list[Tensor]
    translations: list[Tensor]
    read_scale: list[Tensor]
    level: list[Tensor]


class MagNet(nn.Module):
    """A MagNet (002): magnifying layers, a GRU classification layer, auxiliary classifiers.

    Matches the interface the engine uses (:class:`~.base.AttentionSamplingModel`'s):
    ``predict``, ``loss``, ``forward``, ``read_steps``, ``subtile_size``, ``config``.
    """

    config: MagNetConfig
    #: the reads one classification makes: the whole image, then the magnified boxes
    read_steps: tuple[str, ...] = ("stage 1", "magnified regions")

    def __init__(self, config: MagNetConfig | None = None):
        super().__init__()
        config = config or MagNetConfig()
        config.patches = tuple(int(p) for p in config.patches)
        self.config = config
        n_out = 1 if config.num_classes == 2 else config.num_classes
        self.localisers = nn.ModuleDict()
        for layer, (frames, slots) in enumerate(
            zip(self.frames_per_layer, config.patches, strict=True)
        ):
            for q in range(frames):
                for p in range(slots):
                    if not self.frozen(layer, p):
                        self.localisers[self._key(layer, q, p)] = Localiser(
                            config.localiser_channels
                        )
        self.encoder = PatchEncoder(config.encoder_channels, config.feature_dim)
        self.gru = nn.GRU(config.feature_dim, config.gru_hidden, batch_first=True)
        h1, h2 = config.head_hidden
        self.head = nn.Sequential(
            nn.Linear(config.gru_hidden, h1),
            nn.ReLU(),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.Linear(h2, n_out),
        )
        self.aux_encoders = nn.ModuleDict()
        self.aux_heads = nn.ModuleDict()
        for layer in self.aux_layers:
            self.aux_encoders[str(layer)] = PatchEncoder(
                config.encoder_channels, config.feature_dim
            )
            self.aux_heads[str(layer)] = nn.Linear(config.feature_dim, n_out)

    # -- structure ------------------------------------------------------------------------

    @property
    def frames_per_layer(self) -> list[int]:
        """``Q_l = Π_{k<l} P_k``: the frames (inputs) of each layer."""
        out, q = [], 1
        for p in self.config.patches:
            out.append(q)
            q *= p
        return out

    @property
    def n_patches(self) -> int:
        """``Π P_l``: the classification patches (002 §3.4)."""
        return math.prod(self.config.patches)

    @property
    def aux_layers(self) -> tuple[int, ...]:
        """The 1-based auxiliary layers that exist in this MagNet."""
        n = len(self.config.patches)
        return tuple(sorted({int(k) for k in self.config.aux_layers if 1 <= int(k) <= n}))

    def frozen(self, layer: int, slot: int) -> bool:
        """Slot 0 of layer 2 (0-based layer 1) is the identity box (002 §4)."""
        return bool(self.config.frozen_patch) and layer == 1 and slot == 0

    @staticmethod
    def _key(layer: int, q: int, p: int) -> str:
        return f"l{layer + 1}_f{q}_p{p}"

    @property
    def subtile_size(self) -> tuple[int, int]:
        """Level-0 size at which a classification patch shows full detail (the engine
        refuses images smaller than one)."""
        return (self.config.classifier_size, self.config.classifier_size)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # -- reading ----------------------------------------------------------------------------

    def sample_box(
        self,
        source: ImageSource,
        centre: Tensor,
        side: Tensor,
        size: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, float, int]:
        """The square box ``centre ± side/2`` (level-0, differentiable) on a ``size`` ×
        ``size`` grid, read from the file at the level that gives it full detail.

        Returns the (3, size, size) pixels, the read scale and the level read (-1: the
        source has no levels; -2: the box is wholly outside the image, all black).
        """
        h, w = source.shape
        c = centre.detach().cpu().double().tolist()
        s = float(side.detach())
        scale = min(1.0, size / s)
        margin = self.config.read_margin / scale
        y0, x0 = (
            max(0, math.floor(c[0] - s / 2 - margin)),
            max(0, math.floor(c[1] - s / 2 - margin)),
        )
        y1 = min(h, math.ceil(c[0] + s / 2 + margin))
        x1 = min(w, math.ceil(c[1] + s / 2 + margin))
        dev = self.device
        if y1 <= y0 or x1 <= x0:
            # nothing of the image inside: black, as the paper's padding (no gradient)
            return torch.zeros(3, size, size, device=dev), scale, -2
        region = torch.tensor([[y0, x0, y1 - y0, x1 - x0]], dtype=torch.int64)
        if outside_image(region, (h, w)):  # cannot happen: the window is clipped above
            raise RuntimeError("a magnified box was read outside the image (edge rule)")
        pixels = source.read(region, scale).to(dev)
        if self.config.grey_filter:
            pixels = grey_filter(pixels, self.config.grey_threshold)
        level_for = getattr(source, "level_for", None)
        level = int(level_for(scale)) if callable(level_for) else -1
        offsets = (torch.arange(size, device=dev, dtype=torch.float64) + 0.5) / size - 0.5
        ys = centre[0].to(dev, torch.float64) + side.to(dev, torch.float64) * offsets
        xs = centre[1].to(dev, torch.float64) + side.to(dev, torch.float64) * offsets
        yn = 2 * (ys - y0) / (y1 - y0) - 1  # the read's normalised coordinates
        xn = 2 * (xs - x0) / (x1 - x0) - 1
        grid = torch.stack((xn[None, :].expand(size, size), yn[:, None].expand(size, size)), dim=-1)
        out = grid_sample(
            pixels.float(),
            grid[None].float(),
            self.config.sampler,
            generator=generator,
            copies=self.config.lms_copies,
            radius=self.config.lms_radius,
        )
        return out[0], scale, level

    def _sample_all(self, sources, centres, sides, size, generator):
        """Sample boxes (F, B, 2)/(F, B) → pixels (F, B, 3, size, size), scales, levels."""
        frames, batch = sides.shape
        pix, scales, levels = [], [], []
        for f in range(frames):
            for b in range(batch):
                out, scale, level = self.sample_box(
                    sources[b], centres[f, b], sides[f, b], size, generator
                )
                pix.append(out)
                scales.append(scale)
                levels.append(level)
        return (
            torch.stack(pix).reshape(frames, batch, 3, size, size),
            torch.tensor(scales, dtype=torch.float64).reshape(frames, batch),
            torch.tensor(levels, dtype=torch.int64).reshape(frames, batch),
        )

    # -- the pass ---------------------------------------------------------------------------

    def run(
        self,
        sources: Sequence[ImageSource],
        generator: torch.Generator | None = None,
        augment: bool = False,
    ) -> MagPass:
        """All layers for a batch of images (:class:`MagPass`)."""
        cfg, dev = self.config, self.device
        batch = len(sources)
        if batch == 0:
            raise ValueError("nothing to classify")
        turns = [(0, False)] * batch
        if augment:
            draws = torch.randint(0, 8, (batch,), generator=generator).tolist()
            turns = [(d % 4, d >= 4) for d in draws]
        frame1 = []
        for src in sources:
            h, w = (int(v) for v in src.shape)
            side = max(h, w)
            frame1.append([(h - side) // 2, (w - side) // 2, side])
        f1 = torch.tensor(frame1, dtype=torch.float64, device=dev)
        centres = (f1[:, :2] + f1[:, 2:] / 2)[None]  # (1, B, 2)
        sides = f1[:, 2][None]  # (1, B)
        images, _, _ = self._sample_all(sources, centres, sides, cfg.sample_size, generator)
        out = {
            "centres": [],
            "sides": [],
            "scales": [],
            "translations": [],
            "read": [],
            "level": [],
        }
        aux_logits: dict[int, Tensor] = {}
        maps1 = None
        n_layers = len(cfg.patches)
        for layer, slots in enumerate(cfg.patches):
            frames = sides.shape[0]
            view = F.avg_pool2d(
                images.reshape(frames * batch, 3, cfg.sample_size, cfg.sample_size),
                cfg.sample_size // cfg.view_size,
            ).reshape(frames, batch, 3, cfg.view_size, cfg.view_size)
            view = torch.stack(
                [
                    torch.stack([_turn(view[q, b], *turns[b]) for b in range(batch)])
                    for q in range(frames)
                ]
            )
            child_c, child_s, s_all, t_all, layer_maps = [], [], [], [], []
            for q in range(frames):
                for p in range(slots):
                    if self.frozen(layer, p):
                        s = torch.ones(batch, device=dev, dtype=torch.float64)
                        t = torch.zeros(batch, 2, device=dev, dtype=torch.float64)
                    else:
                        scores = self.localisers[self._key(layer, q, p)](view[q]).float()
                        prob = spatial_sparsemax(scores)
                        prob = torch.stack(
                            [_unturn(prob[b], *turns[b]) for b in range(batch)]
                        )  # back to image orientation
                        if layer == 0:
                            layer_maps.append(prob)
                        s, t = moments_to_theta(prob, cfg.min_scale)
                    child_c.append(centres[q] + t * sides[q][:, None] / 2)
                    child_s.append(s * sides[q])
                    s_all.append(s)
                    t_all.append(t)
            if layer == 0:
                maps1 = torch.stack(layer_maps, dim=1)
            centres, sides = torch.stack(child_c), torch.stack(child_s)
            last = layer == n_layers - 1
            size = cfg.classifier_size if last else cfg.sample_size
            images, read, level = self._sample_all(sources, centres, sides, size, generator)
            for key, value in zip(
                ("centres", "sides", "scales", "translations", "read", "level"),
                (centres, sides, torch.stack(s_all), torch.stack(t_all), read, level),
                strict=True,
            ):
                out[key].append(value)
            if layer + 1 in self.aux_layers:
                aux_logits[layer + 1] = self._aux(layer + 1, images, turns)
        patches = images  # (P, B, 3, patch, patch)
        n = patches.shape[0]
        turned = torch.stack(
            [torch.stack([_turn(patches[k, b], *turns[b]) for b in range(batch)]) for k in range(n)]
        )
        feats = self.encoder(turned.reshape(n * batch, 3, cfg.classifier_size, cfg.classifier_size))
        feats = feats.reshape(n, batch, -1).transpose(0, 1)  # (B, P, D): tree order
        states, _ = self.gru(feats)
        trace = self.head(states)
        return MagPass(
            logits=trace[:, -1],
            trace=trace,
            aux_logits=aux_logits,
            maps=maps1,
            frame1=f1,
            centres=out["centres"],
            sides=out["sides"],
            scales=out["scales"],
            translations=out["translations"],
            read_scale=out["read"],
            level=out["level"],
        )

    def _aux(self, layer: int, images: Tensor, turns) -> Tensor:
        """An auxiliary classifier on a layer's patches: mean feature → logits (B, ·)."""
        frames, batch = images.shape[:2]
        turned = torch.stack(
            [
                torch.stack([_turn(images[q, b], *turns[b]) for b in range(batch)])
                for q in range(frames)
            ]
        )
        feats = self.aux_encoders[str(layer)](turned.flatten(0, 1)).reshape(frames, batch, -1)
        return self.aux_heads[str(layer)](feats.mean(0))

    # -- the engine's interface ---------------------------------------------------------------

    def forward(
        self, sources: Sequence[ImageSource], generator: torch.Generator | None = None
    ) -> Tensor:
        """Logits (B, 1 or C) of the last GRU step."""
        with autocast(self.device):
            return self.run(sources, generator).logits

    def class_probabilities(self, logits: Tensor) -> Tensor:
        return class_probabilities(logits)

    def loss(
        self,
        sources: Sequence[ImageSource],
        labels: Tensor | Sequence[int],
        epoch: int = 0,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """Cross-entropy of the GRU's last prediction + auxiliary cross-entropies +
        the paradoxical loss (002 §3.3, §4); flips and rotations when training."""
        cfg = self.config
        labels = torch.as_tensor(labels, dtype=torch.long)
        zero = torch.zeros((), device=self.device)
        with autocast(self.device):
            run = self.run(sources, generator, augment=self.training and cfg.augment)
        ce = classification_loss(run.logits, labels)
        aux, paradox = zero, zero
        per_image = {k: _per_image_ce(v, labels) for k, v in run.aux_logits.items()}
        if per_image:
            aux = sum(v.mean() for v in per_image.values()) / len(per_image)
        layers = sorted(per_image)
        if len(layers) >= 2:
            first, deep = per_image[layers[0]], per_image[layers[-1]]
            paradox = F.relu(deep - first.detach()).mean()
        total = ce + cfg.aux_weight * aux + cfg.paradoxical_weight * paradox
        return LossTerms(
            total,
            ce,
            zero,
            zero,
            zero,
            zero,
            run.logits.detach(),
            labels,
            auxiliary=aux,
            paradoxical=paradox,
        )

    @torch.no_grad()
    def predict(
        self,
        sources: Sequence[ImageSource],
        mode: str = "sample",
        draws: int = 16,
        generator: torch.Generator | None = None,
    ) -> list[Prediction]:
        """Classify images and report every box read (:class:`MagnifiedRegions`).

        A MagNet is deterministic: ``"sample"`` and ``"topk"`` give the same single pass
        (``draws`` is checked but one estimate is all there is; ``spread`` is 0), and
        the prediction's mode says so: ``"magnify"``.
        """
        if mode not in ("sample", "topk"):
            raise ValueError(f"mode must be 'sample' or 'topk', got {mode!r}")
        if int(draws) < 1:
            raise ValueError(f"draws must be at least 1, got {draws}")
        was_training = self.training
        self.eval()
        try:
            with autocast(self.device):
                run = self.run(sources, generator)
        finally:
            self.train(was_training)
        return [self._prediction(run, b, sources[b]) for b in range(len(sources))]

    def _prediction(self, run: MagPass, b: int, source: ImageSource) -> Prediction:
        cfg = self.config
        h, w = (int(v) for v in source.shape)
        trace = class_probabilities(run.trace[b].float()).cpu()
        probs = trace[-1]
        top, left, side = (int(v) for v in run.frame1[b].tolist())
        n = cfg.view_size
        maps = run.maps[b].float().cpu() if run.maps is not None else torch.zeros(1, n, n)
        attention = maps.mean(0) if maps.shape[0] else torch.full((n, n), 1.0 / (n * n))
        grid = CellGrid(
            origins=torch.tensor([[top, left]]),
            region_size=(side, side),
            view_shape=(n, n),
            map_shape=(n, n),
            bounds=(h, w),
        )
        depth, parent, boxes, scale, trans, read, level = [], [], [], [], [], [], []
        offset = 0
        for layer, slots in enumerate(cfg.patches):
            c = run.centres[layer][:, b].detach().double().cpu()
            s = run.sides[layer][:, b].detach().double().cpu()
            k = int(s.shape[0])
            depth.append(torch.full((k,), layer + 1, dtype=torch.int64))
            if layer == 0:
                parent.append(torch.full((k,), -1, dtype=torch.int64))
            else:
                parent.append(
                    offset
                    - int(run.sides[layer - 1].shape[0])
                    + torch.arange(k, dtype=torch.int64) // slots
                )
            offset += k
            boxes.append(torch.cat((c - s[:, None] / 2, s[:, None], s[:, None]), dim=1))
            scale.append(run.scales[layer][:, b].detach().double().cpu())
            trans.append(run.translations[layer][:, b].detach().double().cpu())
            read.append(run.read_scale[layer][:, b])
            level.append(run.level[layer][:, b])
        boxes_t = torch.cat(boxes)
        magnified = MagnifiedRegions(
            depth=torch.cat(depth),
            parent=torch.cat(parent),
            boxes=boxes_t,
            scale=torch.cat(scale),
            translation=torch.cat(trans),
            zoom=side / boxes_t[:, 2],
            read_scale=torch.cat(read),
            level=torch.cat(level),
            trace=trace,
            view_scale=min(1.0, cfg.sample_size / side),
        )
        regions = _inside(boxes_t, h, w)
        leaves = magnified.depth == len(cfg.patches)
        first = magnified.depth == 1
        n_leaves = int(leaves.sum())
        per_tile = n_leaves // int(first.sum())
        centre1 = boxes_t[first, :2] + boxes_t[first, 2:] / 2
        cell = ((centre1 - torch.tensor([top, left])) / side * n).floor().long().clamp(0, n - 1)
        tiles = TileSet(
            cells=cell[:, 0] * n + cell[:, 1],
            regions=regions[first],
            counts=torch.full((int(first.sum()),), per_tile, dtype=torch.int64),
            attention=torch.full((int(first.sum()),), 1.0 / int(first.sum())),
        )
        subtiles = SubtileSet(
            tile=torch.arange(n_leaves, dtype=torch.int64) // per_tile,
            cells=torch.arange(n_leaves, dtype=torch.int64),
            regions=regions[leaves],
            weights=torch.full((n_leaves,), 1.0 / n_leaves),
        )
        return Prediction(
            probabilities=probs,
            spread=torch.zeros_like(probs),
            draw_probabilities=probs[None],
            mode="magnify",
            attention=attention,
            attention_grid=grid,
            tiles=tiles,
            subtiles=subtiles,
            magnified=magnified,
        )


def _inside(boxes: Tensor, h: int, w: int) -> Tensor:
    """The part of float ``[top, left, side, side]`` boxes inside the image, as int64
    ``[top, left, height, width]`` (at least one pixel, at the nearest edge when the box
    lies wholly outside)."""
    y0 = boxes[:, 0].floor().clamp(0, h - 1)
    x0 = boxes[:, 1].floor().clamp(0, w - 1)
    y1 = torch.maximum((boxes[:, 0] + boxes[:, 2]).ceil().clamp(max=h), y0 + 1)
    x1 = torch.maximum((boxes[:, 1] + boxes[:, 3]).ceil().clamp(max=w), x0 + 1)
    return torch.stack((y0, x0, y1 - y0, x1 - x0), dim=1).long()


def _per_image_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per image (sigmoid for one logit, softmax otherwise)."""
    labels = labels.to(logits.device)
    logits = logits.float()
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")
