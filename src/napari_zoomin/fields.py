"""Values checked against a dataclass's field annotations (standard library only).

Settings arrive as JSON (a checkpoint's description, ``zoomin train --set``, the Train
widget's "Other settings"), where ``"epochs": "x"`` or a list of a million sides is
easy to write.  :func:`field_problems` says, for each value, whether it has the type its
field declares (``int``, ``float`` (finite), ``bool``, ``str``, ``Literal[...]``,
``tuple[int, int]``, ``X | None``), so every config dataclass can refuse a wrong
type with one rule, before any range check or allocation.  Ranges stay with each
dataclass (its ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
import unicodedata
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_INT", "MAX_LABEL_CHARS", "control_character", "field_problems"]

#: the largest integer a setting may hold (int64), whatever its own range
MAX_INT = 2**63 - 1
#: characters of a label a file gives (an annotation's class, a slide's class in a
#: labels CSV): a class name shown in every result, never this long
MAX_LABEL_CHARS = 200


def control_character(text: str) -> str | None:
    """The first control or invisible character in ``text`` (Unicode category C: a NUL,
    an escape, a bidi override, ...), or None.  Names read from files must not hold
    one: they would become class or file names that look like other ones."""
    return next((c for c in text if unicodedata.category(c)[0] == "C"), None)


# Limits of the settings every front end shares (the model configs' ``problems``,
# ``TrainConfig``, the ``zoomin`` flags): far above any published set-up, far below
# what would exhaust memory or time while building a model.  Here, torch-free, so
# that the command line checks its flags without importing torch.
MAX_CLASSES = 1024
MAX_SAMPLES = 10_000  # N, cells drawn per estimate (000: 100)
MAX_WIDTH = 65_536  # features, hidden units, channels
MAX_LAYERS = 64
MAX_KERNEL = 64
MAX_SIDE = 65_536  # a tile or sub-tile side, level-0 pixels
MIN_SCALE = 1 / 4096  # the smallest view scale (s1, s2)
MAX_WEIGHT = 1e6  # loss weights (entropy, pixel, contrastive, ...)
MAX_DRAWS = 4096  # K, independent estimates at inference
MAX_SEED = 2**63 - 1  # seeds: 0 ... int64's largest (torch takes < 2**64)
MAX_EPOCHS = 100_000
MAX_WORKERS = 256


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if hint is bool:
        return _is_bool(value)
    if hint is int:
        return isinstance(value, numbers.Integral) and not _is_bool(value) and abs(value) <= MAX_INT
    if hint is float:
        if not isinstance(value, numbers.Real) or _is_bool(value):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:
            return False
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(
            _fits(v, a) for v, a in zip(value, args, strict=True)
        )
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is list or hint is list:
        return isinstance(value, list)
    return True  # a type this module does not know: the dataclass's own checks decide


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        plural = {int: "whole numbers", float: "finite numbers", str: "texts"}
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural.get(args[0], 'values')}"
        kind = plural.get(args[0], "values") if len(set(args)) == 1 else "values"
        return f"a list of {len(args)} {kind}"
    return {
        bool: "true or false",
        int: "a whole number",
        float: "a finite number",
        str: "text",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def field_problems(cls: type, values: Mapping[str, Any]) -> list[str]:
    """``"<field> must be <type>, got <value>"`` for each value of the wrong type.

    Names that are not fields of ``cls`` are left to the caller (unknown settings).
    """
    hints = _hints(cls)
    return [
        f"{name} must be {_describe(hints[name])}, got {_show(value)}"
        for name, value in values.items()
        if name in hints and not _fits(value, hints[name])
    ]
