from __future__ import annotations

from typing import Any, cast

from agents.items import TResponseInputItem
from agents.memory import SessionSettings
from agents.memory.session_settings import coerce_session_settings

from cognitia import InMemorySessionManager, MemoryScope, Session, scoped_key
from cognitia._json import dumps, loads
from cognitia.session.backends import SessionBackend
from cognitia.session.manager import APPEND_RETRIES

__all__ = ["CognitiaSession"]


class CognitiaSession:
    """An OpenAI Agents SDK ``Session`` whose items are turns in a cognitia session.

    Pass it to ``Runner.run(agent, input, session=...)``. Every item the runner adds is
    appended to the turn log of the cognitia session ``session_id`` and stored by the
    manager: one save per ``add_items`` call, whatever the length of the conversation.
    Locking, hooks (``saved``, ``loaded``, ...), structlog events, retries after a
    version conflict and the storage itself are the manager's; this class only
    translates the SDK's four calls into manager calls.

    Args:
        session_id: the conversation's id; also the cognitia key (prefixed by ``scope``).
        store: an :class:`~cognitia.InMemorySessionManager` (recommended: share one per
            application, so its hooks see every conversation and live sessions are reused)
            or any cognitia backend, which is then wrapped in a manager of its own.
        scope: put the key in this :class:`~cognitia.MemoryScope` (``"agent:<session_id>"``).
        session_settings: the SDK's settings; ``limit`` caps the items ``get_items()``
            returns when it is called without one.

    >>> from cognitia import InMemorySessionManager
    >>> from cognitia.session.backends import SqliteSessionBackend
    >>> manager = InMemorySessionManager(SqliteSessionBackend(db_path="sessions.db"))
    >>> session = CognitiaSession("user-42", manager)
    >>> # result = await Runner.run(agent, "Hello", session=session)
    """

    session_settings: SessionSettings | None

    def __init__(
        self,
        session_id: str,
        store: SessionBackend | InMemorySessionManager,
        *,
        scope: MemoryScope | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
    ) -> None:
        self.session_id = session_id
        self.key = session_id if scope is None else scoped_key(scope, session_id)
        """The cognitia session key the items are stored under."""
        self.manager = InMemorySessionManager.of(store)
        # A dict is accepted and converted, as the SDK's own sessions do.
        self.session_settings = (
            None if session_settings is None else coerce_session_settings(session_settings)
        )

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The conversation's items, oldest first; only the newest ``limit`` if given.

        A live session answers from memory; otherwise only the requested tail is read.
        The dicts returned are the ones the session holds: read them, copy to change them.
        """
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        if limit == 0:
            return []
        # A negative limit means "everything", as in the SDK's own SQLiteSession.
        last = None if limit is None or limit < 0 else limit
        turns = await self.manager.turns(self.key, last=last)
        return cast("list[TResponseInputItem]", turns)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` (JSON dicts) to the conversation, all in one save."""
        if not items:
            return
        # Stored as their JSON reads back: what this process holds from now on is what a
        # restarted one reads (a tuple is a list, keys are strings), and later edits of the
        # caller's objects change neither.
        turns = [loads(dumps(self.key, item, root=f"items[{i}]")) for i, item in enumerate(items)]

        def append(session: Session) -> None:
            for turn in turns:
                session.turns.append(turn)

        await self.manager.update(self.key, append, retries=APPEND_RETRIES)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item, or ``None`` if the conversation is empty."""
        if not await self.manager.turns(self.key, last=1):
            return None  # nothing to pop: do not create an empty session by saving
        popped: dict[str, Any] | None = None

        async def pop(session: Session) -> None:
            nonlocal popped
            popped = await session.turns.pop()

        # Re-applied after a conflict: it then pops whatever is newest in storage.
        await self.manager.update(self.key, pop, retries=APPEND_RETRIES)
        return cast("TResponseInputItem | None", popped)

    async def clear_session(self) -> None:
        """Remove every item of the conversation (the cognitia session itself stays)."""
        if not await self.manager.turns(self.key, last=1):
            return

        def clear(session: Session) -> None:
            session.turns.clear()

        await self.manager.update(self.key, clear, retries=APPEND_RETRIES)

    def __repr__(self) -> str:
        return f"<CognitiaSession {self.key!r} manager={self.manager!r}>"
