"""The ``zoomin`` command line.

Every user-facing failure is a :class:`~napari_zoomin.errors.ZoominError`; it is
printed as one line and the command exits with status 1 (argparse's usage
errors exit with 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

from . import __version__
from .errors import TrainingError, ZoominError
from .fields import (
    MAX_DRAWS,
    MAX_EPOCHS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SIDE,
    MAX_WEIGHT,
    MAX_WIDTH,
    MAX_WORKERS,
    MIN_SCALE,
)

#: the largest ``zoomin sample --size`` (a 200 000² slide is 120 GB of pixels)
MAX_SAMPLE_SIDE = 200_000


def _cmd_info(args: argparse.Namespace) -> int:
    from .slide import open_slide

    with open_slide(args.path, backend=args.backend) as slide:
        print(json.dumps(slide.info(), indent=2))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .engine.results import check_output_path
    from .samples import write_sample_slide

    check_output_path(args.out, folder=False)
    start = time.perf_counter()
    try:
        info = write_sample_slide(
            args.out, size=args.size, label=args.label, seed=args.seed, recipe=args.recipe
        )
    except ValueError as err:  # a size too small for the recipe, and the like
        raise ZoominError(args.out, f"cannot write the sample slide: {err}") from err
    seconds = time.perf_counter() - start
    print(
        f"wrote {info.path} ({args.size:,} x {args.size:,} px, {args.label}, seed {args.seed}) "
        f"and its ROIs {info.geojson_path} in {seconds:.1f} s"
    )
    return 0


def _tissue_arg(value: str):
    return None if value == "none" else value


def _progress_line(fraction: float, message: str) -> None:
    """A single self-overwriting progress line on a terminal, nothing when piped."""
    if sys.stderr.isatty():
        print(f"\r[{fraction:4.0%}] {message:<60}", end="", file=sys.stderr, flush=True)
        if fraction >= 1.0:
            print(file=sys.stderr)


def _classify_and_write(slide_path, args) -> int:
    from .engine.inference import classify
    from .engine.results import check_output_path, write_outputs
    from .engine.runtime import keep_freed_memory, resolve_device

    resolve_device(args.device)  # before anything is loaded
    keep_freed_memory()  # this process exits after the slide: no memory to give back
    model = [] if args.model == "demo" else [args.model]
    check_output_path(args.out, folder=True, inputs=[slide_path, *model])
    result = classify(
        slide_path,
        args.model,
        draws=args.draws,
        seed=args.seed,
        device=args.device,
        mode=args.mode,
        tissue=_tissue_arg(args.tissue),
        progress=_progress_line,
        mpp=args.mpp,
        threads=getattr(args, "threads", "auto"),
    )
    print(result.summary(), flush=True)
    for warning in result.warnings:
        print(f"zoomin: warning: {warning}", file=sys.stderr)
    files = write_outputs(result, args.out)
    for what, path in files.items():
        print(f"  {what}: {path}")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    return _classify_and_write(args.slide, args)


def _cmd_batch(args: argparse.Namespace) -> int:
    from .engine.batch import run_batch

    table = run_batch(
        args.folder,
        args.model,
        args.out,
        scheduler=args.scheduler,
        workers=args.workers,
        draws=args.draws,
        seed=args.seed,
        device=args.device,
        tissue=_tissue_arg(args.tissue),
        pattern=args.pattern,
        recursive=args.recursive,
        progress=_progress_line,
        mpp=args.mpp,
    )
    errors = int((table["error"].fillna("") != "").sum()) if "error" in table else 0
    warned = int((table["warnings"].fillna("") != "").sum()) if "warnings" in table else 0
    print(f"{len(table)} slides in {args.out} ({errors} failed)")
    if warned:
        print(
            f"zoomin: warning: {warned} result(s) carry warnings: read the 'warnings' column "
            "before the labels",
            file=sys.stderr,
        )
    return 0


EXAMPLE_SET = "Example: --set '{\"lr\": 1e-3}'"


def _train_config(args: argparse.Namespace):
    """The :class:`TrainConfig` of ``zoomin train``'s options (``--set`` applied last).

    The short flags are the settings of the same meaning (``--s1``: ``view_scale``,
    ``--n``: ``n_samples``, ...; ``--subtile``: ``subtile_size``, the feature network's
    input side, for every kind).
    """
    from .train_settings import parse_names
    from .training import TrainConfig
    from .training.config import KIND_DEFAULTS

    try:
        extra = json.loads(args.set)
    except json.JSONDecodeError as exc:
        raise TrainingError(None, f"--set is not JSON ({exc}).", EXAMPLE_SET) from None
    if not isinstance(extra, dict):
        raise TrainingError(None, "--set must be a JSON object.", EXAMPLE_SET)

    given = {
        "kind": args.kind,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "attention_lr": args.attention_lr,
        "feature_lr": args.feature_lr,
        "lr_schedule": args.lr_schedule,
        "seed": args.seed,
        "device": args.device,
        "early_stopping_patience": args.patience,
        "view_scale": args.s1,
        "stage2_scale": args.s2,
        "tile_size": args.tile,
        "subtile_size": args.subtile,
        "n_samples": args.n,
        "feature_dim": args.feature_dim,
        "entropy_weight": args.entropy,
        "contrastive": False if args.no_contrastive else None,
        "contrastive_warmup_epochs": args.warmup,
        "pixel_weight": args.pixel_weight,
        "roi_attention_weight": args.roi_attention_weight,
        "roi_labels": None if args.roi_labels is None else parse_names(args.roi_labels),
        "lookalike_labels": None
        if args.lookalike_labels is None
        else parse_names(args.lookalike_labels),
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_pooling": args.pretrain_pooling,
        "init_from": args.init_from,
        "init_encoder": args.init_encoder,
    }
    values = {k: v for k, v in given.items() if v is not None}
    # the kind's paper settings where the user gave none (MagNets: 002 §4.3)
    values = {**KIND_DEFAULTS.get(args.kind, {}), **values}
    try:
        return TrainConfig.from_dict({**values, **extra})
    except TrainingError as exc:  # TrainConfig refuses a type or a range: say where from
        source = "the options" if not extra else "the options and --set"
        raise TrainingError(None, f"{source}: {exc.problem}", exc.fix) from None
    except (TypeError, ValueError) as exc:
        raise TrainingError(
            None, f"--set: {exc}.", "See docs/training.md for the settings."
        ) from None


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine.dataset import SlideDataset
    from .engine.results import check_output_path
    from .engine.runtime import resolve_device
    from .training import EpochStep, PretrainProgress, Resolution, TrainEvent, train
    from .training import distributed as dist
    from .training.history import history_csv_path
    from .training.resume import last_checkpoint_path

    resolve_device(args.device)  # before anything is read
    config = _train_config(args)
    together = args.distributed or dist.launched()  # --distributed, or under torchrun
    world = dist.start(config.device) if together else dist.World()
    if not world.main:  # rank 0 reports for all; the others say only their own errors
        logging.disable(logging.WARNING)
    inputs = [args.labels] + ([] if args.init_from in (None, "demo") else [args.init_from])
    inputs += [args.init_encoder] if args.init_encoder else []
    check_output_path(args.out, folder=False, inputs=inputs)
    check_output_path(last_checkpoint_path(args.out), folder=False, inputs=inputs)
    dataset = SlideDataset.from_csv(
        args.labels,
        args.slides,
        args.annotations,
        val_fraction=args.val_fraction,
        seed=args.seed,
        roi_labels=config.roi_labels,
        lookalike_labels=config.lookalike_labels,
        workers=config.num_workers,
    )
    records, classes = dataset.records, dataset.classes

    def progress(event: TrainEvent) -> None:
        if isinstance(event, Resolution):  # said once: training in pixels, not micrometres
            print(f"zoomin: warning: {event.message}", file=sys.stderr, flush=True)
            return
        if isinstance(event, PretrainProgress):  # one line per pre-training epoch
            print(
                f"pretrain {event.network} epoch {event.network_epoch}/{event.network_epochs}, "
                f"step {event.step}/{event.steps}, loss {event.loss:.3f}",
                file=sys.stderr,
                flush=True,
            )
            return
        step = isinstance(event, EpochStep)
        if step and not sys.stderr.isatty():
            return
        parts = [f"{event.stage} epoch {event.epoch}/{event.epochs}"]
        if hasattr(event, "step"):
            parts.append(f"step {event.step}/{event.steps}")
        for key in ("loss", "val_loss", "val_accuracy"):
            value = getattr(event, key, None)
            if value is not None:
                parts.append(f"{key} {value:.3f}")
        for key in ("auxiliary", "paradoxical"):  # a MagNet's extra losses (002 §3.3)
            value = getattr(event, "terms", {}).get(key)
            if value is not None:
                parts.append(f"{key} {value:.3f}")
        split = getattr(event, "roi_attention_split", None)  # the history's names
        for n in (1, 2):  # shares of stage-1 and stage-2 attention on the ROIs
            value = getattr(event, f"roi_attention_stage{n}", None)
            if value is not None:
                parts.append(f"{split}_roi_attention_stage{n} {value:.3f}")
        rate = getattr(event, "slides_per_minute", None)
        if rate is not None:
            parts.append(f"{rate:.1f} slides/min")
        line = ", ".join(parts)
        if sys.stderr.isatty():
            print(f"\r{line:<78}", end="" if step else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    n_train = sum(r.split == "train" for r in records)
    n_val = sum(r.split == "val" for r in records)
    if not world.main:
        with dataset, contextlib.ExitStack() as stack:
            stack.callback(dist.stop)
            train(dataset, config, args.out, resume=not args.fresh, distributed=True)
        return 0
    processes = f" in {world.size} processes" if world.size > 1 else ""
    print(
        f"training {args.kind} on {n_train} slides ({n_val} for validation){processes}, "
        f"classes {classes}"
    )
    with dataset, contextlib.ExitStack() as stack:
        stack.callback(dist.stop)
        result = train(
            dataset,
            config,
            args.out,
            progress=progress,
            resume=not args.fresh,
            distributed=together,
        )
    best = result.best_val_accuracy
    print(
        f"best model (epoch {result.best_epoch}, validation accuracy "
        f"{'n/a' if best is None else f'{best:.3f}'}): {result.checkpoint_path}"
    )
    print(f"resumable training state: {result.last_checkpoint_path}")
    print(f"per-epoch history: {history_csv_path(result.checkpoint_path)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .engine.checkpoints import DEMO_MODEL
    from .samples import sample_slide_path
    from .slide import open_slide

    start = time.perf_counter()
    path = sample_slide_path()
    print(f"sample slide: {path} (ready in {time.perf_counter() - start:.1f} s)")
    if not DEMO_MODEL.is_file():
        # no trained demo model ships yet: show the slide's facts instead
        with open_slide(path) as slide:
            print(json.dumps(slide.info(), indent=2))
        print("The demo model is not shipped in this version; train one with 'zoomin train'.")
    else:
        args.model, args.draws, args.seed, args.device = "demo", 16, 0, "auto"
        args.mode, args.tissue, args.mpp = "sample", "auto", None
        _classify_and_write(path, args)
    print(
        f"Look at it in napari:  napari --plugin napari-zoomin {path}\n"
        "  then Plugins > Zoom-In slide classifier > Classify slide, and click Classify slide"
    )
    return 0


def _mpp_arg(text: str) -> float:
    """``--mpp``: a positive, finite number of micrometres per pixel."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; give the slide's micrometres per pixel, e.g. 0.25"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a positive number of micrometres per pixel (e.g. 0.25), got {text}"
        )
    return value


def _whole(low: int, high: int, what: str = ""):
    """An argparse type: a whole number in ``[low, high]`` (``what`` says in which unit)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be from {low:,} to {high:,}{what}, got {value:,}"
            )
        return value

    return parse


def _number(low: float, high: float, *, below_high: bool = False, above_low: bool = False):
    """An argparse type: a finite number in ``[low, high]`` (ends open when asked)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        inside = (
            math.isfinite(value)
            and (low < value if above_low else low <= value)
            and (value < high if below_high else value <= high)
        )
        if not inside:
            interval = f"{'(' if above_low else '['}{low:g}, {high:g}{')' if below_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    return parse


#: ``--seed``: 0 to 2**63 - 1 (int64; torch takes seeds below 2**64)
_seed_arg = _whole(0, MAX_SEED)

#: ``--threads``: more torch threads than this is a typo, not a machine
MAX_THREADS = 1024


def _threads_arg(text: str) -> str | int:
    """``--threads``: ``auto`` or a whole number of torch CPU threads."""
    if text.strip().lower() == "auto":
        return "auto"
    return _whole(1, MAX_THREADS, " threads (or 'auto')")(text)


def _add_classify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' or a .safetensors checkpoint")
    p.add_argument(
        "--draws",
        type=_whole(1, MAX_DRAWS),
        default=16,
        help=f"independent draws K (default 16, at most {MAX_DRAWS})",
    )
    p.add_argument("--seed", type=_seed_arg, default=0, help="0 to 2**63 - 1 (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--mode", choices=["sample", "topk"], default="sample")
    p.add_argument(
        "--tissue",
        default="auto",
        help="'auto' (detect), 'none' (whole slide), or a mask image/label file",
    )
    p.add_argument(
        "--mpp",
        type=_mpp_arg,
        help="the slide's micrometres per pixel, when the file lacks it or has it wrong "
        "(the model reads slides at the pixel size it was trained at)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoomin",
        description="Classify gigapixel slides from a few attended sub-tiles (Zoom-In network).",
    )
    parser.add_argument("--version", action="version", version=f"napari-zoomin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a slide's facts as JSON")
    info.add_argument("path", help="slide or image file, or a DICOM slide's folder")
    info.add_argument(
        "--backend", choices=["openslide", "tifffile", "array"], help="force a reading library"
    )
    info.set_defaults(func=_cmd_info)

    sample = sub.add_parser(
        "sample", help="write a sample slide with planted tiny regions (and its ROI GeoJSON)"
    )
    sample.add_argument("--out", required=True, help="output .tif path")
    sample.add_argument(
        "--size",
        type=_whole(1, MAX_SAMPLE_SIDE, " pixels"),
        default=40_000,
        help=f"side in pixels (default 40000, at most {MAX_SAMPLE_SIDE})",
    )
    sample.add_argument("--label", choices=["positive", "negative"], default="positive")
    sample.add_argument("--seed", type=_seed_arg, default=0)
    sample.add_argument(
        "--recipe",
        type=int,
        choices=[1, 2],
        default=2,
        help="tissue recipe: 2 quilted real fragments (default), 1 the older mirror tiling",
    )
    sample.set_defaults(func=_cmd_sample)

    classify = sub.add_parser("classify", help="classify a slide and write why")
    classify.add_argument("slide", help="slide or image file, or a DICOM slide's folder")
    classify.add_argument("--out", default="zoomin-out", help="output folder")
    _add_classify_options(classify)
    classify.add_argument(
        "--threads",
        type=_threads_arg,
        default="auto",
        help="torch CPU threads: 'auto' (default: the cores other work leaves idle) or a "
        "number (result.json's 'threads' reproduces a result exactly)",
    )
    classify.set_defaults(func=_cmd_classify)

    batch = sub.add_parser("batch", help="classify every slide in a folder (dask.distributed)")
    batch.add_argument("folder", help="folder of slides")
    batch.add_argument("--out", required=True, help="results CSV (resumable)")
    batch.add_argument("--scheduler", help="dask scheduler address (default: a LocalCluster)")
    batch.add_argument(
        "--workers",
        type=_whole(1, MAX_WORKERS),
        default=2,
        help="LocalCluster worker processes",
    )
    batch.add_argument("--pattern", help="glob of slide names, e.g. '*.svs'")
    batch.add_argument("--recursive", action="store_true", help="look in sub-folders too")
    _add_classify_options(batch)
    batch.set_defaults(func=_cmd_batch)

    tr = sub.add_parser("train", help="train a model on a folder of labelled slides")
    tr.add_argument("--slides", required=True, help="folder of slides")
    tr.add_argument("--labels", required=True, help="CSV with columns slide,label[,split]")
    tr.add_argument("--annotations", help="folder of ROI files (<slide>.geojson / .xml)")
    tr.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    tr.add_argument(
        "--kind",
        default="zoomin",
        choices=["zoomin", "ats", "uniform", "reinforce-ats", "magnet"],
        help="model family (magnet: MagNets, 002, with its paper's lr 3e-5, cosine "
        "annealing and batch 16)",
    )
    # No defaults here (None = TrainConfig's, see docs/training.md): parsing imports no torch.
    # Each flag's type refuses what TrainConfig would (the same limits, fields.py), so
    # the message names the flag; TrainConfig checks again what --set gives.
    epochs, weight = _whole(0, MAX_EPOCHS), _number(0, MAX_WEIGHT)
    rate, scale = _number(0, 10, above_low=True), _number(MIN_SCALE, 1)
    for flag, kind, what in (
        ("--epochs", _whole(1, MAX_EPOCHS), "epochs (default 200)"),
        ("--batch-size", _whole(1, 4096), "slides per step (default 5)"),
        ("--lr", rate, "Adam learning rate of f and g (default 1e-4)"),
        ("--attention-lr", rate, "learning rate of a and b (default: --lr)"),
        ("--feature-lr", _number(0, 10), "learning rate of f (default: --lr; 0 = keep f)"),
        ("--patience", epochs, "early-stopping patience in epochs (default 20; 0 = off)"),
        ("--s1", scale, "stage-1 view scale (default 1/16)"),
        ("--s2", scale, "stage-2 view scale of a tile (default 1/8)"),
        ("--tile", _whole(1, MAX_SIDE, " pixels"), "tile side in level-0 pixels (default 256)"),
        ("--subtile", _whole(1, MAX_SIDE, " pixels"), "sub-tile side, level-0 px (default 50)"),
        ("--n", _whole(1, MAX_SAMPLES), "n_samples (N): cells sampled per estimate (default 100)"),
        ("--feature-dim", _whole(1, MAX_WIDTH), "features of f (default 512)"),
        ("--entropy", weight, "entropy regulariser λ (default 1e-5)"),
        ("--warmup", epochs, "epochs before the contrastive loss (default 10)"),
        ("--pixel-weight", weight, "weight of the ROI attention MSE (default 1)"),
        ("--roi-attention-weight", weight, "weight of the stage-1 ROI term (default 0 = off)"),
        ("--pretrain-epochs", epochs, "tile pre-training epochs when ROIs exist (default 5)"),
    ):
        tr.add_argument(flag, type=kind, help=what)
    tr.add_argument(
        "--pretrain-pooling",
        choices=("mean", "max"),
        help="pool a pre-trained attention map by its max (default; tiny ROIs) or mean (000)",
    )
    tr.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help="learning rate per epoch: constant (default), or cosine annealing towards 0 "
        "(default for --kind magnet)",
    )
    tr.add_argument("--no-contrastive", action="store_true", help="no in-sample contrastive loss")
    tr.add_argument("--roi-labels", help="ROI annotation labels, comma-separated (default Tumor)")
    tr.add_argument(
        "--lookalike-labels",
        help="look-alike annotation labels, comma-separated: looked at, told apart (default none)",
    )
    tr.add_argument("--init-from", help="start from this checkpoint's weights ('demo' or a path)")
    tr.add_argument(
        "--init-encoder",
        help="--kind magnet: start its patch encoders from this safetensors file of weights",
    )
    tr.add_argument(
        "--set", default="{}", help="any other setting as JSON, e.g. '{\"num_workers\": 2}'"
    )
    tr.add_argument(
        "--val-fraction",
        type=_number(0, 1, below_high=True),
        default=0.2,
        help="share of slides held out for validation when the CSV has no split (default 0.2)",
    )
    tr.add_argument("--seed", type=_seed_arg, default=0)
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    tr.add_argument(
        "--fresh", "--no-resume", action="store_true", help="ignore a previous training state"
    )
    tr.add_argument(
        "--distributed",
        action="store_true",
        help="one process of several (GPUs, machines): launch under torchrun, which also "
        "turns this on; see docs/training.md",
    )
    tr.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="build the sample slide and classify it with the demo model")
    demo.add_argument("--out", default="demo-out", help="output folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _save_traceback(argv: list[str] | None) -> Path | None:
    """Write the current exception's traceback to a file a user can attach to a report.

    Under the user data folder (``crash-reports/``), else the cache, else the temporary
    folder; ``None`` when none can be written.
    """
    import datetime
    import os
    import platform
    import tempfile
    import traceback

    from .atomic import write_text_atomic
    from .paths import cache_dir, user_data_dir

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (
        f"zoomin {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"napari-zoomin {__version__}, Python {platform.python_version()}, "
        f"{platform.platform()}\n\n{traceback.format_exc()}"
    )
    for folder in (
        lambda: user_data_dir("crash-reports"),
        lambda: cache_dir("crash-reports"),
        lambda: Path(tempfile.gettempdir()),
    ):
        try:
            where = folder()
            where.mkdir(parents=True, exist_ok=True)
            return write_text_atomic(where / f"zoomin-{stamp}-{os.getpid()}.txt", text)
        except OSError:
            continue
    return None


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at the null device, so that Python's final flush
    does not print "Exception ignored ... BrokenPipeError"."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one ``zoomin`` command; the exit status.

    0 success; 1 a :class:`ZoominError` (one line: the file or flag, what is wrong, what
    to do); 2 a usage error (argparse) or an unexpected error (a bug: one line, and the
    traceback saved to a file named in it); 130 interrupted (Ctrl-C).  Never a raw
    traceback on the terminal.
    """
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # a broken pipe shows here, not in Python's exit
        return code
    except ZoominError as err:
        print(f"zoomin: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("zoomin: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (zoomin ... | head)
        _quiet_stdout()
        return 1
    except MemoryError:
        print(
            "zoomin: error: out of memory. Try fewer --draws, a smaller model, or a machine "
            "with more memory.",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # a bug: one line and a saved traceback, never a raw one
        saved = _save_traceback(argv)
        first = (str(exc).splitlines() or [""])[0][:300]
        where = f"with the traceback saved in {saved}" if saved else "(no traceback was saved)"
        print(
            f"zoomin: internal error: {type(exc).__name__}: {first}. Please report it {where}",
            file=sys.stderr,
        )
        return 2


def run() -> None:
    """The ``zoomin`` command: :func:`main`, then exit without tearing the interpreter
    down (:func:`_exit`).  (Not in :func:`main`, which tests call in their own
    process.)"""
    _exit(main())


def _exit(code: int) -> None:
    """End the process as Python's own exit would, less its teardown.

    At exit Python frees every module and object torch and the other libraries made:
    0.13 s of a ``zoomin classify`` that takes about 4 (issue 22), spent on memory the
    operating system takes back anyway.  By now the outputs are written and closed
    (atomically).  What a normal exit guarantees still happens, in its order: other
    non-daemon threads are waited for, exit handlers run (:mod:`atexit`: logging's
    flush, ``weakref.finalize`` clean-ups such as temporary folders), and the standard
    streams are flushed; then :func:`os._exit`.
    """
    import atexit
    import os
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or its reader went away
            if stream is not None:
                stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
