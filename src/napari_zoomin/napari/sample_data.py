"""npe2 sample-data contribution: the planted-region sample slide."""

from __future__ import annotations

from ..samples import sample_slide_path
from ..slide import open_slide
from .layers import slide_layer_data


def sample_slide() -> list[tuple]:
    """The default sample slide, built once into the user cache and reused."""
    slide = open_slide(sample_slide_path())
    return [slide_layer_data(slide, name="sample slide")]
