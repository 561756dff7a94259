from __future__ import annotations

import copy
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import anyio
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.platform import time as platform_time
from google.adk.platform import uuid as platform_uuid
from google.adk.sessions import Session as AdkSession
from google.adk.sessions import State
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from pydantic_core import to_jsonable_python

from cognitia import InMemorySessionManager, Session, SessionNotFound, Turns
from cognitia.session.backends import Capability, SessionBackend, capabilities_of
from cognitia.session.manager import APPEND_RETRIES

__all__ = ["CognitiaSessionService"]

Turn = dict[str, Any]

SNAPSHOT_ATTEMPTS = 8
"""How many times ``get_session`` reads a session and its app and user state while appends
keep changing them; the last read is returned if none was a single snapshot."""

RETRY_WINDOW = 16
"""How many of a session's newest events a retried append is looked for among, in any order."""


class CognitiaSessionService(BaseSessionService):
    """A Google ADK session service that stores sessions in cognitia.

    Keys (each part percent-encoded, so ids may contain ``:``)::

        {prefix}session:{app}:{user}:{session_id}   one per ADK session
        {prefix}app:{app}                           the app's "app:" state
        {prefix}user:{app}:{user}                   the user's "user:" state

    A session's cognitia state holds its ids, its own state (keys without a prefix) and
    its last update time; each event is one turn of its turn log, the event's
    ``model_dump(mode="json", exclude_none=True)``. Appending an event appends one turn,
    so its cost does not grow with the session, and ``num_recent_events`` reads only
    the tail of the log. ``app:`` and ``user:`` keys go to their own cognitia keys,
    shared by every session of the app or of the user; ``temp:`` keys are never stored,
    as in ADK's own services.

    A live session keeps its newest ``cached_events`` events validated, so a read of the
    whole session (the Runner's default) validates each event once and then hands out
    copies, which cost about half as much; past that many, older events are validated on
    every read, as ADK's own services do. Each cached event costs a few kilobytes of memory,
    held only while the session is live in the manager, and all sessions together keep at
    most ``cached_events_total``: beyond it, the caches of the sessions read or appended to
    least recently are let go.

    Writes are versioned: a session object carries the version it was read at, and
    appending through a copy that another writer has since advanced raises ADK's
    ``StaleSessionError``. Every write goes through the
    :class:`~cognitia.InMemorySessionManager`, so its hooks and structlog events fire
    for every event.

    >>> from cognitia.session.backends import SqliteSessionBackend
    >>> service = CognitiaSessionService(SqliteSessionBackend("adk.db"))
    >>> # runner = Runner(agent=agent, app_name="dice", session_service=service)

    Args:
        backend_or_manager: an :class:`~cognitia.InMemorySessionManager`, or a backend
            to wrap in a new one.
        prefix: prepended to every key this service writes.
        cached_events: how many of a live session's newest events to keep validated
            (0 turns the cache off).
        cached_events_total: how many validated events all live sessions keep together
            (about 6 KB each: the default bounds the cache near 120 MB).
    """

    def __init__(
        self,
        backend_or_manager: InMemorySessionManager | SessionBackend,
        *,
        prefix: str = "adk:",
        cached_events: int = 1_000,
        cached_events_total: int = 20_000,
    ) -> None:
        for name, value in (("cached_events", cached_events), ("cached_events_total", cached_events_total)):
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.manager = InMemorySessionManager.of(backend_or_manager)
        self.prefix = prefix
        self.cached_events = min(cached_events, cached_events_total)
        self.cached_events_total = cached_events_total
        # Per live cognitia session: its validated events. Dropped with the session object,
        # so a session the manager evicts, reloads or deletes takes its cache with it.
        self._events: weakref.WeakKeyDictionary[Session, _EventCache] = weakref.WeakKeyDictionary()
        # Per session key being appended to: its lock and how many appends hold or await it.
        self._appending: dict[str, list[Any]] = {}

    # -- keys -------------------------------------------------------------------------------

    def session_key(self, app_name: str, user_id: str, session_id: str) -> str:
        """The cognitia key of one ADK session."""
        return f"{self._sessions_prefix(app_name, user_id)}{_part(session_id, 'session_id')}"

    def app_key(self, app_name: str) -> str:
        """The cognitia key holding an app's ``app:`` state."""
        return f"{self.prefix}app:{_part(app_name, 'app_name')}"

    def user_key(self, app_name: str, user_id: str) -> str:
        """The cognitia key holding a user's ``user:`` state within an app."""
        return f"{self.prefix}user:{_part(app_name, 'app_name')}:{_part(user_id, 'user_id')}"

    def _sessions_prefix(self, app_name: str, user_id: str | None = None) -> str:
        prefix = f"{self.prefix}session:{_part(app_name, 'app_name')}:"
        return prefix if user_id is None else f"{prefix}{_part(user_id, 'user_id')}:"

    # -- BaseSessionService -----------------------------------------------------------------

    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> AdkSession:
        """Create and store a session; ``AlreadyExistsError`` if the id is taken."""
        if session_id is not None:
            session_id = _stripped(session_id)
        session_id = session_id or platform_uuid.new_uuid()
        app_delta, user_delta, own_state = _split(state or {})
        now = platform_time.get_time()
        record = {
            "app_name": app_name,
            "user_id": user_id,
            "id": session_id,
            "state": own_state,
            "updated": now,
        }

        async def create(stored: Session) -> None:
            if stored.version:
                raise AlreadyExistsError(f"Session with id {session_id} already exists.")
            stored.state = record

        key = self.session_key(app_name, user_id, session_id)
        scoped = self._scoped(app_name, user_id, app_delta, user_delta)
        stored = await self._commit(key, create, scoped)
        return await self._without_events(copy.deepcopy(stored.state), stored.version)

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str | None,
        config: GetSessionConfig | None = None,
    ) -> AdkSession | None:
        """The session with its events (filtered by ``config``), or ``None``."""
        if session_id is None:  # as ADK's services: no such session
            return None
        key = self.session_key(app_name, user_id, _stripped(session_id))
        app_key, user_key = self.app_key(app_name), self.user_key(app_name, user_id)
        for _ in range(SNAPSHOT_ATTEMPTS):
            # Locked so that the state and the events come from one version of the session.
            async with self.manager.locked(key) as stored:
                if stored is None:
                    return None
                events = await self._read_events(stored, config)
                record, version = copy.deepcopy(stored.state), stored.version
            app_state, app_version = await self._scoped_state(app_key)
            user_state, _ = await self._scoped_state(user_key)
            # The app and user state live under keys of their own, read after the session's
            # lock is let go. An append stores them with the session in one commit, so the
            # three reads are one snapshot (as of the last) if neither the session nor the
            # app state was stored again in between; otherwise read again.
            if (await self._version(key), await self._version(app_key)) == (version, app_version):
                break
        return self._to_adk(record, version, events, app_state, user_state)

    async def list_sessions(self, *, app_name: str, user_id: str | None = None) -> ListSessionsResponse:
        """The app's sessions (of ``user_id`` if given) without events, oldest update first."""
        sessions = []
        # Each key read once per listing; a key that was not live is let go once read, so
        # listing a large store neither holds it all in memory nor pushes the sessions in use
        # (and their cached events) out of the live set.
        scoped: dict[str, dict[str, Any]] = {}

        async def read(key: str) -> Session | None:
            was_live = key in self.manager
            try:
                stored = await self.manager.get(key)
            except SessionNotFound:  # deleted since it was listed, or never stored
                return None
            if not was_live:
                await self.manager.close(key)
            return stored

        async def scoped_state(key: str) -> dict[str, Any]:
            if key not in scoped:
                stored = await read(key)
                scoped[key] = {} if stored is None else copy.deepcopy(stored.state)
            return copy.deepcopy(scoped[key])

        for key in await self.manager.list_keys(self._sessions_prefix(app_name, user_id)):
            stored = await read(key)
            if stored is None:
                continue
            record, version = copy.deepcopy(stored.state), stored.version
            app_state = await scoped_state(self.app_key(app_name))
            user_state = await scoped_state(self.user_key(app_name, record["user_id"]))
            sessions.append(self._to_adk(record, version, [], app_state, user_state))
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str | None) -> None:
        """Delete the session and its events (app and user state stay)."""
        if session_id is None:  # as ADK's services: nothing to delete
            return
        await self.manager.delete(self.session_key(app_name, user_id, _stripped(session_id)))

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        """The user's state in the app, keys without the ``user:`` prefix."""
        state, _ = await self._scoped_state(self.user_key(app_name, user_id))
        return state

    async def append_event(self, session: AdkSession, event: Event) -> Event:
        """Store the event as one turn and apply its state delta; returns the event.

        Raises ``SessionNotFoundError`` if the session is not stored, and
        ``StaleSessionError`` if ``session`` is older than the stored one. Appending
        again an event that is stored already (a retried call) stores nothing twice. If
        it is the newest stored event and ``session`` was current when it was stored,
        ``session`` gets the event and follows storage; otherwise ``session`` is left as
        it was, stale, and its next append raises ``StaleSessionError``.
        """
        if event.partial:
            return event
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        app_delta, user_delta, own_delta = _split(event.actions.state_delta if event.actions else {})
        scoped = self._scoped(session.app_name, session.user_id, app_delta, user_delta)
        turn = event.model_dump(mode="json", exclude_none=True)
        key = self.session_key(session.app_name, session.user_id, session.id)
        async with self._appending_to(key):
            # Held from reading the session object's version to recording the new one, so
            # appends made at once through one session object (ADK does so for live tools)
            # each see the version the one before them wrote.
            retried = await self._append(key, session, event, turn, own_delta, scoped)
        if retried is None:  # stored already, and `session` is stale: left as it is
            return event
        if retried and any(e.id == event.id and e == event for e in reversed(session.events)):
            return event
        return self._commit_event_to_session(session, event)

    async def _append(
        self,
        key: str,
        session: AdkSession,
        event: Event,
        turn: Turn,
        own_delta: dict[str, Any],
        scoped: dict[str, dict[str, Any]],
    ) -> bool | None:
        """Store ``turn``: ``False`` if it was new, ``True`` if it was stored already (a retry)
        and ``session`` now follows storage, ``None`` for a retry through a stale copy."""
        seen = _marker(session)
        before: list[int] = []

        async def append(stored: Session) -> None:
            if not stored.version:
                raise SessionNotFoundError(f"Session {session.id} not found.")
            found = await _stored_already(stored.turns, turn)
            if found is not None:
                raise _AlreadyStored(stored, newest=found == 0)
            # A session object made by hand has no version: then ADK's own rule applies,
            # storage must not have been updated after the copy was.
            stale = (
                seen != stored.version
                if seen is not None
                else stored.state["updated"] > session.last_update_time
            )
            if stale:
                raise StaleSessionError(
                    f"Session {session.id} was changed in storage since this copy was read; get it again."
                )
            # A new dict, not an in-place update: a failed save must not leave the live copy changed.
            stored.state = {
                **stored.state,
                "state": {**stored.state["state"], **own_delta},
                "updated": event.timestamp,
            }
            before[:] = [stored.version, len(stored.turns)]
            stored.turns.append(turn)

        try:
            stored = await self._commit(key, append, scoped)
        except _AlreadyStored as retried:
            stored = retried.session
            if scoped and Capability.MULTI_KEY_COMMIT not in capabilities_of(self.manager.backend):
                # Written key by key, the first try may have stored the event and failed
                # before its app:/user: values: they are set again.
                await self.manager.update_many(scoped, self._merger(scoped), retries=APPEND_RETRIES)
            # Every write of a session after its creation appends one event, so the newest
            # event was stored by the version before the stored one. A copy at that version
            # (or at the stored one) missed only the answer: it moves forward. A copy
            # further behind stays stale, whatever the retry found.
            if retried.newest and (seen is None or stored.version - seen in (0, 1)):
                session.last_update_time = stored.state["updated"]
                _set_marker(session, stored.version)
                return True
            return None
        cache = self._events.get(stored)
        if cache is not None:
            cache.appended(before, stored.version, turn, self.cached_events)
            self._used(stored, cache)
        session.last_update_time = event.timestamp
        _set_marker(session, stored.version)
        return False

    @asynccontextmanager
    async def _appending_to(self, key: str) -> AsyncIterator[None]:
        entry = self._appending.get(key)
        if entry is None:
            entry = self._appending[key] = [anyio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._appending[key]

    def _scoped(
        self, app_name: str, user_id: str, app_delta: dict[str, Any], user_delta: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """The ``app:`` and ``user:`` values to merge, by the cognitia key that holds them."""
        scoped = {}
        if app_delta:
            scoped[self.app_key(app_name)] = app_delta
        if user_delta:
            scoped[self.user_key(app_name, user_id)] = user_delta
        return scoped

    async def _commit(
        self, key: str, change: Callable[[Session], Awaitable[None]], scoped: dict[str, dict[str, Any]]
    ) -> Session:
        """Apply ``change`` to the session under ``key`` and store it, with the ``scoped`` merges.

        The session and the app and user state it changes are stored in one commit: a
        crash, a conflict or a failure never leaves an event stored without its ``app:``
        and ``user:`` values. Every session of an app writes the same ``app:`` key, so a
        conflict there re-applies all of it (the merges commute) rather than failing.
        """
        if not scoped:
            return await self.manager.update(key, change)
        merge = self._merger(scoped)

        async def together(sessions: dict[str, Session]) -> None:
            await change(sessions[key])
            merge(sessions)

        sessions = await self.manager.update_many([key, *scoped], together, retries=APPEND_RETRIES)
        return sessions[key]

    @staticmethod
    def _merger(scoped: dict[str, dict[str, Any]]) -> Callable[[dict[str, Session]], None]:
        """A change that ``dict.update``s each scoped key's state with its values."""

        def merge(sessions: dict[str, Session]) -> None:
            for scoped_key, delta in scoped.items():
                stored = sessions[scoped_key]
                # A new dict, not an in-place update: a failed save must not leave it changed.
                stored.state = {**stored.state, **delta}

        return merge

    # -- internals --------------------------------------------------------------------------

    async def _read_events(self, stored: Session, config: GetSessionConfig | None) -> list[Event]:
        """Copies of the stored events ``config`` asks for, reading only the tail of the log where it can."""
        recent = config.num_recent_events if config else None
        after = config.after_timestamp if config else None
        if recent == 0:
            return []
        cache = self._events.get(stored)
        if cache is None:
            cache = _EventCache()
            if self.cached_events:
                self._events[stored] = cache
        if after is None:
            events, private = await cache.newest(stored, recent, self.cached_events)
        else:
            # As InMemorySessionService does: walk back from the newest event and stop at
            # the first one older than after_timestamp. Read windows that grow until one holds it.
            window = recent if recent is not None else 64
            while True:
                events, private = await cache.newest(stored, window, self.cached_events)
                start = len(events)
                while start > 0 and events[start - 1].timestamp >= after:
                    start -= 1
                if start > 0 or recent is not None or len(events) < window:
                    events, private = events[start:], max(0, private - start)
                    break
                window *= 4
        if self.cached_events:
            self._used(stored, cache)
        # Events the cache keeps are copied; the older ones were built for this read alone.
        return events[:private] + [event.model_copy(deep=True) for event in events[private:]]

    def _used(self, stored: Session, cache: _EventCache) -> None:
        """Note that ``cache`` was just used, and let the least recently used caches go
        while all of them together hold more than ``cached_events_total`` events."""
        self._events.pop(stored, None)
        self._events[stored] = cache  # the most recently used come last
        total = sum(len(each.items) for each in self._events.values())
        for session, each in list(self._events.items()):
            if total <= self.cached_events_total or each is cache:
                break
            total -= len(each.items)
            del self._events[session]

    async def _without_events(self, record: dict[str, Any], version: int) -> AdkSession:
        """:meth:`_to_adk` with no events and the app and user state as they are now."""
        app_state, _ = await self._scoped_state(self.app_key(record["app_name"]))
        user_state, _ = await self._scoped_state(self.user_key(record["app_name"], record["user_id"]))
        return self._to_adk(record, version, [], app_state, user_state)

    @staticmethod
    def _to_adk(
        record: dict[str, Any],
        version: int,
        events: list[Event],
        app_state: dict[str, Any],
        user_state: dict[str, Any],
    ) -> AdkSession:
        """An ADK session from copies of a stored record and its app and user state."""
        state = record["state"]
        for key, value in app_state.items():
            state[State.APP_PREFIX + key] = value
        for key, value in user_state.items():
            state[State.USER_PREFIX + key] = value
        session = AdkSession(
            id=record["id"],
            app_name=record["app_name"],
            user_id=record["user_id"],
            state=state,
            events=events,
            last_update_time=record["updated"],
        )
        _set_marker(session, version)
        return session

    async def _scoped_state(self, key: str) -> tuple[dict[str, Any], int | None]:
        """A copy of the app or user state under ``key`` and its version (``None``: none stored)."""
        try:
            stored = await self.manager.get(key)
        except SessionNotFound:
            return {}, None
        return copy.deepcopy(stored.state), stored.version

    async def _version(self, key: str) -> int | None:
        try:
            return (await self.manager.get(key)).version
        except SessionNotFound:
            return None


class _EventCache:
    """The newest events of one live session's log, validated once and shared by later reads.

    ``items`` are the last ``len(items)`` of the ``total`` events the log held at
    ``version``; an item still a stored turn (a dict) is validated when first read. Any
    save the cache did not see changes the version, and the cache starts over.
    """

    __slots__ = ("items", "total", "version")

    def __init__(self) -> None:
        self.version = -1
        self.total = 0
        self.items: list[Event | Turn] = []

    async def newest(self, stored: Session, n: int | None, limit: int) -> tuple[list[Event], int]:
        """The newest ``n`` events (all if ``None``), oldest first, and how many of them, from
        the first, were built for this call alone; the others are the cache's own."""
        total = len(stored.turns)
        n = total if n is None else min(n, total)
        if stored.turns.pending:
            # Turns appended to the live session and not saved: served, never cached.
            self.version = -1
            return ([_event(turn) for turn in await stored.turns.last(n)] if n else []), n
        if self.version != stored.version or self.total != total:
            self.version, self.total, self.items = stored.version, total, []
        if n == 0:
            return [], 0
        items = self.items
        if n > len(items):
            turns = await stored.turns.last(n)
            items[:0] = turns[: n - len(items)]
        tail = items[len(items) - n :]
        for i, item in enumerate(tail):
            if type(item) is dict:
                tail[i] = items[len(items) - n + i] = _event(item)
        if len(items) > limit:
            del items[: len(items) - limit]
        return tail, max(0, n - len(items))  # type: ignore[return-value]  # tail is all validated

    def appended(self, before: list[int], version: int, turn: Turn, limit: int) -> None:
        """Record that the save from ``before`` (version, event count) to ``version`` added ``turn``."""
        if before == [self.version, self.total]:
            self.version, self.total = version, self.total + 1
            self.items.append(turn)
            if len(self.items) > limit:
                del self.items[: len(self.items) - limit]
        else:
            self.version = -1


def _event(turn: Turn) -> Event:
    # Parsed from a copy: a model keeps the dicts and lists of its free-form fields (state
    # deltas, tool arguments) as given, and turns are the manager's cached dicts.
    return Event.model_validate_json(json.dumps(turn))


async def _stored_already(turns: Turns, turn: Turn) -> int | None:
    """Where an event equal to ``turn`` is stored, counted from the newest (0), or ``None``.

    A retried append is written once. The search reads the newest :data:`RETRY_WINDOW`
    events whatever their timestamps (parallel agents append events out of timestamp
    order), then goes on back only through events not older than ``turn``: equal events
    have equal timestamps. A new event costs one read of that tail, from memory while
    its session is live.
    """
    event_id, timestamp = turn.get("id"), turn.get("timestamp")
    examined, wanted = 0, RETRY_WINDOW
    while examined < len(turns):
        tail = await turns.last(wanted)
        for position, stored in enumerate(reversed(tail[: len(tail) - examined]), start=examined):
            if stored.get("id") == event_id and stored == turn:
                return position
            older = stored.get("timestamp")
            if (
                position >= RETRY_WINDOW
                and isinstance(older, (int, float))
                and isinstance(timestamp, (int, float))
                and older < timestamp
            ):
                return None
        if len(tail) < wanted:
            return None
        examined, wanted = len(tail), wanted * 4
    return None


class _AlreadyStored(Exception):
    """Ends an append that finds its event stored already, writing nothing."""

    def __init__(self, session: Session, *, newest: bool) -> None:
        self.session = session
        self.newest = newest


def _part(value: str, name: str) -> str:
    """``value`` as one part of a key, after checking it is a ``str`` (``name``: the argument)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r}")
    # Percent-encoding ":" keeps "app:a:b" and "app:a" from sharing a key prefix.
    return quote(value, safe="")


def _stripped(session_id: str) -> str:
    """A session id without surrounding whitespace, as ADK's in-memory service uses it."""
    _part(session_id, "session_id")
    return session_id.strip()


def _split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``state`` as (app, user, session) parts, prefixes removed and ``temp:`` keys dropped.

    Values are converted the way ADK's database services convert them (datetimes to
    ISO strings, models to dicts), so the state reads back as the event recorded it.
    """
    app: dict[str, Any] = {}
    user: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith(State.APP_PREFIX):
            app[key.removeprefix(State.APP_PREFIX)] = value
        elif key.startswith(State.USER_PREFIX):
            user[key.removeprefix(State.USER_PREFIX)] = value
        elif not key.startswith(State.TEMP_PREFIX):
            own[key] = value
    return _jsonable(app), _jsonable(user), _jsonable(own)


def _jsonable(part: dict[str, Any]) -> dict[str, Any]:
    if not part:
        return part
    try:
        converted: dict[str, Any] = to_jsonable_python(part)
    except Exception:
        # Left as is: cognitia then refuses it with an error naming the offending path.
        return part
    return converted


def _marker(session: AdkSession) -> int | None:
    """The stored version this ADK session object was read or last written at."""
    marker = getattr(session, "_storage_update_marker", None)
    return int(marker) if isinstance(marker, str) and marker.isdigit() else None


def _set_marker(session: AdkSession, version: int) -> None:
    # ADK's own slot for a storage revision (its database service keeps one there too).
    session._storage_update_marker = str(version)
