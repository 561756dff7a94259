from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter
from pydantic_ai.run import AgentRunResult

from cognitia import InMemorySessionManager, Session
from cognitia.session.manager import APPEND_RETRIES

__all__ = ["history", "remember"]


async def history(
    manager: InMemorySessionManager, key: str, *, last: int | None = None
) -> list[ModelMessage]:
    """The messages stored under ``key``, ready for ``agent.run(..., message_history=...)``.

    Only the newest ``last`` messages are read when given (pydantic-ai repairs a window
    that starts between a tool call and its result). An unknown key has no messages.

    >>> # messages = await history(manager, "chat:42")
    >>> # result = await agent.run("And now?", message_history=messages)
    >>> # await remember(manager, "chat:42", result)
    """
    turns = await manager.turns(key, last=last)
    return ModelMessagesTypeAdapter.validate_python([turn["message"] for turn in turns])


async def remember(
    manager: InMemorySessionManager,
    key: str,
    messages: AgentRunResult[Any] | Sequence[ModelMessage],
) -> Session:
    """Append a run's new messages (or the given messages) to ``key``'s turn log.

    One turn per message, ``{"message": ...}`` in pydantic-ai's JSON form, written in one
    save (so the ``saved`` hook fires once, with ``turns`` = the number of messages).
    Returns the saved session.

    >>> # result = await agent.run("Hello", message_history=await history(manager, "chat:42"))
    >>> # await remember(manager, "chat:42", result)
    """
    new = messages.new_messages() if isinstance(messages, AgentRunResult) else list(messages)
    dumped = ModelMessagesTypeAdapter.dump_python(new, mode="json")

    def append(session: Session) -> None:
        for message in dumped:
            session.turns.append({"message": message})

    return await manager.update(key, append, retries=APPEND_RETRIES)
