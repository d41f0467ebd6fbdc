"""XML from untrusted files (OME-XML in slides, ASAP annotations): no DTD, no entity.

Entity expansion (billion laughs) and external entities (reading local files or the
network) both need a DOCTYPE or ENTITY declaration; refusing every declaration,
before parsing and again in the parser, rules both out with the standard library's
expat (what defusedxml does, without adding it as a dependency).  One home for the
rule, so the slide and annotation readers cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from xml.parsers import expat

__all__ = ["has_declaration", "parser_refusing_declarations"]

_DECLARATION = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def has_declaration(data: bytes) -> bool:
    """Whether ``data`` holds a DOCTYPE or ENTITY declaration anywhere."""
    return _DECLARATION.search(data) is not None


def parser_refusing_declarations(refuse: Callable[..., Any]) -> Any:
    """An expat parser that calls ``refuse`` (which raises) at any DOCTYPE, entity
    declaration or external entity reference."""
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    return parser
