"""Attention-sampling models: Zoom-In (two stages), ATS and U-N (one stage), REINFORCE-ATS.

A torch-only area (no napari, Qt or slide imports).  Models read pixels through the
:class:`~.source.ImageSource` protocol, so the same code runs on in-memory tensors
(:class:`~.source.TensorSource`) and on lazy slides.

- :mod:`.source` — the protocol, :class:`TensorSource`, read counters;
- :mod:`.coordinates` — :class:`CellGrid`, attention cells ↔ level-0 pixels;
- :mod:`.networks` — ``a``/``b``, ``f``, ``g``; :mod:`.distributions` — masked softmax;
- :mod:`.zoomin`, :mod:`.ats`, :mod:`.reinforce`, :mod:`.baselines` — the models;
- :mod:`.magnet` — MagNets (002), with :mod:`.sparsemax` and :mod:`.lms`;
- :mod:`.losses`, :mod:`.pretrain` — objectives and tile pre-training;
- :mod:`.outputs` — what training and inference return; :mod:`.device` — CUDA/CPU/AMP.
"""

from __future__ import annotations

from .ats import ATS, ATSConfig, Uniform
from .base import AttentionSamplingModel, SamplingConfig
from .baselines import LowResolutionCNN
from .coordinates import CellGrid
from .device import autocast, grad_scaler, select_device
from .magnet import MagNet, MagNetConfig
from .outputs import LossTerms, Prediction, SubtileSet, TileSet
from .pretrain import pretrain_tile_classifiers
from .reinforce import ReinforceATS, ReinforceConfig
from .source import ImageSource, TensorSource
from .zoomin import ZoomIn, ZoomInConfig

__all__ = [
    "ATS",
    "ATSConfig",
    "AttentionSamplingModel",
    "CellGrid",
    "ImageSource",
    "LossTerms",
    "LowResolutionCNN",
    "MagNet",
    "MagNetConfig",
    "Prediction",
    "ReinforceATS",
    "ReinforceConfig",
    "SamplingConfig",
    "SubtileSet",
    "TensorSource",
    "TileSet",
    "Uniform",
    "ZoomIn",
    "ZoomInConfig",
    "autocast",
    "grad_scaler",
    "pretrain_tile_classifiers",
    "select_device",
]
