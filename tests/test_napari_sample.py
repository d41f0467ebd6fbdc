"""File > Open Sample: the first build runs in a worker thread, with progress, while the
GUI keeps turning; without a viewer the build is synchronous (under Xvfb)."""

from __future__ import annotations

import itertools
import time

import pytest

napari = pytest.importorskip("napari")

pytestmark = pytest.mark.viewer

#: big enough that a build on the GUI thread would freeze it for over a second
SIZE = 16_384


def _forget_cached(size: int) -> None:
    from napari_zoomin.paths import cache_dir

    for f in cache_dir("samples").glob(f"sample-positive-{size}-seed0-*"):
        f.unlink()


def test_first_open_sample_keeps_the_gui_turning_and_shows_progress(make_napari_viewer, cmu_svs):
    from napari.utils.progress import progress
    from qtpy.QtCore import QTimer

    _forget_cached(SIZE)
    viewer = make_napari_viewer(show=True)
    ticks: list[float] = []
    values: list[tuple[float, int]] = []
    bars: list = []

    def on_bars(event) -> None:
        for bar in event.added:
            bars.append(bar)
            bar.events.value.connect(lambda e: values.append((time.perf_counter(), e.value)))

    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    progress._all_instances.events.changed.connect(on_bars)
    try:
        timer.start()
        t0 = time.perf_counter()
        layers = viewer.open_sample("napari-zoomin", "sample_slide", size=SIZE)
        t1 = time.perf_counter()
    finally:
        timer.stop()
        progress._all_instances.events.changed.disconnect(on_bars)

    (layer,) = layers
    assert layer.multiscale and layer.rgb and layer.data[0].shape == (SIZE, SIZE, 3)
    assert layer.metadata["mpp"] == [0.499, 0.499]
    assert viewer.canvas.overlays.scale_bar.visible  # the sample slide is in micrometres

    # one progress bar, counting up to its end, closed when the slide is in
    assert len(bars) == 1 and not progress._all_instances
    counts = [v for _, v in values]
    assert counts == sorted(counts) and counts[-1] == bars[0].total
    assert len(set(counts)) >= 10, counts  # steps, then every level-0 tile row

    # the event loop kept turning while the slide was built: until the last progress
    # value (what comes after is napari adding the layer, as for a cached slide)
    built = values[-1][0]
    during = [t0, *(t for t in ticks if t0 < t <= built), built]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert built - t0 > 1.0, "the build was too quick to test that the GUI keeps turning"
    assert len(during) > (built - t0) / 0.2, f"{len(during)} ticks in {built - t0:.1f} s"
    assert max(gaps) < 1.0, f"largest gap {max(gaps):.2f} s in a {t1 - t0:.1f} s open"

    # the second time the slide is cached: no bar, same file
    (again,) = viewer.open_sample("napari-zoomin", "sample_slide", size=SIZE)
    assert again.metadata["path"] == layer.metadata["path"] and len(bars) == 1


def test_without_a_viewer_the_sample_is_built_synchronously(cmu_svs):
    from napari.utils.progress import progress

    from napari_zoomin.napari import sample_data

    size = 8192
    _forget_cached(size)
    assert napari.current_viewer() is None
    ((data, meta, kind),) = sample_data.sample_slide(size=size)
    assert kind == "image" and data[0].shape == (size, size, 3)
    assert meta["metadata"]["mpp"] == [0.499, 0.499]
    assert not progress._all_instances and not sample_data._builds
