"""Networks of the MNIST haystack benchmarks, shared by Megapixel and Needle MNIST.

- :class:`PooledFeatureNetwork`: ``f`` for a digit anywhere in a patch;
- :class:`ScaledClassifier`: ``g`` on unit-norm features;
- :class:`StridedAttention`: an attention network with one cell per 2×2 view pixels
  that sees a whole digit;
- :class:`HalfResolutionAttention`: an attention network computed at half the view's
  resolution from its first layer on, for a stage 1 that only has to pick tiles.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HalfResolutionAttention",
    "PooledFeatureNetwork",
    "ScaledClassifier",
    "StridedAttention",
]


class PooledFeatureNetwork(nn.Module):
    """``f`` for digits anywhere in a patch: conv–ReLU–max-pool ×2, conv–ReLU, global max pool.

    Like the ATS reference's Megapixel MNIST network (convolutions, then global max
    pooling, then L2 normalisation), with pooling between the convolutions to keep
    it cheap on one CPU core: a digit is recognised wherever it lies in the patch.
    """

    def __init__(self, out_features: int = 64, channels: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            nn.Conv2d(3, c1, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3),
            nn.ReLU(),
        )
        self.out = nn.Linear(c3, out_features)

    def forward(self, patches: Tensor) -> Tensor:
        h = self.body(patches).amax(dim=(-2, -1))
        return F.normalize(self.out(h), dim=-1, eps=1e-12)


class ScaledClassifier(nn.Module):
    """``g``: one fully connected layer on the aggregated feature times a fixed ``scale``.

    The features are unit vectors (ATS §3.4) and their attention-weighted mean is
    shorter still, so a plain linear ``g`` needs thousands of Adam steps just to grow
    weights large enough for confident logits; a fixed scale (a cosine classifier's
    temperature) is the same layer, reparametrised to start there.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.scale = scale
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z * self.scale)


class StridedAttention(nn.Module):
    """An attention network that can see a whole digit: one cell per 2×2 view pixels.

    conv 3×3 (``c1``)–leaky ReLU–max-pool 2–``depth`` × (conv 3×3 (``c2``)–leaky
    ReLU), then a 1×1 logit.  Its receptive field is 4 + 4·``depth`` view pixels: 12
    at the default depth 2 (a 28-pixel digit is 14 pixels at ``s = 0.5``), where
    000's three 3×3 layers see 7; 16 at depth 3, a whole digit.  The layers after the
    pooling cost a quarter as much per channel.  ``offset``/``stride`` place each cell
    on the centre of its 2×2 block.
    """

    offset = (0.5, 0.5)
    stride = (2, 2)

    def __init__(self, c1: int = 8, c2: int = 16, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, c1, 3, padding=1), nn.LeakyReLU(0.2)]
        layers.append(nn.MaxPool2d(2))
        for k in range(depth):
            layers += [nn.Conv2d(c1 if k == 0 else c2, c2, 3, padding=1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.logit = nn.Conv2d(c2, 1, 1)

    def map_shape(self, view_shape: tuple[int, int]) -> tuple[int, int]:
        if min(view_shape) < 2:
            raise ValueError(f"view {tuple(view_shape)} is too small for a stride-2 map")
        return (view_shape[0] // 2, view_shape[1] // 2)

    def forward(self, view: Tensor) -> Tensor:
        return self.logit(self.body(view))[:, 0]


class HalfResolutionAttention(nn.Module):
    """Attention at one cell per 2×2 view pixels, computed at that resolution throughout.

    conv 3×3 stride 2 (``c1``)–leaky ReLU–conv 3×3 (``c2``)–leaky ReLU–conv 3×3 (``c2``)
    –leaky ReLU, then a 1×1 logit that starts at zero (uniform attention, as
    :class:`~napari_zoomin.models.networks.AttentionNetwork`).  Zoom-In's stage 1 picks
    tiles (100² level-0 pixels, 12 view pixels at ``s1`` = 0.12) rather than patch
    centres, so its map can be coarser than ATS's: every layer runs on a quarter of
    the view's pixels, which is where the attention network's memory goes, while the
    first layer still reads every view pixel.  Receptive field: 11 view pixels.
    Cell ``(i, j)`` is centred on view pixel ``(2i, 2j)``.
    """

    offset = (0.0, 0.0)
    stride = (2, 2)

    def __init__(self, c1: int = 8, c2: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, c1, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.logit = nn.Conv2d(c2, 1, 1)
        nn.init.zeros_(self.logit.weight)
        nn.init.zeros_(self.logit.bias)

    def map_shape(self, view_shape: tuple[int, int]) -> tuple[int, int]:
        return ((view_shape[0] + 1) // 2, (view_shape[1] + 1) // 2)

    def forward(self, view: Tensor) -> Tensor:
        return self.logit(self.body(view))[:, 0]
