"""The conventional baseline: a CNN on the whole image, downsampled to fit.

The papers compare attention sampling with CNNs on downsampled images (ATS §4,
000 Table 1).  On tiny-object problems the downsampled view washes out the object,
so this baseline shows what the view alone can tell.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import apply_grouped
from .device import autocast
from .losses import classification_loss
from .networks import class_probabilities, n_logits
from .outputs import LossTerms
from .source import ImageSource, read_view

__all__ = ["LowResolutionCNN"]


class LowResolutionCNN(nn.Module):
    """CNN on ``V(x, view_scale)``: 3×3 conv–ReLU blocks, global mean+max pooling, linear.

    Same ``loss`` / ``forward`` interface as the attention-sampling models.
    """

    def __init__(
        self,
        num_classes: int = 2,
        view_scale: float = 0.125,
        channels: Sequence[int] = (16, 32, 64),
    ):
        super().__init__()
        self.view_scale = view_scale
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c_in, n_logits(num_classes))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _logits(self, view: Tensor) -> Tensor:
        h = self.body(view)
        pooled = torch.cat((h.mean(dim=(-2, -1)), h.amax(dim=(-2, -1))), dim=-1)
        return self.head(pooled)

    def forward(self, sources: Sequence[ImageSource], generator=None) -> Tensor:
        views = [read_view(s, self.view_scale).to(self.device) for s in sources]
        with autocast(self.device):
            return torch.stack(apply_grouped(self._logits, views))

    def loss(self, sources, labels, epoch: int = 0, generator=None) -> LossTerms:
        labels = torch.as_tensor(labels, dtype=torch.long)
        logits = self(sources)
        ce = classification_loss(logits, labels)
        zero = torch.zeros((), device=self.device)
        return LossTerms(ce, ce, zero, zero, zero, zero, logits.detach(), labels)

    @torch.no_grad()
    def predict_proba(self, sources: Sequence[ImageSource]) -> Tensor:
        """(B, C) class probabilities."""
        was_training = self.training
        self.eval()
        try:
            return class_probabilities(self(sources)).cpu()
        finally:
            self.train(was_training)
