"""The session manager: live sessions, their persistence, and their observable lifecycle.

>>> from cognitia.session.manager import InMemorySessionManager
>>> from cognitia.session.backends import SqliteSessionBackend
>>> manager = InMemorySessionManager(backend=SqliteSessionBackend(db_path="sessions.db"))
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, nullcontext
from types import TracebackType
from typing import Any, NoReturn, TypeVar, overload

import anyio
import anyio.lowlevel
import structlog

from .._json import byte_size, check_key, dumps, loads
from .._worker import current_task
from ..errors import BackendClosedError, HookError, SessionNotFound, VersionConflictError
from ._events import EVENTS, EventName, Hook, HookRegistry, SessionEvent, Subscription
from ._session import Session, Turns
from ._store import Loaded, Pending, Store, open_store
from .backends._base import check_delete_version
from .backends._protocol import SessionBackend
from .backends._scope import MemoryScope

__all__ = [
    "APPEND_RETRIES",
    "EVENTS",
    "InMemorySessionManager",
    "Session",
    "SessionEvent",
    "Subscription",
    "Turns",
    "as_manager",
]

log = structlog.get_logger("cognitia")

H = TypeVar("H", bound=Hook)


APPEND_RETRIES = 30
"""Conflict retries for a change that commutes with any other: appending turns, merging keys.

Re-applied on a fresh copy, such a change lands exactly once whatever landed first, so
several writers on one session are outlasted (with :func:`conflict_pause`, several seconds
of them) rather than reported. The integrations use it for their appends.
"""


async def conflict_pause(attempt: int) -> None:
    """Wait before re-applying a change after ``attempt`` conflicts (``0``: the first try).

    The first retry runs at once: most conflicts come from a live copy another worker has
    moved past, and reloading settles them. Writers colliding again are truly concurrent;
    each then waits a random time, doubling up to a tenth of a second, so they stop
    landing together.
    """
    if attempt > 1:
        await anyio.sleep(random.uniform(0, min(0.1, 0.001 * 2**attempt)))


def as_manager(store: SessionBackend | InMemorySessionManager, **options: Any) -> InMemorySessionManager:
    """``store`` itself if it is a manager, else a new manager over the backend ``store``.

    What every adapter that accepts "a backend or a manager" starts with; ``options`` are
    passed to :class:`InMemorySessionManager` when one is created.

    >>> from cognitia.session.backends import InMemorySessionBackend
    >>> manager = as_manager(InMemorySessionBackend())
    >>> as_manager(manager) is manager
    True
    """
    if isinstance(store, InMemorySessionManager):
        return store
    if store is None:
        raise TypeError("a backend or a session manager is needed, got None")
    return InMemorySessionManager(store, **options)


def _own_copy(key: str, state: dict[str, Any] | None) -> dict[str, Any]:
    """A session's initial state: a deep copy of ``state``, which must be storable."""
    return {} if state is None else loads(dumps(key, state))


class _KeyLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, list[Any]] = {}

    def hold(self, key: str) -> _Held:
        return _Held(self._locks, key)


_FINALIZER_TURNS = 20
"""Scheduler turns given to an abandoned streaming handler's finalizer to start closing it."""


class _Parked:
    """The holder of a key whose streaming handler is suspended at a chunk, last run by ``task``."""

    __slots__ = ("task",)

    def __init__(self, task: object) -> None:
        self.task = task


class _Held:
    """``async with locks.hold(key)``: a class, not a generator, as it wraps every operation.

    The entry for a key is ``[semaphore or None, holders and waiters, holding task]``. A
    free key is taken without creating any lock object (``[None, 1, task]``): most
    operations never wait,
    and making an anyio semaphore per operation was a measurable part of a decorated
    call. The first caller that finds the key taken creates the semaphore it waits on,
    so a semaphore is always made inside the event loop whose tasks wait on it, never
    cached across loops or runtimes.
    """

    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: dict[str, list[Any]], key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        locks, key = self._locks, self._key
        if key not in locks:
            # A free key is taken without yielding to the scheduler, but a cancelled
            # caller still stops here (the operation checkpoints in storage).
            await anyio.lowlevel.checkpoint_if_cancelled()
        entry = locks.get(key)
        me = current_task()
        if entry is not None and me is not None and entry[2] is not None:
            if entry[2] is me:
                raise RuntimeError(
                    f"session {key!r} is held by this very task: code running inside an operation "
                    "on it (a locked() block, a hook of its step, a decorated handler of it) called "
                    "the manager for the same key, which would wait for itself forever (hand that "
                    "work to another task, or do it after the operation)"
                )
            if type(entry[2]) is _Parked and entry[2].task is me:
                entry = await self._await_abandoned_stream(entry, me)
        if entry is None:
            entry = locks[key] = [None, 1, me]
            self._entry = entry
            return
        entry[1] += 1
        try:
            if entry[0] is None:
                # The key is held, so the semaphore starts at 0. A semaphore, not a Lock:
                # a streaming handler its caller abandons is closed by the runtime's
                # async-generator finalizer in another task, which must be able to release
                # the key (a Lock refuses a release by a task that does not own it).
                entry[0] = anyio.Semaphore(0)
            await entry[0].acquire()
        except BaseException:
            self._drop(entry)
            raise
        entry[2] = me
        self._entry = entry

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    async def _await_abandoned_stream(self, entry: list[Any], me: object) -> list[Any] | None:
        """The key is held by a streaming handler this task iterated and left suspended.

        A stream left by ``break`` is closed by the runtime's async-generator finalizer,
        in a task of its own, within a few turns of the scheduler: give it those turns, and
        the key is free or held by that task (and waited for as usual). A stream still
        suspended after them is one the caller keeps, and waiting would be forever.
        """
        parked = entry[2]
        for _ in range(_FINALIZER_TURNS):
            await anyio.lowlevel.checkpoint()
            current = self._locks.get(self._key)
            if current is not entry or entry[2] is not parked:
                return current
        raise RuntimeError(
            f"session {self._key!r} is held by a streaming handler this task started and has not "
            "finished: iterate it to the end, or close it (`async with contextlib.aclosing(stream)`), "
            "before calling the manager for the same key; waiting would be forever"
        )

    def _park(self) -> None:
        """A streaming handler holding the key hands a chunk out: no task runs it until resumed."""
        self._entry[2] = _Parked(self._entry[2])

    def _unpark(self) -> None:
        """The handler runs again, in whichever task resumed it (or closes it)."""
        self._entry[2] = current_task()

    def _release(self) -> None:
        entry = self._entry
        entry[2] = None
        try:
            if entry[0] is not None:
                entry[0].release()
        finally:
            self._drop(entry)

    def _drop(self, entry: list[Any]) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self._locks[self._key]


class _Operation(_Held):
    """``async with manager._operation(key)``: the key's lock, then the capacity check."""

    __slots__ = ("_manager",)

    def __init__(self, manager: InMemorySessionManager, key: str) -> None:
        self._locks = manager._locks._locks
        self._key = key
        self._manager = manager

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()
        manager = self._manager
        if manager.max_sessions is not None and len(manager._live) > manager.max_sessions:
            # Whatever the operation's outcome: a session it made live counts against the
            # bound even if it failed or was cancelled (an outage must not grow the live set
            # with every key it touches). Shielded, so that a cancellation arriving now does
            # not report a committed save as cancelled. Eviction never waits for a key in
            # use, each of its saves is bounded by save_timeout, and its failures are
            # reported, never raised here. After a failure or a cancellation only sessions
            # with nothing to save go: the caller is not held by writes (storage may be
            # what failed), and the next operation that succeeds saves and evicts the rest.
            with anyio.CancelScope(shield=True):
                await manager._evict_over_capacity(self._key, unsaved=exc is None)


class _Operations(_Operation):
    """:class:`_Operation` over several keys, taken one after the other in sorted order.

    Every operation over several keys takes them in that one order, so they never wait
    for each other in a cycle.
    """

    __slots__ = ("_held",)

    def __init__(self, manager: InMemorySessionManager, keys: tuple[str, ...]) -> None:
        super().__init__(manager, keys[-1])
        self._held = [_Held(self._locks, key) for key in keys[:-1]]

    async def __aenter__(self) -> None:
        taken: list[_Held] = []
        try:
            for held in self._held:
                await held.__aenter__()
                taken.append(held)
            await super().__aenter__()
        except BaseException:
            for held in reversed(taken):
                held._release()
            raise

    def _release(self) -> None:
        try:
            super()._release()
        finally:
            for held in reversed(self._held):
                held._release()


class InMemorySessionManager:
    """Owns live sessions, persists them through a backend, and reports every lifecycle step.

    Without a backend, sessions live in memory only. With one, ``register`` and ``close``
    persist (as do ``save`` and ``update``), and ``get`` rehydrates a session that is not
    live from storage. Operations on one key are serialized; different keys never wait on
    each other. Each step fires the hooks registered with :meth:`on` and logs a structlog
    event (``session.saved``, ...) carrying the key, scope, backend, runtime, version, size
    and duration, never the state.

    Args:
        backend: any :class:`~cognitia.session.backends.SessionBackend`, or ``None``.
        idle_ttl: seconds without use after which a live session is saved and evicted
            (event ``expired``). Checked on access, by :meth:`evict_idle`, and every
            ``sweep_interval`` seconds while the manager is entered with ``async with``.
        max_sessions: evict the least recently used live sessions beyond this many
            (event ``evicted``). Evicted sessions stay in storage.
        retries: how many times :meth:`update` re-applies a change after a version conflict
            (at once the first time, then after a short random pause that doubles each time).
        revalidate: before a live session is used, check that storage still holds the
            version it was loaded or saved as, and reload it if another worker (or another
            manager on the same storage) saved or deleted it since (event ``loaded`` with
            ``reason="stale"``). Costs one read of the stored record per access; turns
            already in memory are kept while the version is unchanged. Turn it on when
            requests for one session may reach different workers.
        strict_hooks: re-raise hook failures as :class:`~cognitia.errors.HookError`
            instead of logging them (for tests).
        sweep_interval: seconds between idle and retention sweeps under ``async with``.
        save_timeout: seconds a write may take before it raises ``TimeoutError``; its
            outcome is then unknown, so the live copy is dropped and the next access reads
            storage. Also how long a step's hooks may run (shielded) before the one still
            running is cancelled and reported as failed.
        clock: monotonic clock for idle tracking.

    >>> manager = InMemorySessionManager()
    >>> unsubscribe = manager.on("saved", lambda event: print(event.name, event.key, event.version))
    """

    def __init__(
        self,
        backend: SessionBackend | None = None,
        *,
        idle_ttl: float | None = None,
        max_sessions: int | None = None,
        retries: int = 3,
        revalidate: bool = False,
        strict_hooks: bool = False,
        sweep_interval: float = 60.0,
        save_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_ttl is not None and not idle_ttl > 0:
            raise ValueError(f"idle_ttl must be a positive number of seconds or None, got {idle_ttl!r}")
        if max_sessions is not None and max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1 or None, got {max_sessions!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.backend = backend
        self.idle_ttl = idle_ttl
        self.max_sessions = max_sessions
        self.retries = retries
        self.revalidate = revalidate
        self.sweep_interval = sweep_interval
        self.save_timeout = save_timeout
        self._live: OrderedDict[str, Session] = OrderedDict()
        self._store: Store = open_store(backend, self._live)
        self._hooks = HookRegistry(strict=strict_hooks)
        self._clock = clock
        self._locks = _KeyLocks()
        self._closed = False
        self._evicting: set[str] = set()
        """Keys of sessions being saved on their way out for capacity: while still in the
        live set, no longer counted as live."""
        self._task_group: anyio.abc.TaskGroup | None = None

    @classmethod
    def of(
        cls, store: SessionBackend | InMemorySessionManager, *, max_sessions: int | None = 256
    ) -> InMemorySessionManager:
        """``store`` itself if it is a manager, else a new manager over the backend.

        For components that accept either (the integrations do). A manager made here
        belongs to one component object, while other objects, processes or managers may
        use the same storage, so it is created with ``revalidate=True``; and it keeps at
        most ``max_sessions`` sessions live (the least recently used are evicted, and stay
        in storage), so a long-running server does not hold every conversation it has
        served. Pass a manager of your own to choose other settings.
        """
        if isinstance(store, InMemorySessionManager):
            return store
        return cls(store, revalidate=True, max_sessions=max_sessions)

    # -- hooks ------------------------------------------------------------------------------

    @overload
    def on(self, event: EventName | str, hook: None = None) -> Callable[[H], H]: ...

    @overload
    def on(self, event: EventName | str, hook: Hook) -> Subscription: ...

    def on(self, event: EventName | str, hook: Hook | None = None) -> Subscription | Callable[[H], H]:
        """Call ``hook(event)`` after every ``event`` step; returns a handle that unregisters it.

        ``hook`` may be sync or async. Used as a decorator (``@manager.on("saved")``) it
        returns the function unchanged; unregister it with :meth:`off`. A hook that raises
        does not undo or fail the step: the failure is logged as ``session.hook_failed``
        (raised instead with ``strict_hooks=True``).
        """
        if hook is None:

            def register(fn: H) -> H:
                self._hooks.add(event, fn)
                return fn

            if event not in EVENTS:
                raise ValueError(f"unknown lifecycle event {event!r}; expected one of {', '.join(EVENTS)}")
            return register
        return self._hooks.add(event, hook)

    def off(self, event: EventName | str, hook: Hook) -> bool:
        """Unregister ``hook`` from ``event``; ``True`` if it was registered."""
        if event not in EVENTS:
            raise ValueError(f"unknown lifecycle event {event!r}; expected one of {', '.join(EVENTS)}")
        return Subscription(self._hooks, event, hook).cancel()

    # -- lifecycle of one session -------------------------------------------------------------

    async def register(self, key: str, state: dict[str, Any] | None = None) -> Session:
        """Make ``key`` a live session with a copy of ``state`` (default ``{}``) and persist it.

        If a session with that key is stored already, ``state`` replaces its state (the
        version keeps counting, the turn log is kept). To resume a stored session, use
        :meth:`get` or :meth:`open`.
        """
        check_key(key)
        state = _own_copy(key, state)
        async with self._operation(key):
            live = self._live.get(key)
            if self._store.backend is None:
                session = live or Session(key, state, turns=Turns(key, 0, self._store.turn_loader))
                await self._register_write(session, state, None)
            else:
                session = await self._register_stored(key, live, state)
            self._admit(session)
            return session

    async def _register_stored(self, key: str, live: Session | None, state: dict[str, Any]) -> Session:
        """:meth:`register` over storage, whose turn log is kept: the session must know its length.

        Every write checks the version it was based on. A live copy is written with its
        queued turns only while storage still holds its version: one storage has moved past
        (another worker, or a save of unknown outcome that landed after all, turns queued
        included) is replaced by a session read from storage. After ``retries`` conflicts
        the state is written alone, unchecked, so that no turn is added or cut on a count
        that may be stale (turns queued on the live copy are dropped then).
        """
        for attempt in range(self.retries + 1):
            if attempt:
                await conflict_pause(attempt)
            if live is not None and not self.revalidate and not attempt:
                # A copy only this manager writes is current, unless a save whose outcome
                # was unknown landed: the version check tells.
                session, expected = live, live.version
            else:
                stored = await self._store.read(key)
                expected = 0 if stored is None else stored.version
                if live is not None and live.version == expected:
                    session = live
                else:
                    count = 0 if stored is None else stored.turn_count
                    session = Session(key, state, turns=Turns(key, count, self._store.turn_loader))
            try:
                await self._register_write(session, state, expected)
            except VersionConflictError:
                live = None  # dropped by the conflict: storage decides from now on
                continue
            return session
        stored = await self._store.read(key)
        read = 0 if stored is None else stored.version
        session = Session(
            key, state, turns=Turns(key, 0 if stored is None else stored.turn_count, self._store.turn_loader)
        )
        await self._register_write(session, state, None)
        if session.version != read + 1:  # another write came in between: count again
            now = await self._store.read(key)
            if now is not None and now.version == session.version:
                session.turns._restart(now.turn_count)
        return session

    async def _register_write(self, session: Session, state: dict[str, Any], expected: int | None) -> None:
        """Store ``state`` as the session's state; a write that fails leaves the live copy as it was."""
        previous = session.state
        session.state = state
        try:
            await self._persist(session, "registered", expected=expected)
        except BaseException:
            session.state = previous
            raise

    async def get(self, key: str) -> Session:
        """The live session for ``key``, rehydrated from the backend if it is not live.

        Raises :class:`~cognitia.errors.SessionNotFound` if it exists nowhere.
        """
        check_key(key)
        async with self._operation(key):
            session = await self._get_locked(key)
            if session is None:
                raise SessionNotFound(key)
            return session

    async def open(self, key: str, state: dict[str, Any] | None = None) -> Session:
        """:meth:`get` the session, or create it with a copy of ``state`` if it exists nowhere.

        The copy is made, and checked to be storable, before anything else: the caller's
        dict (a shared default, say) never becomes a session's state.
        A created session is live but not yet stored; its first :meth:`save` stores it
        (and fails with a conflict if another worker created the key in the meantime).
        """
        check_key(key)
        initial = _own_copy(key, state)
        async with self._operation(key):
            session = await self._get_locked(key)
            if session is None:
                session = Session(
                    key,
                    initial,
                    turns=Turns(key, 0, self._store.turn_loader),
                    last_active=self._clock(),
                )
                self._admit(session)
            return session

    async def save(self, session: Session | str) -> Session:
        """Persist the session's state and its queued turns as one atomic step.

        Raises :class:`~cognitia.errors.VersionConflictError` if another writer saved the
        session since it was loaded (the live copy is then dropped, so the next
        :meth:`get` sees the stored one). Use :meth:`update` to retry automatically.
        """
        key = session if isinstance(session, str) else session.key
        check_key(key)
        async with self._operation(key):
            live = self._live.get(key)
            if live is None:
                if isinstance(session, str):
                    raise SessionNotFound(key)
                live = session
            elif not isinstance(session, str) and live is not session:
                raise ValueError(
                    f"session {key!r} passed to save() is not the manager's live session for that key "
                    "(it was closed or reloaded); get() it again"
                )
            await self._persist(live, "saved", expected=live.version)
            self._admit(live)
            return live

    async def update(
        self,
        key: str,
        change: Callable[[Session], Awaitable[object] | object],
        *,
        retries: int | None = None,
    ) -> Session:
        """Apply ``change(session)`` and save, re-applying it on a fresh copy after a conflict.

        ``change`` (sync or async) mutates ``session.state`` and may append turns. If
        another worker saved in between, the session is reloaded and ``change`` runs again,
        up to ``retries`` times (default: the manager's); then the conflict is raised.
        """
        sessions = await self._update((key,), lambda sessions: change(sessions[key]), retries)
        return sessions[key]

    async def update_many(
        self,
        keys: Iterable[str],
        change: Callable[[dict[str, Session]], Awaitable[object] | object],
        *,
        retries: int | None = None,
    ) -> dict[str, Session]:
        """:meth:`update` several sessions together: ``change(sessions)`` then one save of them all.

        ``sessions`` maps each key to its session (a session stored nowhere starts empty,
        as in :meth:`update`). On a backend declaring ``multi_key_commit`` (every one of
        cognitia's own) the states and queued turns of all of them are stored in one
        transaction: all land, or none does, whether a version conflict, a failure or a
        crash stops the save. A conflict on any of them re-applies ``change`` to fresh
        copies of all of them, up to ``retries`` times. Each stored session fires ``saved``.

        The keys are taken in sorted order, so calls over several keys never wait for each
        other in a cycle. Code that holds one key and then waits for another (inside
        :meth:`locked`, or a decorated handler calling a second session) takes them in its
        own order: if that order is not sorted, it can wait in a cycle with a call over both
        keys, as any two tasks taking two locks in opposite orders can. Called by a task
        that holds one of its keys, it raises ``RuntimeError`` (it would wait for itself).

        On a plain four-method backend the sessions are written one after the other,
        every version checked first: a conflict found then writes nothing, but a failure
        part way leaves the first ones written.

        >>> def move(sessions):
        ...     sessions["agent:a"].state["credits"] -= 5
        ...     sessions["agent:b"].state["credits"] += 5
        >>> await manager.update_many(["agent:a", "agent:b"], move)  # doctest: +SKIP
        """
        if isinstance(keys, str | bytes):
            raise TypeError(f"update_many takes a list of keys, not one key: got {keys!r}")
        given = list(keys)
        for key in given:
            check_key(key)
        ordered = sorted(given)
        if not ordered:
            raise ValueError("update_many needs at least one key")
        for before, key in itertools.pairwise(ordered):
            if before == key:
                raise ValueError(f"session {key!r} is given twice to update_many")
        return await self._update(tuple(ordered), change, retries)

    async def _update(
        self,
        keys: tuple[str, ...],
        change: Callable[[dict[str, Session]], Awaitable[object] | object],
        retries: int | None,
    ) -> dict[str, Session]:
        if retries is not None and (type(retries) is not int or retries < 0):
            raise ValueError(
                f"retries must be an int >= 0, got {retries!r} (sessions {', '.join(map(repr, keys))})"
            )
        attempts = (self.retries if retries is None else retries) + 1
        for attempt in range(attempts):
            if attempt:
                await conflict_pause(attempt)
            async with self._operation(*keys):
                sessions: dict[str, Session] = {}
                try:
                    for key in keys:
                        found = await self._get_locked(key)
                        sessions[key] = found or Session(
                            key, {}, turns=Turns(key, 0, self._store.turn_loader)
                        )
                except VersionConflictError:
                    # An idle live copy's unsaved changes lost to a newer save (the copy is
                    # dropped): retried like a conflict of this save.
                    if attempt + 1 < attempts:
                        continue
                    raise
                points = [(session, session._checkpoint()) for session in sessions.values()]
                saving = False
                try:
                    # update_many's change gets a copy: it decides nothing by editing the dict.
                    # (update's passes it to no one, and a copy per turn is not free.)
                    result = change(sessions if len(keys) == 1 else dict(sessions))
                    if inspect.isawaitable(result):
                        await result
                    saving = True
                    if len(keys) == 1:
                        session = sessions[keys[0]]
                        await self._persist(session, "saved", expected=session.version)
                    else:
                        await self._persist_many(list(sessions.values()))
                except BaseException as exc:
                    # Only this save's conflict is retried (the live copies are dropped, so
                    # the next attempt reloads); a conflict raised by `change` is its failure.
                    if saving and isinstance(exc, VersionConflictError):
                        if attempt + 1 < attempts:
                            continue
                        raise
                    # A change that failed (or could not be stored) must not linger in the
                    # live sessions, or the next save would store half of it.
                    for session, point in points:
                        if not session._rollback(point) and self._live.get(session.key) is session:
                            del self._live[session.key]
                    raise
                for session in sessions.values():
                    self._admit(session)
                return sessions
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self, key: str) -> bool:
        """Persist the session if it changed, and drop it from the live set.

        Returns ``False`` if the session was not live.
        """
        check_key(key)
        async with self._operation(key, allow_closed=True):
            session = self._live.get(key)
            if session is None:
                return False
            await self._retire(session, "closed", reason=None)
            return True

    async def close_all(self) -> None:
        """:meth:`close` every live session.

        A session that cannot be saved (its state no longer encodes, storage is down) does
        not stop the others from closing: each is tried, and then the failure is raised
        (an :class:`ExceptionGroup` if more than one failed). Those sessions stay live.
        """
        failures: list[Exception] = []
        for key in list(self._live):
            try:
                await self.close(key)
            except Exception as exc:
                failures.append(exc)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise ExceptionGroup(f"{len(failures)} sessions could not be closed", failures)

    async def delete(self, key: str, *, expected_version: int | None = None) -> bool:
        """Drop the session from the live set and delete it from storage, turns included.

        Returns whether there was a session to delete (stored, or live only).

        ``expected_version=n`` deletes only if the stored session still has version ``n``
        (an expired one counts as absent), checked in the same atomic step as the delete on
        cognitia's own backends; a plain four-method backend is checked from this process's
        point of view only. Otherwise :class:`~cognitia.errors.VersionConflictError` is
        raised, nothing is deleted, and ``conflict`` is emitted. As after a conflicting
        save, a live copy whose version is not the stored one is dropped, so the next
        :meth:`get` sees what storage holds; a live copy at the stored version is kept.

        >>> session = await manager.get("agent:a")  # doctest: +SKIP
        >>> await manager.delete("agent:a", expected_version=session.version)  # doctest: +SKIP
        True
        """
        check_key(key)
        check_delete_version(key, expected_version)
        async with self._operation(key):
            started = time.perf_counter()
            session = self._live.get(key)
            try:
                existed = await self._store.delete(key, expected_version)
            except VersionConflictError as exc:
                if session is not None and (session.version or None) != exc.actual:
                    self._live.pop(key, None)
                await self._emit("conflict", key, exc.expected, started, reason=f"found {exc.actual}")
                raise
            except BaseException:
                # The outcome is unknown (timeout, connection lost): forget the live copy so
                # the next access reads what storage really holds.
                self._live.pop(key, None)
                raise
            self._live.pop(key, None)
            existed = existed or session is not None
            if existed:
                if expected_version is not None:  # the version storage had when it was deleted
                    version = expected_version
                else:
                    version = 0 if session is None else session.version
                await self._emit("deleted", key, version, started)
            return existed

    # -- reading ------------------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        """The live sessions, least recently used first."""
        return list(self._live.values())

    def live_keys(self) -> list[str]:
        """Keys of the live sessions, least recently used first."""
        return list(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    async def list_keys(self, prefix: str | MemoryScope = "") -> list[str]:
        """Stored keys (and live ones not stored yet), sorted; filtered by prefix or scope."""
        if isinstance(prefix, MemoryScope):
            prefix = prefix.prefix
        stored = await self._store.keys(prefix)
        live = [k for k in self._live if k.startswith(prefix)]
        return sorted(set(stored).union(live))

    @asynccontextmanager
    async def locked(self, key: str) -> AsyncIterator[Session | None]:
        """Hold ``key``'s lock and yield its session (rehydrated if needed), or ``None``.

        For reading consistently: no save, update or decorated call of the same key runs
        until the block ends. Calling the manager for the same key inside the block raises
        ``RuntimeError`` (it would wait for this lock); save after leaving it.

        >>> async with manager.locked("agent:user:42") as session:  # doctest: +SKIP
        ...     tail = [] if session is None else await session.turns.last(2)
        """
        check_key(key)
        async with self._operation(key):
            yield await self._get_locked(key)

    async def turns(self, key: str, *, last: int | None = None) -> list[dict[str, Any]]:
        """The session's turns, oldest first; only the newest ``last`` if given.

        Served from the live session's memory when it is there, else read from storage
        (only the tail when ``last`` is given). With ``revalidate``, a live session is
        checked against storage first, unless an operation on the key is under way (a
        decorated handler of the key may call this): that operation checked it when it began.
        """
        check_key(key)
        if last is not None and (type(last) is not int or last < 0):
            raise ValueError(f"last must be a non-negative int or None, got {last!r} (session {key!r})")
        session = self._live.get(key)
        if (
            session is not None
            and self.revalidate
            and self._store.backend is not None
            and key not in self._locks._locks
        ):
            # A key in use is not waited for: the operation holding it (perhaps the caller's
            # own, a decorated handler) revalidated the live session when it began.
            async with self._operation(key):
                session = await self._get_locked(key)
                if session is None:
                    return []
        if session is not None:
            return await (session.turns.all() if last is None else session.turns.last(last))
        return await self._store.turns(key, last)

    # -- retention ----------------------------------------------------------------------------

    async def evict_idle(self) -> list[str]:
        """Save and evict live sessions idle for longer than ``idle_ttl``; return their keys."""
        if self.idle_ttl is None:
            return []
        deadline = self._clock() - self.idle_ttl
        evicted = []
        for key, session in list(self._live.items()):
            # A key in use is not idle, and is not waited for: an operation may take longer
            # than idle_ttl (and may be the caller's own, a handler calling this).
            if session.last_active <= deadline and key not in self._locks._locks:
                async with self._operation(key, allow_closed=True):
                    current = self._live.get(key)
                    if current is not None and current.last_active <= deadline:
                        # One session that cannot be saved must not keep the others live.
                        if await self._retire_or_report(current, "expired", reason="idle"):
                            evicted.append(key)
        return evicted

    async def prune(self, *, dry_run: bool = False) -> list[str]:
        """Remove stored sessions past the backend's TTL; with ``dry_run``, only report them.

        Each pruned key fires ``pruned`` (``reason="dry_run"`` when nothing was deleted).
        """
        started = time.perf_counter()
        keys = await self._store.prune(dry_run)
        for key in keys:
            if not dry_run:
                self._live.pop(key, None)
            await self._emit("pruned", key, 0, started, reason="dry_run" if dry_run else "ttl")
        return keys

    async def _sweep_forever(self) -> None:
        while True:
            await anyio.sleep(self.sweep_interval)
            try:
                await self.evict_idle()
                if self._store.expires:
                    await self.prune()
            except Exception as exc:
                # A sweep that fails (the database is briefly unreachable) is retried on
                # the next tick; the manager keeps serving.
                log.warning(
                    "session.sweep_failed",
                    backend=self._store.name,
                    error=f"{type(exc).__module__}.{type(exc).__qualname__}",
                )

    # -- the manager's own lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> InMemorySessionManager:
        if self._task_group is not None:
            raise RuntimeError("this manager is already entered")
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        if self.idle_ttl is not None or self._store.expires:
            self._task_group.start_soon(self._sweep_forever)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        assert task_group is not None
        task_group.cancel_scope.cancel()  # stops the sweeper
        # Shielded from outer cancellation: the sweeper ends at once, and a cancellation of
        # the caller arriving while it does must not replace the body's exception.
        task_group.cancel_scope.shield = True
        try:
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            # The body's exception is not the sweeper's: it goes on as raised, not wrapped in
            # an exception group by the task group.
            await task_group.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Refuse further operations, then close every live session. The backend stays open.

        Operations already under way finish first, and the sessions they leave live are
        closed too. The manager is closed even if some sessions could not be saved; their
        failures are raised as by :meth:`close_all`.
        """
        # Closed first, so that no operation starts meanwhile; one already under way is
        # waited for (closing its key takes the key's lock) and what it leaves live is closed.
        self._closed = True
        failed: dict[str, Exception] = {}
        while keys := [key for key in dict.fromkeys((*self._live, *self._locks._locks)) if key not in failed]:
            for key in keys:
                try:
                    await self.close(key)
                except Exception as exc:
                    failed[key] = exc
        failures = list(failed.values())
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise ExceptionGroup(f"{len(failures)} sessions could not be closed", failures)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"<InMemorySessionManager backend={self._store.name} live={len(self._live)}>"

    # -- internals --------------------------------------------------------------------------

    def _operation(self, key: str, *more: str, allow_closed: bool = False) -> _Operation:
        """Hold ``key``'s lock (and those of ``more``, sorted keys after it) for one operation;
        afterwards, evict beyond ``max_sessions``."""
        if self._closed and not allow_closed:
            raise BackendClosedError(f"session manager is closed: cannot use session {key!r}")
        return _Operation(self, key) if not more else _Operations(self, (key, *more))

    async def _get_locked(self, key: str) -> Session | None:
        session = self._live.get(key)
        if session is not None:
            if self.idle_ttl is not None and session.last_active <= self._clock() - self.idle_ttl:
                await self._retire(session, "expired", reason="idle")
            elif not self.revalidate or self._store.backend is None:
                return self._touch(session)
            else:
                started = time.perf_counter()
                loaded = await self._store.read(key)
                if self._current(session, loaded):
                    return self._touch(session)
                # Another writer saved or deleted the session since this copy was made.
                del self._live[key]
                if loaded is None:
                    await self._emit("evicted", key, session.version, started, reason="gone")
                    return None
                return await self._rehydrate(key, loaded, started, reason="stale")
        started = time.perf_counter()
        loaded = await self._store.read(key)
        if loaded is None:
            return None
        return await self._rehydrate(key, loaded, started, reason=None)

    def _touch(self, session: Session) -> Session:
        session.last_active = self._clock()
        self._live.move_to_end(session.key)
        return session

    def _current(self, session: Session, loaded: Loaded | None) -> bool:
        """Whether a live session may be served as it is, given what storage holds now."""
        if loaded is None:
            return session.version == 0  # created by open(), not stored yet
        if loaded.version == session.version:
            return True
        # Changes made to the live copy and not saved yet are never dropped here: its next
        # save reports the conflict, as it would without revalidation.
        return self._changed(session)

    async def _rehydrate(self, key: str, loaded: Loaded, started: float, *, reason: str | None) -> Session:
        session = Session(
            key,
            loaded.state,
            version=loaded.version,
            turns=Turns(key, loaded.turn_count, self._store.turn_loader),
            saved_json=dumps(key, loaded.state),
            last_active=self._clock(),
        )
        self._admit(session)
        await self._emit(
            "loaded", key, loaded.version, started, size=loaded.bytes, turns=loaded.turn_count, reason=reason
        )
        return session

    async def _persist(
        self,
        session: Session,
        event: str,
        *,
        expected: int | None,
        default: Callable[[Any], Any] | None = None,
    ) -> None:
        """Write state and queued turns; shielded so a cancelled caller never leaves it half-known.

        Everything is encoded (and so validated) before storage is touched.
        """
        started = time.perf_counter()
        write, count = self._encode(session, expected, default)
        key = session.key
        conflict: VersionConflictError | None = None
        # The write is shielded from the caller's cancellation but bounded by save_timeout.
        with self._write_scope() as scope:
            try:
                version = await self._store.write(
                    key, write.state, write.state_json, expected, write.turns, write.truncate
                )
            except VersionConflictError as exc:
                self._live.pop(key, None)
                conflict = exc
            except BaseException:
                # The outcome is unknown (timeout, connection lost): forget the live copy so
                # the next access reads what storage really holds.
                self._live.pop(key, None)
                raise
            else:
                self._stored(session, write, count, version, default)
        if scope.cancelled_caught:
            raise TimeoutError(f"saving session {key!r} took longer than {self.save_timeout}s")
        if conflict is not None:
            try:
                await self._report_conflict(conflict, session.version, started)
            finally:
                del conflict  # no cycle through the error's traceback, which holds this frame
        await self._report(event, session, write, count, started)

    async def _persist_many(self, sessions: list[Session]) -> None:
        """:meth:`_persist` of several sessions as one write (one transaction where storage has them)."""
        started = time.perf_counter()
        encoded = [self._encode(session, session.version, None) for session in sessions]
        conflict: VersionConflictError | None = None
        with self._write_scope() as scope:
            try:
                versions = await self._store.write_many([write for write, _ in encoded])
            except BaseException as exc:
                # A conflict, or an outcome unknown: every live copy is forgotten, so the
                # next access reads what storage holds.
                for session in sessions:
                    self._live.pop(session.key, None)
                if not isinstance(exc, VersionConflictError):
                    raise
                conflict = exc
            else:
                for session, (write, count), version in zip(sessions, encoded, versions, strict=True):
                    self._stored(session, write, count, version, None)
        if scope.cancelled_caught:
            keys = ", ".join(repr(session.key) for session in sessions)
            raise TimeoutError(f"saving sessions {keys} took longer than {self.save_timeout}s")
        if conflict is not None:
            stale = next((s.version for s in sessions if s.key == conflict.key), 0)
            try:
                await self._report_conflict(conflict, stale, started)
            finally:
                del conflict  # no cycle through the error's traceback, which holds this frame
        for session, (write, count) in zip(sessions, encoded, strict=True):
            await self._report("saved", session, write, count, started)

    def _encode(
        self, session: Session, expected: int | None, default: Callable[[Any], Any] | None
    ) -> tuple[Pending, int]:
        """The session's write (state and queued turns as JSON) and how many turns it appends."""
        key = session.key
        state_json = dumps(key, session.state)
        pending = session.turns._take_pending()
        count = len(pending)
        turns_json = [
            dumps(key, turn, root="turn" if count == 1 else f"turns[{i}]", default=default)
            for i, turn in enumerate(pending)
        ]
        return Pending(key, session.state, state_json, expected, turns_json, session.turns._truncate), count

    def _write_scope(self) -> anyio.CancelScope:
        """Shielded from the caller's cancellation, bounded by ``save_timeout``."""
        return anyio.CancelScope(shield=True, deadline=anyio.current_time() + self.save_timeout)

    def _stored(
        self, session: Session, write: Pending, count: int, version: int, default: Callable[[Any], Any] | None
    ) -> None:
        """Record a committed write in the live session."""
        session.version = version
        # With a converter, memory must hold what storage holds, not the original objects.
        session.turns._committed(count, None if default is None else [loads(t) for t in write.turns])
        session._saved_json = write.state_json
        session.last_active = self._clock()

    async def _report_conflict(
        self, conflict: VersionConflictError, version: int, started: float
    ) -> NoReturn:
        await self._announce("conflict", conflict.key, version, started, 0, 0, f"found {conflict.actual}")
        try:
            raise conflict
        finally:
            del conflict

    async def _report(self, event: str, session: Session, write: Pending, count: int, started: float) -> None:
        await self._announce(
            event, session.key, session.version, started, byte_size(write.state_json), count, None
        )

    async def _announce(
        self, name: str, key: str, version: int, started: float, size: int, count: int, reason: str | None
    ) -> None:
        # Called after the deadline scope: a slow hook cannot fail a committed save.
        await self._emit(name, key, version, started, size=size, turns=count, reason=reason)

    async def _retire(self, session: Session, event: str, *, reason: str | None) -> None:
        """Persist the session if it changed, drop it from the live set, and report ``event``."""
        started = time.perf_counter()
        if self._store.backend is not None and self._changed(session):
            try:
                await self._persist(session, "saved", expected=session.version)
            except VersionConflictError:
                raise  # storage moved on: the live copy is rightly gone
            except BaseException:
                # Not saved, or not known to be: the session stays live with its unsaved
                # turns. The next try stores them, or, if this write did land, reports a
                # conflict and reloads what storage holds.
                if session.key not in self._live:
                    self._live[session.key] = session
                    self._live.move_to_end(session.key, last=False)
                raise
        self._live.pop(session.key, None)
        self._store.dropped(session.key, session.version)
        await self._emit(event, session.key, session.version, started, reason=reason)

    @staticmethod
    def _changed(session: Session) -> bool:
        if (
            session.turns._take_pending()
            or session.turns._truncate is not None
            or session._saved_json is None
        ):
            return True
        try:
            return dumps(session.key, session.state) != session._saved_json
        except Exception:
            return True

    def _admit(self, session: Session) -> None:
        self._live[session.key] = session
        self._live.move_to_end(session.key)

    async def _evict_over_capacity(self, keep: str, *, unsaved: bool = True) -> None:
        """Save and evict least recently used sessions until at most ``max_sessions`` are live.

        Runs on whichever caller pushed the live set over capacity; its own session,
        ``keep``, just used, stays. A session whose key is in use (held, or waited for) is
        skipped, never waited for: the caller must not wait on another key (a handler
        calling a sub-agent under a second key would wait for itself). A session that
        cannot be saved stays live and is reported, not raised to that unrelated caller;
        the next eviction tries it again. Without ``unsaved``, a session with changes to save
        is passed over too.
        """
        assert self.max_sessions is not None
        for key in list(self._live):
            leaving = sum(1 for key in self._evicting if key in self._live)
            if len(self._live) - leaving <= self.max_sessions:
                return
            if key == keep or key in self._locks._locks:
                continue
            if not unsaved and self._store.backend is not None and self._changed(self._live[key]):
                continue
            async with self._locks.hold(key):
                session = self._live.get(key)
                if session is not None:
                    # Counted as leaving while it is saved; once out of the live set (its
                    # `evicted` hooks may still be running) it counts as gone by itself.
                    self._evicting.add(key)
                    try:
                        await self._retire_or_report(session, "evicted", reason="capacity")
                    finally:
                        self._evicting.discard(key)

    async def _retire_or_report(self, session: Session, event: str, *, reason: str | None) -> bool:
        """:meth:`_retire`, logging a failure (``session.retire_failed``) instead of raising it."""
        try:
            await self._retire(session, event, reason=reason)
        except HookError as exc:
            # Strict hooks: the step happened (the save on the way out, or the retirement
            # itself) and one of its hooks failed. Reported as that hook's failure, as it
            # would be without strict hooks, not to this unrelated caller.
            log.error(
                "session.hook_failed",
                lifecycle_event=exc.event,
                key=exc.key,
                hook=exc.hook,
                error=type(exc.__cause__).__name__,
                exc_info=exc.__cause__,
            )
            return session.key not in self._live
        except Exception as exc:
            # Only the error's type: a message may quote the state (a path to a bad value).
            log.warning(
                "session.retire_failed",
                key=session.key,
                lifecycle_event=event,
                backend=self._store.name,
                error=f"{type(exc).__module__}.{type(exc).__qualname__}",
            )
            return False
        return True

    async def _emit(
        self,
        name: str,
        key: str,
        version: int,
        started: float,
        *,
        size: int = 0,
        turns: int = 0,
        reason: str | None = None,
    ) -> None:
        """Report a step that happened: its structlog event, then its hooks.

        Hooks run shielded from the caller's cancellation, so a step that happened is
        always reported to them as it is logged; one still running after ``save_timeout``
        is cancelled and reported as failed, so a stuck hook cannot hold the manager (its
        shutdown included) for ever. With no hook for the event, emitting never
        suspends (structlog logs synchronously), so nothing can interrupt it and the
        shield, a measurable cost on every save, is skipped.
        """
        hooked = self._hooks.has_hooks(name)
        with anyio.CancelScope(shield=True) if hooked else nullcontext():
            await self._hooks.emit(
                name,
                key,
                backend=self._store.name,
                version=version,
                bytes=size,
                duration=time.perf_counter() - started,
                turns=turns,
                reason=reason,
                deadline=anyio.current_time() + self.save_timeout if hooked else math.inf,
            )
