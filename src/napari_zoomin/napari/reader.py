"""npe2 reader contribution: open a slide as one multiscale RGB image layer.

A DICOM slide is a folder of ``.dcm`` instances: the manifest accepts directories, so
dropping the folder on the viewer (or any one of its ``.dcm`` files) opens the slide.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ZoominError
from ..slide import SLIDE_EXTENSIONS, open_slide, slide_of
from .layers import slide_layer_data


def _is_ours(path: str | Path) -> bool:
    """A file with a slide extension, or a folder holding a DICOM slide (other folders
    are left to other readers)."""
    path = Path(path)
    if path.is_dir():
        return slide_of(path) is not None
    return path.suffix.lower() in SLIDE_EXTENSIONS


def get_reader(path: str | list[str]) -> Callable | None:
    """Return :func:`read_slides` if every path is a slide file or DICOM folder, else None."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(_is_ours(p) for p in paths):
        return None
    return read_slides


def read_slides(path: str | list[str]) -> list[tuple]:
    """Read each slide lazily; a bad file becomes a notification, never a traceback."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers = []
    for p in paths:
        try:
            slide = open_slide(p)
        except ZoominError as err:
            _notify_error(str(err))
            continue
        layers.append(slide_layer_data(slide))
    if layers:
        from .slide_layers import show_scale_bar_when_added

        show_scale_bar_when_added(layers)
    # napari's sentinel for "read fine, nothing to add": no second reader is tried
    return layers or [(None,)]


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(f"napari-zoomin: {message}")
