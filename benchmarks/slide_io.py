"""Slide I/O benchmark: open, first screenshot, region reads and memory on a huge slide.

    xvfb-run -a .venv/bin/python -m benchmarks.slide_io [--size 100000] [--backends ...]

Writes (once, into the napari-zoomin cache) a pyramidal JPEG-tiled sample
slide of ``--size``² pixels, then measures each backend in its own process
(so peak resident memory is that backend's alone), side by side:

* open: ``open_slide`` + dask pyramid + adding the layer to a shown viewer, once
  in a fresh process (imports and napari's unit registry included) and once more
  in the warmed-up process (what opening a slide in a running napari costs);
* first screenshot: until napari has drawn the whole-slide view;
* pan/zoom: screenshots at full resolution at random places (the viewing peak RSS);
* a 1024² region at level 0: cold (a never-read place) and warm (the same place again);
* a whole low level (the coarsest level at least 1024 px on a side).

Targets (issue 2): open < 0.5 s, 1024² level-0 region < 50 ms warm, peak RSS
while viewing < 1 GB.  Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks._measure import peak_rss_mb

TARGETS = {"open_s": 0.5, "region_warm_ms": 50.0, "viewing_peak_rss_mb": 1024.0}


def ensure_slide(size: int) -> tuple[Path, float | None]:
    """The benchmark slide, written once (returns its path and the write time if written)."""
    from napari_zoomin.paths import cache_dir
    from napari_zoomin.samples import write_sample_slide

    path = cache_dir("bench") / f"bench-{size}.tif"
    if path.exists():
        return path, None
    start = time.perf_counter()
    write_sample_slide(path, size=size, label="positive", seed=0)
    return path, time.perf_counter() - start


def measure(path: Path, backend: str, viewer: bool, repeats: int = 5) -> dict:
    """All measurements for one backend, in this process."""
    import numpy as np

    result: dict = {"backend": backend}
    rng = np.random.default_rng(0)
    if viewer:
        import napari

        from napari_zoomin.napari.layers import slide_layer_kwargs

        v = napari.Viewer(show=True)
        v.window.resize(1200, 900)
        _process_events()
    from napari_zoomin import open_slide

    start = time.perf_counter()
    slide = open_slide(path, backend=backend)
    pyramid = slide.pyramid()
    if viewer:
        layer = v.add_image(pyramid, **slide_layer_kwargs(slide))
    result["first_open_s"] = time.perf_counter() - start
    # the same again in the warmed-up process (libraries imported, napari's unit
    # registry built): what opening another slide in a running napari costs
    start = time.perf_counter()
    again = open_slide(path, backend=backend)
    if viewer:
        v.layers.remove(v.add_image(again.pyramid(), **slide_layer_kwargs(again)))
    else:
        again.pyramid()
    result["open_s"] = time.perf_counter() - start
    again.close()
    if viewer:
        start = time.perf_counter()
        v.reset_view()
        v.screenshot(canvas_only=True, flash=False)
        result["first_screenshot_s"] = time.perf_counter() - start
        rows, cols = slide.shape
        times = []
        for _ in range(repeats):
            y, x = rng.integers(0, rows), rng.integers(0, cols)
            start = time.perf_counter()
            v.camera.center = (y * layer.scale[0], x * layer.scale[1])
            v.camera.zoom = 1.0 / layer.scale[0]  # one screen pixel per level-0 pixel
            v.screenshot(canvas_only=True, flash=False)
            times.append(time.perf_counter() - start)
        result["zoomed_screenshot_s"] = statistics.median(times)
        result["viewing_peak_rss_mb"] = peak_rss_mb()
    rows, cols = slide.shape
    cold, warm = [], []
    for _ in range(repeats):
        y, x = int(rng.integers(0, rows - 1024)), int(rng.integers(0, cols - 1024))
        start = time.perf_counter()
        slide.read(0, y, x, 1024, 1024)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        slide.read(0, y, x, 1024, 1024)
        warm.append(time.perf_counter() - start)
    result["region_cold_ms"] = 1000 * statistics.median(cold)
    result["region_warm_ms"] = 1000 * statistics.median(warm)
    low = max(i for i, s in enumerate(slide.level_shapes) if min(s) >= 1024)
    start = time.perf_counter()
    slide.read(low, 0, 0, *slide.level_shapes[low])
    result["low_level"] = f"{low} ({slide.level_shapes[low][0]}x{slide.level_shapes[low][1]})"
    result["low_level_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    if viewer:
        v.close()
    slide.close()
    return result


def _process_events() -> None:
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()


def table(rows: list[dict]) -> str:
    """Markdown table, with each column's ratio to the first backend."""
    cols = [
        ("first_open_s", "first open in process (s)"),
        ("open_s", "open (s)"),
        ("first_screenshot_s", "first screenshot (s)"),
        ("zoomed_screenshot_s", "full-res screenshot (s)"),
        ("region_cold_ms", "1024² L0 cold (ms)"),
        ("region_warm_ms", "1024² L0 warm (ms)"),
        ("low_level_s", "whole low level (s)"),
        ("viewing_peak_rss_mb", "peak RSS viewing (MB)"),
        ("peak_rss_mb", "peak RSS (MB)"),
    ]
    head = "| backend | " + " | ".join(title for _, title in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    lines = [head, sep]
    base = rows[0]
    for r in rows:
        cells = []
        for key, _ in cols:
            if key not in r:
                cells.append("–")
                continue
            text = f"{r[key]:.3g}"
            if r is not base and base.get(key):
                text += f" (×{r[key] / base[key]:.2f})"
            cells.append(text)
        lines.append(f"| {r['backend']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--backends", nargs="+", default=["openslide", "tifffile"])
    parser.add_argument("--no-viewer", action="store_true", help="skip the napari part")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one backend, in its own process
        print(json.dumps(measure(Path(args.path), args.child, viewer=not args.no_viewer)))
        return 0

    path, wrote = ensure_slide(args.size)
    if wrote is not None:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {wrote:.1f} s")
    rows = []
    for backend in args.backends:
        cmd = [sys.executable, "-m", "benchmarks.slide_io", "--child", backend, "--path", str(path)]
        if args.no_viewer:
            cmd.append("--no-viewer")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"\n{args.size:,} × {args.size:,} px JPEG-tiled pyramid, {date.today()}, "
        f"{platform.machine()} {platform.processor() or ''}".rstrip()
    )
    print(table(rows))
    for r in rows:
        misses = [k for k, limit in TARGETS.items() if k in r and r[k] > limit]
        verdict = "meets the targets" if not misses else f"misses {', '.join(misses)}"
        print(f"{r['backend']}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
