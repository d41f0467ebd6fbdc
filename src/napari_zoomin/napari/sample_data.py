"""npe2 sample-data contribution: the planted-region sample slide.

The first time, the 40,000² sample slide is built (a few seconds to tens of seconds,
more if CMU-1-Small-Region must be fetched first) and cached; later calls only open
it.  napari calls a sample function on its GUI thread and needs the layer data it
returns (``ViewerModel.open_sample`` refuses an empty answer), so in a running Qt
application :func:`sample_slide` builds the slide in a worker thread and keeps the
event loop turning (a local :class:`QEventLoop`) until the worker is done: the window
stays responsive and a progress bar in napari's activity dock says how far the
build is.  Without a Qt application (the CLI, scripts, the Python API) the build
runs synchronously, as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..samples import sample_slide_path
from ..samples.pyramid import Progress
from ..slide import open_slide
from .layers import slide_layer_data
from .slide_layers import show_scale_bar_when_added

#: side (level-0 pixels) of the sample slide napari's File > Open Sample gives
SAMPLE_SIZE = 40_000
#: resolution of the progress bar (its total)
PROGRESS_STEPS = 1000


def sample_slide(size: int = SAMPLE_SIZE) -> list[tuple]:
    """The default sample slide, built once into the user cache and reused.

    ``size`` (level-0 side in pixels) is for tests and scripts:
    ``viewer.open_sample("napari-zoomin", "sample_slide", size=8192)``.
    """
    if _gui_thread_with_viewer():
        data = _build_keeping_gui_alive(int(size))
    else:
        data = _sample_layer_data(int(size))
    show_scale_bar_when_added([data])
    return [data]


def _sample_layer_data(size: int, build_progress: Progress | None = None) -> tuple:
    """Build (once) and open the sample slide: its layer data (no Qt, any thread)."""
    path = sample_slide_path(size, build_progress=build_progress)
    return slide_layer_data(open_slide(path), name="sample slide")


def _gui_thread_with_viewer() -> bool:
    """True on the thread of a running Qt application that has a napari viewer."""
    if "qtpy" not in sys.modules:  # napari's Qt front end was never imported
        return False
    from qtpy.QtCore import QThread
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    if app is None or QThread.currentThread() is not app.thread():
        return False
    from napari import current_viewer

    return current_viewer() is not None


# builds under way, by size: a second Open Sample while one runs waits for the same build
_builds: dict[int, _Build] = {}


class _Build:
    """One sample-slide build in a napari worker thread, reported on the GUI thread."""

    def __init__(self, size: int):
        from napari.qt.threading import create_worker
        from qtpy.QtCore import QObject, Signal, Slot

        class Bridge(QObject):
            # emitted on the worker thread; delivered (queued) on the GUI thread
            progressed = Signal(float, str)

            def __init__(self, handler: Callable[[float, str], None]):
                super().__init__()
                self._handler = handler
                self.progressed.connect(self._relay)

            @Slot(float, str)
            def _relay(self, fraction: float, message: str) -> None:
                self._handler(fraction, message)

        self.size = size
        self.data: tuple | None = None
        self.error: BaseException | None = None
        self.done = False
        self.bar = None
        self._latest: tuple[float, str] | None = None
        self._showing = False
        self._closed = False
        self._bridge = Bridge(self._on_progress)
        self.worker = create_worker(
            _sample_layer_data,
            size,
            build_progress=self._bridge.progressed.emit,
            _start_thread=False,
        )
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self._loops: list = []

    # -- GUI thread ------------------------------------------------------------
    def _on_progress(self, fraction: float, message: str) -> None:
        self._latest = (fraction, message)
        if self._showing:  # napari's progress bar turns the event loop while it updates
            return
        self._showing = True
        try:
            shown = None
            while self._latest != shown and not self._closed:
                shown = self._latest
                self._show(*shown)
        finally:
            self._showing = False

    def _show(self, fraction: float, message: str) -> None:
        from napari.utils import progress

        if self.bar is None:  # only a real build shows a bar (a cached slide is instant)
            self.bar = progress(total=PROGRESS_STEPS)
        step = min(PROGRESS_STEPS, max(self.bar.n, round(fraction * PROGRESS_STEPS)))
        self.bar.set_description(f"Building the {self.size:,}² sample slide (once): {message}")
        self.bar.update(step - self.bar.n)

    def _close_bar(self) -> None:
        self._closed = True
        if self.bar is not None:
            self.bar.close()

    def _on_returned(self, data: tuple) -> None:
        self.data = data

    def _on_errored(self, error: BaseException) -> None:
        self.error = error

    def _on_finished(self) -> None:
        self.done = True
        _builds.pop(self.size, None)
        for loop in self._loops:
            loop.quit()

    def wait(self) -> tuple:
        """Turn the event loop until the build ends; its layer data, or its error raised."""
        from qtpy.QtCore import QEventLoop

        if not self.done:
            loop = QEventLoop()
            self._loops.append(loop)
            try:
                loop.exec()
            finally:
                self._loops.remove(loop)
        self._close_bar()
        if self.error is not None:
            raise self.error
        if self.data is None:  # the application quit while the slide was being built
            raise RuntimeError("the sample slide build was interrupted")
        return self.data


def _build_keeping_gui_alive(size: int) -> tuple:
    """Build (or find) and open the sample slide in a worker thread; the GUI keeps running."""
    build = _builds.get(size)
    if build is None:
        build = _builds[size] = _Build(size)
        build.worker.start()
    return build.wait()
