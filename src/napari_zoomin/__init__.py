"""napari-zoomin: classify gigapixel slides from a few attended sub-tiles, and show why.

The core (``slide``, ``sampling``, ``models``, ``engine``) imports neither napari
nor Qt.  Heavy submodules are imported lazily so that ``import napari_zoomin``
stays cheap for the napari reader.

Docstrings cite the papers by short codes (000: Zoom-In, 001: ATS, 002: MagNets,
003: the lymphoma REINFORCE study), defined in ``docs/methods.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .errors import AnnotationError, CheckpointError, SlideError, ZoominError

if TYPE_CHECKING:
    from .engine.checkpoints import load_model
    from .engine.inference import classify
    from .slide import Slide, open_slide

__all__ = [
    "AnnotationError",
    "CheckpointError",
    "Slide",
    "SlideError",
    "ZoominError",
    "__version__",
    "classify",
    "load_model",
    "open_slide",
]

_LAZY = {
    "open_slide": ".slide",
    "Slide": ".slide",
    "classify": ".engine.inference",
    "load_model": ".engine.checkpoints",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
