"""Where napari-zoomin keeps files it builds or fetches (sample slides, data sets).

The user cache directory by default; ``NAPARI_ZOOMIN_CACHE`` overrides it so
tests and clusters can point it somewhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the napari-zoomin cache."""
    root = os.environ.get("NAPARI_ZOOMIN_CACHE")
    base = Path(root) if root else Path(platformdirs.user_cache_dir("napari-zoomin"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
