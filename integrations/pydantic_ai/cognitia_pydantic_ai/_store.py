from __future__ import annotations

import heapq
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
)
from pydantic_ai.messages import ModelMessagesTypeAdapter

from cognitia import InMemorySessionManager, Session, SessionNotFound, VersionConflictError
from cognitia.session.backends import SessionBackend

__all__ = ["CognitiaConversationStore"]

_RECORD: TypeAdapter[ConversationRecord] = TypeAdapter(ConversationRecord)

Turn = dict[str, Any]


class CognitiaConversationStore(ConversationStore):
    """A pydantic-ai ``ConversationStore`` that keeps conversations in cognitia.

    Each conversation is one cognitia session under ``prefix + conversation_id``: its
    state is the :class:`~pydantic_ai.conversation_store.ConversationRecord` (head,
    usage, scope, branches, revision) as JSON, and every message is one turn of its turn
    log, ``{"id", "parent_id", "kind", "message"}``, with the message in pydantic-ai's
    own JSON form. A save appends only the new messages, so its cost does not grow with
    the conversation. The record's ``revision`` is checked under the manager's per-key
    lock and the write is a versioned commit, so a writer that lost a race (in this
    process or another one sharing the storage) gets
    :class:`~pydantic_ai.conversation_store.ConversationConflict`.

    Every write goes through the :class:`~cognitia.InMemorySessionManager`, so its
    hooks and structlog events fire for framework turns too.

    A fork copies the history it keeps into the new conversation's own log (same entry
    ids), so each conversation can be deleted, with all its messages, on its own.

    >>> from cognitia.session.backends import SqliteSessionBackend
    >>> store = CognitiaConversationStore(SqliteSessionBackend("chats.db"))
    >>> # conversation = await store.load(cid) or Conversation(conversation_id=cid)
    >>> # result = await agent.run("Hello", conversation=conversation)
    >>> # await store.save(result)

    Args:
        backend_or_manager: an :class:`~cognitia.InMemorySessionManager`, or a backend
            to wrap in a new one.
        prefix: prepended to each conversation id to make its session key.
    """

    def __init__(
        self,
        backend_or_manager: InMemorySessionManager | SessionBackend,
        *,
        prefix: str = "pydantic_ai:conversation:",
    ) -> None:
        self.manager = InMemorySessionManager.of(backend_or_manager)
        self.prefix = prefix
        # Which session holds an entry, for the heads and branch tips this store has
        # seen: read_history() and read_entry() get only an entry id.
        self._holder: OrderedDict[str, str] = OrderedDict()

    def key(self, conversation_id: str) -> str:
        """The cognitia session key of a conversation."""
        return self.prefix + conversation_id

    # -- the storage primitives pydantic-ai asks for ----------------------------------------

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        """The conversation's record, or ``None`` if it is not stored."""
        key = self.key(conversation_id)
        try:
            session = await self.manager.get(key)
        except SessionNotFound:
            return None
        return self._record_of(session, key)

    async def read_records(
        self, *, scope: str | None = None, limit: int | None = None
    ) -> Sequence[ConversationRecord]:
        """Stored records (of ``scope`` if given), most recently saved first, at most ``limit``.

        Reads every stored conversation's record. One that was not live is let go once
        read, and only the newest ``limit`` records are held meanwhile, so listing a large
        store neither fills memory nor pushes the conversations in use out of the live set.
        """
        if limit is not None and limit <= 0:
            return []
        newest: list[tuple[Any, int, ConversationRecord]] = []  # a heap of the newest, oldest on top
        for n, key in enumerate(await self.manager.list_keys(self.prefix)):
            was_live = key in self.manager
            try:
                session = await self.manager.get(key)
            except SessionNotFound:  # deleted since it was listed
                continue
            record = self._record_of(session, key)
            if not was_live:
                await self.manager.close(key)
            if record is None or (scope is not None and record.scope != scope):
                continue
            # Ties keep the listing's order (by key), as a stable sort of all of them would.
            heapq.heappush(newest, (record.updated_at, -n, record))
            if limit is not None and len(newest) > limit:
                heapq.heappop(newest)
        return [record for _, _, record in sorted(newest, key=lambda item: item[:2], reverse=True)]

    async def write_record(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
    ) -> None:
        """Store the record and append ``new_entries``, in one versioned commit."""
        key = self.key(record.conversation_id)
        state = _RECORD.dump_python(record, mode="json")
        turns = _to_turns(new_entries)
        new_ids = {entry.id for entry in new_entries}
        head = record.head_id

        async def change(session: Session) -> None:
            if _revision(session) != expected_revision:
                raise ConversationConflict(record.conversation_id)
            copied: list[Turn] = []
            if head is not None and head not in new_ids and head != session.state.get("head_id"):
                # A branch moves the head within this log; a fork points into another
                # conversation, whose kept history is copied so this one stands alone.
                if not any(turn["id"] == head for turn in await session.turns.all()):
                    source = None if record.forked_from is None else self.key(record.forked_from)
                    try:
                        copied = await self._locate(head, None, hint=source, exclude=key)
                    except LookupError:
                        raise ConversationConflict(record.conversation_id) from None
            session.state = state
            for turn in (*copied, *turns):
                session.turns.append(turn)

        try:
            await self.manager.update(key, change)
        except VersionConflictError:
            # Storage moved on more often than the manager's retries allow (or it allows
            # none): the revision this save expected is gone, as ``change`` would have found.
            raise ConversationConflict(record.conversation_id) from None
        self._note(key, record)

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        """Delete the conversation and every message in its log.

        The record is read and its revision checked; the delete then expects the version
        the record was read at, which storage checks in the same atomic step as the delete.
        A conversation saved in between, by this process or another one sharing the
        storage, is left alone and the caller gets
        :class:`~pydantic_ai.conversation_store.ConversationConflict`.
        """
        key = self.key(conversation_id)
        try:
            session = await self.manager.get(key)
        except SessionNotFound:
            raise ConversationConflict(conversation_id) from None
        if session.version == 0 or _revision(session) != expected_revision:
            raise ConversationConflict(conversation_id)
        # No lock is held from the check to the delete (manager.delete takes the key's lock
        # itself): the expected version covers a save by another task of this process too.
        try:
            await self.manager.delete(key, expected_version=session.version)
        except VersionConflictError:
            raise ConversationConflict(conversation_id) from None

    async def read_entry(self, entry_id: str) -> ConversationEntry:
        """The entry with this id; ``KeyError`` if no stored conversation has it."""
        return _to_entries(await self._locate(entry_id, 1))[0]

    async def read_history(self, head_id: str | None, *, limit: int | None = None) -> list[ConversationEntry]:
        """The entries up to ``head_id``, oldest first (only the last ``limit``).

        Reads only the tail of the log when ``limit`` is given and the history is
        linear; ``KeyError`` if no stored conversation has ``head_id``.
        """
        if head_id is None or limit == 0:
            return []
        return _to_entries(await self._locate(head_id, limit))

    # -- internals --------------------------------------------------------------------------

    def _record_of(self, session: Session, key: str) -> ConversationRecord | None:
        if "conversation_id" not in session.state:
            # Not a conversation: an earlier version of this store emptied a session before
            # deleting it, and an interrupted delete left it so. It reads as absent, and a new
            # conversation may take it over.
            return None
        record = _RECORD.validate_python(session.state)
        self._note(key, record)
        return record

    def _note(self, key: str, record: ConversationRecord) -> None:
        for entry_id in (record.head_id, *record.branches):
            if entry_id is not None:
                self._holder[entry_id] = key
                self._holder.move_to_end(entry_id)
        while len(self._holder) > 10_000:
            self._holder.popitem(last=False)

    async def _locate(
        self, entry_id: str, limit: int | None, *, hint: str | None = None, exclude: str | None = None
    ) -> list[Turn]:
        """The chain of turns ending at ``entry_id``, from whichever conversation holds it.

        Looks first in ``hint``'s log (or the one this store last saw holding the entry).
        """
        hint = hint or self._holder.get(entry_id)
        if hint is not None and hint != exclude:
            chain = await self._chain(hint, entry_id, limit)
            if chain is not None:
                return chain
        # Not a head or branch tip this store has seen (another process wrote it, or the
        # caller kept an old id): look through every conversation. Rare, and O(stored).
        for key in await self.manager.list_keys(self.prefix):
            if key in (hint, exclude):
                continue
            chain = await self._chain(key, entry_id, limit)
            if chain is not None:
                self._holder[entry_id] = key
                return chain
        raise KeyError(f"no stored conversation under {self.prefix!r} has entry {entry_id!r}")

    async def _chain(self, key: str, entry_id: str, limit: int | None) -> list[Turn] | None:
        """Follow parent links back from ``entry_id`` in ``key``'s log; ``None`` if it is not there.

        Reads the newest ``limit`` turns first: on a linear history that is exactly the
        window asked for. Only a history with branches in its log reads further back.
        """
        window = limit
        while True:
            turns = await self.manager.turns(key, last=window)
            by_id = {turn["id"]: turn for turn in turns}
            if entry_id not in by_id and (window is None or len(turns) < window):
                return None
            chain: list[Turn] = []
            current: str | None = entry_id
            while current is not None and (limit is None or len(chain) < limit):
                turn = by_id.get(current)
                if turn is None:
                    break
                chain.append(turn)
                current = turn["parent_id"]
            else:
                chain.reverse()
                return chain
            if window is None or len(turns) < window:
                # The whole log was read and a parent is missing: the log is damaged.
                raise KeyError(
                    f"session {key!r}: entry {current!r} is missing from the history of {entry_id!r}"
                )
            window *= 4


def _revision(session: Session) -> str | None:
    revision = session.state.get("revision")
    return revision if isinstance(revision, str) else None


def _to_turns(entries: Sequence[ConversationEntry]) -> list[Turn]:
    messages = ModelMessagesTypeAdapter.dump_python([entry.message for entry in entries], mode="json")
    return [
        {"id": entry.id, "parent_id": entry.parent_id, "kind": entry.kind, "message": message}
        for entry, message in zip(entries, messages, strict=True)
    ]


def _to_entries(turns: list[Turn]) -> list[ConversationEntry]:
    # From JSON text, not from the turns: a model keeps the dicts of its free-form fields
    # (tool arguments) as given, and the turns are the live session's own.
    messages = ModelMessagesTypeAdapter.validate_json(json.dumps([turn["message"] for turn in turns]))
    return [
        ConversationEntry(id=turn["id"], parent_id=turn["parent_id"], message=message)
        for turn, message in zip(turns, messages, strict=True)
    ]
