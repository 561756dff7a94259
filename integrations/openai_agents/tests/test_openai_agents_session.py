"""CognitiaSession driven by the real OpenAI Agents Runner, offline, on each backend."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import structlog
from agents import Agent, Runner, SessionSettings
from agents.memory import Session as AgentsSession

from cognitia import InMemorySessionManager, MemoryScope, SessionEvent
from cognitia.session.backends import SqliteSessionBackend
from cognitia_openai_agents import CognitiaSession

pytestmark = pytest.mark.anyio

WEATHER_TURN = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny in Paris"},
]


def texts(items: list[Any]) -> list[str]:
    """A readable digest of items: the text of messages, the name or output of tool items."""
    out = []
    for item in items:
        if item.get("type") == "function_call":
            out.append(f"call {item['name']}({item['arguments']})")
        elif item.get("type") == "function_call_output":
            out.append(f"result {item['output']}")
        elif isinstance(item["content"], str):
            out.append(f"{item['role']}: {item['content']}")
        else:
            out.append(f"{item['role']}: {item['content'][0]['text']}")
    return out


EXPECTED = [
    "user: What is the weather in Paris?",
    'call get_weather({"city": "Paris"})',
    "result sunny in Paris",
    "assistant: It is sunny in Paris.",
    "user: thanks",
    "assistant: echo: thanks",
]


async def test_the_adapter_is_an_sdk_session(backend_factory: Any) -> None:
    """CognitiaSession satisfies the SDK's runtime-checkable Session protocol."""
    assert isinstance(CognitiaSession("s", backend_factory()), AgentsSession)


async def test_multi_turn_run_with_a_tool_call_stores_every_item_as_a_turn(
    backend_factory: Any, agent: Agent[Any]
) -> None:
    """Two runs (one calling a tool) store user, tool call, tool result and replies, in order."""
    manager = InMemorySessionManager(backend_factory())
    session = CognitiaSession("user-1", manager)
    first = await Runner.run(agent, "What is the weather in Paris?", session=session)
    assert first.final_output == "It is sunny in Paris."
    second = await Runner.run(agent, "thanks", session=session)
    assert second.final_output == "echo: thanks"

    stored = await manager.turns("user-1")
    assert texts(stored) == EXPECTED
    assert stored[:3] == WEATHER_TURN
    assert await session.get_items() == stored
    # The second run sent the model the whole first run as history.
    assert texts(agent.model.inputs[-1]) == EXPECTED[:5]  # type: ignore[union-attr]


async def test_conversation_resumes_after_a_restart_with_its_full_history(
    backend_factory: Any, agent: Agent[Any]
) -> None:
    """A new backend object (and manager) on the same storage continues the conversation."""
    backend = backend_factory()
    await Runner.run(agent, "What is the weather in Paris?", session=CognitiaSession("user-1", backend))
    if backend_factory.persistent:  # in memory, the store is the object: it stays open
        await backend.aclose()

    # The restart: nothing survives but the storage. A backend is accepted directly too.
    resumed = CognitiaSession("user-1", backend_factory())
    result = await Runner.run(agent, "thanks", session=resumed)

    assert result.final_output == "echo: thanks"
    assert texts(agent.model.inputs[-1]) == EXPECTED[:5]  # type: ignore[union-attr]
    assert texts(await resumed.get_items()) == EXPECTED
    assert texts(await CognitiaSession("user-1", backend_factory()).get_items()) == EXPECTED


async def test_concurrent_conversations_stay_separate(backend_factory: Any, agent: Agent[Any]) -> None:
    """Runs of several conversations interleaved on one manager never mix their items."""
    manager = InMemorySessionManager(backend_factory())
    cities = ["Paris", "Oslo", "Lima", "Tokyo", "Cairo", "Quito"]

    async def converse(city: str) -> None:
        session = CognitiaSession(f"user-{city}", manager)
        await Runner.run(agent, f"What is the weather in {city}?", session=session)
        await Runner.run(agent, f"thanks from {city}", session=session)

    async with anyio.create_task_group() as tg:
        for city in cities:
            tg.start_soon(converse, city)

    for city in cities:
        stored = await InMemorySessionManager(backend_factory()).turns(f"user-{city}")
        assert texts(stored) == [
            f"user: What is the weather in {city}?",
            f'call get_weather({{"city": "{city}"}})',
            f"result sunny in {city}",
            f"assistant: It is sunny in {city}.",
            f"user: thanks from {city}",
            f"assistant: echo: thanks from {city}",
        ]
    assert sorted(await manager.list_keys("user-")) == sorted(f"user-{city}" for city in cities)


async def test_hooks_and_log_events_fire_for_agent_turns(backend_factory: Any, agent: Agent[Any]) -> None:
    """Every add_items is one manager save: a `saved` hook call and a `session.saved` log event."""
    manager = InMemorySessionManager(backend_factory(), strict_hooks=True)
    saved: list[SessionEvent] = []
    manager.on("saved", saved.append)
    session = CognitiaSession("chat", manager, scope=MemoryScope.AGENT)

    with structlog.testing.capture_logs() as logs:
        await Runner.run(agent, "What is the weather in Paris?", session=session)

    assert [(e.key, e.scope, e.runtime) for e in saved] == [("agent:chat", "agent", "asyncio")] * len(saved)
    assert sum(e.turns for e in saved) == 4
    assert [e.version for e in saved] == list(range(1, len(saved) + 1))
    saved_logs = [entry for entry in logs if entry["event"] == "session.saved"]
    assert len(saved_logs) == len(saved)
    assert all(entry["key"] == "agent:chat" for entry in saved_logs)
    # The conversation itself never reaches the logs.
    assert "Paris" not in repr(logs)


async def test_stored_turns_are_plain_json_rows(persistent_backend_factory: Any, agent: Agent[Any]) -> None:
    """The storage holds each item as a JSON turn, readable without cognitia."""
    async with persistent_backend_factory() as backend:
        session = CognitiaSession("user-1", backend)
        await Runner.run(agent, "What is the weather in Paris?", session=session)
        await Runner.run(agent, "thanks", session=session)

    state, turns = persistent_backend_factory.stored("user-1")
    assert state is not None and isinstance(json.loads(state), dict)
    items = [json.loads(turn) for turn in turns]
    assert texts(items) == EXPECTED
    assert items[:3] == WEATHER_TURN


async def test_get_items_limit_pop_and_clear_are_stored(backend_factory: Any, agent: Agent[Any]) -> None:
    """limit returns the tail; pop_item and clear_session are saved and survive a restart."""
    session = CognitiaSession("user-1", backend_factory())
    await Runner.run(agent, "What is the weather in Paris?", session=session)
    await Runner.run(agent, "thanks", session=session)

    assert texts(await session.get_items(limit=2)) == EXPECTED[-2:]
    assert await session.get_items(limit=0) == []
    assert texts(await session.get_items(limit=-1)) == EXPECTED
    limited = CognitiaSession("user-1", backend_factory(), session_settings=SessionSettings(limit=3))
    assert texts(await limited.get_items()) == EXPECTED[-3:]
    as_dict = CognitiaSession("user-1", backend_factory(), session_settings={"limit": 2})
    assert as_dict.session_settings == SessionSettings(limit=2)
    assert texts(await as_dict.get_items()) == EXPECTED[-2:]

    popped = await session.pop_item()
    assert popped is not None and texts([popped]) == EXPECTED[-1:]
    assert texts(await CognitiaSession("user-1", backend_factory()).get_items()) == EXPECTED[:-1]

    await session.clear_session()
    assert await session.get_items() == []
    assert await CognitiaSession("user-1", backend_factory()).get_items() == []
    # The conversation goes on from empty.
    await Runner.run(agent, "hello again", session=session)
    assert texts(await CognitiaSession("user-1", backend_factory()).get_items()) == [
        "user: hello again",
        "assistant: echo: hello again",
    ]


async def test_pop_and_clear_of_an_unknown_conversation_store_nothing(backend_factory: Any) -> None:
    """Popping or clearing a conversation that does not exist creates no session."""
    manager = InMemorySessionManager(backend_factory())
    saved: list[SessionEvent] = []
    manager.on("saved", saved.append)
    session = CognitiaSession("nobody", manager)
    assert await session.pop_item() is None
    await session.clear_session()
    assert await session.get_items() == []
    assert saved == []
    assert await manager.list_keys() == []


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_run_sync_from_trio_through_a_thread(tmp_path: Path, agent: Agent[Any]) -> None:
    """cognitia on trio; the SDK's Runner.run_sync runs its own asyncio loop in a worker thread.

    The session handed to the runner has a manager of its own (a manager serves one event loop
    at a time); both managers share the SQLite backend, which serves any runtime and thread.
    """
    async with SqliteSessionBackend(tmp_path / "chats.db") as backend:
        session = CognitiaSession("user-1", InMemorySessionManager(backend))
        finals = []
        for text in ("What is the weather in Paris?", "thanks"):
            run = functools.partial(Runner.run_sync, agent, text, session=session)
            finals.append((await anyio.to_thread.run_sync(run)).final_output)

        assert finals == ["It is sunny in Paris.", "echo: thanks"]
        # The second run saw the first as history, and trio reads what the thread stored.
        assert texts(agent.model.inputs[-1]) == EXPECTED[:5]  # type: ignore[union-attr]
        assert texts(await InMemorySessionManager(backend).turns("user-1")) == EXPECTED


async def test_sessions_over_one_storage_see_each_others_items(
    backend_factory: Any, agent: Agent[Any]
) -> None:
    """Two workers, each with its own backend object on the same storage, share a conversation:
    every read sees what the other stored (a session built from a backend revalidates)."""
    one = CognitiaSession("user-1", backend_factory())
    two = CognitiaSession("user-1", backend_factory())
    await Runner.run(agent, "What is the weather in Paris?", session=one)
    await Runner.run(agent, "thanks", session=two)
    assert texts(agent.model.inputs[-1]) == EXPECTED[:5]  # type: ignore[union-attr]
    assert texts(await one.get_items()) == EXPECTED

    popped = await one.pop_item()
    assert popped is not None and texts([popped]) == EXPECTED[-1:]
    assert texts(await two.get_items()) == EXPECTED[:-1]
    await two.clear_session()
    assert await one.get_items() == []
    assert await one.pop_item() is None


async def test_a_live_session_returns_what_a_restarted_one_reads(persistent_backend_factory: Any) -> None:
    """Items are held as stored: JSON types, and no link to the caller's objects after add_items."""
    session = CognitiaSession("user-1", persistent_backend_factory())
    item: Any = {"role": "user", "content": ("a", "b"), 7: "x"}
    await session.add_items([item])
    item["role"] = "edited after add_items"
    expected = [{"role": "user", "content": ["a", "b"], "7": "x"}]
    assert await session.get_items() == expected
    assert await CognitiaSession("user-1", persistent_backend_factory()).get_items() == expected


async def test_pop_and_clear_outlast_another_worker_appending(backend_factory: Any) -> None:
    """Pops and clears re-applied after conflicts with a busy writer on the same storage, as the
    SDK's own session never refuses them."""
    writer = CognitiaSession("user-1", backend_factory())
    other = CognitiaSession("user-1", backend_factory())
    await writer.add_items([{"role": "user", "content": "first"}])
    popped: list[Any] = []

    async def write() -> None:
        for i in range(60):
            await writer.add_items([{"role": "user", "content": f"m{i}"}])

    async def pop_and_clear() -> None:
        for i in range(30):
            popped.append(await other.pop_item())
            if i % 10 == 9:
                await other.clear_session()

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        tg.start_soon(pop_and_clear)
    assert len(popped) == 30
