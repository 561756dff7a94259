"""CognitiaConversationStore driven by real pydantic-ai agents on its fake models."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
import pytest
from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationConflict
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ToolCallPart, ToolReturnPart
from pydantic_ai.models.test import TestModel

import cognitia_pydantic_ai
from cognitia import InMemorySessionManager, SessionEvent
from cognitia.session.backends import BackendBase
from cognitia_pydantic_ai import CognitiaConversationStore

pytestmark = pytest.mark.anyio

Prompts = Callable[[list[ModelMessage]], list[str]]


async def chat(store: CognitiaConversationStore, agent: Agent[None, str], cid: str, prompt: str) -> str:
    """One request of a stateless server: load, run, save."""
    conversation = await store.load(cid) or Conversation(conversation_id=cid)
    result = await agent.run(prompt, conversation=conversation)
    await store.save(result)
    return result.output


def tool_calls(messages: list[ModelMessage]) -> int:
    return sum(isinstance(part, ToolCallPart) for message in messages for part in message.parts)


def test_public_names() -> None:
    assert cognitia_pydantic_ai.__all__ == ["CognitiaConversationStore", "history", "remember"]


async def test_multi_turn_with_a_tool_call_is_stored(
    store_backend: BackendBase, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    store = CognitiaConversationStore(store_backend)
    await chat(store, agent, "c1", "first")
    await chat(store, agent, "c1", "second")
    output = await chat(store, agent, "c1", "third")

    assert output == "rolled; prompts seen: first | second | third"
    loaded = await store.load("c1")
    assert loaded is not None
    assert len(loaded.messages) == 12  # per turn: prompt, tool call, tool return, answer
    assert tool_calls(loaded.messages) == 3
    assert prompts_of(loaded.messages) == ["first", "second", "third"]
    assert await store_backend.load_turns(store.key("c1")) == await store.manager.turns(store.key("c1"))


async def test_test_model_conversation_round_trips(store_backend: BackendBase) -> None:
    agent: Agent[None, str] = Agent(TestModel())

    @agent.tool_plain
    def lookup(city: str) -> str:
        """Look a city up."""
        return f"{city} is sunny"

    store = CognitiaConversationStore(store_backend)
    conversation = Conversation(conversation_id="weather")
    for prompt in ("Paris?", "Rome?"):
        result = await agent.run(prompt, conversation=conversation)
        await store.save(result)
        conversation = result.conversation
    loaded = await store.load("weather")
    assert loaded is not None
    assert loaded.messages == conversation.messages
    assert loaded.usage == conversation.usage
    assert loaded.revision == conversation.revision


async def test_restart_on_a_new_backend_resumes_the_full_history(
    persistent_backend_factory: Any, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    backend = persistent_backend_factory()
    store = CognitiaConversationStore(backend)
    await chat(store, agent, "c1", "before restart 1")
    await chat(store, agent, "c1", "before restart 2")
    before = await store.load_entries("c1")
    await store.manager.aclose()
    await backend.aclose()

    backend = persistent_backend_factory()
    try:
        store = CognitiaConversationStore(backend)
        after = await store.load_entries("c1")
        assert after == before
        output = await chat(store, agent, "c1", "after restart")
        assert output == "rolled; prompts seen: before restart 1 | before restart 2 | after restart"
        loaded = await store.load("c1")
        assert loaded is not None
        assert prompts_of(loaded.messages) == ["before restart 1", "before restart 2", "after restart"]
        # An entry id kept from before the restart still resolves.
        assert before is not None
        assert (await store.read_entry(before[1].id)).message == before[1].message
    finally:
        await backend.aclose()


async def test_concurrent_conversations_stay_separate(
    store_backend: BackendBase, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    store = CognitiaConversationStore(store_backend)
    cids = [f"user-{i}" for i in range(6)]

    async def converse(cid: str) -> None:
        for turn in range(3):
            await chat(store, agent, cid, f"{cid} says {turn}")

    async with anyio.create_task_group() as tg:
        for cid in cids:
            tg.start_soon(converse, cid)

    for cid in cids:
        loaded = await store.load(cid)
        assert loaded is not None
        assert prompts_of(loaded.messages) == [f"{cid} says {turn}" for turn in range(3)]
    assert {record.conversation_id for record in await store.list_conversations()} == set(cids)


async def test_saved_hooks_fire_for_framework_turns(
    store_backend: BackendBase, agent: Agent[None, str]
) -> None:
    manager = InMemorySessionManager(store_backend)
    saved: list[SessionEvent] = []
    manager.on("saved", saved.append)
    store = CognitiaConversationStore(manager)

    await chat(store, agent, "c1", "one")
    await chat(store, agent, "c1", "two")

    assert [(event.key, event.turns, event.version) for event in saved] == [
        ("pydantic_ai:conversation:c1", 4, 1),
        ("pydantic_ai:conversation:c1", 4, 2),
    ]


async def test_stored_rows_are_plain_json(persistent_backend_factory: Any, agent: Agent[None, str]) -> None:
    async with persistent_backend_factory() as backend:
        store = CognitiaConversationStore(backend)
        await chat(store, agent, "c1", "hello")
        loaded = await store.load("c1")
    assert loaded is not None

    state, rows = persistent_backend_factory.stored("pydantic_ai:conversation:c1")
    turns = [json.loads(row) for row in rows]
    assert [turn["message"]["kind"] for turn in turns] == ["request", "response", "request", "response"]
    assert [turn["parent_id"] for turn in turns[1:]] == [turn["id"] for turn in turns[:-1]]
    part_kinds = [part["part_kind"] for turn in turns for part in turn["message"]["parts"]]
    assert part_kinds == ["user-prompt", "tool-call", "tool-return", "text"]
    assert ModelMessagesTypeAdapter.validate_python([turn["message"] for turn in turns]) == loaded.messages
    record = json.loads(state)
    assert record["conversation_id"] == "c1"
    assert record["head_id"] == turns[-1]["id"]
    assert record["revision"] == loaded.revision


async def test_a_stale_revision_is_a_conflict(
    store_backend: BackendBase, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    store = CognitiaConversationStore(store_backend)
    await chat(store, agent, "c1", "start")
    first = await store.load("c1")
    second = await store.load("c1")
    assert first is not None and second is not None

    winner = await agent.run("winner", conversation=first)
    loser = await agent.run("loser", conversation=second)
    await store.save(winner)
    with pytest.raises(ConversationConflict):
        await store.save(loser)
    with pytest.raises(ConversationConflict):  # a new conversation may not replace a stored one
        await store.save(Conversation(conversation_id="c1"))

    loaded = await store.load("c1")
    assert loaded is not None
    assert prompts_of(loaded.messages) == ["start", "winner"]


async def test_concurrent_saves_of_one_revision_let_exactly_one_win(
    store_backend: BackendBase, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    store = CognitiaConversationStore(store_backend)
    await chat(store, agent, "c1", "start")
    results = []
    for prompt in ("left", "right", "middle"):
        loaded = await store.load("c1")
        assert loaded is not None
        results.append(await agent.run(prompt, conversation=loaded))
    outcomes: list[str] = []

    async def save(index: int) -> None:
        try:
            await store.save(results[index])
            outcomes.append("saved")
        except ConversationConflict:
            outcomes.append("conflict")

    # Three results continue the same revision; however the saves interleave, one wins.
    async with anyio.create_task_group() as tg:
        for index in range(3):
            tg.start_soon(save, index)
    assert sorted(outcomes) == ["conflict", "conflict", "saved"]
    loaded = await store.load("c1")
    assert loaded is not None
    assert len(prompts_of(loaded.messages)) == 2


@pytest.mark.parametrize("retries", [3, 0])
async def test_a_writer_in_another_process_is_detected_by_version(
    persistent_backend_factory: Any, agent: Agent[None, str], prompts_of: Prompts, retries: int
) -> None:
    """With retries the manager reloads and the revision check refuses the save; without
    any, the backend's version conflict itself reaches the caller as ConversationConflict."""
    async with persistent_backend_factory() as backend_a, persistent_backend_factory() as backend_b:
        conflicts: list[SessionEvent] = []
        manager_a = InMemorySessionManager(backend_a, retries=retries)
        manager_a.on("conflict", conflicts.append)
        store_a = CognitiaConversationStore(manager_a)
        store_b = CognitiaConversationStore(backend_b)
        await chat(store_a, agent, "c1", "start")
        stale = await store_a.load("c1")  # worker A's live copy
        assert stale is not None

        await chat(store_b, agent, "c1", "worker b")  # worker B writes behind A's back
        result = await agent.run("worker a", conversation=stale)
        with pytest.raises(ConversationConflict):
            await store_a.save(result)

        # A's live copy passed the revision check; the versioned commit caught the race.
        assert [event.key for event in conflicts] == ["pydantic_ai:conversation:c1"]
        loaded = await store_a.load("c1")
        assert loaded is not None
        assert prompts_of(loaded.messages) == ["start", "worker b"]


async def test_a_conversation_moving_between_workers_on_every_request(
    persistent_backend_factory: Any, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    """Stateless requests alternate between two workers (a store over its own backend object
    each): every load sees the other's save, so no request ends in a conflict."""
    async with persistent_backend_factory() as backend_a, persistent_backend_factory() as backend_b:
        stores = [CognitiaConversationStore(backend_a), CognitiaConversationStore(backend_b)]
        for i in range(4):
            await chat(stores[i % 2], agent, "c1", f"request {i}")
        for store in stores:
            loaded = await store.load("c1")
            assert loaded is not None
            assert prompts_of(loaded.messages) == [f"request {i}" for i in range(4)]


async def test_branch_fork_and_delete(
    store_backend: BackendBase, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    store = CognitiaConversationStore(store_backend)
    for prompt in ("a", "b", "c"):
        await chat(store, agent, "main", prompt)
    loaded = await store.load("main")
    assert loaded is not None

    fork = await store.fork("main", at=8, new_conversation_id="fork")
    assert prompts_of(fork.messages) == ["a", "b"]
    await store.save(await agent.run("fork only", conversation=fork))

    branched = await store.branch("main", at=4, expected_revision=loaded.revision)
    await store.save(await agent.run("b again", conversation=branched))
    main = await store.load("main")
    record = await store.read_record("main")
    assert main is not None and record is not None
    assert prompts_of(main.messages) == ["a", "b again"]
    old_tip = record.branches[-1]
    back = await store.branch("main", from_entry=old_tip, expected_revision=main.revision)
    assert prompts_of(back.messages) == ["a", "b", "c"]

    await store.delete("main")
    assert await store.load("main") is None
    assert await store_backend.load_turns(store.key("main")) == []
    assert await store_backend.list_keys("pydantic_ai:") == ["pydantic_ai:conversation:fork"]
    forked = await store.load("fork")
    assert forked is not None
    assert prompts_of(forked.messages) == ["a", "b", "fork only"]


class ActsBeforeDelete(InMemorySessionManager):
    """A real manager that runs the test's steps just before a delete reaches storage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_delete: list[Callable[[], Awaitable[None]]] = []

    async def delete(self, key: str, *, expected_version: int | None = None) -> bool:
        while self.before_delete:
            await self.before_delete.pop(0)()
        return await super().delete(key, expected_version=expected_version)


@pytest.mark.parametrize("elsewhere", ["saves a new revision", "deletes it and starts it again"])
async def test_a_delete_never_erases_what_another_worker_wrote_after_the_check(
    backend_factory: Any, agent: Agent[None, str], prompts_of: Prompts, elsewhere: str
) -> None:
    """Worker A checks the revision; before its delete reaches storage, worker B (a store over
    a backend object of its own) writes the conversation. A's delete is refused, B's survives."""
    manager_a = ActsBeforeDelete(backend_factory(), revalidate=True)
    store_a = CognitiaConversationStore(manager_a)
    store_b = CognitiaConversationStore(backend_factory())
    await chat(store_a, agent, "c1", "first")
    # Saved twice: a conversation started again under the key is at version 1 after its
    # first save, a version A's delete (expecting 2) tells apart.
    await chat(store_a, agent, "c1", "second")
    record = await store_a.read_record("c1")
    assert record is not None

    async def worker_b() -> None:
        if elsewhere == "deletes it and starts it again":
            await store_b.delete("c1")
        await chat(store_b, agent, "c1", "from b")

    manager_a.before_delete.append(worker_b)
    with pytest.raises(ConversationConflict):
        await store_a.delete_record("c1", expected_revision=record.revision)

    survivor = ["from b"] if elsewhere == "deletes it and starts it again" else ["first", "second", "from b"]
    for store in (store_a, store_b):
        loaded = await store.load("c1")
        assert loaded is not None
        assert prompts_of(loaded.messages) == survivor
    # A, told of the conflict, deletes what is stored now.
    await store_a.delete("c1")
    assert await store_b.load("c1") is None


async def test_a_session_left_empty_by_an_interrupted_delete_reads_as_absent(
    store_backend: BackendBase, agent: Agent[None, str], prompts_of: Prompts
) -> None:
    """An earlier version of the store emptied a conversation's session before deleting it."""
    store = CognitiaConversationStore(store_backend)
    await store_backend.commit(store.key("c1"), {}, truncate=0)
    assert await store.load("c1") is None
    assert await store.list_conversations() == []
    await store.delete("c1")  # nothing to delete
    await chat(store, agent, "c1", "new")  # a new conversation takes the session over
    loaded = await store.load("c1")
    assert loaded is not None and prompts_of(loaded.messages) == ["new"]
    await store.delete("c1")
    assert await store_backend.list_keys("pydantic_ai:") == []


async def test_list_conversations_by_scope(store_backend: BackendBase, agent: Agent[None, str]) -> None:
    store = CognitiaConversationStore(store_backend)
    for cid, scope in (("c1", "alice"), ("c2", "bob"), ("c3", "alice")):
        result = await agent.run("hi", conversation=Conversation(conversation_id=cid))
        await store.save(result, scope=scope)

    alice = await store.list_conversations(scope="alice")
    assert [record.conversation_id for record in alice] == ["c3", "c1"]
    assert await store.load("c2", scope="alice") is None
    assert len(await store.list_conversations(limit=2)) == 2


async def test_messages_read_back_share_nothing_with_what_the_store_keeps(store_backend: BackendBase) -> None:
    """A caller changing what ``load`` or ``history`` returned, nested tool arguments
    included, changes neither storage nor the next read, as with pydantic-ai's own store."""
    from pydantic_ai.messages import ModelRequest, ModelResponse, UserPromptPart

    from cognitia_pydantic_ai import history, remember

    messages: list[ModelMessage] = [
        ModelRequest(parts=[UserPromptPart("weather?")]),
        ModelResponse(parts=[ToolCallPart("get_weather", {"city": {"name": "Paris"}}, tool_call_id="t1")]),
        ModelRequest(parts=[ToolReturnPart("get_weather", {"tags": ["sunny"]}, tool_call_id="t1")]),
    ]
    store = CognitiaConversationStore(store_backend)
    await store.save(Conversation(conversation_id="c1", messages=messages))
    manager = InMemorySessionManager(store_backend)
    await remember(manager, "chat:1", messages)
    for _ in range(2):
        loaded = await store.load("c1")
        assert loaded is not None
        remembered = await history(manager, "chat:1")
        for read in (loaded.messages, remembered):
            call, returned = read[1].parts[0], read[2].parts[0]
            assert isinstance(call, ToolCallPart) and isinstance(returned, ToolReturnPart)
            args, content = cast("dict[str, Any]", call.args), cast("dict[str, Any]", returned.content)
            assert args == {"city": {"name": "Paris"}} and content == {"tags": ["sunny"]}
            args["city"]["name"] = "changed"
            content["tags"].append("changed")


async def test_listing_conversations_leaves_the_live_set_as_it_found_it(
    store_backend: BackendBase, agent: Agent[None, str]
) -> None:
    """A listing reads every stored record: those that were not live are let go once read,
    so the conversations in use stay live and a large store is not held in memory."""
    writer = CognitiaConversationStore(store_backend)
    for i in range(6):
        result = await agent.run("hi", conversation=Conversation(conversation_id=f"c{i}"))
        await writer.save(result, scope="even" if i % 2 == 0 else "odd")
    store = CognitiaConversationStore(InMemorySessionManager(store_backend, max_sessions=3))
    await store.load("c0")
    live = store.manager.live_keys()
    assert live == [store.key("c0")]

    listed = await store.list_conversations()
    assert [record.conversation_id for record in listed] == [f"c{i}" for i in reversed(range(6))]
    assert store.manager.live_keys() == live
    newest_even = await store.list_conversations(scope="even", limit=2)
    assert [record.conversation_id for record in newest_even] == ["c4", "c2"]
    assert await store.list_conversations(limit=0) == []
    assert store.manager.live_keys() == live


class TurnReadsRecorded(InMemorySessionManager):
    """A real manager that also notes how many turns each read asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[int | None] = []

    async def turns(self, key: str, *, last: int | None = None) -> list[dict[str, Any]]:
        self.reads.append(last)
        return await super().turns(key, last=last)


async def test_a_limited_load_reads_only_the_tail(
    persistent_backend_factory: Any, agent: Agent[None, str]
) -> None:
    async with persistent_backend_factory() as backend:
        store = CognitiaConversationStore(backend)
        for turn in range(5):
            await chat(store, agent, "c1", f"turn {turn}")
    async with persistent_backend_factory() as backend:
        manager = TurnReadsRecorded(backend)
        store = CognitiaConversationStore(manager)
        window = await store.load("c1", limit=2)
        assert window is not None
        assert isinstance(window.messages[0].parts[0], ToolReturnPart)
        assert manager.reads == [2]
        full = await store.load("c1")
        assert full is not None and full.messages[-2:] == window.messages
