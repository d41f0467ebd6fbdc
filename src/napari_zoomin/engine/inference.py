"""Classify one slide: read only what the method needs, and say what it cost.

:func:`classify` runs a checkpoint's model on a lazy slide through
:class:`~napari_zoomin.engine.slide_source.SlideSource`:

- the stage-1 view ``V(x, s1)`` is resampled from the pyramid level nearest a
  downsample of ``1/s1`` (never from level 0);
- a drawn tile's stage-2 view ``V(T(x, c), s2)`` comes from the level nearest
  ``1/s2`` — in our models ``s2`` is relative to the full-resolution tile, so the
  tile's view is read at level-0 scale ``s2`` (not ``s1·s2``);
- sub-tiles are read from level 0 at the drawn coordinates only, in parallel.

The model works in its own pixels: with the checkpoint's training pixel size
(:func:`~napari_zoomin.engine.checkpoints.training_mpp`) and the slide's, the source
resamples the slide to the model's µm per pixel (``SlideSource(model_mpp=...)``; the
levels above are then those nearest ``r/s`` for ``r`` slide pixels per model pixel).
Everything in the :class:`Result` (regions, map placements, decode accounting) is
mapped back to the slide's level-0 pixels.

Tissue detection (or a user's mask) keeps background cells out of stage-1 sampling.
The slide's decode counter is reset and its tile cache cleared first, so
``pixels_decoded`` is this classification's cost; ``pixels_needed`` is the minimum
for the method on this file (see :data:`~napari_zoomin.engine.results.PIXEL_DEFINITIONS`).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AnnotationError, ClassificationError, ZoominError
from ..slide import Slide, open_slide
from .checkpoints import Checkpoint, load_model, training_mpp
from .results import Result, SubtileRecord, TileRecord, grid_placement, support
from .runtime import (
    CpuLoad,
    choose_threads,
    is_oom,
    parse_threads,
    resolve_device,
    torch_threads,
    usable_cpus,
    versions,
)
from .slide_source import SlideSource
from .tissue import TissueMask, detect_tissue, load_tissue_mask
from .trust import (
    evidence,
    evidence_warnings,
    model_warnings,
    profile_slide,
    resolution_warnings,
    slide_warnings,
    tissue_warnings,
    training_profile_of,
)

__all__ = ["Cancelled", "classify", "needed_file_tiles", "warm_up"]

Progress = Callable[[float, str], None]

#: progress fractions at the start of each step
_STEPS = {
    "tissue": 0.05,
    "stage 1": 0.15,
    "stage 2": 0.35,
    "sub-tiles": 0.6,
    "magnified regions": 0.35,
    "summary": 0.9,
    "done": 1.0,
}


class Cancelled(Exception):
    """The caller's ``cancel()`` returned True; the classification stopped between steps."""


# --------------------------------------------------------------------------- decode cost


def needed_file_tiles(slide: Slide, level: int, regions) -> set[tuple[int, int, int]]:
    """Distinct file tiles ``(stored level, row, col)`` holding level-0 ``regions`` at
    ``level``: what reading them decodes (:meth:`Slide.level_window`,
    :meth:`Slide.file_tiles`)."""
    out: set[tuple[int, int, int]] = set()
    for top, left, h, w in np.asarray(regions, dtype=np.int64).reshape(-1, 4).tolist():
        y0, y1, x0, x1 = slide.level_window(level, top, left, h, w)
        out |= slide.file_tiles(level, y0, x0, y1 - y0, x1 - x0)
    return out


def _tile_pixels(slide: Slide, tiles: set[tuple[int, int, int]]) -> int:
    """Decode cost of file tiles as the slide counts it (full tile area each)."""
    area = {lv.stored: lv.tile[0] * lv.tile[1] for lv in slide.levels if lv.stored is not None}
    return sum(area[s] for s, _, _ in tiles)


# --------------------------------------------------------------------------- helpers


class _ObservedSource:
    """A SlideSource that reports progress and honours cancel at every read.

    The model reads the stage-1 view, then the stage-2 views, then the sub-tiles
    (one read each for one image), so each read starts the next step.
    """

    def __init__(self, source: SlideSource, steps: list[str], report, check):
        self._source = source
        self._steps = steps
        self._n = 0
        self._report = report
        self._check = check

    @property
    def shape(self) -> tuple[int, int]:
        return self._source.shape

    def level_for(self, scale: float) -> int:
        return self._source.level_for(scale)

    def read(self, regions, scale: float):
        return self._observed(self._source.read, regions, scale)

    def read_bytes(self, regions, scale: float):
        return self._observed(self._source.read_bytes, regions, scale)

    def _observed(self, read, regions, scale: float):
        self._check()
        step = self._steps[min(self._n, len(self._steps) - 1)]
        self._n += 1
        n = int(torch.as_tensor(regions).reshape(-1, 4).shape[0])
        level = self._source.level_for(scale)
        what = {
            "stage 1": f"Stage 1: reading the view at scale {scale:.4g} (level {level})",
            "stage 2": f"Stage 2: reading the views of {n} drawn tiles (level {level})",
            "sub-tiles": f"Reading {n} sub-tiles at full resolution (level {level})",
            "magnified regions": f"Magnifying: reading a box at scale {scale:.4g} (level {level})",
        }[step]
        self._report(step, what)
        out = read(regions, scale)
        self._check()
        return out

    def tissue_mask(self, scale: float):
        return self._source.tissue_mask(scale)

    def read_roi(self, regions, scale: float):
        return None


def _resolve_tissue(slide: Slide, tissue) -> TissueMask | None:
    if tissue is None or (isinstance(tissue, str) and tissue.lower() == "none"):
        return None
    if isinstance(tissue, str) and tissue == "auto":
        return detect_tissue(slide)
    if isinstance(tissue, TissueMask):
        if tuple(tissue.level0_shape) != tuple(slide.shape):
            raise AnnotationError(
                None if tissue.source in ("otsu", "") else tissue.source,
                f"the tissue mask was made for a {tissue.level0_shape[0]} x "
                f"{tissue.level0_shape[1]} slide but this slide is {slide.shape[0]} x "
                f"{slide.shape[1]} pixels.",
                "Make the mask for this slide.",
            )
        return tissue
    if isinstance(tissue, str | os.PathLike):
        return load_tissue_mask(tissue, slide.shape)
    raise TypeError(f"tissue must be 'auto', a TissueMask, a mask path or None, got {tissue!r}")


def _tile_size(ckpt: Checkpoint) -> tuple[int, int]:
    """A stage-1 tile of the model: Zoom-In's tile, a one-stage model's sub-tile."""
    size = getattr(ckpt.model.config, "tile_size", None) or ckpt.model.subtile_size
    return (int(size[0]), int(size[1]))


def _check_size(slide: Slide, ckpt: Checkpoint) -> list[str]:
    """Refuse a slide smaller than one sub-tile, or too small for the stage-1
    attention network; warn about one smaller than a tile (the edge rule centres the
    tiles on it, ``models/coordinates.py``).  Returns the warnings.

    Sizes are in the model's pixels (the slide resampled to its training pixel size).
    """
    model_mpp = training_mpp(ckpt)
    h, w = SlideSource(slide, model_mpp=model_mpp).shape
    size = f"{h} x {w} pixels"
    if (h, w) != tuple(slide.shape):
        size = (
            f"{slide.shape[0]} x {slide.shape[1]} pixels, {h} x {w} at the model's "
            f"{model_mpp:.3g} µm/pixel"
        )
    sh, sw = (int(v) for v in ckpt.model.subtile_size)
    if h < sh or w < sw:
        raise ClassificationError(
            slide.path,
            f"the image is {size}, smaller than one {sh} x {sw} sub-tile of the {ckpt.kind} "
            "model, the smallest region its feature network reads.",
            "Classify the whole slide at full resolution (not a thumbnail or a crop).",
        )
    warnings = []
    th, tw = _tile_size(ckpt)
    if h < th or w < tw:
        warnings.append(
            f"The image ({size}) is smaller than one {th} x {tw} tile of the model: its "
            "tiles were centred on it and their stage-2 views include blank padding beyond "
            "its edge, which the model never saw in training (nothing was drawn there). "
            "Classify the whole slide, not a crop, for a result you can rely on."
        )
    from ..geometry import scaled_size

    s1 = getattr(ckpt.model.config, "view_scale", None)  # a MagNet has no fixed view
    map_shape = getattr(getattr(ckpt.model, "attention", None), "map_shape", None)
    if map_shape is not None and s1 is not None:
        view = (scaled_size(h, s1), scaled_size(w, s1))
        try:
            map_shape(view)
        except ValueError as exc:
            raise ClassificationError(
                slide.path,
                f"the {size} image gives a {view[0]} x {view[1]} stage-1 view at scale "
                f"{s1:g}, too small for the attention network ({exc}).",
                "Classify a larger image, or use a model with a larger view scale.",
            ) from exc
    return warnings


def _oom_error(slide: Slide, ckpt: Checkpoint, device: torch.device, draws: int, exc):
    cfg = ckpt.model.config
    th, tw = _tile_size(ckpt)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if hasattr(cfg, "patches"):  # a MagNet: one pass, its size is its tree of boxes
        fix = (
            f"Try a MagNet with fewer boxes per layer (patches, now {tuple(cfg.patches)}) "
            f"or smaller patches (classifier_size, now {cfg.classifier_size})"
        )
    else:
        fix = (
            f"Try fewer draws (--draws, now {draws}), a model with a smaller N "
            f"(n_samples, now {cfg.n_samples}) or tile size (now {th} x {tw})"
        )
    fix += ", or --device cpu." if device.type != "cpu" else ", or close other programs."
    return ClassificationError(
        slide.path, f"ran out of memory on {device} while classifying ({first}).", fix
    )


# --------------------------------------------------------------------------- classify


def classify(
    slide: Slide | str | os.PathLike,
    model: Checkpoint | str | os.PathLike = "demo",
    *,
    draws: int = 16,
    seed: int = 0,
    device: str | torch.device = "auto",
    mode: str = "sample",
    tissue: str | os.PathLike | TissueMask | None = "auto",
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    workers: int = 4,
    mpp: float | tuple[float, float] | None = None,
    threads: int | str | None = None,
) -> Result:
    """Classify a slide and report where the model looked and what reading cost.

    Args:
        slide: an open :class:`Slide` (its tile cache is cleared and its decode counter
            reset; reads by others sharing it meanwhile, e.g. a viewer, are counted
            too) or a path (opened and closed here).
        model: a :class:`Checkpoint` (its model is moved to ``device``), ``"demo"`` or
            a checkpoint path.
        draws: K independent two-stage estimates averaged (``mode="sample"``).
        seed: seed of the sampling generator (a CPU ``torch.Generator``, so the draws
            are the same on any device).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        mode: ``"sample"`` (K draws: mean probability and spread) or ``"topk"``
            (deterministic N most attended tiles and sub-tiles).
        tissue: ``"auto"`` (detect tissue on a low level), a :class:`TissueMask`, a mask
            file (image or ``.npy`` labels, non-zero = tissue, the slide's aspect ratio),
            or ``None`` / ``"none"`` (every cell may be drawn).
        progress: ``progress(fraction, message)`` at each step (tissue, stage 1,
            stage 2, sub-tiles, done).
        cancel: ``cancel() -> bool`` polled between steps; True raises
            :class:`Cancelled`.
        workers: threads decoding regions in parallel.
        mpp: the slide's pixel size in µm (or (y, x)), overriding or supplying the
            file's, when ``slide`` is a path (``open_slide(path, mpp=...)`` for an open
            slide).  The model reads the slide at its training pixel size when both are
            known (``Result.resolution``, ``Result.warnings``).
        threads: torch CPU threads: a number, ``"auto"`` (the CPUs other work leaves
            idle now: what the CLI and the widget pass; :func:`.runtime.choose_threads`)
            or None (torch's setting, unchanged).  ``Result.threads`` says how many ran.

    Returns:
        A :class:`~napari_zoomin.engine.results.Result`.  ``pixels_decoded`` is what
        the decoder produced (tissue detection included); ``pixels_needed`` the
        minimum for this method on this file: distinct file tiles touched by the
        stage-1 view's level window, the drawn tiles' stage-2 views (at their level)
        and the sub-tiles (level 0), × tile area; ``pixels_read`` the requested
        region areas at the levels they were read from.

    Raises:
        ClassificationError: image smaller than a sub-tile, an empty tissue mask of
            the user's, out of memory, unavailable device, non-finite output.  (No
            tissue detected, a slide smaller than a tile, an unknown pixel size: the
            result carries a warning instead, :attr:`Result.warnings`.)
        AnnotationError: a tissue mask that is unreadable or of the wrong shape.
        SlideError, CheckpointError: the slide or model cannot be opened.
        Cancelled: ``cancel()`` returned True.
    """
    if mode not in ("sample", "topk"):
        raise ValueError(f"mode must be 'sample' or 'topk', got {mode!r}")
    if int(draws) < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    draws = int(draws) if mode == "sample" else 1

    def report(step: str, message: str) -> None:
        if progress is not None:
            progress(_STEPS[step], message)

    def check() -> None:
        if cancel is not None and cancel():
            raise Cancelled("classification cancelled")

    dev = resolve_device(device)
    if isinstance(model, Checkpoint):
        ckpt = model
        ckpt.model.to(dev).eval()
    else:
        ckpt = load_model(model, dev)

    own = not isinstance(slide, Slide)
    if mpp is not None and not own:
        raise ValueError(
            "mpp is for a slide given as a path; open the slide with open_slide(path, mpp=...)"
        )
    threads = parse_threads(threads) if dev.type == "cpu" else None  # refused before work
    t0 = time.perf_counter()
    # the load is measured while tissue is found, this process's own work subtracted
    load = CpuLoad() if threads == "auto" else None
    the_slide = open_slide(slide, mpp=mpp) if own else slide
    stop_prefetch = None
    try:
        the_slide.clear_cache()
        the_slide.reset_decoded()
        stop_prefetch = _prefetch_view(the_slide, ckpt, workers)
        with ExitStack() as model_context:

            def start_model() -> None:  # tissue is found: the model's torch threads
                model_context.enter_context(torch_threads(choose_threads(threads, load=load)))

            return _classify(
                the_slide, ckpt, dev, draws, seed, mode, tissue, report, check, t0, workers,
                start_model,
            )  # fmt: skip
    finally:
        if stop_prefetch is not None:
            stop_prefetch()
        if own:
            the_slide.close()


def _prefetch_view(slide: Slide, ckpt: Checkpoint, workers: int) -> Callable[[], None] | None:
    """Start decoding the stage-1 view's file tiles in the background while tissue is
    detected on one core (:meth:`Slide.prefetch`); its ``stop``, or None."""
    scale = getattr(ckpt.model.config, "view_scale", None)
    if scale is None:
        return None
    # one core is left to tissue detection, which would otherwise wait its turn
    threads = min(int(workers), max(1, usable_cpus() - 1))
    source = SlideSource(slide, workers=threads, model_mpp=training_mpp(ckpt))
    return source.prefetch_view(float(scale))


def _classify(
    slide, ckpt, dev, draws, seed, mode, tissue, report, check, t0, workers, start_model
) -> Result:
    timings: dict[str, float] = {}
    warnings: list[str] = []  # plain-language reasons to doubt the result (Result.warnings)
    model = ckpt.model
    cfg = model.config
    check()
    warnings.extend(_check_size(slide, ckpt))
    # damage the reader worked around (Slide.warnings); the pixel size's own word
    # comes with the resolution warnings below
    warnings.extend(w[:1].upper() + w[1:] for w in slide.warnings if w != slide.mpp_warning)

    # -- tissue ---------------------------------------------------------------------
    t = time.perf_counter()
    if tissue is None or (isinstance(tissue, str) and tissue.lower() == "none"):
        report("tissue", "No tissue mask: every cell may be drawn")
    elif isinstance(tissue, str) and tissue == "auto":
        report("tissue", "Finding tissue")
    else:
        report("tissue", "Loading the tissue mask")
    mask = _resolve_tissue(slide, tissue)
    detected = mask is not None and mask.source == "otsu"
    if mask is not None and not mask.mask.any():
        if not detected:  # the user's own mask says there is nothing to read
            raise ClassificationError(
                mask.source,
                "no tissue in the mask: every cell would be background.",
                "Pass a tissue mask of your own (an image or .npy file, non-zero = tissue), "
                "or classify without one (tissue=None, 'none' on the command line) to let "
                "the model look everywhere.",
            )
        mask = None  # nothing stained: do not fail, but do not look confident either
        warnings.extend(tissue_warnings(None, found=False))
    elif detected:
        warnings.extend(tissue_warnings(mask.fraction))
    # what the slide looks like, against what the model was trained on (trust.py)
    profile = profile_slide(slide, mask)
    warnings.extend(model_warnings(ckpt.info))
    warnings.extend(slide_warnings(training_profile_of(ckpt), profile))
    tissue_decoded = slide.total_decoded_pixels
    timings["tissue"] = time.perf_counter() - t
    check()
    start_model()

    # -- model ----------------------------------------------------------------------
    steps = list(model.read_steps)  # the reads the model makes, in order
    two_stage = "stage 2" in steps
    source = SlideSource(slide, tissue=mask, workers=workers, model_mpp=training_mpp(ckpt))
    warnings.extend(
        resolution_warnings(source.slide_mpp, source.model_mpp, source.factor, slide.mpp_warning)
    )
    observed = _ObservedSource(source, steps, report, check)
    generator = torch.Generator().manual_seed(int(seed))
    t = time.perf_counter()
    try:
        (pred,) = model.predict([observed], mode=mode, draws=draws, generator=generator)
    except Cancelled:
        raise
    except ZoominError:
        raise
    except Exception as exc:
        if not is_oom(exc):
            raise
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        raise _oom_error(slide, ckpt, dev, draws, exc) from exc
    timings["predict"] = time.perf_counter() - t
    if pred.mode == "magnify":  # a MagNet: one deterministic pass, no draws averaged
        mode, draws = pred.mode, pred.draws
    check()

    # -- summary --------------------------------------------------------------------
    t = time.perf_counter()
    report("summary", "Counting decoded pixels")
    probs = pred.probabilities.double().numpy()
    spread = pred.spread.double().numpy()
    attention = pred.attention.float().numpy()
    if not (np.isfinite(probs).all() and np.isfinite(spread).all()):
        raise ClassificationError(
            ckpt.path,
            "the model's probabilities are not finite numbers (NaN or infinity).",
            "The checkpoint is damaged or its training diverged; retrain or use another.",
        )
    attention = np.nan_to_num(attention, nan=0.0, posinf=0.0, neginf=0.0)
    classes = list(ckpt.classes) or [f"class {i}" for i in range(len(probs))]

    # the model read model pixels; the result is in the slide's level-0 pixels
    label_index = int(np.argmax(probs))
    tiles, subtiles = _tiles_and_subtiles(pred, source, label_index)
    magnified = pred.magnified  # a MagNet's boxes, read at levels of their own
    magnified_record = None
    s1 = float(cfg.view_scale) if magnified is None else magnified.view_scale
    level1 = source.level_for(s1)
    h, w = slide.shape
    view = source.to_level0([[0, 0, *source.shape]]).numpy()
    view_tiles = needed_file_tiles(slide, level1, view)
    parts = {"view": view_tiles}
    level_sub = source.level_for(1.0)
    levels = {"view": level1, "subtiles": level_sub}
    if two_stage:
        s2 = float(cfg.stage2_scale)
        level2 = source.level_for(s2)
        regions2 = source.to_level0(_stage2_regions(pred)).numpy()
        parts["stage2"] = needed_file_tiles(slide, level2, regions2)
        levels["stage2"] = level2
    if magnified is None:
        subtile_regions = source.to_level0(pred.subtiles.regions).numpy()
        parts["subtiles"] = needed_file_tiles(slide, level_sub, subtile_regions)
    else:
        parts.update(_magnified_parts(slide, source, magnified, levels))
        magnified_record = _magnified_record(magnified, source, classes)
    union = set().union(*parts.values())
    pixels_needed = _tile_pixels(slide, union)
    pixels_read = 0
    ry, rx = source.factor
    for scale, area in source.counter.level0_pixels.items():
        dy, dx = slide.levels[source.level_for(scale)].downsample
        pixels_read += round(area * ry * rx / (dy * dx))
    decode = {
        "decoded_pixels_by_level": {str(k): int(v) for k, v in slide.decoded_pixels.items()},
        "decoded_tiles_by_level": {str(k): int(v) for k, v in slide.decoded_tiles.items()},
        "tissue_decoded_pixels": int(tissue_decoded),
        "needed_pixels_by_part": {k: _tile_pixels(slide, v) for k, v in parts.items()},
        "needed_tiles_by_part": {k: len(v) for k, v in parts.items()},
        "needed_tiles": len(union),
        "read_levels": levels,
        "regions_read": {f"{k:g}": int(v) for k, v in source.counter.regions.items()},
    }
    origin, cell = grid_placement(pred.attention_grid)
    (oy, ox), (dy, dx) = source.to_level0_yx(origin), source.to_level0_yx(cell)
    resolution = {
        "slide_mpp": None if source.slide_mpp is None else list(source.slide_mpp),
        "model_mpp": source.model_mpp,
        "factor": [float(v) for v in source.factor],
        "units": source.units,
    }
    # how many distinct places the evidence comes from (sub-tiles within a tile side)
    th, tw = _tile_size(ckpt)
    link = max(th * source.factor[0], tw * source.factor[1])
    ev = evidence(np.array([sub["region"] for sub in subtiles]).reshape(-1, 4), link)
    ev["link"] = float(link)  # level-0 pixels: engine.places groups by it again
    warnings.extend(
        evidence_warnings(ev, mode, draws, float(spread[label_index]), slide.shape, link)
    )
    timings["summary"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    timings["total"] = seconds
    result = Result(
        slide={
            "path": None if slide.path is None else str(slide.path),
            "name": "image" if slide.path is None else Path(slide.path).name,
            "shape": [int(h), int(w)],
            "mpp": None if slide.mpp is None else [float(v) for v in slide.mpp],
            "vendor": slide.vendor,
            "backend": slide.backend,
            "level_shapes": [list(s) for s in slide.level_shapes],
        },
        label=classes[label_index],
        label_index=label_index,
        classes=classes,
        probabilities={c: float(p) for c, p in zip(classes, probs, strict=True)},
        spread={c: float(s) for c, s in zip(classes, spread, strict=True)},
        draws=int(draws),
        mode=mode,
        seed=int(seed),
        stage1_attention=attention,
        stage1_origin=(oy, ox),
        stage1_cell_size=(dy, dx),
        tiles=tiles,
        subtiles=subtiles,
        pixels_decoded=int(slide.total_decoded_pixels),
        pixels_needed=int(pixels_needed),
        pixels_read=int(pixels_read),
        seconds=float(seconds),
        model_sha256=ckpt.sha256,
        model_kind=ckpt.kind,
        device=str(dev),
        versions=versions(),
        threads=torch.get_num_threads() if dev.type == "cpu" else None,
        model_path=None if ckpt.path is None else str(ckpt.path),
        model_config=_jsonable(ckpt.config),
        tissue={
            # detection that found nothing says so (fraction 0), unlike --tissue none
            "source": "otsu" if detected else (None if mask is None else mask.source),
            "fraction": 0.0 if detected and mask is None else _fraction(mask),
            "od_mean": None if profile.od_mean is None else list(profile.od_mean),
        },
        decode=decode,
        timings={k: float(v) for k, v in timings.items()},
        warnings=warnings,
        evidence=ev,
        resolution=resolution,
        magnified=magnified_record,
    )
    report("done", result.summary())
    return result


#: side (pixels) of the synthetic slide :func:`warm_up` classifies
WARM_UP_SIDE = 1024


def warm_up(model: Checkpoint) -> float | None:
    """Classify a small synthetic slide once; returns the seconds it took (None if the
    model refused the slide, whose first real slide then pays instead).

    A process's first classification takes every network and sampler path for the
    first time (0.1-0.2 s more on the 100,000² slide).  The widget warms its model in
    the background when it opens and when the model or device changes, so its first
    slide costs what the next ones do (docs/benchmarks.md, issue 22).  It runs on the
    device the model is on; nothing of the slide stays behind.
    """
    t = time.perf_counter()
    side = WARM_UP_SIDE
    # glass with a pink disc of tissue, plus noise (bytes only: no large temporaries)
    image = np.random.default_rng(0).integers(0, 24, (side, side, 3), dtype=np.uint8)
    yy, xx = np.ogrid[:side, :side]
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2
    image += np.where(disc[..., None], np.uint8([190, 110, 160]), np.uint8(220))
    slide = open_slide(image, mpp=training_mpp(model))
    try:
        on = next((p.device for p in model.model.parameters()), torch.device("cpu"))
        classify(slide, model, draws=2, device=on, threads=None)
    except ZoominError:
        return None
    finally:
        slide.close()
    return time.perf_counter() - t


def _fraction(mask: TissueMask | None) -> float | None:
    return None if mask is None else float(mask.fraction)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _magnified_parts(slide: Slide, source: SlideSource, magnified, levels: dict) -> dict:
    """File tiles a MagNet needs: each layer's boxes (the part inside the image) at the
    level each was read from; ``levels`` gets each layer's finest level."""
    h, w = source.shape
    parts: dict[str, set] = {}
    finest: dict[str, int] = {}
    depth = magnified.depth.tolist()
    last = max(depth)
    for m, box in enumerate(magnified.boxes.tolist()):
        if int(magnified.level[m]) == -2:  # wholly outside the image: nothing read
            continue
        top, left, side = box[0], box[1], box[2]
        y0, x0 = max(0, math.floor(top)), max(0, math.floor(left))
        y1, x1 = min(h, math.ceil(top + side)), min(w, math.ceil(left + side))
        if y1 <= y0 or x1 <= x0:
            continue
        level = source.level_for(float(magnified.read_scale[m]))
        name = "subtiles" if depth[m] == last else f"layer {depth[m]}"
        region = source.to_level0([[y0, x0, y1 - y0, x1 - x0]]).numpy()
        parts.setdefault(name, set()).update(needed_file_tiles(slide, level, region))
        finest[name] = min(finest.get(name, level), level)
    levels.update(finest)
    return parts


def _magnified_record(magnified, source: SlideSource, classes: list[str]) -> dict[str, Any]:
    """:attr:`Result.magnified` from a MagNet's :class:`~napari_zoomin.models.outputs.
    MagnifiedRegions`: boxes mapped from model pixels to the slide's level 0 (floats,
    so a box keeps its exact place), the trace as ``{class: p}`` per patch."""
    boxes = []
    for m, (top, left, side, _) in enumerate(magnified.boxes.double().tolist()):
        y, x = source.to_level0_yx((top, left))
        h, w = source.to_level0_yx((side, side))
        boxes.append(
            {
                "depth": int(magnified.depth[m]),
                "parent": int(magnified.parent[m]),
                "box": [y, x, h, w],
                "zoom": float(magnified.zoom[m]),
                "level": int(magnified.level[m]),
                "read_scale": float(magnified.read_scale[m]),
                "scale": float(magnified.scale[m]),
                "translation": [float(v) for v in magnified.translation[m].tolist()],
            }
        )
    trace = [
        {c: float(p) for c, p in zip(classes, row, strict=True)}
        for row in magnified.trace.double().tolist()
    ]
    depths = sorted({int(d) for d in magnified.depth.tolist()})
    counts = [int((magnified.depth == d).sum()) for d in depths]  # Π_{k≤l} P_k
    per_frame = [counts[0]] + [b // a for a, b in itertools.pairwise(counts)]
    return {
        "boxes": boxes,
        "trace": trace,
        "patches": per_frame,
        "view_scale": float(magnified.view_scale),
    }


def _stage2_regions(pred) -> np.ndarray:
    """Regions of every tile whose stage-2 view was read (the model reports them)."""
    views = pred.tiles.regions if pred.stage2_views is None else pred.stage2_views
    return views.numpy()


def _tiles_and_subtiles(
    pred, source: SlideSource, label_index: int
) -> tuple[list[TileRecord], list[SubtileRecord]]:
    """Plain-Python tiles (most attended first) and sub-tiles (largest :func:`support`
    for the predicted class first, then largest weight).

    Regions and placements are mapped from the model's pixels to the slide's level 0.
    """
    ts = pred.tiles
    alpha = ts.attention.double().numpy()
    order = sorted(range(len(alpha)), key=lambda i: (-alpha[i], int(ts.cells[i])))
    new_index = {old: new for new, old in enumerate(order)}
    grid = ts.stage2_grid
    tiles = []
    for old in order:
        t: TileRecord = {
            "region": [int(v) for v in source.to_level0(ts.regions[old])[0].tolist()],
            "cell": int(ts.cells[old]),
            "count": int(ts.counts[old]),
            "alpha": float(alpha[old]),
        }
        if ts.stage2_attention is not None and grid is not None:
            beta = ts.stage2_attention[old].float().numpy()
            origin, cell = grid_placement(grid, old)
            t["stage2_attention"] = np.nan_to_num(beta, nan=0.0)
            t["stage2_origin"] = source.to_level0_yx(origin)
            t["stage2_cell_size"] = source.to_level0_yx(cell)
        tiles.append(t)
    subtiles = pred.subtiles
    weights = subtiles.weights.double().numpy()
    regions = source.to_level0(subtiles.regions).tolist()
    scores = None if subtiles.scores is None else subtiles.scores.double().numpy()
    subs: list[SubtileRecord] = []
    for k in range(len(weights)):
        sub: SubtileRecord = {
            "region": [int(v) for v in regions[k]],
            "weight": float(weights[k]),
            "tile": new_index.get(int(subtiles.tile[k]), -1),
            "cell": int(subtiles.cells[k]),
        }
        if scores is not None:
            sub["scores"] = [float(np.nan_to_num(v, nan=0.0)) for v in scores[k]]
        subs.append(sub)
    keys = support(subs, label_index)
    order = sorted(
        range(len(subs)),
        key=lambda k: (-keys[k], -subs[k]["weight"], subs[k]["tile"], subs[k]["cell"]),
    )
    return tiles, [subs[k] for k in order]
