"""The models a user can pick in ``Classify slide``: the demo and checkpoints of this session.

``Train classifier`` registers each checkpoint it writes; ``Classify slide`` lists
them (and any file the user browses to) and listens for new ones.  Plain Python
callbacks, so the registry needs neither Qt nor a viewer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["DEMO", "known_models", "on_models_changed", "register_model"]

#: the packaged model's name (``load_model("demo")``)
DEMO = "demo"

_models: list[str] = []
_listeners: list[Callable[[list[str]], None]] = []


def known_models() -> list[str]:
    """``"demo"`` and then every registered checkpoint path, newest first."""
    return [DEMO, *_models]


def register_model(path: str | os.PathLike) -> None:
    """Make a checkpoint selectable (moved to the front if already known)."""
    path = str(Path(path).expanduser().resolve())
    if path in _models:
        _models.remove(path)
    _models.insert(0, path)
    choices = known_models()
    for listener in list(_listeners):
        listener(choices)


def on_models_changed(callback: Callable[[list[str]], None]) -> Callable[[], None]:
    """Call ``callback(known_models())`` after each registration; returns a disconnect."""
    _listeners.append(callback)

    def disconnect() -> None:
        if callback in _listeners:
            _listeners.remove(callback)

    return disconnect
