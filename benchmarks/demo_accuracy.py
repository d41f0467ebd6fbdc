"""The demo model on fresh sample slides it never saw: accuracy, where it looked, time.

    .venv/bin/python -m benchmarks.demo_accuracy [--slides 50] [--model demo] [--out DIR]

Writes ``--slides`` sample slides (half positive, sizes cycling through ``--sizes``,
seeds from ``--first-seed``: the demo trains on seeds 1000–1095 and validates on
2000–2015) into ``--out`` (reused when there), classifies each with
:func:`napari_zoomin.engine.inference.classify` and the default options, as a user does, and
prints a Markdown table: accuracy, false positives and negatives, the share of
positive slides whose top-ranked sub-tile lies on a tumour, and the stage-1 mass on
the planted regions (tumours and distractors: what a 1/16 view can find).
Target (issue 18): at least 95 % right on 50 slides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CLASSES = ("negative", "positive")


def _write(job: tuple[str, int, str, int]) -> str:
    from napari_zoomin.samples import write_sample_slide

    path, size, label, seed = job
    if not (Path(path).is_file() and Path(path).with_suffix(".json").is_file()):
        write_sample_slide(path, size=size, label=label, seed=seed, n_tumor=1, n_distractors=1)
    return path


def fresh_jobs(
    folder: Path, count: int, sizes: list[int], first_seed: int
) -> list[tuple[str, int, str, int]]:
    """The fresh slides' ``(path, size, label, seed)``: half positive (positive first),
    sizes cycling in pairs (also used by ``benchmarks/magnet_slides.py``)."""
    jobs = []
    for k in range(count):
        label, size, seed = CLASSES[(k + 1) % 2], sizes[(k // 2) % len(sizes)], first_seed + k
        jobs.append(
            (str(folder / f"fresh-{k:03d}-{label}-{size}-seed{seed}.tif"), size, label, seed)
        )
    return jobs


def _on(box: list[float], regions: list[dict], kind: str) -> bool:
    """Whether the centre of a level-0 ``[top, left, h, w]`` box lies in a region's box."""
    cy, cx = box[0] + box[2] / 2, box[1] + box[3] / 2
    return any(
        r["kind"].lower() == kind
        and r["y"] <= cy < r["y"] + r["box"]
        and r["x"] <= cx < r["x"] + r["box"]
        for r in regions
    )


def _stage1_mass(result, regions: list[dict]) -> float:
    """The stage-1 attention mass whose cells lie in a planted region's box."""
    import numpy as np

    a = np.asarray(result.stage1_attention, dtype=np.float64)
    (oy, ox), (cy, cx) = result.stage1_origin, result.stage1_cell_size
    ys = oy + (np.arange(a.shape[0]) + 0.5) * cy
    xs = ox + (np.arange(a.shape[1]) + 0.5) * cx
    on = np.zeros(a.shape, bool)
    for r in regions:
        iy = (ys >= r["y"]) & (ys < r["y"] + r["box"])
        ix = (xs >= r["x"]) & (xs < r["x"] + r["box"])
        on |= iy[:, None] & ix[None, :]
    return float(a[on].sum() / max(a.sum(), 1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=50)
    parser.add_argument("--sizes", default="8192,12288")
    parser.add_argument("--first-seed", type=int, default=5000)
    parser.add_argument("--model", default="demo", help="'demo' or a checkpoint file")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="slides folder (cache by default)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    from napari_zoomin.engine.checkpoints import load_model
    from napari_zoomin.engine.inference import classify
    from napari_zoomin.paths import cache_dir

    folder = args.out or cache_dir("bench") / "demo-accuracy"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [int(v) for v in args.sizes.split(",")]
    jobs = fresh_jobs(folder, args.slides, sizes, args.first_seed)
    t = time.perf_counter()
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(_write, jobs))
    print(f"{len(jobs)} slides ready in {time.perf_counter() - t:.0f} s: {folder}", flush=True)

    ckpt = load_model(args.model)
    rows = []
    for path, size, label, seed in jobs:
        regions = json.loads(Path(path).with_suffix(".json").read_text())["regions"]
        t = time.perf_counter()
        result = classify(path, ckpt, draws=args.draws)
        seconds = time.perf_counter() - t
        top = result.subtiles[0]["region"] if result.subtiles else None
        rows.append(
            {
                "slide": Path(path).name,
                "size": size,
                "seed": seed,
                "label": label,
                "predicted": result.label,
                "p_positive": result.probabilities["positive"],
                "top_on_tumour": bool(top is not None and _on(top, regions, "tumor")),
                "top_on_distractor": bool(top is not None and _on(top, regions, "distractor")),
                "stage1_on_planted": _stage1_mass(result, regions),
                "seconds": seconds,
            }
        )
        r = rows[-1]
        where = "tumour" if r["top_on_tumour"] else "other"
        where = "distractor" if r["top_on_distractor"] else where
        print(
            f"{r['slide']}: {r['predicted']} (p+ {r['p_positive']:.2f}), top sub-tile on {where}"
            f", stage-1 on planted {r['stage1_on_planted']:.2f}, {seconds:.1f} s",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows, args))
    return 0


def table(rows: list[dict], args) -> str:
    n = len(rows)
    right = sum(r["label"] == r["predicted"] for r in rows)
    pos = [r for r in rows if r["label"] == "positive"]
    neg = [r for r in rows if r["label"] == "negative"]
    fp = sum(r["predicted"] == "positive" for r in neg)
    fn = sum(r["predicted"] == "negative" for r in pos)
    top = sum(r["top_on_tumour"] for r in pos)
    mass = sum(r["stage1_on_planted"] for r in rows) / max(n, 1)
    secs = sum(r["seconds"] for r in rows) / max(n, 1)
    return "\n".join(
        [
            f"model {args.model}, {n} fresh slides (seeds {args.first_seed}–"
            f"{args.first_seed + n - 1}, sizes {args.sizes}), {args.draws} draws",
            "",
            "| slides | right | accuracy | false positives | false negatives | "
            "positives whose top sub-tile is on a tumour | stage-1 mass on planted regions | "
            "seconds per slide |",
            "|---|---|---|---|---|---|---|---|",
            f"| {n} | {right} | {right / max(n, 1):.1%} | {fp} / {len(neg)} | {fn} / {len(pos)} | "
            f"{top} / {len(pos)} | {mass:.2f} | {secs:.1f} |",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
