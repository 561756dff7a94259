from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .._json import dumps, loads
from .backends._scope import MemoryScope

__all__ = ["Session", "Turns"]

TurnLoader = Callable[[str, "int | None"], Awaitable[list[dict[str, Any]]]]

MAX_CACHED_TURNS = 1_000
"""How many of the newest stored turns a live session keeps in memory; older ones are re-read on demand."""


_READ_ATTEMPTS = 5
"""A tail read redone this often if saves keep landing while it runs; after that it is served as read."""


class Turns:
    """A session's append-only turn log, as seen from a live session.

    ``append`` queues a turn; the next save writes it together with the state, in one
    atomic step. ``len()`` counts every turn, stored and queued. The log is read lazily:
    ``await turns.last(5)`` fetches only the tail, and once fetched, turns stay in memory,
    so a live conversation costs one append per turn, never a reload. Only the newest
    ``MAX_CACHED_TURNS`` stored turns stay in memory; older ones are read again on demand. A
    log without a ``loader`` (a manager without a backend) is the only copy of its turns and
    keeps them all.
    """

    __slots__ = (
        "_backing",
        "_complete",
        "_generation",
        "_key",
        "_known",
        "_loader",
        "_pending",
        "_stored",
        "_truncate",
    )

    def __init__(self, key: str, stored: int, loader: TurnLoader | None) -> None:
        self._key = key
        self._loader = loader
        self._stored = stored
        self._backing = stored
        """Turns in storage: more than ``_stored`` after :meth:`pop`, until the next save."""
        self._known: list[dict[str, Any]] = []
        """The newest ``len(_known)`` stored turns (the whole log when ``_complete``)."""
        self._complete = stored == 0
        self._pending: list[dict[str, Any]] = []
        self._truncate: int | None = None
        """Stored turns to keep at the next save, after :meth:`pop` or :meth:`clear`."""
        self._generation = 0
        """Bumped whenever the stored part changes, so a read that raced a save is redone."""

    def __len__(self) -> int:
        return self._stored + len(self._pending)

    def __repr__(self) -> str:
        return f"<Turns {self._key!r} stored={self._stored} pending={len(self._pending)}>"

    def append(self, turn: dict[str, Any]) -> None:
        """Queue ``turn`` (a JSON-compatible dict) for the next save."""
        if not isinstance(turn, dict):
            raise TypeError(f"a turn of session {self._key!r} must be a dict, got {type(turn).__name__}")
        self._pending.append(turn)

    async def pop(self) -> dict[str, Any] | None:
        """Remove and return the newest turn (``None`` if there is none); stored at the next save."""
        # Lists are replaced, not changed in place, so a failed call can restore them
        # (see Session._checkpoint).
        if self._pending:
            turn = self._pending[-1]
            self._pending = self._pending[:-1]
            return turn
        if self._stored == 0:
            return None
        if not self._known:
            await self.last(1)
        turn = self._known[-1]
        self._known = self._known[:-1]
        self._stored -= 1
        self._generation += 1
        self._truncate = self._stored
        return turn

    def clear(self) -> None:
        """Remove every turn, stored and queued; stored at the next save."""
        self._pending = []
        self._known = []
        self._stored = 0
        self._complete = True
        self._truncate = 0
        self._generation += 1

    @property
    def pending(self) -> list[dict[str, Any]]:
        """Turns appended since the last save."""
        return list(self._pending)

    async def last(self, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` turns, oldest first, reading storage only for what is not in memory."""
        if n <= 0:
            return []
        in_memory = len(self._known) + len(self._pending)
        if n > in_memory and not self._complete and self._loader is not None:
            for _ in range(_READ_ATTEMPTS):
                generation = self._generation
                wanted = n - len(self._pending)
                # Storage still holds the turns popped since the last save: read past them.
                popped = self._backing - self._stored
                loaded = await self._loader(self._key, wanted + popped)
                if generation == self._generation:
                    turns = loaded[: len(loaded) - popped]
                    self._keep(turns)
                    return turns[max(0, len(turns) - wanted) :] + self._pending
        # Sliced before joining: the cost follows n, not the length of the log held.
        pending = self._pending
        if n <= len(pending):
            return pending[len(pending) - n :]
        return self._known[-(n - len(pending)) :] + pending

    def _keep(self, turns: list[dict[str, Any]]) -> None:
        """Hold the newest of the stored ``turns`` just read (all of them, up to MAX_CACHED_TURNS)."""
        self._known = turns if len(turns) <= MAX_CACHED_TURNS else turns[-MAX_CACHED_TURNS:]
        self._complete = len(self._known) >= self._stored

    async def all(self) -> list[dict[str, Any]]:
        """Every turn, oldest first (kept in memory after the first read, up to the newest
        ``MAX_CACHED_TURNS``: a longer log is read from storage at every call)."""
        if not self._complete and self._loader is not None:
            for _ in range(_READ_ATTEMPTS):
                generation = self._generation
                loaded = await self._loader(self._key, None)
                if generation == self._generation:
                    turns = loaded[: self._stored]
                    self._keep(turns)
                    return turns + self._pending
        return self._known + self._pending

    # -- used by the manager ----------------------------------------------------------------

    def _restart(self, stored: int) -> None:
        """Storage holds ``stored`` turns that this log has not seen: forget what it knew.

        Turns appended and not saved yet stay queued; a pop or clear not saved yet is
        dropped, as it was made against turns that are no longer the stored ones.
        """
        self._stored = self._backing = stored
        self._known = []
        self._complete = stored == 0
        self._truncate = None
        self._generation += 1

    def _take_pending(self) -> list[dict[str, Any]]:
        return self._pending

    def _committed(self, count: int, stored: list[dict[str, Any]] | None = None) -> None:
        """The first ``count`` pending turns are now stored (as ``stored``, when they were converted)."""
        done, self._pending = self._pending[:count], self._pending[count:]
        # Extended in place, not copied (up to MAX_CACHED_TURNS items on every save): a
        # checkpoint taken before this commit still refers to this list, but a committed
        # change is never rolled back (Session._rollback checks the version first), and
        # nothing else holds on to it (last(), all() and pop() hand out or keep new lists).
        known = self._known
        known.extend(done if stored is None else stored)
        # Without a loader this log is the only copy of the turns: nothing is let go.
        if len(known) > MAX_CACHED_TURNS and self._loader is not None:
            del known[: len(known) - MAX_CACHED_TURNS]
            self._complete = False
        self._stored += count
        self._backing = self._stored
        self._truncate = None
        self._generation += 1


class Session:
    """A live session: its key, its state, its version and its turns.

    Mutate ``state`` freely; ``await manager.save(session)`` persists it. ``version`` is 0
    until the first save and grows by one with every save.
    """

    __slots__ = ("__weakref__", "_saved_json", "key", "last_active", "state", "turns", "version")

    def __init__(
        self,
        key: str,
        state: dict[str, Any],
        *,
        version: int = 0,
        turns: Turns | None = None,
        saved_json: str | None = None,
        last_active: float = 0.0,
    ) -> None:
        self.key = key
        self.state = state
        self.version = version
        self.turns = turns if turns is not None else Turns(key, 0, None)
        self.last_active = last_active
        self._saved_json = saved_json

    def _checkpoint(self) -> tuple[Any, ...]:
        """What :meth:`_rollback` needs to undo an uncommitted change (no copies made, but
        of a state never stored: its JSON, since no stored copy can restore it)."""
        t = self.turns
        opened = None
        if self._saved_json is None:
            try:
                opened = dumps(self.key, self.state)
            except Exception:  # not storable as it is: nothing to go back to
                opened = None
        return (self.version, t._known, t._stored, t._complete, t._truncate, opened)

    def _rollback(self, point: tuple[Any, ...]) -> bool:
        """Undo a failed change: the session goes back to what was last saved, state and turns alike.

        Turns queued before the change are dropped with it, as are the state edits made
        along with them: restoring one without the other would store a turn without the
        state that went with it. Nothing is undone if the change was committed meanwhile.
        Returns ``False`` for a session never stored: the caller drops it. Its state still
        goes back to what it was when the change began (when that was storable), so a
        handle kept on it holds nothing of the failed change.
        """
        version, known, stored, complete, truncate, opened = point
        if self.version != version:
            return True
        t = self.turns
        t._pending = []
        if truncate is None:
            # What the log knew of storage before the change is still what storage holds.
            t._known, t._stored, t._complete, t._truncate = known, stored, complete, None
            t._generation += 1
        else:
            t._restart(t._backing)  # a pop or clear from before the change is dropped too
        saved = self._saved_json if self._saved_json is not None else opened
        if saved is not None:
            self.state = loads(saved)
        return self._saved_json is not None

    @property
    def scope(self) -> MemoryScope | None:
        """The :class:`MemoryScope` the key was made in, if any."""
        return MemoryScope.of(self.key)

    def __repr__(self) -> str:
        return f"<Session {self.key!r} version={self.version} turns={len(self.turns)}>"
