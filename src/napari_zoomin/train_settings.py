"""The training settings in the user's words: one table of labels, tooltips and ranges.

:data:`TRAIN_SETTINGS` describes the :class:`~napari_zoomin.training.TrainConfig` fields
that a user sets by hand: the label and tooltip the ``Train classifier`` form shows,
the range its spin boxes allow (the limits of :mod:`.fields`, the ones
``TrainConfig.validate`` and the ``zoomin train`` flags check; a test holds the three
together), and the ``zoomin train`` flag that sets it.  Standard library only, like
:mod:`.fields`, so the command line can read it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import MAX_EPOCHS, MAX_SAMPLES, MAX_SIDE, MAX_WEIGHT, MIN_SCALE

__all__ = ["MAX_BATCH", "MAX_LR", "TRAIN_SETTINGS", "Setting", "parse_names", "setting_name"]

#: the most slides per optimisation step (``TrainConfig.batch_size``)
MAX_BATCH = 4096
#: the largest learning rate (``TrainConfig.lr``, ``attention_lr``)
MAX_LR = 10.0


@dataclass(frozen=True)
class Setting:
    """One training setting as the user meets it.

    Attributes:
        label: the form's label.
        tooltip: what it does, in plain words (the form's tooltip).
        low, high: the values it may take (``None``: no such limit here; the dataclass
            decides); ``low_open``: ``low`` itself is refused (a learning rate > 0).
        entry: how the form asks for it: ``"spin"`` (a whole number), ``"number"``
            (typed text, e.g. ``1e-4``), ``"fraction"`` (typed text, e.g. ``1/16``),
            ``"names"`` (comma-separated), ``"check"``, ``"choice"``.
        flag: the ``zoomin train`` flag that sets it (``None``: only ``--set``).
    """

    label: str
    tooltip: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    entry: str = "spin"
    flag: str | None = None

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range (``None`` when it is in range)."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'above' if self.low_open else 'at least'} {self.low:g}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:g}"
        return None


#: ``TrainConfig`` field → how the user meets it (the ``Train classifier`` form, in its
#: order: the first four are always shown, the rest are under "Advanced settings")
TRAIN_SETTINGS: dict[str, Setting] = {
    "kind": Setting(
        "Model",
        "Zoom-In: looks at a shrunk slide, then zooms into the tiles it finds "
        "interesting (two stages; the default). ATS: one stage. Uniform: ATS that picks "
        "tiles at random (a baseline). REINFORCE-ATS: ATS trained by policy gradient "
        "(distinct tiles per estimate, their features averaged: the recipe that learned "
        "in our benchmarks; 'Other settings (JSON)' can restore the paper's). "
        "MagNet: no sampling; layers that each choose where and how much to zoom and read "
        "that part of the slide in finer detail, then read the last patches one by one "
        "(its paper's learning rate 3e-5, batch 16 and a learning rate falling to 0 over "
        "the epochs are set when you pick it, unless you changed them; the tile, scale "
        "and loss settings it does not use are greyed out).",
        entry="choice",
        flag="--kind",
    ),
    "epochs": Setting(
        "Epochs",
        "How many times training goes through all training slides. Typical: "
        "50-200 for real data; 1-5 to try the set-up.",
        1,
        MAX_EPOCHS,
        flag="--epochs",
    ),
    "n_samples": Setting(
        "Tiles per slide",
        "N: how many tiles the model reads at full resolution per slide and step. "
        "More reads more pixels and is slower: 100 in the paper on a GPU, 10-30 are "
        "practical on a CPU.",
        1,
        MAX_SAMPLES,
        flag="--n",
    ),
    "device": Setting(
        "Device",
        "Where training runs: auto (a GPU when there is one, else the CPU), cpu, or a named GPU.",
        entry="choice",
        flag="--device",
    ),
    "batch_size": Setting(
        "Batch (slides)",
        "Slides per optimisation step. Larger is steadier but needs more memory; the paper uses 5.",
        1,
        MAX_BATCH,
        flag="--batch-size",
    ),
    "lr": Setting(
        "Learning rate",
        "How big a step the optimiser (Adam) takes. Typical: 1e-4 (the paper) to "
        "1e-3 for small models; lower it if the loss becomes NaN.",
        0,
        MAX_LR,
        low_open=True,
        entry="number",
        flag="--lr",
    ),
    "view_scale": Setting(
        "Stage-1 scale (s1)",
        "Stage-1 view scale (s1): the model first looks at the whole slide "
        "shrunk by this factor (1/16 = 16x smaller) to choose where to look. Type 1/16 or "
        "0.0625.",
        MIN_SCALE,
        1,
        entry="fraction",
        flag="--s1",
    ),
    "stage2_scale": Setting(
        "Stage-2 scale (s2)",
        "Stage-2 view scale (s2; Zoom-In only): a chosen tile is looked at "
        "shrunk by this factor, relative to full resolution, to choose its sub-tiles "
        "(1/8 = 8x smaller).",
        MIN_SCALE,
        1,
        entry="fraction",
        flag="--s2",
    ),
    "tile_size": Setting(
        "Tile (px)",
        "Side of a tile, the region the model picks, in full-resolution (level-0) "
        "pixels. Typical: 256-1024.",
        1,
        MAX_SIDE,
        flag="--tile",
    ),
    "subtile_size": Setting(
        "Sub-tile (px)",
        "Side of a sub-tile, what the feature network reads at full resolution, in "
        "level-0 pixels (every model kind). Typical: 32-100.",
        1,
        MAX_SIDE,
        flag="--subtile",
    ),
    "entropy_weight": Setting(
        "Entropy weight (λ)",
        "Entropy weight (λ): how strongly the attention is kept spread out "
        "rather than fixed on a few places. 0 turns it off; the paper uses 1e-5.",
        0,
        MAX_WEIGHT,
        entry="number",
        flag="--entropy",
    ),
    "contrastive": Setting(
        "Contrastive loss",
        "Also train the model to tell the tiles it picks from random ones (the "
        "paper's in-sample contrastive loss).",
        entry="check",
        flag="--no-contrastive",
    ),
    "contrastive_warmup_epochs": Setting(
        "Contrastive warm-up (epochs)",
        "Epochs of training before the contrastive loss is switched on (the paper: 10).",
        0,
        MAX_EPOCHS,
        flag="--warmup",
    ),
    "pixel_weight": Setting(
        "Pixel supervision weight",
        "How strongly the attention is pulled towards the ROI outlines on slides "
        "that have them (0: not at all; default 1).",
        0,
        MAX_WEIGHT,
        entry="number",
        flag="--pixel-weight",
    ),
    "roi_labels": Setting(
        "ROI labels",
        "Which outline labels in the ROI files count as a region of interest, "
        "comma-separated (default: Tumor).",
        entry="names",
        flag="--roi-labels",
    ),
    "lookalike_labels": Setting(
        "Look-alike labels",
        "Outline labels of look-alikes: regions that look like the ROI at low "
        "resolution but are not (a benign mimic), comma-separated. The model learns to "
        "look at them and to tell them apart (default: none).",
        entry="names",
        flag="--lookalike-labels",
    ),
}


def setting_name(field: str) -> str:
    """``"Epochs (epochs)"``: a field as the form labels it, and its name in settings."""
    setting = TRAIN_SETTINGS.get(field)
    return field if setting is None else f"{setting.label} ({field})"


def parse_names(text: str) -> tuple[str, ...]:
    """A ``"names"`` setting as typed (``"Tumor, Mimic"``): the comma-separated names,
    stripped, empty ones dropped (the Train form and ``zoomin train`` alike)."""
    return tuple(name.strip() for name in str(text).split(",") if name.strip())
