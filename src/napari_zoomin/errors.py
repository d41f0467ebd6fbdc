"""User-facing error types.

Each failure a user can cause (a bad slide, checkpoint or annotation file)
has its own exception type whose message names the file, the problem and
the fix.  The front ends (CLI, napari) catch :class:`ZoominError` and show
the message instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class ZoominError(Exception):
    """Base class of every error napari-zoomin reports to a user."""

    def __init__(self, path: str | Path | None, problem: str, fix: str | None = None):
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path is not None else ""
        message = f"{where}{problem}"
        if fix:
            message += f" {fix}"
        super().__init__(message)


class SlideError(ZoominError):
    """A slide (or image) cannot be opened or read."""


class CheckpointError(ZoominError):
    """A model checkpoint is missing, foreign, tampered with or incompatible."""


class AnnotationError(ZoominError):
    """An annotation file (GeoJSON, ASAP XML, mask) cannot be used."""


class DataError(ZoominError):
    """A data set or its download is missing or fails its checksum."""


class LabelsError(DataError):
    """A training labels CSV (or the slides and annotations it names) cannot be used."""


class TrainingError(ZoominError):
    """Training cannot go on (non-finite loss, out of memory, a foreign resume file)."""


class ClassificationError(ZoominError):
    """A slide cannot be classified (too small, no tissue, out of memory, bad device)."""
