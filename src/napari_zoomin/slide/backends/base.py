"""The small interface every slide backend implements.

A backend knows the file's own pyramid (level shapes, tile shapes, mpp) and
decodes in-bounds regions.  Everything shared — bounds and zero fill, the
decode counter, derived coarse levels, dask arrays — lives in
:class:`napari_zoomin.slide.Slide`, so adding a format means adding one class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class SlideBackend(ABC):
    """One opened slide file (or array), read through one library."""

    #: short name used to force a backend: ``open_slide(path, backend=name)``
    name: str = ""
    #: damage the reading library worked around when it opened the file, in plain words
    #: (shown with :attr:`Slide.warnings`, carried into every result)
    warnings: tuple[str, ...] = ()

    def __init__(self, path: Path | None):
        self.path = path

    # -- facts -------------------------------------------------------------
    @property
    @abstractmethod
    def vendor(self) -> str:
        """Scanner vendor or file format ("aperio", "generic-tiff", "ome", "image", ...)."""

    @property
    @abstractmethod
    def level_shapes(self) -> list[tuple[int, int]]:
        """(rows, cols) of each stored level, finest first."""

    @property
    @abstractmethod
    def tile_shapes(self) -> list[tuple[int, int]]:
        """(rows, cols) of the file's decode unit (tile or strip) at each level."""

    def _stated_mpp(self) -> tuple[tuple[float, float], str] | None:
        """``((y, x) µm per pixel as the file states it, where it says so)``, or None."""
        return None

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Micrometres per level-0 pixel as (y, x), as the file states it; None if it does not.

        Unchecked: 0, negative, NaN (an unreadable number) and infinite values are
        returned as they are; :class:`~napari_zoomin.slide.Slide` judges them.
        """
        stated = self._stated_mpp()
        return None if stated is None else stated[0]

    @property
    def mpp_source(self) -> str:
        """Where in the file :attr:`mpp` comes from, for messages (e.g. "TIFF resolution tags")."""
        stated = self._stated_mpp()
        return "" if stated is None else stated[1]

    @property
    def properties(self) -> dict[str, str]:
        """Raw metadata as strings (vendor properties, TIFF tags)."""
        return {}

    @property
    def associated_names(self) -> tuple[str, ...]:
        """Names of associated images (e.g. "thumbnail", "label", "macro")."""
        return ()

    def associated_image(self, name: str) -> np.ndarray:
        raise KeyError(name)

    # -- pixels ------------------------------------------------------------
    @abstractmethod
    def read_level(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Decode an in-bounds region of ``level`` as (height, width, 3) uint8 RGB."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""
