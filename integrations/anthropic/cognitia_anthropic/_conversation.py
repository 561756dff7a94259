from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypeVar, cast, overload

import anyio
import pydantic
from anthropic.lib.streaming import BetaAsyncMessageStream
from anthropic.lib.threads._thread_state import same_message
from anthropic.lib.tools import BetaAsyncStreamingToolRunner, BetaAsyncToolRunner
from anthropic.types.beta import BetaMessage, BetaMessageParam
from anthropic.types.beta.parsed_beta_message import ParsedBetaMessage

from cognitia import CognitiaError, InMemorySessionManager, MemoryScope, Session, scoped_key
from cognitia.session.backends import SessionBackend
from cognitia.session.manager import APPEND_RETRIES

__all__ = ["ConversationChangedError", "PersistedConversation"]

T = TypeVar("T")

AnyRunner = BetaAsyncToolRunner[Any] | BetaAsyncStreamingToolRunner[Any]


class ConversationChangedError(CognitiaError, RuntimeError):
    """The stored conversation changed under a runner whose history is being stored.

    Raised instead of overwriting messages another writer stored meanwhile; the step being
    stored was not (the message says whether earlier steps of the run were). ``key`` is the
    conversation's session key.
    """

    def __init__(self, key: str, expected: int, actual: int, *, message: str | None = None) -> None:
        self.key = key
        super().__init__(
            message
            or (
                f"conversation {key!r} changed in storage while a runner was recording it "
                f"(expected {expected} stored messages, found {actual}); nothing was written"
            )
        )


class PersistedConversation:
    """The messages of an Anthropic conversation, kept as turns of a cognitia session.

    Each message (the user's, each assistant reply, each batch of tool results) is one
    turn, stored as the JSON ``MessageParam`` the Messages API takes, so the stored
    history is passed back as ``messages=`` unchanged after a restart. Storing a message
    costs one save, however long the conversation is; locking, hooks, logs and storage
    are the manager's.

    Args:
        store: an :class:`~cognitia.InMemorySessionManager` (share one per application,
            so its hooks see every conversation) or any cognitia backend, which is then
            wrapped in a manager of its own.
        key: the conversation's key (prefixed by ``scope`` if given).
        scope: put the key in this :class:`~cognitia.MemoryScope`.

    >>> conversation = PersistedConversation(manager, "user-42")  # doctest: +SKIP
    >>> await conversation.append({"role": "user", "content": "Weather in Paris?"})  # doctest: +SKIP
    >>> runner = client.beta.messages.tool_runner(  # doctest: +SKIP
    ...     model="claude-sonnet-5-5", max_tokens=1024, tools=[get_weather],
    ...     messages=await conversation.messages(),
    ... )
    >>> final = await conversation.run(runner)  # doctest: +SKIP
    """

    def __init__(
        self,
        store: SessionBackend | InMemorySessionManager,
        key: str,
        *,
        scope: MemoryScope | None = None,
    ) -> None:
        self.key = key if scope is None else scoped_key(scope, key)
        """The cognitia session key the messages are stored under."""
        self.manager = InMemorySessionManager.of(store)

    async def messages(self) -> list[BetaMessageParam]:
        """Every stored message, oldest first: what to pass as ``messages=`` to resume.

        The messages are the caller's own: changing them in place (marking the newest
        block with ``cache_control``, say) changes neither storage nor the next read.
        """
        # Copied through JSON text (the turns are JSON already): the turns are the live
        # session's own, which later reads hand out too.
        return cast("list[BetaMessageParam]", json.loads(json.dumps(await self.manager.turns(self.key))))

    async def append(self, *messages: BetaMessageParam | BetaMessage) -> None:
        """Store ``messages`` (params or replies) at the end of the conversation, in one save."""
        turns = await _as_turns(messages)
        if turns:
            await self.manager.update(
                self.key, lambda session: _append(session, turns), retries=APPEND_RETRIES
            )

    @overload
    def record(self, runner: BetaAsyncStreamingToolRunner[T]) -> AsyncIterator[BetaAsyncMessageStream[T]]: ...

    @overload
    def record(self, runner: BetaAsyncToolRunner[T]) -> AsyncIterator[ParsedBetaMessage[T]]: ...

    def record(self, runner: AnyRunner) -> AsyncIterator[Any]:
        """Iterate ``runner`` as usual, keeping the stored conversation equal to its history.

        The runner's messages must continue the stored conversation: start with all of it
        or with its newest messages (a window), followed by any new ones; otherwise
        :class:`ConversationChangedError` is raised before anything is written. Messages it
        was given that are not stored yet are stored with its first reply, in one save.

        A reply is stored once you are done with it: when you ask for the next one, or
        when the loop ends. A reply that stopped to call tools (``tool_use``) is stored
        together with the tool results, in one save, so an interrupted run never leaves
        that call unanswered; a reply cut off in a tool call (``max_tokens``) is stored as
        the runner holds it, unanswered. The tools run once: the runner reuses the results (its
        ``generate_tool_call_response()`` is cached). Whatever else the runner does to its
        history is stored the same way: the message announcing ``add_tools()`` and
        ``remove_tools()``, the summary that replaces the history after
        ``compact_before_next_turn()``, messages added with ``runner.append_messages()``
        (a tool result you add yourself replaces the runner's), and a refused reply, which
        the runner leaves out, is left out. A failure or cancellation during the loop
        closes the runner, as one inside the runner's own loop does. A reply you
        ``break`` on is stored when the runner is recorded again (``run(runner)``).

        Works with ``stream=True`` runners too; their streams are yielded unread.
        """
        return self._record(runner)

    async def _record(self, runner: AnyRunner) -> AsyncIterator[Any]:
        mirror = await self._follow(runner)
        try:
            async for item in runner:
                yield item
                reply = item if isinstance(item, BetaMessage) else await item.get_final_message()
                results = None
                # The runner runs tools only for a `tool_use` stop; for any other stop reason
                # (max_tokens, refusal, pause_turn) its tool_use blocks must stay unrun.
                if reply.stop_reason == "tool_use" and not runner._messages_modified:
                    results = await runner.generate_tool_call_response()
                await mirror.sync(_next_history(runner, reply, results))
            await mirror.sync(_history(runner))
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                # A failure here (a tool cancelled or failing, a conflict) ends the run, as a
                # failure inside the runner's own loop would; closing the runner now, rather
                # than when it is garbage collected, lets its request and span end in order.
                # A `break` (GeneratorExit) leaves it to be recorded again.
                with anyio.CancelScope(shield=True):
                    await runner.close()
            raise

    async def run(
        self, runner: BetaAsyncToolRunner[T] | BetaAsyncStreamingToolRunner[T]
    ) -> ParsedBetaMessage[T]:
        """Drive ``runner`` to the end, storing every message; return the final reply."""
        async for _ in self.record(runner):
            pass
        return await runner.until_done()

    async def _follow(self, runner: AnyRunner) -> _Mirror:
        """Line the runner's history up with the stored conversation and store what it adds."""
        # The turns and the version they belong to, read together: every step checks that
        # storage is still at that version, so no other writer's change goes unnoticed.
        async with self.manager.locked(self.key) as session:
            stored = [] if session is None else await session.turns.all()
            version = 0 if session is None else session.version
        history = list(_history(runner))
        # The largest overlap: the stored conversation ends with the runner's first messages.
        start = await _window_start(history, stored, stored, max(0, len(stored) - len(history)))
        overlap = len(stored) - start
        if stored and history and not overlap:
            # None of the newest stored messages is in the runner's history: it was built
            # from a read that another writer has added to since (or from another
            # conversation). Appending it would store that history a second time.
            raise ConversationChangedError(
                self.key,
                len(stored),
                len(stored),
                message=(
                    f"the runner's messages do not continue conversation {self.key!r}: its newest "
                    f"stored message (of {len(stored)}) is not among them, so it changed since they "
                    "were read; read messages() again. Nothing was written"
                ),
            )
        # Messages the runner was given that are not stored yet are stored with its first
        # reply, in the same save: a run that loses a race at its first step stores nothing.
        return _Mirror(self, kept=start, messages=history[:overlap], turns=stored[start:], version=version)

    def __repr__(self) -> str:
        return f"<PersistedConversation {self.key!r} manager={self.manager!r}>"


class _Mirror:
    """Keeps the stored conversation equal to a runner's history.

    The stored conversation is the first ``kept`` turns (stored messages the runner was
    not given) followed by ``messages``, the runner's history as last stored (``turns``
    is their JSON form). A history that extends it is stored by appending; one that
    differs (a compaction, a rewritten history) replaces the turns from the first
    difference on, in the same save.
    """

    def __init__(
        self,
        conversation: PersistedConversation,
        *,
        kept: int,
        messages: list[Any],
        turns: list[dict[str, Any]],
        version: int,
    ) -> None:
        self._conversation = conversation
        self._version = version
        """The stored conversation's version when it was last read or written here."""
        self._kept = kept
        self._messages = messages
        self._turns = turns
        self._stored_any = False
        """Whether a step of this run has been stored (an error must not say "nothing")."""

    async def sync(self, history: Sequence[Any]) -> None:
        messages = list(history)
        same = await _common_prefix(messages, self._messages, self._turns)
        if same == len(messages) == len(self._messages):
            return
        if same < len(self._messages):
            await self._slide(messages)
            same = await _common_prefix(messages, self._messages, self._turns)
        new = await _as_turns(messages[same:])
        drop = len(self._messages) - same
        expected = self._kept + len(self._messages)
        key = self._conversation.key

        stored_any = self._stored_any
        version = self._version

        async def change(session: Session) -> None:
            # The count alone would miss a change that kept it (another writer's compaction).
            if session.version != version or len(session.turns) != expected:
                found = len(session.turns)
                raise ConversationChangedError(
                    key,
                    expected,
                    found,
                    message=(
                        f"conversation {key!r} changed in storage while a runner was recording it "
                        f"(expected {expected} stored messages at version {version}, found {found} "
                        f"at version {session.version}); "
                        + (
                            "this step was not stored, the run's earlier steps are"
                            if stored_any
                            else "nothing of this run was stored"
                        )
                    ),
                )
            if drop:
                await session.turns.last(drop)  # one read for the turns replaced
                for _ in range(drop):
                    await session.turns.pop()
            _append(session, new)

        stored = await self._conversation.manager.update(key, change)
        self._version = stored.version
        self._messages = messages
        self._turns = [*self._turns[:same], *new]
        self._stored_any = True

    async def _slide(self, messages: list[Any]) -> None:
        """Keep older turns stored when ``messages`` drops only the oldest of the history.

        A history trimmed to its newest messages (``set_messages_params`` with a shorter
        list) is a window, as when a runner is given one to start with: the messages it
        left out stay stored. Any other change (a compaction's summary, an edited message)
        is stored as a replacement by :meth:`sync`.
        """
        drop = await _window_start(messages, self._messages, self._turns, 1)
        if drop < len(self._messages):
            self._kept += drop
            self._messages = self._messages[drop:]
            self._turns = self._turns[drop:]


def _history(runner: AnyRunner) -> Sequence[BetaMessageParam]:
    """The runner's conversation as its next request sends it, between replies.

    The runner keeps it on the message thread it runs over (``thread.messages``, which
    the SDK documents); the runner itself has no public accessor for it.
    """
    return runner._thread.messages


def _next_history(runner: AnyRunner, reply: BetaMessage, results: BetaMessageParam | None) -> list[Any]:
    """The history the runner's next request sends, once it has taken in ``reply`` (and the tool
    ``results``), as the runner builds it when asked for the next reply.

    While a reply is handled, ``set_messages_params()`` and ``append_messages()`` change a
    copy of the history the runner keeps apart from its thread (``_messages``, the history
    as sent until then). When asked for the next reply, the runner hands that copy to the
    thread: followed by the reply, unless ``append_messages()`` was called (the caller then
    owns the turn, and neither the reply nor tool results are added), then by any message
    the thread itself was given meanwhile. Tool results go right after the reply.
    """
    history = list(runner._thread.messages)  # the history sent, the reply, messages added since
    messages, sent = runner._messages, runner._sent_messages
    modified = runner._messages_modified
    if messages is not None and messages is not sent:
        answer = reply.to_param()
        added = history[len(sent) :]
        history = [
            *messages,
            *(() if modified else (answer,)),
            *(message for message in added if not same_message(message, answer)),
        ]
    if results is None or modified:
        return history
    after = max(i for i, message in enumerate(history) if message["role"] == "assistant") + 1
    return [*history[:after], results, *history[after:]]


async def _common_prefix(messages: list[Any], stored: list[Any], turns: list[dict[str, Any]]) -> int:
    """How many leading ``messages`` are ``stored`` (same object, or the same as ``turns``)."""
    n = 0
    for message, old, turn in zip(messages, stored, turns, strict=False):
        if message is not old and await _as_turns([message]) != [turn]:
            break
        n += 1
    return n


async def _window_start(
    messages: list[Any], older: list[Any], turns: list[dict[str, Any]], first: int
) -> int:
    """The smallest ``start >= first`` such that ``messages`` begins with ``older[start:]``
    (``turns`` is ``older`` as stored); ``len(older)`` when only the empty tail does."""
    for start in range(first, len(older)):
        rest = len(older) - start
        if len(messages) >= rest and await _common_prefix(messages, older[start:], turns[start:]) == rest:
            return start
    return len(older)


def _append(session: Session, turns: list[dict[str, Any]]) -> None:
    for turn in turns:
        session.turns.append(turn)


async def _as_turns(messages: Sequence[BetaMessageParam | BetaMessage]) -> list[dict[str, Any]]:
    """``messages`` as the JSON ``MessageParam`` the API takes back, files read and base64-encoded."""
    files: list[tuple[dict[str, Any], object]] = []
    turns = [_as_turn(message, files) for message in messages]
    for source, data in files:
        source["data"] = base64.b64encode(await _read(data)).decode("ascii")
    return turns


def _as_turn(
    message: BetaMessageParam | BetaMessage, files: list[tuple[dict[str, Any], object]]
) -> dict[str, Any]:
    if isinstance(message, BetaMessage):
        return {"role": message.role, "content": [_as_json(block, files) for block in message.content]}
    return cast("dict[str, Any]", _as_json(message, files))


def _as_json(value: object, files: list[tuple[dict[str, Any], object]]) -> object:
    """``value`` with every SDK model in it dumped the way a request body sends it.

    A base64 source whose ``data`` is a path or a file object (the SDK reads and encodes
    those when it sends them) is noted in ``files``, to be read and encoded the same way.
    ``cache_control`` marks are left out: one asks the API to cache a prefix of this one
    request, and the caller marks the blocks of each request anew (a stored mark would be
    sent again with every later request, past the API's limit of four). A tool call's
    ``input`` is kept as it is, whatever its keys.
    """
    if isinstance(value, pydantic.BaseModel):
        # Only the fields the API sent (exclude_unset), so the dump round-trips as input.
        return value.model_dump(
            mode="json", by_alias=True, exclude_unset=True, exclude=getattr(value, "__api_exclude__", None)
        )
    if isinstance(value, Mapping):
        # A tool call's input is the model's JSON, stored as it is: a "cache_control" key
        # there is an argument of the tool, not a mark.
        tool_call = str(value.get("type", "")).endswith("tool_use")
        copied = {
            key: _verbatim(item) if tool_call and key == "input" else _as_json(item, files)
            for key, item in value.items()
            if key != "cache_control"
        }
        data = value.get("data")
        if value.get("type") == "base64" and isinstance(data, (os.PathLike, io.IOBase)):
            files.append((copied, data))
        return copied
    if isinstance(value, (list, tuple)):
        return [_as_json(item, files) for item in value]
    # Anything else is stored as is; a value JSON cannot hold is refused by the manager,
    # which names its path, before anything is written.
    return value


def _verbatim(value: object) -> object:
    """A JSON copy of ``value`` with nothing left out."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if isinstance(value, Mapping):
        return {key: _verbatim(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_verbatim(item) for item in value]
    return value


async def _read(data: object) -> bytes:
    """The bytes of a file given as a path or a file object; the object's position is kept."""
    if isinstance(data, os.PathLike):
        return await anyio.Path(os.fspath(data)).read_bytes()
    file = cast("io.IOBase", data)
    position = file.tell() if file.seekable() else None
    content = file.read()
    if position is not None:
        file.seek(position)
    return content if isinstance(content, bytes) else str(content).encode()
