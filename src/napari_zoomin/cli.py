"""The ``zoomin`` command line.

Every user-facing failure is a :class:`~napari_zoomin.errors.ZoominError`; it is
printed as one line and the command exits with status 1 (argparse's usage
errors exit with 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ZoominError


def _cmd_info(args: argparse.Namespace) -> int:
    from .slide import open_slide

    with open_slide(args.path, backend=args.backend) as slide:
        print(json.dumps(slide.info(), indent=2))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .slide.synthetic import write_sample_slide

    start = time.perf_counter()
    try:
        info = write_sample_slide(args.out, size=args.size, label=args.label, seed=args.seed)
    except ValueError as err:  # a size too small for the recipe, and the like
        raise ZoominError(args.out, f"cannot write the sample slide: {err}") from err
    seconds = time.perf_counter() - start
    print(
        f"wrote {info.path} ({args.size:,} x {args.size:,} px, {args.label}, seed {args.seed}) "
        f"and its ROIs {info.geojson_path} in {seconds:.1f} s"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .slide import open_slide
    from .slide.synthetic import sample_slide_path

    start = time.perf_counter()
    path = sample_slide_path()
    print(f"sample slide: {path} (ready in {time.perf_counter() - start:.1f} s)")
    with open_slide(path) as slide:
        print(json.dumps(slide.info(), indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("Open it in napari with:  napari --plugin napari-zoomin " + str(path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoomin",
        description="Classify gigapixel slides from a few attended sub-tiles (Zoom-In network).",
    )
    parser.add_argument("--version", action="version", version=f"napari-zoomin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a slide's facts as JSON")
    info.add_argument("path", help="slide or image file")
    info.add_argument(
        "--backend", choices=["openslide", "tifffile", "array"], help="force a reading library"
    )
    info.set_defaults(func=_cmd_info)

    sample = sub.add_parser(
        "sample", help="write a sample slide with planted tiny regions (and its ROI GeoJSON)"
    )
    sample.add_argument("--out", required=True, help="output .tif path")
    sample.add_argument("--size", type=int, default=40_000, help="side in pixels (default 40000)")
    sample.add_argument("--label", choices=["positive", "negative"], default="positive")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_cmd_sample)

    demo = sub.add_parser("demo", help="build the sample slide and run the main job on it")
    demo.add_argument("--out", default="demo-out", help="output folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ZoominError as err:
        print(f"zoomin: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("zoomin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
