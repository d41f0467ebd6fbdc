"""Classify a folder of slides on ``dask.distributed``: one task per slide, one CSV row each.

The same code runs on a laptop and on a cluster: without a scheduler address a
:class:`~distributed.LocalCluster` of worker *processes* is started (one thread
each, so PyTorch and the decoders do not fight over cores); with one, the tasks go
to that scheduler and its workers (which must see the slides, the model file and
the CSV's folder under the same paths).

Each task opens its slide and the model itself; a worker loads the model once and
keeps it for the next slides (keyed by path, SHA-256 and device).  Rows are
appended to the CSV as tasks finish, flushed to disk each time, so an interrupted
batch loses nothing; a re-run skips the slides that already have a row without an
error and retries the others.  A slide that fails (a corrupt file, say) becomes a
row with its error message, and the batch goes on.  At the end the CSV is
rewritten (atomically) with one row per slide, the latest, sorted by path.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from ..atomic import atomic_open
from ..errors import CheckpointError, ZoominError
from ..slide import SLIDE_EXTENSIONS, slide_of

__all__ = ["classify_task", "csv_columns", "discover_slides", "run_batch"]

#: columns before the per-class ones, and after them
_HEAD = ["slide", "name", "label"]
_TAIL = [
    "places",  # distinct places the evidence came from (Result.evidence)
    "warnings",  # Result.warnings joined by " | ": read them before the label
    "pixels_decoded",
    "pixels_needed",
    "pixels_read",
    "decode_ratio",
    "seconds",
    "draws",
    "mode",
    "seed",
    "device",
    "model_path",
    "model_sha256",
    "model_kind",
    "napari_zoomin",
    "torch",
    "python",
    "worker",
    "finished",
    "error",
]

#: models loaded in this process (a dask worker keeps its model between slides)
_MODELS: dict[tuple[str, str, str], Any] = {}


def csv_columns(classes: list[str]) -> list[str]:
    """The CSV header for a model with ``classes``."""
    return [*_HEAD, *(f"p_{c}" for c in classes), *(f"spread_{c}" for c in classes), *_TAIL]


def discover_slides(
    folder: str | os.PathLike, pattern: str | None = None, recursive: bool = False
) -> list[Path]:
    """Slides in ``folder``, sorted: known extensions, hidden files skipped.

    ``pattern`` is a glob relative to the folder (``"*.svs"``, ``"**/*.tif"``);
    ``recursive`` looks in sub-folders too (when no pattern is given).  A DICOM slide
    is its folder, listed once however many ``.dcm`` files it holds (:func:`slide_of`).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ZoominError(folder, "is not a folder of slides.", "Give the folder holding them.")
    if pattern is not None:
        _check_pattern(pattern)
        found = folder.glob(pattern)
    else:
        found = folder.rglob("*") if recursive else folder.iterdir()
    slides = {slide_of(p) for p in found if not p.name.startswith(".")}
    return sorted(s for s in slides if s is not None)


def _check_pattern(pattern: str) -> None:
    """A glob relative to the slides folder: not empty, not absolute, no ``..``."""
    problem = None
    if not pattern.strip():
        problem = "is empty"
    elif Path(pattern).is_absolute() or pattern.startswith(("/", "\\")):
        problem = "is an absolute path; it is matched inside the slides folder"
    elif ".." in Path(pattern).parts:
        problem = "leaves the slides folder ('..')"
    if problem:
        raise ZoominError(
            None, f"--pattern {pattern!r} {problem}.", "Give a name pattern such as '*.svs'."
        )


def _check_scheduler(address: str, seconds: float = 5.0) -> None:
    """A dask scheduler address that parses and answers within ``seconds`` (TCP/TLS).

    Without this, ``Client(address)`` waits its 30 s connect timeout and then raises
    from deep inside distributed.
    """
    import socket
    from urllib.parse import urlsplit

    fix = "Check the address (tcp://host:8786), or leave --scheduler out for a local cluster."
    text = address.strip()
    parsed = urlsplit(text if "://" in text else f"tcp://{text}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if parsed.scheme not in ("tcp", "tls") or not host or port is None or " " in text:
        raise ZoominError(None, f"--scheduler {address!r} is not a scheduler address.", fix)
    try:
        with socket.create_connection((host, port), timeout=seconds):
            pass
    except OSError as exc:
        raise ZoominError(
            None,
            f"--scheduler {address}: no dask scheduler answers there "
            f"({exc.strerror or type(exc).__name__}).",
            fix,
        ) from None


def _check_options(draws, seed, workers, device, scheduler) -> None:
    """The classification options, checked once before any slide is read or any worker
    starts (a wrong one would otherwise fail every slide, one row at a time)."""
    from numbers import Integral

    from ..fields import MAX_DRAWS, MAX_SEED, MAX_WORKERS
    from .runtime import resolve_device

    for name, value, low, high in (
        ("--draws", draws, 1, MAX_DRAWS),
        ("--seed", seed, 0, MAX_SEED),
        ("--workers", workers, 1, MAX_WORKERS),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
            raise ZoominError(None, f"{name} must be from {low} to {high}, got {value!r}.")
    if scheduler is None:  # the workers run here: the device must exist here
        resolve_device(device)
        return
    _check_scheduler(scheduler)
    if not (device == "auto" or str(device).split(":")[0] in ("cpu", "cuda", "mps")):
        raise ZoominError(None, f"--device {device!r} is not a device.", "Use cpu, cuda or auto.")


def _resolve_model(model) -> Path:
    from .checkpoints import DEMO_MODEL, Checkpoint

    if isinstance(model, Checkpoint):
        if model.path is None:
            raise CheckpointError(None, "the checkpoint has no file.", "Save it first.")
        return Path(model.path).resolve()
    if str(model) == "demo":
        return DEMO_MODEL
    return Path(model).expanduser().resolve()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"local:{os.getpid()}"


def _fmt(value: float) -> str:
    return repr(float(value))


def _error_row(slide: str, classes: list[str], model: dict, message: str, worker: str) -> dict:
    row = dict.fromkeys(csv_columns(classes), "")
    row.update(
        slide=slide,
        name=Path(slide).name,
        model_path=model["path"],
        model_sha256=model["sha256"],
        model_kind=model["kind"],
        napari_zoomin=__version__,
        worker=worker,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        error=" ".join(message.split()) or "unknown error",
    )
    return row


def classify_task(
    slide: str,
    model: dict,
    classes: list[str],
    options: dict,
    outputs: str | None = None,
) -> dict:
    """One slide on a worker: classify and return its CSV row (never raises).

    ``model`` is ``{"path", "sha256", "kind"}``; ``options`` the keyword arguments
    of :func:`~napari_zoomin.engine.inference.classify` (``draws``, ``seed``,
    ``device``, ``mode``, ``tissue``; ``device`` is resolved on the worker, ``"auto"``
    included, and the worker's model cache is keyed by the resolved device).  With
    ``outputs``, the slide's files (:func:`~napari_zoomin.engine.results.write_outputs`)
    go to ``outputs/<file name with dots as underscores>``.
    """
    worker = _worker_name()
    try:
        from .checkpoints import load_model
        from .inference import classify
        from .results import write_outputs
        from .runtime import resolve_device

        # resolved here, on the worker ("auto" is this worker's CUDA, else its CPU)
        device = resolve_device(options.get("device", "cpu"))
        key = (model["path"], model["sha256"], str(device))
        ckpt = _MODELS.get(key)
        if ckpt is None:
            ckpt = load_model(model["path"], device)
            if ckpt.sha256 != model["sha256"]:
                raise CheckpointError(
                    model["path"],
                    "changed while the batch was running (its SHA-256 differs).",
                    "Run the batch again with one model file.",
                )
            _MODELS.clear()  # one model per worker process at a time
            _MODELS[key] = ckpt
        result = classify(slide, ckpt, **{**options, "device": device})
        if outputs is not None:
            write_outputs(result, Path(outputs) / Path(slide).name.replace(".", "_"))
        row = dict.fromkeys(csv_columns(classes), "")
        row.update(
            slide=slide,
            name=Path(slide).name,
            label=result.label,
            places=result.evidence.get("places", ""),
            warnings=" | ".join(result.warnings),
            pixels_decoded=result.pixels_decoded,
            pixels_needed=result.pixels_needed,
            pixels_read=result.pixels_read,
            decode_ratio=_fmt(result.decode_ratio),
            seconds=_fmt(result.seconds),
            draws=result.draws,
            mode=result.mode,
            seed=result.seed,
            device=result.device,
            model_path=model["path"],
            model_sha256=result.model_sha256,
            model_kind=result.model_kind,
            napari_zoomin=result.versions["napari_zoomin"],
            torch=result.versions["torch"],
            python=result.versions["python"],
            worker=worker,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            error="",
        )
        for c in classes:
            row[f"p_{c}"] = _fmt(result.probabilities[c])
            row[f"spread_{c}"] = _fmt(result.spread[c])
        return row
    except Exception as exc:  # recorded in the CSV; the batch goes on
        return _error_row(slide, classes, model, f"{type(exc).__name__}: {exc}", worker)


# --------------------------------------------------------------------------- CSV


def _read_rows(path: Path) -> tuple[list[str] | None, list[dict]]:
    if not path.is_file() or path.stat().st_size == 0:
        return None, []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _append_row(path: Path, columns: list[str], row: dict) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow(row)
        fh.flush()
        os.fsync(fh.fileno())


def _compact(path: Path, columns: list[str]) -> None:
    """One row per slide (the last one written), sorted by path, replaced atomically."""
    _, rows = _read_rows(path)
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["slide"]] = row
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for slide in sorted(latest):
            writer.writerow(latest[slide])


# --------------------------------------------------------------------------- batch


def run_batch(
    folder: str | os.PathLike,
    model,
    out_csv: str | os.PathLike,
    *,
    scheduler: str | None = None,
    workers: int = 2,
    draws: int = 16,
    seed: int = 0,
    device: str = "cpu",
    mode: str = "sample",
    tissue: str | None = "auto",
    pattern: str | None = None,
    recursive: bool = False,
    outputs: str | os.PathLike | None = None,
    progress: Callable[[float, str], None] | None = None,
    mpp: float | None = None,
):
    """Classify every slide in ``folder`` with ``model``; one row per slide in ``out_csv``.

    Args:
        folder: the slides (see :func:`discover_slides` for ``pattern``/``recursive``).
        model: ``"demo"``, a checkpoint path, or a loaded ``Checkpoint`` (its file is
            what the workers load).
        out_csv: the results table; rows are appended as slides finish.  Slides with
            a row without error (same model) are skipped; failed ones are retried.
        scheduler: a ``dask.distributed`` scheduler address (``"tcp://host:8786"``);
            ``None`` starts a LocalCluster of ``workers`` processes, one thread each.
        draws, seed, device, mode, tissue: as in :func:`~napari_zoomin.engine.classify`
            (each slide gets the same seed, so results do not depend on the order).
        outputs: optional folder for each slide's result files.
        mpp: every slide's pixel size in µm, overriding or supplying the files' (as
            ``classify``'s ``mpp``); ``None`` uses each file's own.
        progress: ``progress(fraction, message)`` after each slide.

    Returns:
        The whole table (this run and earlier ones) as a ``pandas.DataFrame``, one row
        per slide: path, label, ``p_<class>``, ``spread_<class>``, pixels decoded /
        needed / read, seconds, model path / SHA-256 / kind, versions, worker, and
        ``error`` (empty on success).

    Raises:
        ZoominError: no slides, an unreadable model, or a CSV written for another model.
    """
    import pandas as pd

    from .checkpoints import read_checkpoint_info
    from .results import check_output_path

    _check_options(draws, seed, workers, device, scheduler)
    given = isinstance(model, str | os.PathLike) and str(model) != "demo"
    model_inputs = [model] if given else []
    out_csv = check_output_path(out_csv, folder=False, inputs=model_inputs).resolve()
    if outputs is not None:
        check_output_path(outputs, folder=True, what="outputs", inputs=model_inputs)
    slides = discover_slides(folder, pattern, recursive)
    if not slides:
        raise ZoominError(
            Path(folder),
            "holds no slides"
            + (f" matching {pattern!r}" if pattern else "")
            + f" (looked for {', '.join(SLIDE_EXTENSIONS)}).",
            "Check the folder, or pass --pattern.",
        )
    model_path = _resolve_model(model)
    info = read_checkpoint_info(model_path)  # refuses a damaged or foreign file early
    classes = list(info.get("classes", []))
    model_desc = {
        "path": str(model_path),
        "sha256": _file_sha256(model_path),
        "kind": str(info.get("kind")),
    }
    columns = csv_columns(classes)
    if any(out_csv == p.resolve() for p in slides):
        raise ZoominError(out_csv, "is one of the slides; --out would overwrite it.")

    try:
        header, rows = _read_rows(out_csv)
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise ZoominError(
            out_csv,
            f"is not a results table ({type(exc).__name__}); --out would overwrite it.",
            "Write this batch to another file.",
        ) from None
    if header is not None and header != columns:
        raise ZoominError(
            out_csv,
            "was written with other columns (another model's classes, or not a results table).",
            "Write this batch to another file.",
        )
    others = {r["model_sha256"] for r in rows} - {model_desc["sha256"]}
    if others:
        raise ZoominError(
            out_csv,
            f"holds results of another model (SHA-256 {sorted(others)[0][:12]}…).",
            "Write this batch to another file, or use that model.",
        )
    done = {r["slide"] for r in rows if not r.get("error")}
    todo = [str(p.resolve()) for p in slides if str(p.resolve()) not in done]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    options = {"draws": draws, "seed": seed, "device": device, "mode": mode, "tissue": tissue}
    if mpp is not None:
        options["mpp"] = float(mpp)
    if progress is not None:
        progress(0.0, f"{len(todo)} of {len(slides)} slides to classify")

    if todo:
        _run(
            todo,
            model_desc,
            classes,
            options,
            outputs,
            out_csv,
            columns,
            scheduler,
            workers,
            progress,
        )
    _compact(out_csv, columns)
    table = pd.read_csv(out_csv, dtype={"error": str, "label": str})
    table[["label", "error"]] = table[["label", "error"]].fillna("")
    return table


def _run(
    todo, model_desc, classes, options, outputs, out_csv, columns, scheduler, workers, progress
) -> None:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(
            n_workers=max(1, int(workers)),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    else:
        client = Client(scheduler, timeout="10s")
    outputs = None if outputs is None else str(Path(outputs).expanduser().resolve())
    try:
        futures = {
            client.submit(
                classify_task, slide, model_desc, classes, options, outputs, pure=False
            ): slide
            for slide in todo
        }
        for n, future in enumerate(as_completed(futures), start=1):
            slide = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # the worker died (e.g. a decoder crash)
                row = _error_row(slide, classes, model_desc, f"{type(exc).__name__}: {exc}", "")
            _append_row(out_csv, columns, row)
            if progress is not None:
                what = f"failed: {row['error']}" if row["error"] else row["label"]
                progress(n / len(todo), f"{Path(slide).name}: {what}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
