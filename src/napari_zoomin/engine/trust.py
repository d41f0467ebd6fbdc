"""Whether to believe a result: what a model's training slides were like, how a new
slide compares with them, and how concentrated the evidence is.

A model is only as good as the slides it learned from.  Each checkpoint carries a
compact *training profile* (``info["data"]["profile"]``, written by the trainer): the
pixel size, the colour of tissue as mean optical density per RGB channel (OD =
−log10((I + 1)/256), the quantity stains add up in), the tissue fraction, and
whether every slide was a synthetic sample slide.  :func:`slide_warnings` compares a
slide's :class:`SlideProfile` with it and returns plain-language warnings; every
front end (``result.json``, the CLI's stderr, the widget beside the prediction, the
batch CSV) shows the same strings, so the rules live here and nowhere else.

The profile is computed at the tissue-detection level (a downsample of about 64),
whose tiles the slide's cache still holds after detection: it costs no decode.

Evidence: the draws of a sampled prediction can agree (a spread of ±0.00) because
they all read the same two sub-tiles; :func:`evidence` counts the distinct *places*
the sub-tiles lie in (sub-tiles closer than one tile side, chained, are one place),
so a result can say "16 draws, 5 sub-tiles in 1 place" instead of looking certain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .places import link_groups

__all__ = [
    "SYNTHETIC_MARKER",
    "SlideProfile",
    "evidence",
    "evidence_warnings",
    "model_warnings",
    "profile_slide",
    "resolution_warnings",
    "slide_warnings",
    "tissue_warnings",
    "training_profile",
    "training_profile_of",
]

#: level used for the colour profile (the tissue-detection level, already decoded)
PROFILE_DOWNSAMPLE = 64.0
#: the ImageDescription of napari-zoomin's sample slides starts with this
SYNTHETIC_MARKER = "napari-zoomin sample slide"
#: a channel's mean tissue OD further than this from training (or 3 training standard
#: deviations, if larger) is "unlike training": 0.12 is about what separates H&E from
#: a DAB/haematoxylin IHC stain in the green channel by half; a 10 % colour cast
#: moves it by 0.03-0.05 (measured on CMU-1-Small-Region)
OD_TOLERANCE = 0.12
#: pixels with less optical density than this (summed over RGB) are glass, not stain
GLASS_OD = 0.15
#: darker than this (max channel) is a black border or padding, not stain
BLACK = 30
#: fraction of the slide below which "very little tissue" is worth saying
LITTLE_TISSUE = 0.01
#: a slide's pixel size further than this factor from the model's is worth saying
MPP_RATIO = 1.25
_CHANNELS = ("red", "green", "blue")


@dataclass(frozen=True)
class SlideProfile:
    """What a slide looks like at low resolution (JSON-able with :func:`asdict`).

    Attributes:
        mpp: mean µm per pixel, or None.
        tissue_fraction: share of the slide that is tissue, or None without a mask.
        od_mean: mean optical density of stained tissue pixels per RGB channel, or
            None when no stained pixel was found.
        stained_pixels: how many pixels ``od_mean`` averages (at the profile level).
        synthetic: the file is a napari-zoomin sample slide.
    """

    mpp: float | None
    tissue_fraction: float | None
    od_mean: tuple[float, float, float] | None
    stained_pixels: int
    synthetic: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(shape[0], dtype=np.int64) * mask.shape[0]) // shape[0]
    cols = (np.arange(shape[1], dtype=np.int64) * mask.shape[1]) // shape[1]
    return mask[rows][:, cols]


#: optical density of each 8-bit value, ``−log10((v + 1) / 256)``
_OD = (-np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)


def optical_density_mean(rgb: np.ndarray, mask: np.ndarray | None = None):
    """Mean OD per channel over stained pixels (not glass, not black) of ``rgb`` (h, w, 3)
    uint8, within ``mask`` if given; returns ``(od (3,) or None, count)``."""
    rgb = np.asarray(rgb)
    channels = [rgb[..., c] for c in range(3)]
    # table lookups, a channel at a time: a logarithm per pixel, or reductions over the
    # last axis of 3, cost most of a second on a 100,000² slide
    keep = (_OD[channels[0]] + _OD[channels[1]] + _OD[channels[2]]) > GLASS_OD
    keep &= (channels[0] > BLACK) | (channels[1] > BLACK) | (channels[2] > BLACK)
    if mask is not None:
        keep &= _resize_nearest(np.asarray(mask, bool), keep.shape)
    n = int(np.count_nonzero(keep))
    if n == 0:
        return None, 0
    # the mean OD of a channel from the histogram of its kept values
    od64 = _OD.astype(np.float64)
    return np.array([np.bincount(ch[keep], minlength=256) @ od64 / n for ch in channels]), n


def is_synthetic(slide) -> bool:
    """Whether a slide is one of napari-zoomin's generated sample slides."""
    try:
        description = str(slide.properties.get("tiff.ImageDescription", ""))
    except Exception:  # a backend without properties
        return False
    return description.startswith(SYNTHETIC_MARKER)


def profile_slide(slide, tissue=None) -> SlideProfile:
    """The :class:`SlideProfile` of an open slide and its tissue mask (or None)."""
    downsamples = list(slide.level_downsamples)
    level = int(np.argmin([abs(math.log(d / PROFILE_DOWNSAMPLE)) for d in downsamples]))
    rows, cols = slide.level_shapes[level]
    pixels = slide.read(level, 0, 0, rows, cols)
    mask = None if tissue is None else tissue.mask
    od, n = optical_density_mean(pixels, mask)
    mpp = None if slide.mpp is None else float(np.mean(slide.mpp))
    return SlideProfile(
        mpp=mpp,
        tissue_fraction=None if tissue is None else float(tissue.fraction),
        od_mean=None if od is None else tuple(round(float(v), 4) for v in od),
        stained_pixels=n,
        synthetic=is_synthetic(slide),
    )


def training_profile(profiles: Sequence[SlideProfile], mpp: float | None) -> dict[str, Any]:
    """The checkpoint's compact description of its training slides (JSON-able).

    ``mpp`` is the pixel size the model was trained at (None: pixels).  Colour is
    the mean and standard deviation over slides of each slide's mean tissue OD.
    """
    ods = np.array([p.od_mean for p in profiles if p.od_mean is not None], dtype=np.float64)
    fractions = [p.tissue_fraction for p in profiles if p.tissue_fraction is not None]
    return {
        "slides": len(profiles),
        "mpp": None if mpp is None else float(mpp),
        "slide_mpp": sorted({round(p.mpp, 4) for p in profiles if p.mpp is not None}),
        "od_mean": None if not len(ods) else [round(float(v), 4) for v in ods.mean(axis=0)],
        "od_std": None if not len(ods) else [round(float(v), 4) for v in ods.std(axis=0)],
        "tissue_fraction": None
        if not fractions
        else [round(float(np.min(fractions)), 4), round(float(np.max(fractions)), 4)],
        "synthetic": bool(profiles) and all(p.synthetic for p in profiles),
    }


def model_warnings(info: dict[str, Any]) -> list[str]:
    """Warnings about the model itself, from its checkpoint document (``Checkpoint.info``)."""
    data = (info.get("info") or {}).get("data") or {}
    profile = data.get("profile")
    out = []
    if profile is None:
        out.append(
            "This checkpoint does not describe its training slides (it predates "
            "napari-zoomin's training profiles), so nothing can say whether this slide is "
            "like them; retrain it to get these checks."
        )
    elif profile.get("synthetic"):
        out.append(
            "This model was trained on synthetic sample slides only (real tissue with "
            "planted regions): it is a demonstration, not for diagnosis."
        )
    return out


def training_profile_of(ckpt) -> dict[str, Any] | None:
    """A checkpoint's training profile (``info.data.profile``), or None for older ones."""
    data = ((ckpt.info or {}).get("info") or {}).get("data") or {}
    profile = data.get("profile")
    return profile if isinstance(profile, dict) else None


def tissue_warnings(fraction: float | None, found: bool = True) -> list[str]:
    """Warnings about the detected tissue: none at all, or under :data:`LITTLE_TISSUE`."""
    if not found:
        return [
            "No tissue was found (nothing stained at low resolution: the slide looks like "
            "glass, black or blank), so the model looked everywhere, and this result is "
            "unlikely to mean anything. Check that this is the slide you meant; if it holds "
            "faint tissue, pass a tissue mask of your own (--tissue mask.png)."
        ]
    if fraction is not None and fraction < LITTLE_TISSUE:
        return [
            f"Very little tissue found ({100 * fraction:.2g} % of the slide): the result "
            "rests on that small area. Check that the tissue mask covers the tissue (pale "
            "or faint staining can be missed), or pass a mask of your own (--tissue mask.png)."
        ]
    return []


def _mpp_text(mpp) -> str:
    """``0.25 µm/pixel``, or ``0.25 x 0.26 µm/pixel`` (y x x) when the axes differ."""
    y, x = (float(v) for v in mpp)
    return f"{y:.3g} µm/pixel" if f"{y:.3g}" == f"{x:.3g}" else f"{y:.3g} x {x:.3g} µm/pixel"


def resolution_warnings(
    slide_mpp, model_mpp: float | None, factor, file_warning: str | None = None
) -> list[str]:
    """Warnings about the pixel size the model reads the slide at (engine.md, *Physical
    resolution*).

    Args:
        slide_mpp: the slide's (y, x) µm per pixel, or None.
        model_mpp: the model's training µm per pixel, or None.
        factor: (r_y, r_x) slide pixels per model pixel the slide is read at.
        file_warning: the slide's own word on its pixel size (``Slide.mpp_warning``: an
            implausible value was ignored, or the axes differ); it replaces the
            "slide records no pixel size" warning, which it already explains.
    """
    out = [] if not file_warning else [file_warning[:1].upper() + file_warning[1:]]
    if slide_mpp is None and model_mpp is None:
        out.append(
            "Read in pixels, not micrometres: neither the slide nor the model records a "
            "pixel size, so nothing checks that the slide is scanned at the model's "
            "magnification. Pass the slide's pixel size (zoomin classify --mpp 0.25, "
            "open_slide(path, mpp=0.25)) and use a model trained with this version "
            "(zoomin train records it)."
        )
        return out
    if model_mpp is None:
        out.append(
            f"Read in pixels, not micrometres: the model records no training pixel size "
            f"(the slide is {_mpp_text(slide_mpp)}); if its training slides were scanned "
            "at another magnification the result is unreliable. Retrain or fine-tune it "
            "(zoomin train --init-from) to record the pixel size."
        )
        return out
    if slide_mpp is None:
        if not file_warning:
            out.append(
                f"Read in pixels, not micrometres: the slide records no pixel size (the "
                f"model was trained at {model_mpp:.3g} µm/pixel). If you know it, pass it: zoomin "
                "classify --mpp <µm per pixel> (Python: open_slide(path, mpp=...))."
            )
        return out
    model = f"{model_mpp:.3g} µm/pixel"
    if min(factor) < 1 / MPP_RATIO:
        out.append(
            f"The slide ({_mpp_text(slide_mpp)}) is {1 / min(factor):.2g}x coarser than the "
            f"model's training resolution ({model}): it was upsampled, so the model looked "
            "for finer detail than the slide holds and the result is less reliable. Use a "
            f"scan at {model} or finer."
        )
    if max(factor) > MPP_RATIO:
        out.append(
            f"The slide ({_mpp_text(slide_mpp)}) was resampled to the model's {model} "
            f"({max(factor):.2g}x fewer pixels per side)."
        )
    return out


def slide_warnings(profile: dict[str, Any] | None, slide: SlideProfile) -> list[str]:
    """Plain-language differences between a slide's colour and a model's training profile."""
    out: list[str] = []
    if not profile:
        return out
    train_od, train_sd = profile.get("od_mean"), profile.get("od_std")
    if slide.od_mean is not None and train_od is not None:
        sd = train_sd or [0.0, 0.0, 0.0]
        off = [
            (name, s, t)
            for name, s, t, d in zip(_CHANNELS, slide.od_mean, train_od, sd, strict=True)
            if abs(s - t) > max(OD_TOLERANCE, 3.0 * d)
        ]
        if off:
            fmt = "/".join
            out.append(
                "The stain colour is unlike the training slides' (mean optical density "
                f"R/G/B {fmt(f'{v:.2f}' for v in slide.od_mean)} here, "
                f"{fmt(f'{v:.2f}' for v in train_od)} in training; most different in "
                f"{', '.join(n for n, _, _ in off)}): the model has not seen tissue that "
                "looks like this, so its answer may be wrong with any confidence."
            )
    return out


def evidence(regions: np.ndarray, link: float) -> dict[str, Any]:
    """Distinct places among the sub-tiles ``regions`` (n, 4) ``[top, left, h, w]``.

    Two sub-tiles whose centres are at most ``link`` level-0 pixels apart along both
    axes are in the same place (chained: single linkage; :func:`napari_zoomin.engine.
    places.link_groups`, the rule :func:`~napari_zoomin.engine.places.places` describes
    the places by).  Returns ``{"subtiles": n, "places": k}``.
    """
    labels = link_groups(regions, link)
    n = len(labels)
    return {"subtiles": n, "places": int(labels.max()) + 1 if n else 0}


def evidence_warnings(
    ev: dict[str, int],
    mode: str,
    draws: int,
    spread: float,
    image_shape: tuple[int, int] | None = None,
    link: float = 0.0,
) -> list[str]:
    """A warning when the evidence comes from one or two places.

    With several draws their agreement (the spread) is then not independent
    evidence; in top-k mode there is no spread at all; a MagNet (``"magnify"``)
    makes one deterministic pass, and its warning says so.  An image at most four
    ``link`` (tile sides) long is only a few places in all: no warning there.
    """
    places, n = int(ev.get("places", 0)), int(ev.get("subtiles", 0))
    if places == 0 or places > 2:
        return []
    if image_shape is not None and max(image_shape) <= 4 * link:
        return []
    where = "one place" if places == 1 else "two places"
    if mode == "magnify":  # a MagNet's one pass: there are no draws to agree
        return [
            f"The prediction rests on {n} magnified patch{'es' if n != 1 else ''} in {where} "
            "(one deterministic pass chose where to zoom; nothing else of the slide was read "
            f"at full detail). Look at {'it' if places == 1 else 'them'} yourself."
        ]
    if mode == "sample" and draws > 1:
        return [
            f"All {draws} draws read {n} sub-tile{'s' if n != 1 else ''} in {where}: their "
            f"agreement (± {spread:.2f}) means they looked at the same spot, not that the "
            "slide was examined widely. Look at that spot yourself."
        ]
    return [
        f"The prediction rests on {n} sub-tile{'s' if n != 1 else ''} in {where}. Look at "
        f"{'it' if places == 1 else 'them'} yourself."
    ]
