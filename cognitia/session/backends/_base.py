from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Self

from ..._json import byte_size, check_key, dumps, key_prefix_possible, loads
from ..._worker import checkpoint
from ...errors import BackendClosedError, CognitiaError, StorageError, VersionConflictError
from ._protocol import Capability, SessionRecord, Write
from ._scope import MemoryScope

__all__ = [
    "BackendBase",
    "EncodedWrite",
    "RawRecord",
    "check_delete_version",
    "check_version",
    "prefix_bounds",
]

MAX_TTL = 1000 * 365.25 * 24 * 3600
"""The longest ``ttl`` a backend takes, in seconds: every engine can store such a deadline."""
MAX_COUNT = 2**31 - 1
"""Turn counts are passed to the engines capped here (more turns than any log holds)."""
MAX_VERSION = 2**63 - 1
"""The highest ``expected_version`` accepted (SQLite and PostgreSQL store versions in 64 bits)."""

RawRecord = tuple[str, int, int, float, "float | None"]
"""What a storage engine returns for a session: state JSON, version, turn count, updated_at, expires_at."""


class EncodedWrite(NamedTuple):
    """A :class:`~cognitia.session.backends.Write` whose state and turns are JSON text already."""

    key: str
    state: str
    expected_version: int | None = None
    turns: Sequence[str] = ()
    truncate: int | None = None


def check_version(key: str, expected: int | None, actual: int | None) -> None:
    """The optimistic-concurrency rule every backend applies before it writes.

    ``expected=None``: no check. ``0``: the key must not exist (``actual is None``).
    ``n``: the stored version must be ``n``. Otherwise :class:`VersionConflictError`.
    """
    if expected is not None and (
        (expected == 0 and actual is not None) or (expected > 0 and actual != expected)
    ):
        raise VersionConflictError(key, expected, actual)


def check_delete_version(key: str, expected_version: object) -> None:
    """Refuse an ``expected_version`` that a conditional delete cannot mean.

    ``None`` (delete whatever is stored) or an ``int >= 1``, the version the stored session
    must have. ``0`` ("only if nothing is stored") would leave nothing to delete, so it is
    refused like a negative number or a ``bool``.
    """
    if expected_version is not None and (
        type(expected_version) is not int or not 1 <= expected_version <= MAX_VERSION
    ):
        raise ValueError(
            f"expected_version must be None or an int from 1 to 2**63 - 1, got {expected_version!r} "
            f"(session {key!r})"
        )


def prefix_bounds(prefix: str) -> tuple[str, str | None]:
    """The half-open key range ``[low, high)`` holding every key that starts with ``prefix``.

    Keys compared as UTF-8 bytes (SQLite's BINARY collation, PostgreSQL's "C") order like
    code points, so bumping the last code point gives the upper bound and a range scan on
    the key index finds exactly the prefix. ``high`` is ``None`` when there is no bound.
    """
    if not prefix:
        return "", None
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return prefix, None
    bumped = last + 1
    if 0xD800 <= bumped <= 0xDFFF:
        bumped = 0xE000
    return prefix, prefix[:-1] + chr(bumped)


class BackendBase(ABC):
    """Everything cognitia's own backends share, written once.

    Subclasses implement the ``_raw_*`` methods over already-validated keys and already
    encoded JSON text; this class does key checks, JSON encoding and decoding, expiry
    arithmetic, the closed state and the translation of driver errors into
    :class:`~cognitia.errors.StorageError`.
    """

    name: ClassVar[str] = "base"
    capabilities: frozenset[Capability] = frozenset(Capability)
    _driver_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._raw_commit_many is BackendBase._raw_commit_many:
            # An engine written before multi-key commits existed does not claim them.
            cls.capabilities = cls.capabilities - {Capability.MULTI_KEY_COMMIT}

    def __init__(self, *, ttl: float | None = None, clock: Callable[[], float] = time.time) -> None:
        if ttl is not None and not 0 < ttl <= MAX_TTL:
            raise ValueError(
                f"ttl must be a positive number of seconds up to {MAX_TTL:.0f} (about a thousand years) "
                f"or None, got {ttl!r}"
            )
        self.ttl = ttl
        self._clock = clock
        self._closed = False

    # -- the seed's four methods ------------------------------------------------------------

    async def save(self, key: str, state: dict[str, Any]) -> None:
        """Store ``state`` under ``key``, replacing what was there."""
        check_key(key)
        encoded = dumps(key, state)
        now, expires_at = self._write_times()
        with self._errors("save", key):
            await self._raw_save(key, encoded, now, expires_at)

    async def load(self, key: str) -> dict[str, Any] | None:
        """The state stored under ``key``, or ``None``."""
        check_key(key)
        with self._errors("load", key):
            text = await self._raw_load_state(key, self._clock())
        return None if text is None else self._decode(text, key, "state")

    async def delete(self, key: str, *, expected_version: int | None = None) -> bool:
        """Delete the session and its turns; ``True`` if it existed.

        ``expected_version=n`` deletes only if the stored session (an expired one counts as
        absent) has version ``n``, checked and deleted atomically in the storage engine;
        otherwise :class:`~cognitia.errors.VersionConflictError` is raised and nothing is
        deleted. A conditional delete that returns has deleted the session (``True``).
        """
        check_key(key)
        check_delete_version(key, expected_version)
        with self._errors("delete", key):
            return await self._raw_delete(key, self._clock(), expected_version)

    async def list_keys(self, prefix: str | MemoryScope = "") -> list[str]:
        """Every stored key, sorted; only those starting with ``prefix`` if given.

        ``prefix`` may be a :class:`MemoryScope` to list one namespace. The filtering runs
        in the storage engine, not in Python. A prefix no key can start with (one holding
        NUL or a lone surrogate, which keys cannot) lists nothing.
        """
        if isinstance(prefix, MemoryScope):
            prefix = prefix.prefix
        elif not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str or MemoryScope, got {type(prefix).__name__}")
        with self._errors("list", f"keys starting with {prefix!r}" if prefix else "keys", whole=True):
            if not key_prefix_possible(prefix):
                # NUL or a lone surrogate: no key holds one, and not every engine can take one.
                await checkpoint()
                return []
            return await self._raw_list_keys(prefix, self._clock())

    # -- versioned records and the turn log -------------------------------------------------

    async def load_record(self, key: str) -> SessionRecord | None:
        """The stored session with its version and metadata, or ``None``."""
        check_key(key)
        with self._errors("load", key):
            raw = await self._raw_load(key, self._clock())
        if raw is None:
            return None
        state, version, turn_count, updated_at, expires_at = raw
        decoded = self._decode(state, key, "state")
        return SessionRecord(key, decoded, version, turn_count, updated_at, expires_at, byte_size(state))

    async def commit(
        self,
        key: str,
        state: dict[str, Any],
        *,
        expected_version: int | None = None,
        turns: Sequence[dict[str, Any]] = (),
        truncate: int | None = None,
    ) -> int:
        """Write ``state`` and append ``turns`` atomically; return the new version.

        A live session's version grows by one. A session created anew (the key was never
        saved, was deleted, or expired) starts one above the highest version the backend
        has removed so far (``1`` if it never removed one), so a version never names two
        lives of a key: an ``expected_version`` read before a delete cannot match the
        session created after it.

        ``expected_version``: ``None`` overwrites; ``0`` requires that no session exists;
        ``n`` requires stored version ``n``, else
        :class:`~cognitia.errors.VersionConflictError` and nothing is written.
        ``truncate``: first keep only the oldest ``truncate`` stored turns (``0`` clears the
        log), in the same transaction.
        """
        check_key(key)
        encoded = dumps(key, state)
        encoded_turns = _encode_turns(key, turns)
        return await self.commit_encoded(
            key, encoded, expected_version=expected_version, turns=encoded_turns, truncate=truncate
        )

    async def commit_encoded(
        self,
        key: str,
        state: str,
        *,
        expected_version: int | None = None,
        turns: Sequence[str] = (),
        truncate: int | None = None,
    ) -> int:
        """:meth:`commit` for a state and turns already encoded by :func:`cognitia._json.dumps`."""
        check_key(key)
        truncate = _check_write(key, expected_version, truncate)
        now, expires_at = self._write_times()
        with self._errors("save", key):
            return await self._raw_commit(
                key, state, expected_version, list(turns), truncate, now, expires_at
            )

    async def _restore(
        self,
        key: str,
        state: dict[str, Any],
        turns: Sequence[dict[str, Any]],
        *,
        expected_version: int | None,
        expires_at: float | None,
    ) -> int:
        """Write a whole exported session: its state, its turns replacing the log, and its own
        expiry (``None``: none) in place of this backend's ``ttl``. What ``cognitia import`` writes."""
        check_key(key)
        encoded, encoded_turns = dumps(key, state), _encode_turns(key, turns)
        _check_write(key, expected_version, 0)
        with self._errors("save", key):
            return await self._raw_commit(
                key, encoded, expected_version, encoded_turns, 0, self._clock(), expires_at
            )

    async def commit_many(self, writes: Sequence[Write]) -> list[int]:
        """Commit several sessions in one transaction: every write lands, or none does.

        Each :class:`~cognitia.session.backends.Write` means what the same arguments mean
        to :meth:`commit`, and the new versions are returned in the order given. If any
        ``expected_version`` does not match, :class:`~cognitia.errors.VersionConflictError`
        names that session and nothing is written; nor is anything if a state or turn
        cannot be encoded (checked before storage is touched). A key may appear once.

        >>> await backend.commit_many([  # doctest: +SKIP
        ...     Write("agent:user:42", {"turn": 8}, expected_version=7, turns=[{"role": "user"}]),
        ...     Write("shared:app", {"theme": "dark"}, expected_version=2),
        ... ])
        [8, 3]
        """
        encoded = []
        for write in writes:
            if not isinstance(write, Write):
                raise TypeError(f"commit_many takes Write objects, got {type(write).__name__}")
            check_key(write.key)
            encoded.append(
                EncodedWrite(
                    write.key,
                    dumps(write.key, write.state),
                    write.expected_version,
                    _encode_turns(write.key, write.turns),
                    write.truncate,
                )
            )
        return await self.commit_many_encoded(encoded)

    async def commit_many_encoded(self, writes: Sequence[EncodedWrite]) -> list[int]:
        """:meth:`commit_many` for states and turns already encoded by :func:`cognitia._json.dumps`."""
        checked: list[EncodedWrite] = []
        seen: set[str] = set()
        for key, state, expected_version, turns, truncate in writes:
            check_key(key)
            if key in seen:
                raise ValueError(
                    f"session {key!r} appears twice in one commit_many; merge its writes into one"
                )
            seen.add(key)
            truncate = _check_write(key, expected_version, truncate)
            checked.append(EncodedWrite(key, state, expected_version, list(turns), truncate))
        if not checked:
            return []
        if len(checked) == 1:
            key, state, expected_version, turns, truncate = checked[0]
            return [
                await self.commit_encoded(
                    key, state, expected_version=expected_version, turns=turns, truncate=truncate
                )
            ]
        now, expires_at = self._write_times()
        with self._errors("save", "sessions " + ", ".join(repr(write.key) for write in checked), whole=True):
            return await self._raw_commit_many(checked, now, expires_at)

    def check_storable(self, key: str, state: str, turns: Sequence[str] = ()) -> None:
        """Raise :class:`~cognitia.errors.StateNotSerializableError` if this engine would refuse
        the encoded ``state`` or ``turns`` of ``key`` that :func:`cognitia._json.dumps` accepted.

        For checking many sessions before writing any (an import); a commit checks anyway.
        Every value ``dumps`` accepts is storable unless a backend says otherwise.
        """
        return None

    async def load_turns(self, key: str, *, last: int | None = None) -> list[dict[str, Any]]:
        """The session's turns in order; only the last ``last`` if given."""
        check_key(key)
        if last is not None and (type(last) is not int or last < 0):
            raise ValueError(f"last must be None or an int >= 0, got {last!r}")
        with self._errors("load turns of", key):
            if last == 0:
                return []
            if last is not None:
                last = min(last, MAX_COUNT)  # more than any log holds: all of them
            raw = await self._raw_load_turns(key, last, self._clock())
        return [self._decode(turn, key, f"turn {i}") for i, turn in enumerate(raw)]

    async def prune(self, *, dry_run: bool = False) -> list[str]:
        """Delete expired sessions and return their keys (only report them if ``dry_run``)."""
        with self._errors("prune", "expired sessions", whole=True):
            return await self._raw_prune(self._clock(), dry_run)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`aclose` was called."""
        return self._closed

    def close(self) -> None:
        """Release the backend's connections and threads. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._raw_close()

    async def aclose(self) -> None:
        """Like :meth:`close`, awaiting pending writes without blocking the event loop."""
        if not self._closed:
            self._closed = True
            await self._raw_aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self._describe()} {state}>"

    def _describe(self) -> str:
        return ""

    def _write_times(self) -> tuple[float, float | None]:
        """A write's timestamp and the expiry it gives the session (``None`` without a TTL)."""
        now = self._clock()
        return now, None if self.ttl is None else now + self.ttl

    def _errors(self, operation: str, key: str, *, whole: bool = False) -> _ErrorBoundary:
        """Driver errors of ``operation`` on session ``key`` (or, ``whole``, on what ``key`` says)
        raised as :class:`StorageError`."""
        target = key if whole else f"session {key!r}"
        if self._closed:
            raise BackendClosedError(f"{self.name} backend is closed: cannot {operation} {target}")
        return _ErrorBoundary(self, operation, target)

    def _decode(self, text: str, key: str, what: str) -> Any:
        """Stored JSON decoded; text that is not JSON (written around cognitia) is a storage error."""
        try:
            return loads(text)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: the position, not the text
            raise StorageError(
                f"{self.name} backend failed to load session {key!r}: its stored {what} is not JSON ({exc})"
            ) from exc

    # -- what a storage engine implements ---------------------------------------------------

    @abstractmethod
    async def _raw_load(self, key: str, now: float) -> RawRecord | None: ...

    @abstractmethod
    async def _raw_commit(
        self,
        key: str,
        state: str,
        expected_version: int | None,
        turns: list[str],
        truncate: int | None,
        now: float,
        expires_at: float | None,
    ) -> int: ...

    async def _raw_load_state(self, key: str, now: float) -> str | None:
        """Only the state's JSON (``load``); an engine may read less than the whole record."""
        raw = await self._raw_load(key, now)
        return None if raw is None else raw[0]

    async def _raw_save(self, key: str, state: str, now: float, expires_at: float | None) -> None:
        """An unconditional write whose new version nobody asks for (``save``)."""
        await self._raw_commit(key, state, None, [], None, now, expires_at)

    async def _raw_commit_many(
        self, writes: list[EncodedWrite], now: float, expires_at: float | None
    ) -> list[int]:
        """Apply every write as :meth:`_raw_commit` would, in one transaction: all or none.

        Version checks run before anything is written or in the same transaction that is
        rolled back on a conflict, which raises the first conflicting key's error. An
        engine that leaves this out does not declare ``multi_key_commit``.
        """
        raise TypeError(
            f"{self.name} backend cannot commit several sessions at once "
            "(it does not declare multi_key_commit)"
        )

    @abstractmethod
    async def _raw_load_turns(self, key: str, last: int | None, now: float) -> list[str]: ...

    @abstractmethod
    async def _raw_delete(self, key: str, now: float, expected_version: int | None) -> bool:
        """Delete the session (alive or expired) and its turns; ``True`` if a live one was there.

        With ``expected_version`` the engine first applies :func:`check_version` to the live
        session's version, in the same atomic step as the delete. The deleted session's
        version raises the backend's highest removed version in that same step (see
        :meth:`commit`); so does every session :meth:`_raw_prune` deletes.
        """

    @abstractmethod
    async def _raw_list_keys(self, prefix: str, now: float) -> list[str]: ...

    @abstractmethod
    async def _raw_prune(self, now: float, dry_run: bool) -> list[str]: ...

    def _raw_close(self) -> None:  # noqa: B027 - a backend with nothing to release keeps this
        pass

    async def _raw_aclose(self) -> None:
        self._raw_close()


def _encode_turns(key: str, turns: object) -> list[str]:
    """Each turn of a commit encoded; a turn is a dict, and ``turns`` a sequence of them."""
    if isinstance(turns, (str, bytes, Mapping)) or not isinstance(turns, Iterable):
        raise TypeError(
            f"turns must be a sequence of dicts, got {type(turns).__name__} (session {key!r}); "
            "a single turn goes in a list: turns=[turn]"
        )
    encoded = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise TypeError(f"turns[{i}] must be a dict, got {type(turn).__name__} (session {key!r})")
        encoded.append(dumps(key, turn, root=f"turns[{i}]"))
    return encoded


def _check_write(key: str, expected_version: object, truncate: object) -> int | None:
    """Refuse arguments a commit cannot mean; returns ``truncate`` capped at :data:`MAX_COUNT`."""
    if expected_version is not None and (
        type(expected_version) is not int or not 0 <= expected_version <= MAX_VERSION
    ):
        raise ValueError(
            f"expected_version must be None or an int from 0 to 2**63 - 1, got {expected_version!r} "
            f"(session {key!r})"
        )
    if truncate is None:
        return None
    if type(truncate) is not int or truncate < 0:
        raise ValueError(f"truncate must be None or an int >= 0, got {truncate!r} (session {key!r})")
    return min(truncate, MAX_COUNT)  # keeping more turns than any log holds keeps them all


class _ErrorBoundary:
    """Translates a driver's errors into :class:`StorageError` (a class: it runs on every operation)."""

    __slots__ = ("backend", "operation", "target")

    def __init__(self, backend: BackendBase, operation: str, target: str) -> None:
        self.backend = backend
        self.operation = operation
        self.target = target

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, CognitiaError):
            return
        if not isinstance(exc, self.backend._driver_errors):
            return
        backend, operation, target = self.backend, self.operation, self.target
        if backend._closed:
            raise BackendClosedError(
                f"{backend.name} backend was closed during {operation} of {target}"
            ) from exc
        raise StorageError(f"{backend.name} backend failed to {operation} {target}: {exc}") from exc
