"""Where napari-zoomin keeps its files: the cache and the per-user data folder.

* :func:`cache_dir`: files it builds or fetches and can build or fetch again (sample
  slides, the CMU-1-Small-Region download, data sets).  The platformdirs user cache
  by default; ``NAPARI_ZOOMIN_CACHE`` overrides it.
* :func:`user_data_dir`: files the user made and would miss (ROI annotations that
  could not go beside their slide, trained models).  The platformdirs user data
  folder by default; ``NAPARI_ZOOMIN_DATA`` overrides it.

The overrides let tests and clusters point either somewhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "napari-zoomin"


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the napari-zoomin cache."""
    root = os.environ.get("NAPARI_ZOOMIN_CACHE")
    base = Path(root) if root else Path(platformdirs.user_cache_dir(APP_NAME))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def user_data_dir(*parts: str) -> Path:
    """A folder under the napari-zoomin user data folder (not created: writers create it).

    Not created here, unlike :func:`cache_dir`: it is asked for to propose a default
    (the Train widget's checkpoint path) or to look for files, and a folder should
    appear in the user's data folder only when something is saved into it.
    """
    root = os.environ.get("NAPARI_ZOOMIN_DATA")
    base = Path(root) if root else Path(platformdirs.user_data_dir(APP_NAME))
    return base.joinpath(*parts)
