"""Pre-training ``a``, ``b`` and ``f`` as tile classifiers from ROI masks (000 §2.5).

When (some) images carry pixel-level annotations, each network is first trained to
tell whether a patch of its own input kind contains any ROI pixel:

- ``a``: regions of ``16/s1`` level-0 pixels read at ``s1`` (16×16 view pixels);
- ``b`` (Zoom-In): tiles read at ``s2``;
- ``f``: (sub-)tiles at full resolution.

An attention network's logit map is pooled to one logit: averaged (000: "global
average pooling layer") or, with ``pooling="max"``, its maximum, for ROIs that fill a
small part of a patch (a few tumour cells, one digit among many: on Needle MNIST the
average learned nothing and the maximum did, see ``docs/benchmarks.md``); ``f`` gets a
temporary linear head.  The heads are discarded
afterwards: the model keeps exactly its own parameters.  Half the patches are centred
on ROI pixels (jittered), a quarter on annotated non-ROI regions when there are any
(hard negatives), the rest anywhere in the tissue, so that rare ROIs and their
look-alikes are seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AttentionSamplingModel
from .coordinates import CellGrid, place_regions
from .source import (
    ImageSource,
    full_region,
    read_attention_target,
    read_hard_negatives,
    read_roi,
    tissue_mask,
)

__all__ = ["POOLINGS", "PRETRAINED_NETWORKS", "pretrain_tile_classifiers"]

PRETRAINED_NETWORKS = ("stage1_attention", "stage2_attention", "feature")
POOLINGS = ("mean", "max")  # how an attention map becomes a patch logit


def _on_mask(view: Tensor, n: int, shape, scale: float, generator) -> Tensor:
    """``n`` level-0 centres of random non-zero pixels of a ``scale`` view, jittered."""
    view = view.cpu()
    grid = CellGrid(torch.zeros(1, 2), shape, tuple(view.shape), tuple(view.shape), bounds=shape)
    candidates = torch.nonzero(view.reshape(-1) > 0)[:, 0]
    pick = candidates[torch.randint(len(candidates), (n,), generator=generator)]
    jitter = torch.randint(-1, 2, (n, 2), generator=generator)
    step = torch.tensor([max(1, round(1 / scale)) // 2] * 2)
    return grid.centres(pick) + jitter * step


def _centres(source: ImageSource, n: int, scale: float, generator: torch.Generator):
    """``n`` level-0 centres located on the ``scale`` view; ``None`` without annotations.

    Half lie on ROI pixels (when the image has any), a quarter on annotated non-ROI
    regions (hard negatives, when it has any), the rest anywhere in the tissue (the
    whole image without a tissue mask): random points of a slide are mostly glass,
    which teaches nothing.
    """
    h, w = source.shape
    whole = full_region(source)
    roi = read_roi(source, whole, scale)
    if roi is None:
        return None
    hard = read_hard_negatives(source, whole, scale)
    tissue = tissue_mask(source, scale)
    n_pos = n // 2 if bool((roi > 0).any()) else 0
    n_hard = n // 4 if hard is not None and bool((hard > 0).any()) else 0
    n_rest = n - n_pos - n_hard
    if tissue is not None and bool(tissue.any()):
        centres = [_on_mask(tissue, n_rest, (h, w), scale, generator)]
    else:
        rand = torch.rand(n_rest, 2, generator=generator, dtype=torch.float64)
        centres = [(rand * torch.tensor([h - 1, w - 1], dtype=torch.float64)).round().long()]
    if n_pos:
        centres.append(_on_mask(roi[0], n_pos, (h, w), scale, generator))
    if n_hard:
        centres.append(_on_mask(hard[0], n_hard, (h, w), scale, generator))
    return torch.cat(centres)


def _patches(
    sources, size, scale: float, per_image: int, locate_scale: float, generator, label=read_roi
):
    """Pixels and any-ROI labels of ``per_image`` regions of ``size`` per annotated source.

    ROI pixels are located on the view at ``locate_scale`` (the stage-1 scale), so a
    slide's mask is never read whole at full resolution.  ``label``: what makes a patch
    positive: the ROI (``f``: tell a tumour from its look-alikes) or the attention
    target (``a``, ``b``: look at both, which their views cannot tell apart).
    """
    pixels, labels = [], []
    for src in sources:
        centres = _centres(src, per_image, locate_scale, generator)
        if centres is None:
            continue
        regions = place_regions(centres, size, src.shape)  # the edge rule
        pixels.append(src.read(regions, scale))
        roi = label(src, regions, scale)
        labels.append((roi.reshape(len(regions), -1) > 0).any(dim=1).float())
    if not pixels:
        raise ValueError("pre-training needs sources with ROI masks (read_roi)")
    return torch.cat(pixels), torch.cat(labels)


def _fit(
    net: nn.Module,
    head,
    params,
    x: Tensor,
    y: Tensor,
    epochs,
    batch_size,
    lr,
    generator,
    device,
    on_epoch: Callable[[int, float], None] = lambda epoch, loss: None,
):
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            logit = head(net(x[idx].to(device)))
            loss = F.binary_cross_entropy_with_logits(logit, y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(x))
        on_epoch(epoch + 1, history[-1])
    return history


def pretrain_tile_classifiers(
    model: AttentionSamplingModel,
    sources: Sequence[ImageSource],
    epochs: int = 5,
    patches_per_image: int = 32,
    batch_size: int = 64,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    pooling: Literal["mean", "max"] = "mean",
    networks: Sequence[str] = PRETRAINED_NETWORKS,
    on_epoch: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Pre-train the model's attention network(s) and feature network from ROI masks.

    Args:
        model: a Zoom-In, ATS or REINFORCE model (a Uniform model's attention has no
            parameters and is skipped).
        sources: images; only those whose ``read_roi`` returns a mask are used.
        epochs, patches_per_image, batch_size, lr: training of each tile classifier.
        generator: seeds patch placement and batch order.
        pooling: how an attention network's logit map becomes the patch logit:
            ``"mean"`` (000) or ``"max"`` (small ROIs).
        networks: which of :data:`PRETRAINED_NETWORKS` to pre-train (in that order).
        on_epoch: called after every epoch of every network with ``(network, step,
            steps, loss)``: ``step`` counts the epochs done over all the networks
            (1-based), ``steps`` is ``epochs`` × the networks pre-trained, ``loss``
            the epoch's mean binary cross-entropy.  The networks are trained one
            after the other, as before (the same random draws in the same order).

    Returns:
        The mean binary cross-entropy per epoch of each pre-trained network
        (``"stage1_attention"``, ``"stage2_attention"``, ``"feature"``).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")
    unknown = sorted(set(networks) - set(PRETRAINED_NETWORKS))
    if unknown:
        raise ValueError(
            f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(PRETRAINED_NETWORKS)}"
        )
    generator = generator or torch.Generator().manual_seed(0)
    device = model.device
    c = model.config
    history: dict[str, list[float]] = {}

    def pooled(logit_map: Tensor) -> Tensor:  # global average or max pooling of the map
        logit_map = logit_map.float()
        return logit_map.amax(dim=(-2, -1)) if pooling == "max" else logit_map.mean(dim=(-2, -1))

    nets = []
    if "stage1_attention" in networks:
        size = (math.ceil(16 / c.view_scale),) * 2
        nets.append(("stage1_attention", model.attention, c.view_scale, size))
    if "stage2_attention" in networks and hasattr(model, "stage2_attention"):
        nets.append(
            ("stage2_attention", model.stage2_attention, c.stage2_scale, tuple(c.tile_size))
        )
    nets = [n for n in nets if list(n[1].parameters())]  # a Uniform attention has none
    steps = epochs * (len(nets) + ("feature" in networks))
    done = 0

    def reporter(name: str) -> Callable[[int, float], None]:
        def report(_epoch: int, loss: float) -> None:
            nonlocal done
            done += 1
            if on_epoch is not None:
                on_epoch(name, done, steps, loss)

        return report

    for name, net, scale, size in nets:
        params = list(net.parameters())
        x, y = _patches(
            sources, size, scale, patches_per_image, c.view_scale, generator, read_attention_target
        )
        history[name] = _fit(
            net, pooled, params, x, y, epochs, batch_size, lr, generator, device, reporter(name)
        )
    if "feature" not in networks:
        return history

    head = nn.Linear(c.feature_dim, 1).to(device)
    x, y = _patches(sources, model.subtile_size, 1.0, patches_per_image, c.view_scale, generator)
    params = list(model.feature.parameters()) + list(head.parameters())
    history["feature"] = _fit(
        model.feature,
        lambda z: head(z)[:, 0],
        params,
        x,
        y,
        epochs,
        batch_size,
        lr,
        generator,
        device,
        reporter("feature"),
    )
    return history
