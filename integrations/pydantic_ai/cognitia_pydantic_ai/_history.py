from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
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
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "message" not in turn:
            raise ValueError(
                f"{_turn_name(key, i, len(turns), last)} is not a pydantic-ai message "
                "turn ({'message': ...}, as remember() writes); was the key written by another integration?"
            )
        messages.append(turn["message"])
    try:
        # From JSON text, not from the turns: a model keeps the dicts of its free-form fields
        # (tool arguments) as given, and the turns are the live session's own.
        return ModelMessagesTypeAdapter.validate_json(json.dumps(messages))
    except ValidationError as exc:
        # Named by the error's kind and place, not its message, which may quote the content.
        first = exc.errors()[0]
        where = first["loc"]
        i = where[0] if where and isinstance(where[0], int) else 0
        place = "".join(f"[{part!r}]" for part in where[1:]) or " itself"
        raise ValueError(
            f"{_turn_name(key, i, len(turns), last)} is not a valid pydantic-ai message: "
            f"{first['type']} at message{place} ({exc.error_count()} error(s))"
        ) from exc


def _turn_name(key: str, i: int, read: int, last: int | None) -> str:
    """How an error names the ``i``-th of the ``read`` turns read.

    A window of the newest turns is named from the end (``-1`` is the newest): its place in
    the whole log would need the key's lock, which the caller may hold (a decorated handler
    reading its own history).
    """
    if last is None:
        return f"turn {i} of session {key!r}"
    return f"turn {i - read} (from the newest) of session {key!r}"


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
