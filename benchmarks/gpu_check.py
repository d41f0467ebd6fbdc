"""The GPU check: what a CUDA card does with napari-zoomin, in one command, under 5 minutes.

    benchmarks/gpu_check.sh [--out OUT]            # or: python -m benchmarks.gpu_check

Run it the moment a GPU is there (nothing to install beyond ``make setup``).  It

1. runs the tests that need CUDA (``pytest -m cuda``; all skipped on a CPU);
2. classifies the ``--size``² sample slide (100,000² by default, written once into
   the napari-zoomin cache) with the demo model: time after the model is loaded,
   first call and a second one, and ``torch.cuda.max_memory_allocated`` next to the
   71.76 MB per slide the Zoom-In paper (000) reports;
3. times one training epoch of the default recipe on ``--train-slides`` sample
   slides of ``--train-size``², with mixed precision (AMP) and without;
4. prints a Markdown table and writes it, with the raw numbers as JSON, to ``--out``.

``--device cpu --quick`` runs every part but the CUDA tests on a CPU with tiny sizes:
the test suite does that, so the script cannot rot while no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

#: Zoom-In paper (000), Camelyon16: peak GPU memory per slide of its model
PAPER_PEAK_MB = 71.76


def _device(name: str):
    import torch

    from napari_zoomin.models.device import select_device

    dev = select_device(name)
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    return dev, label or platform.machine()


def cuda_tests(dev) -> dict:
    """``pytest -m cuda``: the tests a CPU machine skips."""
    if dev.type != "cuda":
        return {"part": "CUDA tests", "result": "not run: no CUDA device"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"part": "CUDA tests", "result": last, "returncode": done.returncode}


def _peak_reset(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev) -> float | None:
    import torch

    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**20


def classification(dev, size: int, model: str) -> list[dict]:
    """The demo model on the ``size``² sample slide: two calls, time and peak memory."""
    from benchmarks.classify_speed import ensure_slide
    from napari_zoomin import open_slide
    from napari_zoomin.engine.checkpoints import load_model
    from napari_zoomin.engine.inference import classify

    path = ensure_slide("sample", size)
    ckpt = load_model(model, device=dev)
    rows = []
    for call in ("first", "second"):
        with open_slide(path) as slide:
            _peak_reset(dev)
            start = time.perf_counter()
            result = classify(slide, ckpt, draws=1, seed=0, device=str(dev))
            seconds = time.perf_counter() - start
        rows.append(
            {
                "part": f"classify {size:,}² ({call} call)",
                "seconds": seconds,
                "peak_mb": _peak_mb(dev),
                "probability": result.probability,
                "decode_ratio": result.decode_ratio,
            }
        )
    return rows


def _cohort(n: int, size: int) -> list:
    """``n`` annotated sample slides of ``size``², half positive, in the cache."""
    from napari_zoomin.engine.dataset import SlideRecord
    from napari_zoomin.paths import cache_dir
    from napari_zoomin.samples import write_sample_slide

    folder = cache_dir("bench") / f"gpu-check-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(n):
        label = ("negative", "positive")[k % 2]
        path = folder / f"s{k}.tif"
        geojson = path.with_suffix(".geojson")
        if not (path.exists() and geojson.exists()):
            write_sample_slide(path, size=size, label=label, seed=900 + k)
        records.append(SlideRecord(path, label, k % 2, "train", geojson, k + 2))
    return records


def training(dev, n_slides: int, size: int, quick: bool, out: Path) -> list[dict]:
    """One epoch of the default recipe, with AMP and without (AMP is CUDA only)."""
    from napari_zoomin.engine.dataset import SlideDataset
    from napari_zoomin.models.device import mixed_precision
    from napari_zoomin.training import TrainConfig, train

    settings = {"epochs": 1, "device": str(dev), "pretrain_epochs": 0, "val_draws": 1}
    if quick:  # a few-thousand-parameter model: the plumbing, not the numbers
        settings.update(
            batch_size=2,
            view_scale=1 / 64,
            stage2_scale=1 / 4,
            tile_size=128,
            subtile_size=16,
            n_samples=4,
            feature_dim=8,
            feature_hidden=16,
            feature_channels=(4, 8),
            num_workers=1,
        )
    records = _cohort(n_slides, size)
    tissue: dict = {}
    rows = []
    for amp in (True, False):
        with (
            mixed_precision(amp),
            SlideDataset(records, ["negative", "positive"], tissue_masks=tissue) as data,
        ):
            ckpt = out / f"train-amp-{'on' if amp else 'off'}.safetensors"
            _peak_reset(dev)
            start = time.perf_counter()
            result = train(data, TrainConfig(**settings), ckpt, resume=False)
            seconds = time.perf_counter() - start
        epoch = result.history[-1]
        rows.append(
            {
                "part": f"train 1 epoch, {n_slides} slides of {size:,}², AMP "
                + ("on" if amp and dev.type == "cuda" else "off"),
                "seconds": seconds,
                "epoch_seconds": epoch.get("seconds"),
                "peak_mb": _peak_mb(dev),
                "train_loss": epoch.get("train_loss"),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| part | result | time (s) | CUDA peak (MB) |", "|---|---|---|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['part']} | {r['result']} | – | – |")
            continue
        if "probability" in r:
            what = f"p = {r['probability']:.3f}, decoded/needed {r['decode_ratio']:.2f}"
        else:
            what = f"loss {r['train_loss']:.3f}, epoch {r['epoch_seconds']:.1f} s"
        peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        lines.append(f"| {r['part']} | {what} | {r['seconds']:.2f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda:0, cpu")
    parser.add_argument("--size", type=int, default=100_000, help="classified slide's side")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--train-slides", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test's run)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.train_slides, args.train_size = 8192, 2, 8192

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    dev, card = _device(args.device)
    start = time.perf_counter()
    rows = [cuda_tests(dev)]
    rows += classification(dev, args.size, args.model)
    rows += training(dev, args.train_slides, args.train_size, args.quick, args.out)
    head = (
        f"{date.today()}, {card}, device {dev}, torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if dev.type == "cuda" else "")
        + f"; whole check {time.perf_counter() - start:.0f} s. "
        f"Zoom-In paper (000): {PAPER_PEAK_MB} MB GPU memory per slide."
    )
    text = head + "\n\n" + table(rows)
    print(text)
    (args.out / "gpu_check.md").write_text(text + "\n")
    (args.out / "gpu_check.json").write_text(
        json.dumps({"device": str(dev), "card": card, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
