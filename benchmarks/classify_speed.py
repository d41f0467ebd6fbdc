"""Classification cost on a huge slide: Zoom-In vs one-stage ATS vs full tiling, side by side.

    .venv/bin/python -m benchmarks.classify_speed [--size 100000] [--model demo] [--n 100]

On a pyramidal JPEG-tiled sample slide of ``--size``² pixels (written once into
the napari-zoomin cache), each method runs in its own process (so its peak
resident memory is its own) after the model is loaded:

* **Zoom-In** (N = ``--n``): the model's own settings, ``classify`` with K = 1 draw;
* **ATS** (N = ``--n``): one stage, same view scale, patches of the Zoom-In
  sub-tile size drawn straight from the stage-1 attention (untrained weights: the
  cost does not depend on them);
* **tiling baseline**: every level-0 file tile that holds tissue is decoded and cut
  into sub-tile-size patches that all go through the same feature network, as
  tiling pipelines do.  It is timed on a seeded random sample of ``--tiling-sample``
  tissue tiles and extrapolated to all of them (the table says so); its decoded
  pixels are the exact count.

Reports wall time, peak RSS, decoded vs needed pixels and, on CUDA, peak allocated
memory.  Targets (issue 4, 2 CPU cores): Zoom-In < 5 s, peak < 1.5 GB, decoded
< 2× needed, ≥ 50× faster than tiling.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks._measure import peak_rss_mb

TARGETS = {"seconds": 5.0, "peak_rss_mb": 1536.0, "decode_ratio": 2.0}


def ensure_slide(size: int) -> Path:
    from napari_zoomin.paths import cache_dir
    from napari_zoomin.samples import write_sample_slide

    path = cache_dir("bench") / f"bench-{size}.tif"
    if not path.exists():
        write_sample_slide(path, size=size, label="positive", seed=0)
    return path


def _cuda_peak(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _timed_classify(path: Path, ckpt, device: str, method: str) -> dict:
    """One classification with K = 1 draw after the model is loaded: the table row."""
    from napari_zoomin import open_slide
    from napari_zoomin.engine.inference import classify

    slide = open_slide(path)
    start = time.perf_counter()
    result = classify(slide, ckpt, draws=1, seed=0, device=device)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "seconds": seconds,
        "pixels_decoded": result.pixels_decoded,
        "pixels_needed": result.pixels_needed,
        "decode_ratio": result.pixels_decoded / max(result.pixels_needed, 1),
        "timings": result.timings,
        "cuda_peak_mb": None,
        "device": result.device,
    }


def run_zoomin(path: Path, model_name: str, n: int, device: str) -> dict:
    from napari_zoomin.engine.checkpoints import load_model

    ckpt = load_model(model_name, device="cpu")
    ckpt.model.config.n_samples = n
    return _timed_classify(path, ckpt, device, f"Zoom-In (N={n})")


def run_ats(path: Path, model_name: str, n: int, device: str) -> dict:
    from napari_zoomin.engine.checkpoints import build_model, load_model, save_checkpoint

    zoomin = load_model(model_name, device="cpu")
    c = zoomin.model.config
    ats = build_model(
        "ats",
        {
            "view_scale": c.view_scale,
            "subtile_size": tuple(c.subtile_size),
            "n_samples": n,
            "replace": False,
            "feature_dim": c.feature_dim,
            "feature_hidden": c.feature_hidden,
            "num_classes": c.num_classes,
        },
    )
    ckpt_path = Path(tempfile.gettempdir()) / f"zoomin-bench-ats-{n}.safetensors"
    save_checkpoint(ckpt_path, ats, zoomin.classes)
    ckpt = load_model(ckpt_path)
    return _timed_classify(
        path, ckpt, device, f"ATS one-stage (N={n}, {c.subtile_size[0]} px patches)"
    )


def run_tiling(path: Path, model_name: str, sample_tiles: int, device: str) -> dict:
    import numpy as np
    import torch

    from napari_zoomin import open_slide
    from napari_zoomin.engine.checkpoints import load_model
    from napari_zoomin.engine.tissue import detect_tissue
    from napari_zoomin.models.device import select_device

    dev = select_device(device)
    ckpt = load_model(model_name, device=dev)
    feature = ckpt.model.feature
    ph, pw = ckpt.model.config.subtile_size
    slide = open_slide(path, cache_bytes=0)
    start = time.perf_counter()
    tissue = detect_tissue(slide)
    th, tw = slide.levels[0].tile
    grid = tissue.at_scale(1.0 / th).numpy()  # one cell per level-0 file tile (approx.)
    tissue_tiles = np.argwhere(grid)
    detect_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    chosen = tissue_tiles[
        rng.choice(len(tissue_tiles), min(sample_tiles, len(tissue_tiles)), False)
    ]
    slide.reset_decoded()
    start = time.perf_counter()
    with torch.no_grad():
        for ty, tx in chosen:
            tile = slide.read(0, int(ty) * th, int(tx) * tw, th, tw)
            t = torch.from_numpy(tile).permute(2, 0, 1).float().div(255)
            patches = t.unfold(1, ph, ph).unfold(2, pw, pw)  # (3, nh, nw, ph, pw)
            patches = patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, ph, pw)
            feature(patches.to(dev))
    per_tile = (time.perf_counter() - start) / len(chosen)
    total = detect_seconds + per_tile * len(tissue_tiles)
    return {
        "method": f"tiling baseline ({len(tissue_tiles)} tissue tiles, timed on {len(chosen)})",
        "seconds": total,
        "extrapolated": True,
        "pixels_decoded": len(tissue_tiles) * th * tw,
        "pixels_needed": len(tissue_tiles) * th * tw,
        "decode_ratio": 1.0,
        "cuda_peak_mb": _cuda_peak(dev),
        "device": str(dev),
    }


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| method | time (s) | × Zoom-In time | peak RSS (MB) | decoded (Mpx) | needed (Mpx) "
        "| decoded / needed | CUDA peak (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = f"{r['seconds']:.2f}" + (" (extrapolated)" if r.get("extrapolated") else "")
        cuda = "–" if r.get("cuda_peak_mb") is None else f"{r['cuda_peak_mb']:.0f}"
        lines.append(
            f"| {r['method']} | {t} | {r['seconds'] / base['seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['pixels_decoded'] / 1e6:.1f} | "
            f"{r['pixels_needed'] / 1e6:.1f} | {r['decode_ratio']:.2f} | {cuda} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiling-sample", type=int, default=40)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        path = Path(args.path)
        if args.child == "zoomin":
            row = run_zoomin(path, args.model, args.n, args.device)
        elif args.child == "ats":
            row = run_ats(path, args.model, args.n, args.device)
        else:
            row = run_tiling(path, args.model, args.tiling_sample, args.device)
        row["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(row))
        return 0

    path = ensure_slide(args.size)
    rows = []
    for child in ("zoomin", "ats", "tiling"):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.classify_speed",
            "--child",
            child,
            "--path",
            str(path),
            "--model",
            args.model,
            "--n",
            str(args.n),
            "--device",
            args.device,
            "--tiling-sample",
            str(args.tiling_sample),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"\n{args.size:,} × {args.size:,} px slide, model {args.model}, {date.today()}, "
        f"{platform.machine()}, device {rows[0]['device']}, {args.threads} torch thread(s)"
    )
    print(table(rows))
    z = rows[0]
    misses = [k for k, limit in TARGETS.items() if z.get(k, 0) > limit]
    speedup = rows[2]["seconds"] / z["seconds"]
    print(f"Zoom-In stage timings (s): {json.dumps(z.get('timings', {}))}")
    print(f"tiling / Zoom-In time: {speedup:.0f}x (target >= 50x)")
    print(
        "Zoom-In meets the targets"
        if not misses and speedup >= 50
        else f"Zoom-In misses: {', '.join(misses) or 'speed-up'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
