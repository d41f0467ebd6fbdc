"""The four networks of attention sampling: attention ``a``/``b``, feature ``f``, classifier ``g``.

- ``a`` (stage 1) and ``b`` (stage 2) are :class:`AttentionNetwork`: three conv layers
  of 8 kernels with ReLU (000 §2.4, ATS §4.2), or with batch norm and leaky ReLU as in
  the PatchGAN-like net of 003, and a 1×1 convolution to one logit per cell.  The
  softmax over all cells (with masks) is in :mod:`.distributions`.
- ``f`` is :class:`FeatureNetwork`, the LeNet of Ilse et al. 2018 used by 000 and ATS
  (conv–ReLU–max-pool ×2, two fully connected layers) with an L2-normalised output:
  equal feature norms make sampling from the attention the minimum-variance choice
  (ATS §3.2.1, eq. 9).
  Optionally with scaled weight standardisation in every layer (``standardise``).
- ``g`` is :class:`Classifier`, one fully connected layer (000 §2.4).  Two classes use
  one logit and a sigmoid (000's "sigmoid activation"); more use a softmax.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "STRIDES",
    "AttentionNetwork",
    "Classifier",
    "FeatureNetwork",
    "StandardisedConv2d",
    "StandardisedLinear",
    "UniformAttention",
    "as_float_view",
    "class_probabilities",
    "n_logits",
]


#: the strides an attention network may have (each a power of 2 from stride-2 convs)
STRIDES = (1, 2, 4)
#: map cells per side of a block of :meth:`AttentionNetwork.forward_blocks`: a 256²
#: block's 8-channel layers (2 MB each) stay in cache; 512² blocks took twice as long
#: on a 6,250² view (0.5 s against 1.0 s, 2 threads; docs/benchmarks.md)
BLOCK = 256


def n_logits(num_classes: int) -> int:
    """Logits of ``g``: 1 for a binary (sigmoid) head, ``num_classes`` otherwise."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def class_probabilities(logits: Tensor) -> Tensor:
    """(B, 1) sigmoid logits → (B, 2) ``[1 − p, p]``; (B, C) → softmax. Always (B, C)."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat((1.0 - p, p), dim=-1)
    return torch.softmax(logits, dim=-1)


class AttentionNetwork(nn.Module):
    """An attention network: view (B, 3, h_v, w_v) → logits (B, h_a, w_a), one per cell.

    Args:
        channels: kernels per conv layer (8 in 000 §2.4).
        layers: conv layers (3).
        kernel_size: odd kernel size (3).
        padding: ``"same"`` keeps the map the size of the view (cell ↔ view pixel,
            full coverage of the region); its convolutions pad by *replicating* the
            border, never with zeros: black padding looks like dark nuclei, and a
            network trained on slides surrounded by glass learned to love it (on
            real H&E whose tissue touches the border, the demo model's whole stage-1
            attention sat on the last row).  ``"valid"`` (the ATS reference) shrinks
            the map by ``layers·(k−1)`` and offsets every cell by half that
            (:attr:`offset`).
        norm: ``"batch"`` for batch norm after each conv (003), else none.
        activation: ``"relu"`` (000, ATS) or ``"leaky_relu"`` (003).
        stride: 1, 2 or 4: the first ``log2(stride)`` convolutions step by 2, so one
            cell covers ``stride``² view pixels (``"same"`` padding only).  The first
            convolution still sees every view pixel, so a region a few view pixels
            across is not averaged away (the 1/32 view that would cost the same was
            not learnable for the demo), but the layers after it, the softmax, the
            draws and the stored maps cost ``stride``² less: on a gigapixel slide
            with tissue everywhere the stage-1 network is most of the time.

    The final 1×1 logit convolution starts at zero, so an untrained network gives the
    uniform distribution over the (unmasked) cells: the exploration 000 A.1 describes.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 8,
        layers: int = 3,
        kernel_size: int = 3,
        padding: Literal["same", "valid"] = "same",
        norm: Literal["batch"] | None = None,
        activation: Literal["relu", "leaky_relu"] = "relu",
        stride: int = 1,
    ):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"stride must be one of {STRIDES}, got {stride!r}")
        halvings = STRIDES.index(stride)
        if halvings > layers:
            raise ValueError(f"stride {stride} needs at least {halvings} conv layers, got {layers}")
        if halvings and padding != "same":
            raise ValueError("a strided attention network needs padding='same'")
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd so that every cell has a centre pixel")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.padding = padding
        self.layers = layers
        self.kernel_size = kernel_size
        self.cell = stride
        body: list[nn.Module] = []
        c_in = in_channels
        for layer in range(layers):
            body.append(
                nn.Conv2d(
                    c_in,
                    channels,
                    kernel_size,
                    stride=2 if layer < halvings else 1,
                    padding=kernel_size // 2 if padding == "same" else 0,
                    padding_mode="replicate",  # no zeros at the view's border
                    bias=norm is None,
                )
            )
            if norm == "batch":
                body.append(nn.BatchNorm2d(channels))
            elif norm is not None:
                raise ValueError(f"norm must be 'batch' or None, got {norm!r}")
            if activation == "relu":
                body.append(nn.ReLU(inplace=True))
            elif activation == "leaky_relu":
                body.append(nn.LeakyReLU(0.2, inplace=True))
            else:
                raise ValueError(f"activation must be 'relu' or 'leaky_relu', got {activation!r}")
            c_in = channels
        self.body = nn.Sequential(*body)
        self.logit = nn.Conv2d(c_in, 1, 1)
        nn.init.zeros_(self.logit.weight)
        nn.init.zeros_(self.logit.bias)

    @property
    def offset(self) -> tuple[float, float]:
        """View-pixel position of cell (0, 0)'s receptive-field centre."""
        r = 0.0 if self.padding == "same" else self.layers * (self.kernel_size - 1) / 2
        return (r, r)

    @property
    def stride(self) -> tuple[int, int]:
        """View pixels between neighbouring cells (cell (i, j) is centred on view pixel
        ``(stride·i, stride·j)`` with ``"same"`` padding)."""
        return (self.cell, self.cell)

    @property
    def radius(self) -> int:
        """The receptive field's half-width in view pixels."""
        r, step = 0, 1
        for module in self.body:
            if isinstance(module, nn.Conv2d):
                r += (self.kernel_size // 2) * step
                step *= module.stride[0]
        return r

    def map_shape(self, view_shape: tuple[int, int]) -> tuple[int, int]:
        """Attention-map shape for a view shape (raises if the view is too small)."""
        shrink = 0 if self.padding == "same" else self.layers * (self.kernel_size - 1)
        h, w = view_shape[0] - shrink, view_shape[1] - shrink
        for _ in range(STRIDES.index(self.cell)):  # a stride-2 "same" conv: ceil(n / 2)
            h, w = (h + 1) // 2, (w + 1) // 2
        if h < 1 or w < 1:
            raise ValueError(
                f"view {tuple(view_shape)} is smaller than the attention network's receptive "
                f"field ({shrink + 1} pixels); use a larger scale or padding='same'"
            )
        return (h, w)

    def forward(self, view: Tensor) -> Tensor:
        self.map_shape(tuple(view.shape[-2:]))
        if view.device.type == "cpu" and not torch.is_grad_enabled():
            # oneDNN's convolutions with few channels run about 2x faster channels-last
            # (inference only: training keeps its exact, reproducible numerics)
            view = dense_channels_last(view)
        return self.logit(self.body(view))[:, 0]

    def _interior(self, crop: Tensor) -> Tensor:
        """:meth:`forward` for a crop whose margin covers the receptive field on every
        side: the border padding cannot reach the cells kept, so the convolutions pad
        with zeros inside oneDNN instead of copying the crop to replicate its border."""
        x = dense_channels_last(crop)
        for module in self.body:
            if isinstance(module, nn.Conv2d):
                x = F.conv2d(
                    x, module.weight, module.bias, module.stride, module.kernel_size[0] // 2
                )
            else:
                x = module(x)
        return self.logit(x)[:, 0]

    @torch.no_grad()
    def forward_blocks(self, view: Tensor, needed: Tensor, block: int = BLOCK) -> Tensor:
        """Logits of one view (3, h, w) only where ``needed`` (map-shaped bool) says so.

        The map is cut into ``block``² blocks; a block without any needed cell is not
        computed (its logits are 0), the others from the view crop plus the receptive
        field's margin, so every computed logit equals the whole-view one.  Blocks of
        :data:`BLOCK` cells keep a block's layers in the CPU's caches.  With the
        tissue mask as ``needed`` this skips a slide's glass: at inference on a
        gigapixel slide the stage-1 convolutions cost what its tissue costs.

        Blocks pad with zeros inside the convolution (no copy); the cells whose
        receptive field reaches the view's edge, where :meth:`forward` replicates the
        border at every layer, are then computed again from thin strips along the
        edges.  ``view`` may be 8-bit (0–255): each crop becomes ``float / 255`` only
        when it is computed, so the float copy of a whole gigapixel view (four times
        the 8-bit one) is never held.
        """
        h_v, w_v = int(view.shape[-2]), int(view.shape[-1])
        h_a, w_a = self.map_shape((h_v, w_v))
        if tuple(needed.shape) != (h_a, w_a):
            raise ValueError(f"needed {tuple(needed.shape)} is not the map's shape {(h_a, w_a)}")
        out = torch.zeros((h_a, w_a), device=view.device)
        if self.padding != "same":  # map (i, j) sees view [i, i+2r] x [j, j+2r]: no padding
            r = self.radius
            for y0, y1, x0, x1 in _busy_blocks(needed, block):
                crop = as_float_view(view[None, :, y0 : y1 + 2 * r, x0 : x1 + 2 * r])
                out[y0:y1, x0:x1] = self.forward(crop)[0]
            return out
        s = self.cell
        m = -(-self.radius // s)  # the margin in whole cells: crops stay cell-aligned
        for y0, y1, x0, x1 in _busy_blocks(needed, block):
            cy0, cy1, cx0, cx1 = s * (y0 - m), s * (y1 + m), s * (x0 - m), s * (x1 + m)
            crop = view[None, :, max(0, cy0) : min(h_v, cy1), max(0, cx0) : min(w_v, cx1)]
            pad = (max(0, -cx0), max(0, cx1 - w_v), max(0, -cy0), max(0, cy1 - h_v))
            crop = as_float_view(dense_channels_last(crop))
            crop = F.pad(crop, pad) if any(pad) else crop
            out[y0:y1, x0:x1] = self._interior(crop)[0, m : m + y1 - y0, m : m + x1 - x0]
        # the edge cells, exactly as forward() pads: strips of e cells along each edge,
        # each read with an inner margin of m cells
        e = m + 1
        strips = (
            ((0, min(h_a, e)), (0, w_a)),
            ((max(0, h_a - e), h_a), (0, w_a)),
            ((0, h_a), (0, min(w_a, e))),
            ((0, h_a), (max(0, w_a - e), w_a)),
        )
        for (y0, y1), (x0, x1) in strips:
            if not bool(needed[y0:y1, x0:x1].any()):
                continue
            vy0, vx0 = s * max(0, y0 - m), s * max(0, x0 - m)
            vy1, vx1 = min(h_v, s * (y1 + m)), min(w_v, s * (x1 + m))
            crop = as_float_view(view[None, :, vy0:vy1, vx0:vx1])
            logits = self.forward(crop)[0]
            keep = needed[y0:y1, x0:x1]
            part = logits[y0 - vy0 // s : y1 - vy0 // s, x0 - vx0 // s : x1 - vx0 // s]
            out[y0:y1, x0:x1] = torch.where(keep, part, out[y0:y1, x0:x1])
        return out


def as_float_view(view: Tensor) -> Tensor:
    """A view (or crop) in [0, 1]: 8-bit ones (``read_view(exact_bytes=True)``) divided by
    255, as the slide reader does."""
    return view if view.is_floating_point() else view.float().div_(255.0)


def dense_channels_last(x: Tensor) -> Tensor:
    """``x`` (B, C, h, w) channels-last in a buffer of its own, without gaps.

    ``contiguous(memory_format=channels_last)`` keeps a tensor it already calls
    channels-last, such as one crop of an 8-bit view read as (h, w, 3) and permuted:
    with one image its batch stride is ignored by that test, but not by oneDNN, whose
    convolutions then took 3× as long (8.3 against 2.8 ms for a 256² block of the
    stage-1 view; docs/benchmarks.md).
    """
    _, c, h, w = x.shape
    if x.stride() == (c * h * w, 1, w * c, c):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


def _busy_blocks(needed: Tensor, block: int):
    """``(y0, y1, x0, x1)`` of each ``block``² block of the map holding a needed cell."""
    h_a, w_a = (int(v) for v in needed.shape)
    nby, nbx = -(-h_a // block), -(-w_a // block)
    padded = needed.new_zeros((nby * block, nbx * block))
    padded[:h_a, :w_a] = needed
    busy = padded.view(nby, block, nbx, block).any(dim=3).any(dim=1).tolist()
    for by in range(nby):
        for bx in range(nbx):
            if busy[by][bx]:
                y0, x0 = by * block, bx * block
                yield y0, min(h_a, y0 + block), x0, min(w_a, x0 + block)


class UniformAttention(nn.Module):
    """Constant logits: the uniform attention of the U-N baseline (ATS §4.1.1). No parameters."""

    offset = (0.0, 0.0)
    stride = (1, 1)

    def map_shape(self, view_shape: tuple[int, int]) -> tuple[int, int]:
        return (int(view_shape[0]), int(view_shape[1]))

    def forward(self, view: Tensor) -> Tensor:
        b, _, h, w = view.shape
        return view.new_zeros((b, h, w))


class _WeightStandardised:
    """Scaled weight standardisation (Brock et al. 2021), shared by
    :class:`StandardisedConv2d` and :class:`StandardisedLinear`: each output unit's
    incoming weights used at zero mean and variance ``gain²/fan_in`` (see
    :class:`FeatureNetwork`)."""

    gain: float
    weight: nn.Parameter

    def reset_parameters(self) -> None:
        super().reset_parameters()  # type: ignore[misc]
        # the scale is divided out: at unit size Adam's steps stay small against it
        nn.init.normal_(self.weight)

    def standardised_weight(self) -> Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=list(range(1, w.dim())), keepdim=True, correction=0)
        return (w - mean) * torch.rsqrt(var * w[0].numel() + 1e-4) * self.gain


class StandardisedConv2d(_WeightStandardised, nn.Conv2d):
    """``nn.Conv2d`` with scaled weight standardisation; ``gain`` √2 (He) where a ReLU
    follows.  Same parameters and state-dict keys as ``nn.Conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = 2**0.5):
        self.gain = gain
        super().__init__(in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardised_weight(), self.bias)


class StandardisedLinear(_WeightStandardised, nn.Linear):
    """``nn.Linear`` with scaled weight standardisation, as :class:`StandardisedConv2d`."""

    def __init__(self, in_features: int, out_features: int, gain: float = 2**0.5):
        self.gain = gain
        super().__init__(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.standardised_weight(), self.bias)


class FeatureNetwork(nn.Module):
    """``f``: a full-resolution sub-tile (B, 3, h, w) → L2-normalised feature (B, D).

    LeNet as in Ilse et al. 2018 (ref. [18] of 000): conv(36, 4×4)–ReLU–max-pool 2,
    conv(48, 3×3)–ReLU–max-pool 2, fully connected ``hidden`` with ReLU, fully
    connected ``out_features``, then ``z / ‖z‖₂`` (ATS §3.4).

    ``standardise=True`` gives every layer scaled weight standardisation (Brock et al.
    2021): each unit's weights at zero mean and variance ``2/fan_in`` (``1/fan_in`` in
    the last layer).  Trained from image labels alone with Adam, the plain LeNet has a
    cold start: the sub-tiles' features start nearly parallel (mean cosine 0.99: the
    last layer's bias outweighs what depends on the pixels), and while the label is
    still noise to ``f`` Adam moves all the weights of a hidden unit by about the same
    step; its inputs (after ReLU and max-pooling) are all positive, so the unit shifts
    on every sub-tile at once, and a third of them die within an epoch.  Training then
    waits on that plateau, on some runs for good.  A standardised unit does not see a
    shift common to its weights, and its features start apart (mean cosine about 0.5;
    docs/benchmarks.md, "digits end to end", twelfth session).
    """

    def __init__(
        self,
        subtile_size: tuple[int, int],
        in_channels: int = 3,
        channels: tuple[int, int] = (36, 48),
        kernel_sizes: tuple[int, int] = (4, 3),
        hidden: int = 512,
        out_features: int = 512,
        dropout: float = 0.0,
        standardise: bool = False,
    ):
        super().__init__()
        self.subtile_size = (int(subtile_size[0]), int(subtile_size[1]))
        self.out_features = out_features
        conv = StandardisedConv2d if standardise else nn.Conv2d
        linear = StandardisedLinear if standardise else nn.Linear
        self.conv = nn.Sequential(
            conv(in_channels, channels[0], kernel_sizes[0]),
            nn.ReLU(),
            nn.MaxPool2d(2, 2, ceil_mode=True),
            conv(channels[0], channels[1], kernel_sizes[1]),
            nn.ReLU(),
            nn.MaxPool2d(2, 2, ceil_mode=True),
        )
        smallest = kernel_sizes[0] + 2 * kernel_sizes[1] - 2
        if min(self.subtile_size) < smallest:
            raise ValueError(
                f"sub-tiles of {self.subtile_size} are too small for the LeNet feature network "
                f"(at least {smallest} pixels a side); pass a feature network of your own"
            )
        # conv (valid) then max-pool 2 with ceil, twice: by arithmetic, not a dummy
        # forward (on the meta device a forward imports torch's decompositions, about 2 s
        # of every checkpoint load)
        side = list(self.subtile_size)
        for k in kernel_sizes:
            side = [-(-(v - k + 1) // 2) for v in side]
        flat = channels[1] * side[0] * side[1]
        self.fc = nn.Sequential(
            nn.Flatten(),
            linear(flat, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            StandardisedLinear(hidden, out_features, gain=1.0)
            if standardise
            else nn.Linear(hidden, out_features),
        )

    def forward(self, subtiles: Tensor) -> Tensor:
        if tuple(subtiles.shape[-2:]) != self.subtile_size:
            got = tuple(subtiles.shape[-2:])
            raise ValueError(f"feature network built for {self.subtile_size} sub-tiles, got {got}")
        z = self.fc(self.conv(subtiles))
        return F.normalize(z.float(), dim=-1, eps=1e-12)


class Classifier(nn.Module):
    """``g``: aggregated feature (B, D) → logits (B, 1) for two classes, (B, C) otherwise."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(in_features, n_logits(num_classes))

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z)
