"""How to train: :class:`TrainConfig`, and the model config it gives (:func:`model_settings`).

One name per setting: a field of :class:`TrainConfig` that configures the model has
the name of the model config's field (:class:`~napari_zoomin.models.ZoomInConfig`,
:class:`~napari_zoomin.models.ATSConfig`, ...), and :func:`model_settings` passes
every such field that the kind's config has, unchanged, except that the region
sizes (``tile_size``, ``subtile_size``) are one side here and a
square ``(side, side)`` there.  Everything else of the kind's config goes through
``model_options``.  The command line keeps its short flags (``--s1``, ``--subtile``,
``--n``, ...); ``zoomin train --help`` and docs/training.md map them to these names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..engine.checkpoints import MODEL_KINDS, complete_config
from ..engine.dataset import DEFAULT_ROI_LABELS
from ..errors import TrainingError
from ..fields import (
    MAX_DRAWS,
    MAX_EPOCHS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SIDE,
    MAX_WEIGHT,
    MAX_WIDTH,
    MAX_WORKERS,
    MIN_SCALE,
    field_problems,
)
from ..models.pretrain import POOLINGS

__all__ = [
    "KIND_DEFAULTS",
    "MODEL_SETTINGS",
    "POOLINGS",
    "TrainConfig",
    "model_config_dict",
    "model_settings",
    "saved_config",
]

#: the :class:`TrainConfig` fields that are model config fields of the same name (passed
#: to every kind whose config has the field)
MODEL_SETTINGS = (
    "view_scale",
    "stage2_scale",
    "tile_size",
    "subtile_size",
    "n_samples",
    "feature_dim",
    "feature_hidden",
    "feature_channels",
    "entropy_weight",
    "contrastive",
    "contrastive_warmup_epochs",
    "pixel_weight",
)
#: settings a model kind's paper trains with, where the user gave none (the
#: ``zoomin train --kind`` flags and the Train form apply them the same way): MagNets,
#: 002 §4.3: Adam 3e-5, batch 16, cosine annealing; no ROI pre-training (its networks
#: have no attention map to pre-train)
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "magnet": {"lr": 3e-5, "batch_size": 16, "lr_schedule": "cosine", "pretrain_epochs": 0},
}
#: the devices a setting may name (whether this machine has them is checked when training)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")
#: sides here, ``(side, side)`` in the model config
_SQUARE = ("tile_size", "subtile_size")


@dataclass
class TrainConfig:
    """How to train (defaults: 000's Camelyon16 set-up, A.5 and §4, for whole slides).

    Optimisation:
        kind: model architecture (``"zoomin"``, ``"ats"``, ``"uniform"``, ``"reinforce-ats"``).
        epochs: maximum epochs (000 Camelyon16: 200).
        batch_size: slides per step (000: 5).
        lr: Adam learning rate (000: 1e-4 for NeedleCamelyon and Camelyon16, 1e-3 for the
            small colon-cancer images); β = (0.9, 0.999) as in 000.
        attention_lr: learning rate of the attention network(s) ``a`` (and ``b``);
            ``None`` = ``lr``.  Attention logits must move by about ``log(cells)`` (≈ 10
            on a slide) to concentrate, which takes many steps at a rate that suits
            ``f`` and ``g``.
        feature_lr: learning rate of the feature network ``f``; ``None`` = ``lr``, 0
            keeps ``f`` as it starts (pre-trained from ROIs, or ``init_from``).  On
            the sample slides an ``f`` pre-trained to tell a tumour from its look-alike
            lost that within an epoch of image-label training at ``lr`` (the label is
            noise to ``f`` until the attention and ``g`` agree with it), and kept it
            at 0 while ``g`` and the attention learned (docs/training.md).
        weight_decay: Adam L2 penalty (000: none).
        lr_schedule: ``"constant"``, or ``"cosine"`` (cosine annealing, 002 §4.3, the
            default of ``zoomin train --kind magnet``): epoch ``e`` (0-based) runs at
            ``(1 + cos(π·e/epochs))/2`` times ``lr`` (and ``attention_lr``), from the
            full rate down towards 0.  A function of the epoch counter, which the
            training checkpoint holds, so a resumed run follows the schedule exactly;
            raising ``epochs`` when resuming stretches the rest of it.
        seed: initial weights, batch order, sampling (see :mod:`.trainer`).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:1"``, ...
        early_stopping_patience: stop after this many epochs without a better
            validation result (0 = never; 000 trains a fixed number of epochs).
        val_draws: sampled estimates per validation slide (mean probability).
        balanced_batches: spread the classes evenly over the batches of an epoch (a
            stratified shuffle).  With one informative sub-tile among N, unbalanced
            batches let a label-prior term dominate the gradient early on.

    Model (the model config's fields of the same names; see
    :class:`~napari_zoomin.models.ZoomInConfig` and
    :class:`~napari_zoomin.models.ATSConfig`):
        view_scale: ``s1`` (000 Camelyon16: 0.0625 = 1/16).
        stage2_scale: ``s2``, relative to the full-resolution tile (000: 0.125; Zoom-In).
        tile_size: level-0 side of a stage-1 tile (000 does not give it for Camelyon16;
            256 > 1/s1 covers the slide and gives a 32×32 stage-2 view at s2 = 1/8;
            Zoom-In).
        subtile_size: level-0 side of a sub-tile, the feature network's input, for every
            kind (000: 50).
        n_samples: ``N`` (000 Camelyon16: 100; use 10-30 on a CPU).
        feature_dim, feature_hidden, feature_channels: the LeNet ``f`` (Ilse et al. sizes).
        entropy_weight: ``λ`` (000: 1e-5).
        contrastive, contrastive_warmup_epochs: in-sample contrastive loss after a
            warm-up (000: on, after 10 epochs; Zoom-In).
        pixel_weight: weight of the attention-map MSE on annotated slides (eq. 11).
        model_options: any other setting of the kind's config (``uniform_mix``,
            ``attention_norm``, ...), applied last.

    Losses the trainer adds:
        roi_attention_weight: weight of an extra stage-1 term on slides with ROI
            pixels: ``KL(M̃ ‖ α)``, the cross-entropy of ``α`` against the ROI mask at the
            view normalised to a distribution (:func:`~napari_zoomin.models.losses.mask_target`),
            minus the target's entropy.  0 (off) by default, as in 000.  Eq. (11)'s MSE
            has a gradient proportional to ``α`` itself, which vanishes on slide-sized
            attention maps (tens of thousands of tissue cells: ``α ≈ 2·10⁻⁵``); the
            cross-entropy's gradient on the logits is ``α − M̃``, so the attention finds
            small annotated regions in tens of steps (measured on the sample slides).

    Pixel-level annotations (000 §2.5):
        pretrain_epochs: epochs of tile-classifier pre-training of ``a``, ``b`` and ``f``
            when training slides carry ROI annotations (0 = off).
        pretrain_patches: patches per annotated slide and network for pre-training.
        pretrain_pooling: how a pre-trained attention map becomes one patch logit:
            ``"max"`` (default), for ROIs that fill a small part of a patch (a few
            tumour cells in a 16-cell view patch), or ``"mean"`` (000's global average
            pooling).  On the sample slides the averaged map put 0.1-0.4 % of ``α`` on
            the planted regions after pre-training, the maximum 97-100 %.
        roi_labels: annotation labels that are ROI (e.g. ``("Tumor",)``).
        lookalike_labels: annotation labels of *look-alikes*: regions that look like an
            ROI at low resolution but are not one (a benign mimic, the sample slides'
            ``"Distractor"``).  Attention is pulled towards ROIs and look-alikes alike
            (the low-resolution view cannot tell them apart: the model must read both
            at full resolution), and pre-training teaches ``f`` to tell them apart (ROI
            positive, look-alike negative).  Without look-alike labels, every annotation
            that is not ROI is a hard negative for ``f`` and nothing for attention.

    Starting point:
        init_from: start from the weights of this checkpoint (a path or ``"demo"``)
            instead of a random initialisation: fine-tuning a model on new slides, or
            a second training phase with other settings. Its kind and architecture
            must be those of these settings.
        init_encoder: start a MagNet's patch encoders (``kind="magnet"``) from a local
            safetensors file of encoder weights instead of from scratch (002 used
            pretrained encoders; none ship offline).  Names and shapes must be the
            encoder's (:mod:`~napari_zoomin.engine.encoder_weights`); checked, never
            unpickled.

    Data:
        num_workers: threads decoding the regions of one read.
        cache_views: decode each training and validation slide's stage-1 view (at
            ``view_scale``) from its pyramid once per run and keep it, 8-bit, in
            ``<checkpoint stem>.views/`` beside the checkpoint
            (:mod:`~napari_zoomin.engine.view_cache`); later epochs read it from there.
            Bit-identical views, so the same weights as without; off: every epoch
            decodes every view again.
    """

    kind: str = "zoomin"
    epochs: int = 200
    batch_size: int = 5
    lr: float = 1e-4
    attention_lr: float | None = None
    feature_lr: float | None = None
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    seed: int = 0
    device: str = "auto"
    early_stopping_patience: int = 20
    val_draws: int = 8
    balanced_batches: bool = True
    view_scale: float = 0.0625
    stage2_scale: float = 0.125
    tile_size: int = 256
    subtile_size: int = 50
    n_samples: int = 100
    feature_dim: int = 512
    feature_hidden: int = 512
    feature_channels: tuple[int, int] = (36, 48)
    entropy_weight: float = 1e-5
    contrastive: bool = True
    contrastive_warmup_epochs: int = 10
    pixel_weight: float = 1.0
    roi_attention_weight: float = 0.0
    model_options: dict[str, Any] = field(default_factory=dict)
    pretrain_epochs: int = 5
    pretrain_patches: int = 32
    pretrain_pooling: str = "max"
    roi_labels: tuple[str, ...] = DEFAULT_ROI_LABELS
    lookalike_labels: tuple[str, ...] = ()
    init_from: str | None = None
    init_encoder: str | None = None
    num_workers: int = 4
    cache_views: bool = True

    def __post_init__(self) -> None:
        """Types first (``{"epochs": "x"}`` is refused here), then :meth:`validate`: a
        TrainConfig that exists can train, whichever front end made it."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        problems = field_problems(type(self), values)
        if problems:
            raise TrainingError(None, "invalid training settings: " + "; ".join(problems) + ".")
        self.feature_channels = tuple(int(c) for c in self.feature_channels)  # type: ignore[assignment]
        self.roi_labels = tuple(self.roi_labels)
        self.lookalike_labels = tuple(self.lookalike_labels)
        self.model_options = dict(self.model_options)
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (stored in checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        """Raise :class:`TrainingError` for settings that cannot train."""
        problems = []
        if self.kind not in MODEL_KINDS:
            problems.append(f"unknown model kind {self.kind!r} (choose {', '.join(MODEL_KINDS)})")
        for name, high in (
            ("epochs", MAX_EPOCHS),
            ("batch_size", 4096),
            ("val_draws", MAX_DRAWS),
            ("n_samples", MAX_SAMPLES),
            ("tile_size", MAX_SIDE),
            ("subtile_size", MAX_SIDE),
            ("feature_dim", MAX_WIDTH),
            ("feature_hidden", MAX_WIDTH),
            ("num_workers", MAX_WORKERS),
            ("pretrain_patches", 100_000),
        ):
            if not 1 <= int(getattr(self, name)) <= high:
                problems.append(f"{name} must be in [1, {high}], got {getattr(self, name)}")
        for name in ("early_stopping_patience", "pretrain_epochs", "contrastive_warmup_epochs"):
            if not 0 <= getattr(self, name) <= MAX_EPOCHS:
                problems.append(f"{name} must be in [0, {MAX_EPOCHS}], got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if not _DEVICE.fullmatch(self.device):
            problems.append(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        for name in ("roi_labels", "lookalike_labels"):
            for label in getattr(self, name):
                if not label or not label.isprintable():
                    problems.append(f"{name} must be printable names, got {label!r}")
        both = sorted(set(self.roi_labels) & set(self.lookalike_labels))
        if both:
            problems.append(f"a label cannot be both ROI and look-alike: {', '.join(both)}")
        for name in ("lr", "attention_lr"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                problems.append(f"{name} must be a positive number, got {value}")
        if self.feature_lr is not None and not (
            self.feature_lr >= 0 and math.isfinite(self.feature_lr)
        ):
            problems.append(f"feature_lr must be 0 or a positive number, got {self.feature_lr}")
        for name in ("view_scale", "stage2_scale"):
            if not MIN_SCALE <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [1/4096, 1], got {getattr(self, name)}")
        for name in (
            "early_stopping_patience",
            "pretrain_epochs",
            "weight_decay",
            "roi_attention_weight",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("lr", "attention_lr", "feature_lr"):
            value = getattr(self, name)
            if value is not None and value > 10:
                problems.append(f"{name} must be at most 10, got {value}")
        for name in ("roi_attention_weight", "weight_decay"):
            if getattr(self, name) > MAX_WEIGHT:
                problems.append(f"{name} must be at most {MAX_WEIGHT:g}, got {getattr(self, name)}")
        if self.init_encoder is not None:
            if not self.init_encoder.strip():
                problems.append("init_encoder must be the path of a .safetensors file, got ''")
            if self.kind != "magnet":
                problems.append(
                    f"init_encoder starts a MagNet's encoders (kind 'magnet'), not a "
                    f"{self.kind} model's"
                )
            if self.init_from:
                problems.append("init_encoder and init_from together: init_from sets every weight")
        if self.pretrain_pooling not in POOLINGS:
            problems.append(
                f"pretrain_pooling must be 'mean' or 'max', got {self.pretrain_pooling!r}"
            )
        if not problems and self.kind in MODEL_KINDS:
            # the model's own rules (sizes, scales, a sub-tile within its tile, model_options)
            try:
                MODEL_KINDS[self.kind][1](**model_settings(self, 2))
            except (TypeError, ValueError) as exc:
                problems.append(str(exc))
        if problems:
            raise TrainingError(None, "invalid training settings: " + "; ".join(problems) + ".")


def saved_config(values: dict[str, Any]) -> dict[str, Any]:
    """A trainer config read from a training checkpoint, in today's names.

    For a while the one-stage kinds (ATS, Uniform, REINFORCE-ATS) had their sub-tile
    side in a setting of its own, ``patch_size`` (``subtile_size`` then kept its
    default): checkpoints of that time have both.  ``patch_size`` goes, its value
    becoming the one-stage kinds' ``subtile_size``, so such a run resumes with today's
    equivalent settings.  Runs from before ``lr_schedule`` had a constant rate.
    """
    values = dict(values)
    values.setdefault("lr_schedule", "constant")  # runs from before the setting: constant
    if "patch_size" in values:
        side = values.pop("patch_size")
        if values.get("kind", _DEFAULTS.kind) != "zoomin":
            values["subtile_size"] = side
    return values


#: model config settings ``train()`` gives a kind where ``model_options`` does not say,
#: instead of the config's own defaults (which stay what older checkpoints were saved
#: with): REINFORCE-ATS's measured recipe (docs/benchmarks.md, thirteenth session:
#: one estimate 5.0–7.0 % wrong on Megapixel MNIST over three seeds, 003's 41 %):
#: distinct draws, each estimate rewarded as a whole, the plain mean of its features,
#: top-k as the draws go
TRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "reinforce-ats": {
        "replace": False,
        "reward": "estimate",
        "aggregation": "mean",
        "topk_max_overlap": 1.0,
    },
}


def model_settings(
    config: TrainConfig, num_classes: int, like: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The model config dict of ``config.kind`` for ``num_classes`` classes.

    Every :data:`MODEL_SETTINGS` field the kind's config has, under its own name
    (sizes squared), then :func:`train_recipe`'s, then ``model_options``.  ``like``:
    the model config of the run this one continues (a resumed run, or ``init_from``),
    whose values of the recipe's settings it keeps: its weights were
    trained with them.
    """
    fields = {f.name for f in dataclasses.fields(MODEL_KINDS[config.kind][1])}
    settings: dict[str, Any] = {"num_classes": num_classes}
    for name in MODEL_SETTINGS:
        if name not in fields:
            continue
        value = getattr(config, name)
        if name in _SQUARE:
            value = (value, value)
        elif name == "feature_channels":
            value = tuple(value)
        settings[name] = value
    recipe = train_recipe(config)
    if like is not None:
        like = complete_config(config.kind, like)  # a setting it predates: the default
        recipe = {name: like[name] for name in recipe}
    settings.update(recipe)
    settings.update(config.model_options)
    return settings


def train_recipe(config: TrainConfig) -> dict[str, Any]:
    """The model settings ``train()`` chooses for a fresh model of ``config``, beyond
    its fields: :data:`TRAIN_RECIPES`, and ``feature_standardise`` where ``f`` trains
    on the slide labels (``feature_lr`` not 0), because the plain LeNet's hidden units
    die under Adam's first steps there (docs/training.md); none that ``model_options``
    sets.  The model configs' own defaults are what older checkpoints were saved with
    (a model saved before ``feature_standardise`` existed was plain)."""
    fields = {f.name for f in dataclasses.fields(MODEL_KINDS[config.kind][1])}
    recipe = dict(TRAIN_RECIPES.get(config.kind, {}))
    if "feature_standardise" in fields:
        recipe["feature_standardise"] = config.feature_lr != 0
    return {k: v for k, v in recipe.items() if k not in config.model_options}


def model_config_dict(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The full model config (defaults filled in) that ``settings`` give, in plain JSON form."""
    try:
        return plain(MODEL_KINDS[kind][1](**settings).to_dict())
    except TypeError as exc:
        raise TrainingError(None, f"invalid {kind} model settings: {exc}.") from None


def plain(value: Any) -> Any:
    """JSON round trip: tuples become lists, as in a checkpoint's description."""
    return json.loads(json.dumps(value))


_DEFAULTS = TrainConfig()  # after model_settings: a TrainConfig validates itself
