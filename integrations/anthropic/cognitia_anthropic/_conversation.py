from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar, cast, overload

import pydantic
from anthropic.lib.streaming import BetaAsyncMessageStream
from anthropic.lib.tools import BetaAsyncStreamingToolRunner, BetaAsyncToolRunner
from anthropic.types.beta import BetaMessage, BetaMessageParam
from anthropic.types.beta.parsed_beta_message import ParsedBetaMessage

from cognitia import InMemorySessionManager, MemoryScope, Session, scoped_key
from cognitia.session.backends import SessionBackend

__all__ = ["PersistedConversation"]

T = TypeVar("T")


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
    ...     model="claude-sonnet-4-5", max_tokens=1024, tools=[get_weather],
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
        """Every stored message, oldest first: what to pass as ``messages=`` to resume."""
        return cast("list[BetaMessageParam]", await self.manager.turns(self.key))

    async def append(self, *messages: BetaMessageParam | BetaMessage) -> None:
        """Store ``messages`` (params or replies) at the end of the conversation, in one save."""
        await self._store([_as_turn(message) for message in messages])

    @overload
    def record(self, runner: BetaAsyncStreamingToolRunner[T]) -> AsyncIterator[BetaAsyncMessageStream[T]]: ...

    @overload
    def record(self, runner: BetaAsyncToolRunner[T]) -> AsyncIterator[ParsedBetaMessage[T]]: ...

    def record(
        self, runner: BetaAsyncToolRunner[Any] | BetaAsyncStreamingToolRunner[Any]
    ) -> AsyncIterator[Any]:
        """Iterate ``runner`` as usual, storing each reply and the results of its tool calls.

        A reply is stored once you are done with it: when you ask for the next one, or
        when the loop ends. A reply that calls tools is stored together with the tool
        results, in one save, so the stored history never ends with an unanswered tool
        call. The tools run once: the runner reuses the results (its
        ``generate_tool_call_response()`` is cached). A reply you ``break`` on is not
        stored. Change the history through this object, not ``runner.append_messages()``.

        Works with ``stream=True`` runners too; their streams are yielded unread.
        """
        return self._record(runner)

    async def _record(
        self, runner: BetaAsyncToolRunner[Any] | BetaAsyncStreamingToolRunner[Any]
    ) -> AsyncIterator[Any]:
        async for item in runner:
            yield item
            reply = item if isinstance(item, BetaMessage) else await item.get_final_message()
            turns = [_as_turn(reply)]
            # The runner runs tools only for a `tool_use` stop; for any other stop reason
            # (max_tokens, refusal, pause_turn) its tool_use blocks must stay unrun.
            if reply.stop_reason == "tool_use":
                results = await runner.generate_tool_call_response()
                if results is not None:
                    turns.append(_as_turn(results))
            await self._store(turns)

    async def run(
        self, runner: BetaAsyncToolRunner[T] | BetaAsyncStreamingToolRunner[T]
    ) -> ParsedBetaMessage[T]:
        """Drive ``runner`` to the end, storing every message; return the final reply."""
        async for _ in self.record(runner):
            pass
        return await runner.until_done()

    async def _store(self, turns: list[dict[str, Any]]) -> None:
        if not turns:
            return

        def append(session: Session) -> None:
            for turn in turns:
                session.turns.append(turn)

        await self.manager.update(self.key, append)

    def __repr__(self) -> str:
        return f"<PersistedConversation {self.key!r} manager={self.manager!r}>"


def _as_turn(message: BetaMessageParam | BetaMessage) -> dict[str, Any]:
    """A message as the JSON ``MessageParam`` the API takes back."""
    if isinstance(message, BetaMessage):
        return {"role": message.role, "content": [_as_json(block) for block in message.content]}
    return cast("dict[str, Any]", _as_json(message))


def _as_json(value: object) -> object:
    """``value`` with every SDK model in it dumped the way a request body sends it."""
    if isinstance(value, pydantic.BaseModel):
        # Only the fields the API sent (exclude_unset), so the dump round-trips as input.
        return value.model_dump(
            mode="json", by_alias=True, exclude_unset=True, exclude=getattr(value, "__api_exclude__", None)
        )
    if isinstance(value, Mapping):
        return {key: _as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(item) for item in value]
    # Anything else is stored as is; a value JSON cannot hold is refused by the manager,
    # which names its path, before anything is written.
    return value
