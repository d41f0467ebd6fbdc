"""Slide backends: one class per reading library behind :class:`SlideBackend`."""

from .base import SlideBackend

__all__ = ["SlideBackend"]
