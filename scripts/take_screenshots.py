"""Take the user guide's screenshots (``docs/images/*.png``) in a real napari window.

Every picture is the whole napari window (layer list, canvas, dock widget) after driving
the plugin's dock widgets the way a user would: buttons are clicked and workers are waited
for with the Qt event loop.  Run it under a virtual X server::

    xvfb-run -a python scripts/take_screenshots.py [--out docs/images] [--only NAME ...]

It uses the packaged demo model and the 40,000² sample slide (built into the cache on
first use, about 10 s), writes four 8192² sample slides for the training picture, and
takes about a minute on two cores (torch on one thread).  The warnings picture
classifies the real Aperio slide CMU-1-Small-Region.svs (fetched into the cache on first
use, or ``--cmu PATH``).  ``--only classify-warnings`` (a picture's file name without
``.png``; repeatable) takes only those pictures.  Inputs go to a fixed folder
under the temporary directory, removed at the end.  The cached sample slide is never
modified: the viewer opens a link (or copy) of it there, so the ROI widget's autosave
writes there too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")  # a real (virtual) screen, not offscreen

WINDOW_SIZE = (1400, 900)
#: the Train classifier form is taller than that
TRAIN_WINDOW_SIZE = (1400, 1100)
#: the warnings picture: room for the prediction, its warnings and the details in the dock
WARNINGS_WINDOW_SIZE = (1600, 1000)
#: the classification overview is this many times wider than the sub-tile's close-up
OVERVIEW_ZOOM_OUT = 4
#: where the inputs are written (removed first and at the end): a fixed name keeps the
#: paths shown in the pictures the same from run to run
WORK_FOLDER = Path(tempfile.gettempdir()) / "napari-zoomin-screenshots"
# ROIs drawn for the pictures are saved here, not into the user's own annotations folder
os.environ.setdefault("NAPARI_ZOOMIN_DATA", str(WORK_FOLDER / "user-data"))
#: a PNG larger than this is reduced to 256 colours, which these pictures survive well
MAX_PNG_BYTES = 400_000
PLUGIN = "napari-zoomin"
#: the pictures, by file name without ``.png`` (``--only``)
PICTURES = (
    "open-slide",
    "classify-slide",
    "classify-result",
    "classify-zoom",
    "classify-warnings",
    "train-widget",
    "roi-drawing",
)
#: the pictures of one classification
CLASSIFY_PICTURES = ("classify-slide", "classify-result", "classify-zoom")
#: the training picture's model: small, so that six epochs take seconds
SMALL_MODEL = {"feature_dim": 32, "feature_hidden": 64, "feature_channels": [16, 32]}


# --------------------------------------------------------------------------- Qt helpers


def settle(seconds: float = 0.5) -> None:
    """Let Qt deliver events (layers added, camera moved, repaints) for ``seconds``."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Run the Qt event loop until ``condition()`` holds; TimeoutError naming ``what``."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        QApplication.processEvents()
        time.sleep(0.02)


def new_viewer(title: str, size: tuple[int, int] = WINDOW_SIZE):
    """A shown napari viewer of ``size`` (width, height) with the scale bar on."""
    import napari

    viewer = napari.Viewer(title=title, show=True)
    viewer.window.resize(*size)
    viewer.canvas.overlays.scale_bar.visible = True
    settle(0.5)
    return viewer


def close_notifications(viewer) -> None:
    """Close the notification pop-ups (they would cover part of the canvas)."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for popup in viewer.window._qt_window.findChildren(NapariQtNotification):
        popup.close()


def save_window(viewer, path: Path) -> Path:
    """The whole window as a PNG, optimised; reduced to 256 colours if still large."""
    from PIL import Image

    close_notifications(viewer)
    settle(1.0)  # the last camera move's tiles are loaded and painted
    shot = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(np.asarray(shot)[..., :3])
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_PNG_BYTES:
        image.quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    print(f"{path}: {image.width} x {image.height}, {path.stat().st_size / 1e3:.0f} kB")
    return path


def dock(viewer, widget_name: str):
    """Open one of the plugin's dock widgets from the manifest, as the Plugins menu does."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, widget_name)
    settle(0.3)
    return widget


def look_at(viewer, slide_layer, top: float, left: float, height: float, width: float) -> None:
    """Point the camera at the level-0 box ``[top, left, height, width]`` of the slide."""
    from napari_zoomin.napari.roi_shapes import level0_to_world
    from napari_zoomin.napari.slide_layers import level0_frame

    frame = level0_frame(slide_layer)
    (sy, sx), _ = frame
    centre = level0_to_world([top + height / 2, left + width / 2], frame)
    canvas_h, canvas_w = viewer.canvas.size
    camera = viewer.scene.camera
    camera.center = (float(centre[0]), float(centre[1]))
    camera.zoom = min(canvas_h / (height * sy), canvas_w / (width * sx))


# --------------------------------------------------------------------------- inputs


def linked_sample(folder: Path) -> Path:
    """The cached 40,000² sample slide and its sidecars as ``sample-slide.*`` in ``folder``.

    A hard link (a copy where linking fails) keeps the cached files untouched when the
    ROI widget saves its edits beside the slide.
    """
    from napari_zoomin.samples import sample_slide_path

    cached = sample_slide_path(progress=print)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "sample-slide.tif"
    try:
        os.link(cached, target)
    except OSError:
        shutil.copyfile(cached, target)
    for suffix in (".geojson", ".json"):
        shutil.copyfile(cached.with_suffix(suffix), target.with_suffix(suffix))
    return target


def cmu_slide() -> Path:
    """The real CC0 Aperio slide CMU-1-Small-Region.svs, fetched into the cache once."""
    from napari_zoomin.samples import fetch_cmu_small_region

    return fetch_cmu_small_region()


def planted_tumours(slide_path: Path) -> list[tuple[int, int, int]]:
    """``(top, left, side)`` of the sample slide's planted tumour regions (recipe sidecar)."""
    regions = json.loads(slide_path.with_suffix(".json").read_text())["regions"]
    return [(r["y"], r["x"], r["box"]) for r in regions if r["kind"] == "Tumor"]


def training_slides(folder: Path) -> Path:
    """Four 8192² sample slides (a positive and a negative to train on, two to validate
    on) and their labels CSV."""
    from napari_zoomin.samples import write_sample_slide

    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        ("case-01", "positive", "train"),
        ("case-02", "negative", "train"),
        ("case-03", "positive", "val"),
        ("case-04", "negative", "val"),
    ]
    for seed, (name, label, _) in enumerate(rows, start=31):
        write_sample_slide(folder / f"{name}.tif", size=8192, label=label, seed=seed, tile=256)
    lines = ["slide,label,split", *(",".join(row) for row in rows)]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


# --------------------------------------------------------------------------- pictures


def open_slide_picture(slide_path: Path, out: Path) -> None:
    viewer = new_viewer("napari-zoomin: open a slide")
    viewer.open(slide_path, plugin=PLUGIN)
    viewer.reset_view()
    save_window(viewer, out / "open-slide.png")
    viewer.close()


def classified(title: str, slide_path: Path, *size):
    """A viewer with ``slide_path`` classified by the demo model in the Classify slide dock."""
    viewer = new_viewer(title, *size)
    viewer.open(slide_path, plugin=PLUGIN)
    widget = dock(viewer, "Classify slide")
    if widget.model_choice.value != "demo":
        raise RuntimeError(f"the model chosen is {widget.model_choice.value!r}, not the demo")
    widget.classify_button.native.click()
    wait_until(lambda: not widget.running, 300, "the classification")
    if widget.result is None:
        raise RuntimeError(f"classification failed: {widget.status.value}")
    print(widget.summary.value)
    return viewer, widget


def classify_pictures(slide_path: Path, out: Path) -> None:
    """Classify with the demo model: the whole slide, around a place, and the place at
    full resolution."""
    viewer, widget = classified("napari-zoomin: classify a slide", slide_path)

    # the whole slide as the result arrives: the overview and the numbered markers
    viewer.reset_view()
    settle(0.5)
    save_window(viewer, out / "classify-slide.png")

    # the place on a planted tumour (the demo model also looks at the look-alike
    # distractors), selected in the table as a user would
    tumours = planted_tumours(slide_path)

    def on_tumour(region) -> bool:
        cy, cx = region[0] + region[2] / 2, region[1] + region[3] / 2
        return any(t <= cy < t + s and x <= cx < x + s for t, x, s in tumours)

    from napari_zoomin.engine.places import places

    # the best-ranked place whose heaviest sub-tile lies on a tumour, chosen in the table
    ranked = places(widget.result)[: widget.place_table.shape[0]]
    subtiles = widget.result.subtiles
    row = next((i for i, p in enumerate(ranked) if on_tumour(subtiles[p.subtiles[0]]["region"])), 0)
    print(f"showing place rank {row + 1}: {ranked[row].share:.1f} % of the evidence")
    widget.place_table.native.selectRow(row)
    settle(0.5)
    camera = viewer.scene.camera
    centre, zoom = tuple(camera.center), camera.zoom

    # zoomed out around it: the drawn tiles, both attention maps and the sub-tiles
    viewer.layers.selection.active = viewer.layers["stage-1 attention"]
    camera.zoom = zoom / OVERVIEW_ZOOM_OUT
    save_window(viewer, out / "classify-result.png")

    # the place at full resolution with every layer as it comes (nothing hidden by hand):
    # thin outlines, half-opaque stage-2 attention, the overview hidden by the zoom
    camera.center, camera.zoom = centre, zoom
    viewer.layers.selection.active = viewer.layers["sampled sub-tiles"]
    save_window(viewer, out / "classify-zoom.png")
    viewer.close()


def classify_warnings_picture(slide_path: Path, out: Path) -> None:
    """The real CMU-1-Small-Region slide classified with the demo model: the prediction
    and, right below it in amber, the warnings (the demo model's "not for diagnosis")."""
    title = "napari-zoomin: when not to trust a result"
    viewer, widget = classified(title, slide_path, WARNINGS_WINDOW_SIZE)
    if not widget.warnings.visible:
        raise RuntimeError("the result shows no warning")
    print(widget.warnings.value)
    viewer.layers.selection.active = viewer.layers["stage-1 attention"]
    viewer.reset_view()
    save_window(viewer, out / "classify-warnings.png")
    viewer.close()


def train_picture(slides: Path, out: Path, model_dir: Path) -> None:
    """A short run of a small model on four sample slides, from a folder and a CSV."""
    from napari_zoomin.napari.train_widget import FROM_FOLDER

    viewer = new_viewer("napari-zoomin: train a classifier", TRAIN_WINDOW_SIZE)
    viewer.open(slides / "case-01.tif", plugin=PLUGIN)
    viewer.reset_view()
    widget = dock(viewer, "Train classifier")
    widget.source.value = FROM_FOLDER
    widget.slides_dir.value = slides
    widget.labels_csv.value = slides / "labels.csv"
    widget.epochs.value = 6
    widget.batch_size.value = 2
    widget.lr.value = "1e-3"
    widget.n_samples.value = 8
    widget.view_scale.value = "1/16"
    widget.stage2_scale.value = "1/4"
    widget.tile_size.value = 128
    widget.subtile_size.value = 32
    widget.other_settings.value = json.dumps(SMALL_MODEL)
    widget.other_settings.native.setCursorPosition(0)
    widget.train_button.native.setFocus()  # no field shows a text cursor or selection
    widget.device.value = "cpu"
    widget.out_path.value = model_dir / "my-model.safetensors"
    widget.train_button.native.click()
    wait_until(lambda: widget.worker is None, 240, "the training run")
    if widget.result is None:
        raise RuntimeError(f"training failed: {widget.status.value}")
    save_window(viewer, out / "train-widget.png")
    viewer.close()


def roi_picture(slide_path: Path, out: Path) -> None:
    """The sample's planted regions as the read-only answer-key layer, and three shapes
    drawn by the user around its tumours (a polygon, a rectangle, an ellipse) labelled
    Tumor in the user's own ROI layer."""
    from napari_zoomin.napari.roi_shapes import level0_to_world
    from napari_zoomin.napari.slide_layers import level0_frame

    viewer = new_viewer("napari-zoomin: ROI annotations")
    (slide,) = viewer.open(slide_path, plugin=PLUGIN)
    widget = dock(viewer, "ROI annotations")
    shapes = widget.shapes_layer
    frame = level0_frame(slide)

    def data_of(points_yx):
        """Level-0 points as the shapes layer's data, through napari's world mapping."""
        world = level0_to_world(np.asarray(points_yx, float), frame)
        return np.array([shapes.world_to_data(p) for p in world])

    centres = [(top + side / 2, left + side / 2) for top, left, side in planted_tumours(slide_path)]
    (y0, x0), (y1, x1), (y2, x2) = centres[:3]
    half = 900.0  # drawn shapes are coarse: about 900 µm across around a 50-80 µm tumour
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = half * (1 + 0.15 * np.sin(3 * angles) + 0.08 * np.cos(5 * angles + 1))
    shapes.add_polygons([data_of(np.c_[y0 + radii * np.sin(angles), x0 + radii * np.cos(angles)])])
    shapes.add_rectangles(data_of([[y1 - 0.8 * half, x1 - half], [y1 + 0.8 * half, x1 + half]]))
    top, bottom, left, right = y2 - 0.7 * half, y2 + 0.7 * half, x2 - half, x2 + half
    shapes.add_ellipses(data_of([[top, left], [top, right], [bottom, right], [bottom, left]]))
    wait_until(lambda: widget.status.value.startswith("Saved"), 10, "the ROI autosave")
    print(widget.status.value)

    ys, xs = [y for y, _ in centres[:3]], [x for _, x in centres[:3]]
    margin = 2.2 * half
    top, left = min(ys) - margin, min(xs) - margin
    look_at(viewer, slide, top, left, max(ys) + margin - top, max(xs) + margin - left)
    save_window(viewer, out / "roi-drawing.png")
    viewer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="PNG folder")
    parser.add_argument(
        "--only",
        action="append",
        choices=PICTURES,
        metavar="NAME",
        help=f"take only this picture (repeatable): one of {', '.join(PICTURES)}",
    )
    parser.add_argument(
        "--cmu",
        type=Path,
        help="CMU-1-Small-Region.svs for the warnings picture (default: fetched into the cache)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or PICTURES)

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    shutil.rmtree(WORK_FOLDER, ignore_errors=True)
    try:
        if wanted & {"open-slide", *CLASSIFY_PICTURES, "roi-drawing"}:
            sample = linked_sample(WORK_FOLDER / "sample")
        if "open-slide" in wanted:
            open_slide_picture(sample, args.out)
        if wanted & set(CLASSIFY_PICTURES):
            classify_pictures(sample, args.out)
        if "classify-warnings" in wanted:
            classify_warnings_picture(args.cmu or cmu_slide(), args.out)
        if "train-widget" in wanted:
            project = WORK_FOLDER / "my-project"
            train_picture(training_slides(project / "slides"), args.out, project / "models")
        # last: Train classifier saves every ROI widget's pending edits when it starts, and
        # an ROI widget of a closed viewer that Python has not collected yet cannot save
        if "roi-drawing" in wanted:
            roi_picture(sample, args.out)
    finally:
        shutil.rmtree(WORK_FOLDER, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
