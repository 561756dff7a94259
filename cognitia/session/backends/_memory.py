from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio.lowlevel

from ._base import BackendBase, EncodedWrite, RawRecord, check_version

__all__ = ["InMemorySessionBackend"]


@dataclass(slots=True)
class _Entry:
    state: str
    version: int
    updated_at: float
    expires_at: float | None
    turns: list[str] = field(default_factory=list)

    def alive(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


class InMemorySessionBackend(BackendBase):
    """Sessions in a dict, for the life of the process: tests, prototypes, one-shot runs.

    States are stored as JSON text, so the backend behaves exactly like the persistent
    ones: a loaded state is a fresh copy, and an unstorable value is rejected on save.

    >>> backend = InMemorySessionBackend()
    >>> # await backend.save("agent:demo", {"turn": 1})
    """

    name = "memory"

    def __init__(self, *, ttl: float | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(ttl=ttl, clock=clock)
        self._entries: dict[str, _Entry] = {}
        self._sorted_keys: list[str] = []
        # The highest version of any session removed so far (see BackendBase.commit).
        self._removed_version = 0

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.alive(now) else None

    async def _raw_load(self, key: str, now: float) -> RawRecord | None:
        await anyio.lowlevel.checkpoint()
        entry = self._live(key, now)
        if entry is None:
            return None
        return (entry.state, entry.version, len(entry.turns), entry.updated_at, entry.expires_at)

    async def _raw_commit(
        self,
        key: str,
        state: str,
        expected_version: int | None,
        turns: list[str],
        truncate: int | None,
        now: float,
        expires_at: float | None,
    ) -> int:
        await anyio.lowlevel.checkpoint()
        self._check(key, expected_version, now)
        return self._write(key, state, turns, truncate, now, expires_at)

    async def _raw_commit_many(
        self, writes: list[EncodedWrite], now: float, expires_at: float | None
    ) -> list[int]:
        await anyio.lowlevel.checkpoint()
        # Every version is checked before anything is written, with no await in between.
        for write in writes:
            self._check(write.key, write.expected_version, now)
        return [self._write(w.key, w.state, list(w.turns), w.truncate, now, expires_at) for w in writes]

    def _check(self, key: str, expected_version: int | None, now: float) -> None:
        live = self._live(key, now)
        check_version(key, expected_version, None if live is None else live.version)

    def _write(
        self,
        key: str,
        state: str,
        turns: list[str],
        truncate: int | None,
        now: float,
        expires_at: float | None,
    ) -> int:
        entry = self._entries.get(key)
        live = entry if entry is not None and entry.alive(now) else None
        if entry is None:
            version = self._removed_version + 1
            self._entries[key] = _Entry(state, version, now, expires_at, list(turns))
            bisect.insort(self._sorted_keys, key)
            return version
        if live is None:
            entry.turns = []
            entry.version = max(entry.version, self._removed_version)
        elif truncate is not None:
            del entry.turns[truncate:]
        entry.state = state
        entry.version += 1
        entry.updated_at = now
        entry.expires_at = expires_at
        entry.turns.extend(turns)
        return entry.version

    async def _raw_load_turns(self, key: str, last: int | None, now: float) -> list[str]:
        await anyio.lowlevel.checkpoint()
        entry = self._live(key, now)
        if entry is None:
            return []
        return entry.turns[-last:] if last is not None else list(entry.turns)

    async def _raw_delete(self, key: str, now: float, expected_version: int | None) -> bool:
        await anyio.lowlevel.checkpoint()
        if expected_version is not None:
            live = self._live(key, now)
            check_version(key, expected_version, None if live is None else live.version)
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        del self._sorted_keys[bisect.bisect_left(self._sorted_keys, key)]
        self._removed_version = max(self._removed_version, entry.version)
        return entry.alive(now)

    async def _raw_list_keys(self, prefix: str, now: float) -> list[str]:
        await anyio.lowlevel.checkpoint()
        keys = self._sorted_keys
        start = bisect.bisect_left(keys, prefix)
        found = []
        for key in keys[start:]:
            if not key.startswith(prefix):
                break
            if self._entries[key].alive(now):
                found.append(key)
        return found

    async def _raw_prune(self, now: float, dry_run: bool) -> list[str]:
        await anyio.lowlevel.checkpoint()
        # Found and removed in one step, with no await in between: a session saved again
        # meanwhile is either alive by now (and kept) or saved after the prune.
        expired: list[str] = []
        kept: list[str] = []
        for key in self._sorted_keys:
            (kept if self._entries[key].alive(now) else expired).append(key)
        if not dry_run and expired:
            for key in expired:
                entry = self._entries.pop(key)
                self._removed_version = max(self._removed_version, entry.version)
            self._sorted_keys = kept
        return expired

    def _describe(self) -> str:
        return f"sessions={len(self._entries)}"
