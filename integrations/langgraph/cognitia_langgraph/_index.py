"""The small index a thread's session state holds, so the latest checkpoint is found without the history.

The turn log holds every checkpoint and every batch of writes, in the order they were
saved. The session state only says, per checkpoint namespace, which checkpoint is the
latest and from which position of the log it (and its pending writes) can be read::

    {"langgraph": 1,
     "namespaces": {"": {"latest": "1f0...", "at": 41, "writes": {"1f0...": 40},
                         "values": {"messages": ["00...07.0.41", 41], "tools": [3, 12]}}}}

``at`` is the log position of the latest checkpoint's turn. ``values`` says, for each channel
of the latest checkpoint, which version of its value the log holds and at which position
(an earlier turn, for a channel the latest checkpoint carries); a value stored as an
extension of an earlier one has a third number, the position of the turn that stores its
chain's first, whole value (``"messages": ["00...09.0.52", 48, 17]``): reading from there
reads all of it. LangGraph saves checkpoints in
the background, so the writes of a step's tasks can be saved before that step's checkpoint:
``writes`` remembers, for the latest checkpoint and any newer one not saved yet, the position
of its first writes. The index is a hint: readers check what they find and fall back to the
whole log if it does not match.

Every subgraph call saves under a namespace of its own, so the index keeps the root
namespace and only the ``KEPT`` others used most recently; once it has let one go it says
``"pruned": true``, and a namespace it does not list may then be in the log. An entry made
after that is ``"partial"``: the log may hold older turns of its namespace (writes saved
before their checkpoint, an older checkpoint copied in) that it does not know of, so it
gives no hint, and readers read the log.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._codec import CHECKPOINT, WRITES, extended

__all__ = ["FORMAT", "KEPT", "latest", "pruned", "rebuild", "record", "values"]

FORMAT = 1

KEPT = 16
"""How many namespaces besides the root one the index lists: the state holding it is
written at every save, so it must not grow with every subgraph call."""


def _namespace(state: dict[str, Any], ns: str) -> dict[str, Any]:
    state.setdefault("langgraph", FORMAT)
    namespaces: dict[str, Any] = state.setdefault("namespaces", {})
    entry: dict[str, Any] | None = namespaces.get(ns)
    if entry is None:
        entry = namespaces[ns] = {"latest": None, "at": None}
        if ns and state.get("pruned"):
            entry["partial"] = True
    return entry


def record(state: dict[str, Any], turn: dict[str, Any], seq: int, *, prune: bool = True) -> None:
    """Account for ``turn``, stored at log position ``seq``, in the index held by ``state``."""
    entry = _namespace(state, turn["ns"])
    latest = entry["latest"]
    if turn["kind"] == CHECKPOINT:
        checkpoint_id = turn["id"]
        # Checkpoint ids grow with time: the latest is the greatest, as in LangGraph's savers.
        if latest is None or checkpoint_id >= latest:
            entry["latest"], entry["at"] = checkpoint_id, seq
            _record_values(entry, turn, seq)
            early = entry.get("writes", {})
            kept = {cid: at for cid, at in early.items() if cid >= checkpoint_id}
            if kept:
                entry["writes"] = kept
            else:
                entry.pop("writes", None)
    elif turn["kind"] == WRITES:
        checkpoint_id = turn["checkpoint"]
        if latest is None or checkpoint_id >= latest:
            entry.setdefault("writes", {}).setdefault(checkpoint_id, seq)
    if prune:
        _prune(state)


def _prune(state: dict[str, Any]) -> None:
    """Let the namespaces used longest ago go, beyond the root one and ``KEPT`` others."""
    namespaces: dict[str, Any] = state.get("namespaces", {})
    if len(namespaces) > KEPT + 1:
        others = sorted((_last_used(entry), ns) for ns, entry in namespaces.items() if ns)
        for _, ns in others[: len(namespaces) - KEPT - 1]:
            del namespaces[ns]
        state["pruned"] = True


def _last_used(entry: dict[str, Any]) -> int:
    """The log position of the newest turn the index knows of in a namespace."""
    at: int | None = entry["at"]
    positions: list[int] = [-1 if at is None else at, *entry.get("writes", {}).values()]
    return max(positions)


def pruned(state: dict[str, Any]) -> bool:
    """Whether the index has let a namespace go: one it does not list may be in the log."""
    return bool(state.get("pruned"))


def _root(where: list[Any]) -> int:
    """The log position a value's chain starts at (its own, for a value stored whole)."""
    start: int = where[-1]
    return start


def _record_values(entry: dict[str, Any], turn: dict[str, Any], seq: int) -> None:
    known: dict[str, list[Any]] = entry.get("values", {})
    versions = turn["checkpoint"]["channel_versions"]
    links = extended(turn)
    now: dict[str, list[Any]] = {}
    for channel in turn["checkpoint"]["channel_values"]:
        if versions.get(channel) is None:
            continue
        link = links.get(channel)
        if link is None:
            now[channel] = [versions[channel], seq]
            continue
        base = known.get(channel)
        # An extension of a value the index does not know (copied threads) is not listed.
        if base is not None and base[0] == link[0]:
            now[channel] = [versions[channel], seq, _root(base)]
    for channel in turn["checkpoint"].get("carried", ()):
        where = known.get(channel)
        # A carried value the index lost track of is simply not listed: readers then fall
        # back to the whole log, and the next save stores that channel again.
        if where is not None and where[0] == versions.get(channel):
            now[channel] = where
    if now:
        entry["values"] = now
    else:
        entry.pop("values", None)


def latest(state: dict[str, Any], ns: str) -> tuple[str, int] | None:
    """The latest checkpoint id of ``ns`` and the log position to read from, or ``None``."""
    entry = state.get("namespaces", {}).get(ns)
    if entry is None or entry["latest"] is None or entry.get("partial"):
        return None
    at: int = entry["at"]
    first_write: int = entry.get("writes", {}).get(entry["latest"], at)
    oldest_value = min((_root(where) for where in entry.get("values", {}).values()), default=at)
    return entry["latest"], min(at, first_write, oldest_value)


def values(state: dict[str, Any], ns: str, since: int) -> dict[str, Any]:
    """The channel versions whose value the log of ``ns`` holds whole from position ``since`` on."""
    entry = state.get("namespaces", {}).get(ns)
    if entry is None:
        return {}
    return {channel: where[0] for channel, where in entry.get("values", {}).items() if _root(where) >= since}


def rebuild(state: dict[str, Any], turns: Iterable[dict[str, Any]]) -> None:
    """Replace the index in ``state`` with one built from the whole log ``turns``."""
    state.clear()
    state["langgraph"] = FORMAT
    state["namespaces"] = {}
    for seq, turn in enumerate(turns):
        record(state, turn, seq, prune=False)  # every entry sees the whole log: none is partial
    _prune(state)
