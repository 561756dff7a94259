"""history() and remember() for message_history users, and the sync entry point from trio."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    UserPromptPart,
)

from cognitia import InMemorySessionManager, Session, SessionEvent, persisted_session
from cognitia.session.backends import BackendBase, SqliteSessionBackend
from cognitia_pydantic_ai import CognitiaConversationStore, history, remember

pytestmark = pytest.mark.anyio

Prompts = Callable[[list[ModelMessage]], list[str]]


async def test_history_and_remember_across_a_restart(
    persistent_backend_factory: Any, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    async with persistent_backend_factory() as backend:
        manager = InMemorySessionManager(backend)
        saved: list[SessionEvent] = []
        manager.on("saved", saved.append)
        for prompt in ("one", "two"):
            result = await agent.run(prompt, message_history=await history(manager, "chat:1"))
            await remember(manager, "chat:1", result)
        before = await history(manager, "chat:1")
        assert [event.turns for event in saved] == [4, 4]

    async with persistent_backend_factory() as backend:
        manager = InMemorySessionManager(backend)
        assert await history(manager, "chat:1") == before
        result = await agent.run("three", message_history=await history(manager, "chat:1"))
        assert result.output == "rolled; prompts seen: one | two | three"
        await remember(manager, "chat:1", result)
        assert prompts_of(await history(manager, "chat:1")) == ["one", "two", "three"]
        assert len(await history(manager, "chat:1", last=4)) == 4
        assert await history(manager, "chat:unknown") == []


async def test_remember_takes_plain_messages(store_backend: BackendBase, agent: Agent[None, str]) -> None:
    manager = InMemorySessionManager(store_backend)
    result = await agent.run("hi")
    session = await remember(manager, "chat:2", result.all_messages())
    assert len(session.turns) == 4
    turns = await store_backend.load_turns("chat:2")
    assert (
        ModelMessagesTypeAdapter.validate_python([turn["message"] for turn in turns]) == result.all_messages()
    )


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_run_sync_from_trio_through_a_thread(
    tmp_path: Path, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    """cognitia stays on trio; the agent runs on asyncio in a worker thread via run_sync."""
    async with SqliteSessionBackend(tmp_path / "chats.db") as backend:
        manager = InMemorySessionManager(backend)
        for prompt in ("trio one", "trio two"):
            messages = await history(manager, "chat:trio")
            run = functools.partial(agent.run_sync, prompt, message_history=messages)
            await remember(manager, "chat:trio", await anyio.to_thread.run_sync(run))
        assert prompts_of(await history(manager, "chat:trio")) == ["trio one", "trio two"]

        # The ConversationStore is plain async code over cognitia, so it runs on trio too.
        store = CognitiaConversationStore(manager)
        for prompt in ("store one", "store two"):
            conversation = await store.load("c-trio") or Conversation(conversation_id="c-trio")
            run = functools.partial(agent.run_sync, prompt, conversation=conversation)
            await store.save(await anyio.to_thread.run_sync(run))
        loaded = await store.load("c-trio")
        assert loaded is not None
        assert prompts_of(loaded.messages) == ["store one", "store two"]


async def test_turns_that_are_not_messages_are_named_in_the_error(store_backend: BackendBase) -> None:
    """A key another integration wrote, or a message pydantic-ai cannot read: the error names
    the session and the turn's place in the whole log, and quotes no content."""
    manager = InMemorySessionManager(store_backend)
    await manager.update("chat:42", lambda s: s.turns.append({"role": "user", "content": "hi"}))
    with pytest.raises(ValueError, match=r"turn 0 of session 'chat:42' is not a pydantic-ai message turn"):
        await history(manager, "chat:42")

    request = ModelRequest(parts=[UserPromptPart("hello")])
    reply = ModelResponse(parts=[TextPart("hi there")])
    await remember(manager, "chat:43", [request, reply])
    await manager.update("chat:43", lambda s: s.turns.append({"message": {"kind": "secret-bogus"}}))
    with pytest.raises(ValueError, match=r"turn 2 of session 'chat:43' is not a valid") as info:
        await history(manager, "chat:43")
    assert "secret" not in str(info.value)
    # A window is named from its end: the newest turn is -1.
    with pytest.raises(ValueError, match=r"turn -1 \(from the newest\) of session 'chat:43' is not a valid"):
        await history(manager, "chat:43", last=2)


async def test_a_handler_reading_its_own_bad_history_gets_the_error(store_backend: BackendBase) -> None:
    """history() inside a decorated handler of the same key: the error is raised, not a wait
    for the key's lock, which the handler holds."""
    manager = InMemorySessionManager(store_backend)
    await manager.update("chat:44", lambda s: s.turns.append({"role": "user", "content": "hi"}))
    errors: list[str] = []

    @persisted_session(manager, key="chat_id")
    async def handler(*, chat_id: str, session: Session) -> None:
        for last in (None, 1):
            with anyio.fail_after(10), pytest.raises(ValueError) as info:
                await history(manager, chat_id, last=last)
            errors.append(str(info.value))

    await handler(chat_id="chat:44")
    assert [error.split(" is ")[0] for error in errors] == [
        "turn 0 of session 'chat:44'",
        "turn -1 (from the newest) of session 'chat:44'",
    ]
