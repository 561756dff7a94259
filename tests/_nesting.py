"""States nested as deeply as cognitia stores them, and one level deeper.

How deep that is depends on the Python version: JSON is encoded one level at a time,
bounded by ``sys.getrecursionlimit()`` on Python 3.11 and by the interpreter's C recursion
limit since 3.12 (about 1,500 levels on 3.12, 10,000 on 3.13), so tests ask rather than
assume.
"""

from __future__ import annotations

import functools
from typing import Any

from cognitia import StateNotSerializableError
from cognitia._json import dumps


def deep(levels: int) -> dict[str, Any]:
    """A state of ``levels`` nested dicts, the state itself being the first."""
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels - 1):
        node["a"] = {}
        node = node["a"]
    return root


def innermost(state: dict[str, Any]) -> dict[str, Any]:
    """The deepest dict of a state made by :func:`deep`."""
    while "a" in state:
        state = state["a"]
    return state


def _stored(levels: int) -> bool:
    try:
        dumps("k", deep(levels))
    except StateNotSerializableError:
        return False
    return True


@functools.cache
def deepest_storable() -> int:
    """How many levels of nesting ``dumps`` accepts on this Python."""
    low, high = 1, 1024
    while _stored(high):
        low, high = high, high * 2
    while low + 1 < high:  # low is stored, high is refused
        middle = (low + high) // 2
        low, high = (middle, high) if _stored(middle) else (low, middle)
    return low
