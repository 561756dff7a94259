from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Capability",
    "SessionBackend",
    "SessionRecord",
    "StoreBackend",
    "Write",
    "capabilities_of",
]


@runtime_checkable
class SessionBackend(Protocol):
    """The contract every backend meets: a JSON state per key.

    Any object with these four async methods is a backend; it does not need to inherit
    from anything. ``save`` replaces the whole state, ``load`` returns ``None`` for a key
    that does not exist, ``delete`` reports whether something was deleted.
    """

    async def save(self, key: str, state: dict[str, Any]) -> None: ...

    async def load(self, key: str) -> dict[str, Any] | None: ...

    async def delete(self, key: str) -> bool: ...

    async def list_keys(self) -> list[str]: ...


class Capability(StrEnum):
    """Optional abilities a backend declares in its ``capabilities`` attribute.

    The manager and the decorator use a capability when it is declared and fall back to
    the four protocol methods when it is not; the conformance kit tests each capability
    only where it is declared.
    """

    PREFIX_LISTING = "prefix_listing"
    """``list_keys(prefix=...)`` filters in the storage engine."""
    VERSIONED_COMMIT = "versioned_commit"
    """``load_record``, ``commit(..., expected_version=...)`` and ``delete(..., expected_version=...)``
    with conflict detection."""
    TURN_LOG = "turn_log"
    """``commit(..., turns=...)`` appends rows natively; ``load_turns`` reads the tail."""
    EXPIRY = "expiry"
    """Stored sessions expire after ``ttl`` seconds without a save; ``prune`` removes them."""
    MULTI_KEY_COMMIT = "multi_key_commit"
    """``commit_many(writes)`` commits several sessions in one transaction: all of them or none."""


def capabilities_of(backend: object) -> frozenset[Capability]:
    """The capabilities ``backend`` declares (none for a plain four-method backend)."""
    declared: frozenset[str] = getattr(backend, "capabilities", frozenset())
    return frozenset(Capability(c) for c in declared)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A stored session as a versioned backend returns it."""

    key: str
    state: dict[str, Any]
    version: int
    """1 after the first save, +1 on every save."""
    turn_count: int = 0
    updated_at: float = 0.0
    """Unix time of the last save."""
    expires_at: float | None = field(default=None)
    """Unix time after which the session is invisible, if the backend has a TTL."""
    size: int = 0
    """Bytes of the stored state's JSON encoding."""


@dataclass(frozen=True, slots=True)
class Write:
    """One session's part of a ``commit_many``: the arguments of one ``commit``.

    >>> Write("agent:app", {"theme": "dark"}, expected_version=3)
    Write(key='agent:app', state={'theme': 'dark'}, expected_version=3, turns=(), truncate=None)
    """

    key: str
    state: dict[str, Any]
    expected_version: int | None = None
    turns: Sequence[dict[str, Any]] = ()
    truncate: int | None = None


@runtime_checkable
class StoreBackend(SessionBackend, Protocol):
    """A backend with versioned commits and a native turn log (all of cognitia's own).

    ``commit`` writes the state and appends ``turns`` in one transaction. With
    ``expected_version=None`` it overwrites unconditionally; with ``0`` the key must not
    exist yet; with ``n`` the stored version must be ``n``, otherwise
    :class:`~cognitia.errors.VersionConflictError` is raised and nothing is written. With
    ``truncate=n`` only the oldest ``n`` stored turns are kept before ``turns`` are
    appended. It returns the new version.

    ``delete(key, expected_version=n)`` deletes only if the stored session has version
    ``n``, checked in the same atomic step; otherwise it raises
    :class:`~cognitia.errors.VersionConflictError` and deletes nothing.

    A backend that declares :attr:`Capability.MULTI_KEY_COMMIT` also has
    ``commit_many(writes: Sequence[Write]) -> list[int]``: every :class:`Write` applied as
    ``commit`` would, in one transaction, or none of them.
    """

    capabilities: frozenset[Capability]

    async def delete(self, key: str, *, expected_version: int | None = None) -> bool: ...

    async def load_record(self, key: str) -> SessionRecord | None: ...

    async def commit(
        self,
        key: str,
        state: dict[str, Any],
        *,
        expected_version: int | None = None,
        turns: Sequence[dict[str, Any]] = (),
        truncate: int | None = None,
    ) -> int: ...

    async def load_turns(self, key: str, *, last: int | None = None) -> list[dict[str, Any]]: ...

    async def list_keys(self, prefix: str = "") -> list[str]: ...

    async def prune(self, *, dry_run: bool = False) -> list[str]: ...
