"""One training epoch with the stage-1 view cache off, cold and warm (issue 18, item 1).

    .venv/bin/python -m benchmarks.view_cache [--slides 8] [--size 8192] [--threads 1]

Writes ``--slides`` sample slides (half positive, one tumour and one distractor each;
two for validation) into the napari-zoomin cache (once), then trains the demo recipe
(``scripts/train_demo_model.py`` ``CONFIG``, without its ROI pre-training, which would
fill the cache before the epoch) for one epoch three times in this process, in this
order: ``cache_views`` off; on with an empty cache (cold: every view decoded and
written); on again, a fresh run beside the same checkpoint (warm: every view from
disk).  Prints a Markdown table: the epoch's seconds, the history's
``slides_per_minute`` (training slides per minute of the epoch's wall time), and what
the cache served from disk and wrote.  ``--max-open`` (default 2) keeps fewer slides
open than there are, as a run over hundreds of slides does: without the cache a
reopened slide decodes its view again (an open slide keeps decoded tiles in memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch

from napari_zoomin.engine.dataset import SlideDataset
from napari_zoomin.engine.view_cache import view_cache_folder
from napari_zoomin.paths import cache_dir
from napari_zoomin.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def demo_config() -> dict:
    """The demo recipe, read from the committed script (not imported as a module path)."""
    spec = importlib.util.spec_from_file_location("_demo", ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.CONFIG)


def make_slides(folder: Path, n: int, size: int) -> Path:
    from napari_zoomin.samples import write_sample_slide

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        label = ("positive", "negative")[k % 2]
        split = "val" if k >= n - 2 else "train"
        path = folder / f"s{k:02d}-{label}-{size}.tif"
        if not (path.is_file() and path.with_suffix(".geojson").is_file()):
            write_sample_slide(
                path, size=size, label=label, seed=3000 + k, n_tumor=1, n_distractors=1
            )
        rows.append(f"{path.name},{label},{split}")
    csv = folder / "labels.csv"
    csv.write_text("slide,label,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return csv


def one_epoch(csv: Path, config: TrainConfig, out: Path, max_open: int) -> dict:
    dataset = SlideDataset.from_csv(
        csv,
        csv.parent,
        roi_labels=config.roi_labels,
        lookalike_labels=config.lookalike_labels,
        workers=config.num_workers,
        max_open=max_open,
    )
    with dataset:
        t0 = time.perf_counter()
        result = train(dataset, config, out, resume=False)
        wall = time.perf_counter() - t0
    (record,) = result.history
    stats = dataset.view_cache.stats if dataset.view_cache is not None else None
    return {
        "slides_per_minute": record["slides_per_minute"],
        "run_seconds": wall,
        "stats": stats,
        "val_loss": record["val_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--max-open",
        type=int,
        default=2,
        help="slides kept open (their decoded tiles in memory): fewer than the slides, as "
        "in a run over hundreds of slides",
    )
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: cache)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.out or cache_dir("bench-view-cache")
    csv = make_slides(work / f"slides-{args.size}", args.slides, args.size)
    settings = {**demo_config(), "epochs": 1, "pretrain_epochs": 0}
    out = work / "run" / "m.safetensors"
    shutil.rmtree(view_cache_folder(out), ignore_errors=True)
    rows = []
    for name, cache in (("off", False), ("cold", True), ("warm", True)):
        config = TrainConfig(**{**settings, "cache_views": cache})
        r = one_epoch(csv, config, out, args.max_open)
        rows.append((name, r))
        print(f"{name}: {r}", file=sys.stderr, flush=True)
    n_train = args.slides - 2
    print(
        f"\n{args.slides} sample slides of {args.size}² ({n_train} training, 2 validation), "
        f"demo recipe without pre-training, 1 epoch, {args.threads} thread(s), "
        f"{args.max_open} slides open at a time\n"
    )
    print("| view cache | epoch (s) | slides / min | views from disk | views decoded and written |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        epoch_s = n_train * 60 / r["slides_per_minute"]
        st = r["stats"]
        disk, written = ("-", "-") if st is None else (st.hits, st.written)
        print(f"| {name} | {epoch_s:.1f} | {r['slides_per_minute']:.1f} | {disk} | {written} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
