"""How the manager talks to a backend: natively, or through the four protocol methods.

cognitia's own backends (and any backend declaring ``versioned_commit`` and ``turn_log``)
get versioned commits and an append-only turn log in the storage engine. A plain
four-method backend, such as one a user wrote from the protocol, still works: the version
and the turns are kept inside the state under one reserved entry, and a version check
guards each save (and each delete given an expected version) from this process's point of
view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._json import dumps, loads
from ..errors import StateNotSerializableError, StorageError
from ._session import TurnLoader
from .backends._base import BackendBase, EncodedWrite, check_version
from .backends._protocol import Capability, SessionBackend, StoreBackend, Write, capabilities_of

__all__ = ["META_KEY", "Loaded", "Pending", "Store", "open_store"]

META_KEY = "__cognitia__"


@dataclass(slots=True)
class Loaded:
    state: dict[str, Any]
    version: int
    turn_count: int
    bytes: int


@dataclass(slots=True)
class Pending:
    """One session's write in :meth:`Store.write_many`: what :meth:`Store.write` takes."""

    key: str
    state: dict[str, Any]
    state_json: str
    expected: int | None
    turns: list[str]
    truncate: int | None = None


class Store:
    """The operations the manager needs, over any backend."""

    name: str
    backend: SessionBackend | None
    prefix_listing: bool = True

    async def read(self, key: str) -> Loaded | None:
        return None

    async def write(
        self,
        key: str,
        state: dict[str, Any],
        state_json: str,
        expected: int | None,
        turns: list[str],
        truncate: int | None = None,
    ) -> int:
        return (expected or 0) + 1

    async def write_many(self, writes: list[Pending]) -> list[int]:
        """:meth:`write` each session; the new versions in order.

        Here every version is checked first and the writes follow one by one: a conflict
        found by the checks writes nothing, but a failure part way (or a writer of another
        process slipping in between) can leave the first sessions written and the others
        not. A store whose backend commits several sessions at once overrides this.
        """
        for write in writes:
            await self._check(write)
        versions: list[int] = []
        for write in writes:
            try:
                versions.append(
                    await self.write(
                        write.key, write.state, write.state_json, write.expected, write.turns, write.truncate
                    )
                )
            except Exception as exc:
                if not versions:
                    raise
                # Not a conflict to retry: re-applying the change would apply it twice to
                # the sessions already written.
                done = ", ".join(repr(w.key) for w in writes[: len(versions)])
                rest = ", ".join(repr(w.key) for w in writes[len(versions) :])
                raise StorageError(
                    f"{self.name} backend stored sessions {done} but not {rest}: it cannot store several "
                    f"sessions at once, and writing {write.key!r} failed ({type(exc).__name__})"
                ) from exc
        return versions

    async def _check(self, write: Pending) -> None:
        """Raise what a write of ``write`` would meet now: a conflict, or a state it refuses."""

    async def turns(self, key: str, last: int | None) -> list[dict[str, Any]]:
        return []

    @property
    def turn_loader(self) -> TurnLoader | None:
        """What a live session's turn log reads older turns with; ``None`` where the live
        session is the only copy of its turns, which it must then keep whole."""
        return self.turns

    async def keys(self, prefix: str) -> list[str]:
        return []

    async def delete(self, key: str, expected: int | None = None) -> bool:
        """Delete the session; with ``expected``, only if its stored version is ``expected``
        (else :class:`~cognitia.errors.VersionConflictError`, nothing deleted)."""
        return False

    async def prune(self, dry_run: bool) -> list[str]:
        return []

    def dropped(self, key: str, version: int) -> None:
        """The manager let go of its live copy of ``key`` (closed or evicted) without deleting it."""

    @property
    def expires(self) -> bool:
        return False


class NullStore(Store):
    """No backend: sessions live only while they are live in the manager.

    A session that leaves the live set (deleted, closed or evicted) is gone, so, like a
    backend, the store keeps the highest version of any session gone and numbers a session
    created anew above it: a version never names two lives of a key.
    """

    name = "none"
    backend = None

    def __init__(self, live: Mapping[str, Any]) -> None:
        self._live = live
        self._removed_version = 0

    async def write(
        self,
        key: str,
        state: dict[str, Any],
        state_json: str,
        expected: int | None,
        turns: list[str],
        truncate: int | None = None,
    ) -> int:
        session = self._live.get(key)
        stored = None if session is None or not session.version else int(session.version)
        # The live set is the storage: a handle kept from before a delete or close, or
        # from an older version, is refused as a backend refuses it.
        check_version(key, expected, stored)
        return (self._removed_version if stored is None else stored) + 1

    async def write_many(self, writes: list[Pending]) -> list[int]:
        # Nothing can fail part way: the live set is the storage, and nothing awaits.
        return [await self.write(w.key, w.state, w.state_json, w.expected, w.turns) for w in writes]

    async def delete(self, key: str, expected: int | None = None) -> bool:
        # The live set is the storage: a session created by open() and never saved is absent.
        session = self._live.get(key)
        if expected is not None:
            check_version(key, expected, None if session is None else session.version or None)
        if session is not None:
            self.dropped(key, session.version)
        return False

    def dropped(self, key: str, version: int) -> None:
        self._removed_version = max(self._removed_version, version)

    @property
    def turn_loader(self) -> TurnLoader | None:
        return None


class NativeStore(Store):
    def __init__(self, backend: StoreBackend) -> None:
        self.backend = backend
        self._native = backend
        self.name = str(getattr(backend, "name", type(backend).__name__))
        self._encoded = isinstance(backend, BackendBase)
        self._caps = capabilities_of(backend)
        self._many = Capability.MULTI_KEY_COMMIT in self._caps

    async def read(self, key: str) -> Loaded | None:
        record = await self._native.load_record(key)
        if record is None:
            return None
        return Loaded(record.state, record.version, record.turn_count, getattr(record, "size", 0))

    async def write(
        self,
        key: str,
        state: dict[str, Any],
        state_json: str,
        expected: int | None,
        turns: list[str],
        truncate: int | None = None,
    ) -> int:
        if self._encoded:
            backend: BackendBase = self.backend  # type: ignore[assignment]
            return await backend.commit_encoded(
                key, state_json, expected_version=expected, turns=turns, truncate=truncate
            )
        return await self._native.commit(
            key,
            loads(state_json),
            expected_version=expected,
            turns=[loads(t) for t in turns],
            truncate=truncate,
        )

    async def write_many(self, writes: list[Pending]) -> list[int]:
        if not self._many:
            return await super().write_many(writes)
        if self._encoded:
            backend: BackendBase = self.backend  # type: ignore[assignment]
            return await backend.commit_many_encoded(
                [EncodedWrite(w.key, w.state_json, w.expected, w.turns, w.truncate) for w in writes]
            )
        return await self._native.commit_many(  # type: ignore[attr-defined, no-any-return]
            [
                Write(w.key, loads(w.state_json), w.expected, [loads(t) for t in w.turns], w.truncate)
                for w in writes
            ]
        )

    async def _check(self, write: Pending) -> None:
        if write.expected is not None:
            found = await self._native.load_record(write.key)
            check_version(write.key, write.expected, None if found is None else found.version)

    async def turns(self, key: str, last: int | None) -> list[dict[str, Any]]:
        return await self._native.load_turns(key, last=last)

    async def keys(self, prefix: str) -> list[str]:
        return await self._native.list_keys(prefix)

    async def delete(self, key: str, expected: int | None = None) -> bool:
        if expected is None:
            return await self._native.delete(key)
        return await self._native.delete(key, expected_version=expected)

    async def prune(self, dry_run: bool) -> list[str]:
        if Capability.EXPIRY not in self._caps:
            return []
        return await self._native.prune(dry_run=dry_run)

    @property
    def expires(self) -> bool:
        return Capability.EXPIRY in self._caps and getattr(self.backend, "ttl", None) is not None


class EnvelopeStore(Store):
    """Keeps the version and the turns inside the stored state, under ``"__cognitia__"``.

    ``backend.load(key)`` still returns the session's state, with one extra entry:
    ``{"role": "coach", "__cognitia__": {"version": 3, "turns": [...]}}``.
    """

    def __init__(self, backend: SessionBackend) -> None:
        self.backend = backend
        self._plain = backend
        self.name = str(getattr(backend, "name", type(backend).__name__))
        self.prefix_listing = Capability.PREFIX_LISTING in capabilities_of(backend)

    async def _split(self, key: str) -> tuple[dict[str, Any], int, list[dict[str, Any]]] | None:
        raw = await self._plain.load(key)
        if raw is None:
            return None
        # A copy all the way down: the backend may hand out its own dict, which a failed
        # turn's changes to the live state must never reach.
        raw = loads(dumps(key, raw))
        meta = raw.pop(META_KEY, None)
        if not isinstance(meta, dict):
            # A state saved directly through the backend: adopt it as version 1, no turns.
            return raw, 1, []
        return raw, int(meta.get("version", 1)), list(meta.get("turns", []))

    async def read(self, key: str) -> Loaded | None:
        found = await self._split(key)
        if found is None:
            return None
        state, version, turns = found
        return Loaded(state, version, len(turns), 0)

    async def write(
        self,
        key: str,
        state: dict[str, Any],
        state_json: str,
        expected: int | None,
        turns: list[str],
        truncate: int | None = None,
    ) -> int:
        _refuse_reserved(key, state)
        found = await self._split(key)
        actual = None if found is None else found[1]
        check_version(key, expected, actual)
        version = (actual or 0) + 1
        old_turns = [] if found is None else found[2]
        if truncate is not None:
            old_turns = old_turns[:truncate]
        stored = loads(state_json)
        stored[META_KEY] = {"version": version, "turns": old_turns + [loads(t) for t in turns]}
        await self._plain.save(key, stored)
        return version

    async def _check(self, write: Pending) -> None:
        _refuse_reserved(write.key, write.state)
        await self._check_version(write.key, write.expected)

    async def _check_version(self, key: str, expected: int | None) -> None:
        if expected is not None:
            found = await self._split(key)
            check_version(key, expected, None if found is None else found[1])

    async def turns(self, key: str, last: int | None) -> list[dict[str, Any]]:
        found = await self._split(key)
        if found is None:
            return []
        turns = found[2]
        if last is None:
            return list(turns)
        return turns[-last:] if last > 0 else []

    async def keys(self, prefix: str) -> list[str]:
        if self.prefix_listing:
            listed: list[str] = await self._plain.list_keys(prefix)  # type: ignore[call-arg]
            return sorted(listed)
        return sorted(k for k in await self._plain.list_keys() if k.startswith(prefix))

    async def delete(self, key: str, expected: int | None = None) -> bool:
        """Delete the session; with ``expected``, check the version kept in the state first.

        Like :meth:`write`, the check and the delete are two calls to the backend: they are
        atomic only from this process's point of view (the manager holds the key's lock), not
        against another process writing the same key in between.
        """
        await self._check_version(key, expected)
        return await self._plain.delete(key)


def _refuse_reserved(key: str, state: dict[str, Any]) -> None:
    if META_KEY in state:
        raise StateNotSerializableError(
            key, f"state[{META_KEY!r}]", "uses a key cognitia reserves for its metadata on this backend"
        )


def open_store(backend: SessionBackend | None, live: Mapping[str, Any]) -> Store:
    """The store for ``backend``: native when it declares versioned commits and a turn log."""
    if backend is None:
        return NullStore(live)
    if not isinstance(backend, SessionBackend):
        raise TypeError(
            f"backend must implement SessionBackend (async save, load, delete, list_keys); "
            f"got {type(backend).__name__}"
        )
    caps = capabilities_of(backend)
    if {Capability.VERSIONED_COMMIT, Capability.TURN_LOG} <= caps:
        return NativeStore(backend)  # type: ignore[arg-type]
    return EnvelopeStore(backend)
