"""Lazy access to whole-slide image pyramids (napari-free)."""

from .open import SLIDE_EXTENSIONS, open_slide, slide_of
from .slide import Level, Slide, SlideWarning

__all__ = ["SLIDE_EXTENSIONS", "Level", "Slide", "SlideWarning", "open_slide", "slide_of"]
