"""CognitiaSessionService driven by ADK's Runner with a scripted model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from google.adk.agents import Agent
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events import Event, EventActions
from google.adk.runners import Runner
from google.adk.sessions import BaseSessionService, InMemorySessionService
from google.adk.sessions import Session as AdkSession
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import types

import cognitia_adk
from cognitia import InMemorySessionManager, SessionEvent, StateNotSerializableError
from cognitia.session.backends import BackendBase, SqliteSessionBackend
from cognitia_adk import CognitiaSessionService

pytestmark = pytest.mark.anyio

APP = "dice"


async def ask(runner: Runner, user_id: str, session_id: str, text: str) -> str:
    """One user message through the Runner; the agent's final text."""
    message = types.Content(role="user", parts=[types.Part(text=text)])
    answer = ""
    async for event in runner.run_async(user_id=user_id, session_id=session_id, new_message=message):
        if event.content and event.content.parts and event.content.parts[0].text:
            answer = event.content.parts[0].text
    return answer


def user_texts(session: AdkSession) -> list[str]:
    return [
        part.text
        for event in session.events
        if event.author == "user" and event.content
        for part in event.content.parts or []
        if part.text
    ]


async def stored(service: BaseSessionService, user_id: str, session_id: str, **config: Any) -> AdkSession:
    session = await service.get_session(
        app_name=APP,
        user_id=user_id,
        session_id=session_id,
        config=GetSessionConfig(**config) if config else None,
    )
    assert session is not None
    return session


def test_public_names() -> None:
    assert cognitia_adk.__all__ == ["CognitiaSessionService"]


async def test_multi_turn_with_a_tool_call(store_backend: BackendBase, agent: Agent) -> None:
    service = CognitiaSessionService(store_backend)
    runner = Runner(agent=agent, app_name=APP, session_service=service)
    await service.create_session(app_name=APP, user_id="ann", session_id="s1")

    for text in ("first", "second"):
        await ask(runner, "ann", "s1", text)
    answer = await ask(runner, "ann", "s1", "third")

    assert answer == "rolled 4; prompts seen: first | second | third"
    session = await stored(service, "ann", "s1")
    calls = [event for event in session.events if event.get_function_calls()]
    assert len(session.events) == 12 and len(calls) == 3  # per turn: user, call, response, answer
    assert user_texts(session) == ["first", "second", "third"]
    assert session.state == {"last_roll": 4, "user:rolls": 3, "app:rolls": 3}


async def test_restart_on_a_new_backend_resumes_the_full_history(
    persistent_backend_factory: Any, agent: Agent
) -> None:
    async with persistent_backend_factory() as backend:
        service = CognitiaSessionService(backend)
        runner = Runner(agent=agent, app_name=APP, session_service=service)
        await service.create_session(app_name=APP, user_id="ann", session_id="s1", state={"topic": "dice"})
        await ask(runner, "ann", "s1", "before restart 1")
        await ask(runner, "ann", "s1", "before restart 2")
        before = await stored(service, "ann", "s1")
        await service.manager.aclose()

    async with persistent_backend_factory() as backend:
        service = CognitiaSessionService(backend)
        after = await stored(service, "ann", "s1")
        assert after.events == before.events
        assert (
            after.state == before.state == {"topic": "dice", "last_roll": 4, "user:rolls": 2, "app:rolls": 2}
        )
        assert after.last_update_time == before.last_update_time

        runner = Runner(agent=agent, app_name=APP, session_service=service)
        answer = await ask(runner, "ann", "s1", "after restart")
        assert answer == "rolled 4; prompts seen: before restart 1 | before restart 2 | after restart"
        assert len((await stored(service, "ann", "s1")).events) == 12


async def test_concurrent_sessions_stay_separate(store_backend: BackendBase, agent: Agent) -> None:
    service = CognitiaSessionService(store_backend)
    runner = Runner(agent=agent, app_name=APP, session_service=service)
    users = [f"user-{i}" for i in range(5)]
    for user in users:
        await service.create_session(app_name=APP, user_id=user, session_id="chat")

    async def converse(user: str) -> None:
        for turn in range(3):
            await ask(runner, user, "chat", f"{user} says {turn}")

    async with anyio.create_task_group() as tg:
        for user in users:
            tg.start_soon(converse, user)

    app_rolls = set()
    for user in users:
        session = await stored(service, user, "chat")
        assert user_texts(session) == [f"{user} says {turn}" for turn in range(3)]
        assert session.state["user:rolls"] == 3
        app_rolls.add(session.state["app:rolls"])
    # One value shared by the app. (The tool writes "app:rolls" as a value computed from its
    # session's copy, so concurrent runs overwrite each other, with ADK's own services too.)
    assert len(app_rolls) == 1


async def test_state_prefixes_behave_like_adks_in_memory_service(
    store_backend: BackendBase, agent: Agent
) -> None:
    ours = CognitiaSessionService(store_backend)
    reference = InMemorySessionService()
    sessions = [("ann", "a1"), ("ann", "a2"), ("bob", "b1")]
    initial = {"app:theme": "dark", "user:lang": "en", "temp:draft": "x", "topic": "dice"}
    for service in (ours, reference):
        runner = Runner(agent=agent, app_name=APP, session_service=service)
        for user, sid in sessions:
            await service.create_session(app_name=APP, user_id=user, session_id=sid, state=initial)
            await ask(runner, user, sid, "roll")

    for user, sid in sessions:
        mine, theirs = await stored(ours, user, sid), await stored(reference, user, sid)
        assert mine.state == theirs.state
        assert "temp:draft" not in mine.state and "temp:scratch" not in mine.state
    assert (await stored(ours, "ann", "a1")).state["user:rolls"] == 2  # shared by ann's two sessions
    assert (await stored(ours, "bob", "b1")).state["user:rolls"] == 1
    for user in ("ann", "bob", "nobody"):
        assert await ours.get_user_state(app_name=APP, user_id=user) == await reference.get_user_state(
            app_name=APP, user_id=user
        )
    listed = await ours.list_sessions(app_name=APP)
    expected = await reference.list_sessions(app_name=APP)
    assert [(s.user_id, s.id, s.state) for s in listed.sessions] == [
        (s.user_id, s.id, s.state) for s in expected.sessions
    ]
    # temp: state is never written: not in the stored state, not in the stored events.
    for user, sid in sessions:
        key = ours.session_key(APP, user, sid)
        assert "temp:" not in json.dumps(await store_backend.load(key))
        assert "temp:" not in json.dumps(await store_backend.load_turns(key))


def record_turn_reads(backend: BackendBase, monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """How many turns each read of ``backend``'s turn logs asks for, from now on."""
    reads: list[int | None] = []
    load_turns = backend.load_turns

    async def recorded(key: str, *, last: int | None = None) -> list[dict[str, Any]]:
        reads.append(last)
        return await load_turns(key, last=last)

    monkeypatch.setattr(backend, "load_turns", recorded)
    return reads


async def test_get_session_config_matches_adk_and_reads_only_the_tail(
    store_backend: BackendBase, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Record a conversation with ADK's own service, then replay the very same events into
    # ours, so both hold identical ids and timestamps.
    reference = InMemorySessionService()
    runner = Runner(agent=agent, app_name=APP, session_service=reference)
    await reference.create_session(app_name=APP, user_id="ann", session_id="s1")
    for turn in range(4):
        await ask(runner, "ann", "s1", f"turn {turn}")
    recorded = await stored(reference, "ann", "s1")

    middle = recorded.events[7].timestamp
    configs: list[dict[str, Any]] = [
        {},
        {"num_recent_events": 0},
        {"num_recent_events": 1},
        {"num_recent_events": 5},
        {"num_recent_events": 100},
        {"after_timestamp": middle},
        {"after_timestamp": 0.0},
        {"num_recent_events": 3, "after_timestamp": middle},
    ]
    # The default cache holds every event, 2 holds fewer than most reads ask for, 0 none.
    for cached in (1_000, 2, 0):
        ours = CognitiaSessionService(store_backend, prefix=f"adk{cached}:", cached_events=cached)
        target = await ours.create_session(app_name=APP, user_id="ann", session_id="s1")
        for event in recorded.events:
            await ours.append_event(target, event.model_copy(deep=True))
        for config in configs + configs[::-1]:
            mine = await stored(ours, "ann", "s1", **config)
            theirs = await stored(reference, "ann", "s1", **config)
            assert [event.id for event in mine.events] == [event.id for event in theirs.events], (
                cached,
                config,
            )
            assert mine.events == theirs.events

    reads = record_turn_reads(store_backend, monkeypatch)
    fresh = CognitiaSessionService(store_backend, prefix="adk0:")
    tail = await stored(fresh, "ann", "s1", num_recent_events=3)
    assert len(tail.events) == 3
    assert reads == [3]


async def test_saved_hooks_fire_once_per_event(store_backend: BackendBase, agent: Agent) -> None:
    manager = InMemorySessionManager(store_backend)
    saved: list[SessionEvent] = []
    manager.on("saved", saved.append)
    service = CognitiaSessionService(manager)
    runner = Runner(agent=agent, app_name=APP, session_service=service)
    await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    await ask(runner, "ann", "s1", "roll")

    key = service.session_key(APP, "ann", "s1")
    turns = [event.turns for event in saved if event.key == key]
    assert turns == [0, 1, 1, 1, 1]  # created, then user, call, response, answer
    assert {event.key for event in saved} == {key, service.app_key(APP), service.user_key(APP, "ann")}


async def test_stored_rows_are_plain_json(persistent_backend_factory: Any, agent: Agent) -> None:
    async with persistent_backend_factory() as backend:
        service = CognitiaSessionService(backend)
        runner = Runner(agent=agent, app_name=APP, session_service=service)
        await service.create_session(app_name=APP, user_id="ann", session_id="s1")
        await ask(runner, "ann", "s1", "roll")
        session = await stored(service, "ann", "s1")
        key, app_key = service.session_key(APP, "ann", "s1"), service.app_key(APP)

    state, rows = persistent_backend_factory.stored(key)
    turns = [json.loads(row) for row in rows]
    assert [turn["author"] for turn in turns] == ["user", "dice", "dice", "dice"]
    assert turns[1]["content"]["parts"][0]["function_call"]["name"] == "roll_die"
    assert [Event.model_validate(turn) for turn in turns] == session.events
    record = json.loads(state)
    assert record["state"] == {"last_roll": 4}
    assert record["updated"] == session.last_update_time
    app_state, _ = persistent_backend_factory.stored(app_key)
    assert json.loads(app_state) == {"rolls": 1}


async def test_a_stale_session_object_is_refused(store_backend: BackendBase) -> None:
    service = CognitiaSessionService(store_backend)
    await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    first = await stored(service, "ann", "s1")
    second = await stored(service, "ann", "s1")

    await service.append_event(first, Event(author="user", invocation_id="i1"))
    with pytest.raises(StaleSessionError):
        await service.append_event(second, Event(author="user", invocation_id="i2"))
    await service.append_event(first, Event(author="user", invocation_id="i3"))  # the current copy goes on
    assert [event.invocation_id for event in (await stored(service, "ann", "s1")).events] == ["i1", "i3"]

    # A session object made by hand carries no version: its last_update_time decides.
    by_hand = AdkSession(id="s1", app_name=APP, user_id="ann", last_update_time=0.0)
    with pytest.raises(StaleSessionError):
        await service.append_event(by_hand, Event(author="user", invocation_id="i4"))
    by_hand.last_update_time = first.last_update_time
    await service.append_event(by_hand, Event(author="user", invocation_id="i5"))
    assert len((await stored(service, "ann", "s1")).events) == 3


async def test_a_writer_in_another_process_is_detected_by_version(persistent_backend_factory: Any) -> None:
    async with persistent_backend_factory() as backend_a, persistent_backend_factory() as backend_b:
        service_a, service_b = CognitiaSessionService(backend_a), CognitiaSessionService(backend_b)
        await service_a.create_session(app_name=APP, user_id="ann", session_id="s1")
        copy_a = await stored(service_a, "ann", "s1")
        copy_b = await stored(service_b, "ann", "s1")

        await service_b.append_event(copy_b, Event(author="user", invocation_id="from b"))
        with pytest.raises(StaleSessionError):
            await service_a.append_event(copy_a, Event(author="user", invocation_id="from a"))
        events = (await stored(service_a, "ann", "s1")).events
        assert [event.invocation_id for event in events] == ["from b"]


async def test_app_values_written_by_many_sessions_at_once_all_land(persistent_backend_factory: Any) -> None:
    """Every session of an app writes the one ``app:`` key: two workers appending to many
    sessions at once never fail on it or lose a value to each other."""
    async with persistent_backend_factory() as backend_a, persistent_backend_factory() as backend_b:
        workers = CognitiaSessionService(backend_a), CognitiaSessionService(backend_b)
        sessions = [
            await workers[i % 2].create_session(app_name=APP, user_id=f"u{i}", session_id="s")
            for i in range(40)
        ]

        async def turn(i: int) -> None:
            for n in (1, 2):
                delta = {f"app:u{i}": n, "user:n": n, "own": n}
                await workers[i % 2].append_event(
                    sessions[i],
                    Event(author="user", invocation_id=f"i{n}", actions=EventActions(state_delta=delta)),
                )

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(turn, i)
        for i in range(40):
            state = (await stored(workers[0], f"u{i}", "s")).state
            assert {k: v for k, v in state.items() if not k.startswith("app:")} == {"user:n": 2, "own": 2}
        assert {k: v for k, v in state.items() if k.startswith("app:")} == {f"app:u{i}": 2 for i in range(40)}


async def test_a_session_created_as_the_caller_is_cancelled_keeps_its_app_and_user_values(
    store_backend: BackendBase,
) -> None:
    """Once the session is stored, its ``app:``/``user:`` values are written even if the caller
    is cancelled meanwhile: a retry finds the session, so they could never be written later."""
    service = CognitiaSessionService(store_backend)
    key = service.session_key(APP, "ann", "s1")
    scope = anyio.CancelScope()
    service.manager.on("saved", lambda event: scope.cancel() if event.key == key else None)
    with scope:
        await service.create_session(
            app_name=APP,
            user_id="ann",
            session_id="s1",
            state={"app:model": "v2", "user:name": "Ann", "topic": "dice"},
        )
    assert scope.cancel_called
    session = await stored(service, "ann", "s1")
    assert session.state == {"app:model": "v2", "user:name": "Ann", "topic": "dice"}


async def test_a_read_returns_the_session_and_its_user_state_from_one_commit() -> None:
    """The ``user:`` state is stored under a key of its own and read after the session: an
    append committed by another worker between the two reads makes the read start over, so
    the session never comes back with its own values from before that append and its
    ``user:`` values from after."""
    from cognitia.session.backends import InMemorySessionBackend, SessionRecord

    async def append(worker: CognitiaSessionService, n: int) -> None:
        session = await stored(worker, "ann", "s1")
        delta = {"own": n, "user:n": n}
        await worker.append_event(
            session, Event(author="user", invocation_id=f"i{n}", actions=EventActions(state_delta=delta))
        )

    interleave: list[int] = []

    class Shared(InMemorySessionBackend):
        async def load_record(self, key: str) -> SessionRecord | None:
            if interleave and ":user:" in key:
                await append(other, interleave.pop())
            return await super().load_record(key)

    storage = Shared()
    reader = CognitiaSessionService(InMemorySessionManager(storage, revalidate=True))
    other = CognitiaSessionService(InMemorySessionManager(storage, revalidate=True))
    await reader.create_session(app_name=APP, user_id="ann", session_id="s1")
    await append(reader, 1)

    interleave.append(2)
    session = await stored(reader, "ann", "s1")
    assert not interleave  # the other worker's append ran between the two reads
    assert (session.state["own"], session.state["user:n"]) == (2, 2)
    assert [event.invocation_id for event in session.events] == ["i1", "i2"]


async def test_storage_stopping_while_app_state_is_read_leaves_nothing_stored() -> None:
    """Storage stops answering while the ``app:`` state is read: the caller can give up, and
    nothing is stored, neither the session nor its values (they are written as one commit)."""
    from cognitia.session.backends import InMemorySessionBackend, SessionRecord

    unreachable = True

    class Partitioned(InMemorySessionBackend):
        async def load_record(self, key: str) -> SessionRecord | None:
            if unreachable and ":app:" in key:
                await anyio.sleep_forever()
            return await super().load_record(key)

    service = CognitiaSessionService(InMemorySessionManager(Partitioned()))
    with anyio.move_on_after(0.2) as scope:
        await service.create_session(
            app_name=APP, user_id="ann", session_id="s1", state={"app:model": "v2", "user:name": "Ann"}
        )
    assert scope.cancelled_caught
    unreachable = False
    assert await service.get_session(app_name=APP, user_id="ann", session_id="s1") is None
    assert await service.get_user_state(app_name=APP, user_id="ann") == {}
    session = await service.create_session(
        app_name=APP, user_id="ann", session_id="s1", state={"app:model": "v2", "user:name": "Ann"}
    )
    assert session.state == {"app:model": "v2", "user:name": "Ann"}


async def test_a_conversation_moving_between_workers_on_every_turn(
    persistent_backend_factory: Any, agent: Agent
) -> None:
    """Each turn reaches another worker (its own backend object and service on the same storage):
    every worker reads what the others stored, so no turn is refused as stale."""
    async with persistent_backend_factory() as backend_a, persistent_backend_factory() as backend_b:
        services = [CognitiaSessionService(backend_a), CognitiaSessionService(backend_b)]
        runners = [Runner(agent=agent, app_name=APP, session_service=service) for service in services]
        await services[0].create_session(app_name=APP, user_id="ann", session_id="s1")
        answers = [await ask(runners[i % 2], "ann", "s1", f"turn {i}") for i in range(4)]
        assert answers[-1] == "rolled 4; prompts seen: turn 0 | turn 1 | turn 2 | turn 3"
        for service in services:
            session = await stored(service, "ann", "s1")
            assert user_texts(session) == [f"turn {i}" for i in range(4)]
            assert session.state == {"last_roll": 4, "user:rolls": 4, "app:rolls": 4}
            assert await service.get_user_state(app_name=APP, user_id="ann") == {"rolls": 4}

        await services[1].delete_session(app_name=APP, user_id="ann", session_id="s1")
        assert await services[0].get_session(app_name=APP, user_id="ann", session_id="s1") is None
        assert (await services[0].list_sessions(app_name=APP, user_id="ann")).sessions == []


async def test_appends_at_once_through_one_session_object_all_land(store_backend: BackendBase) -> None:
    """ADK appends from a live tool's task while the main loop appends too, through one object."""
    service = CognitiaSessionService(store_backend)
    session = await service.create_session(app_name=APP, user_id="ann", session_id="s1")

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(service.append_event, session, Event(author="user", invocation_id=f"e{i}"))

    stored_events = (await stored(service, "ann", "s1")).events
    assert sorted(event.invocation_id for event in stored_events) == [f"e{i}" for i in range(5)]
    assert len(session.events) == 5
    assert service._appending == {}  # no lock outlives its appends


@pytest.mark.parametrize("bad", [object(), float("nan")], ids=["object", "nan"])
async def test_a_scoped_value_json_cannot_hold_writes_nothing(store_backend: BackendBase, bad: Any) -> None:
    service = CognitiaSessionService(store_backend)
    with pytest.raises(StateNotSerializableError, match="user:dice:ann"):
        await service.create_session(app_name=APP, user_id="ann", session_id="s1", state={"user:x": bad})
    assert await service.get_session(app_name=APP, user_id="ann", session_id="s1") is None

    session = await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    before = (session.last_update_time, session._storage_update_marker)
    event = Event(author="user", invocation_id="i1", actions=EventActions(state_delta={"k": 1, "app:x": bad}))
    with pytest.raises(StateNotSerializableError, match="app:dice"):
        await service.append_event(session, event)
    assert (session.last_update_time, session._storage_update_marker) == before
    assert session.events == []
    assert (await stored(service, "ann", "s1")).events == []

    # The caller fixes the value and tries again: the event is stored once.
    fixed = Event(author="user", invocation_id="i1", actions=EventActions(state_delta={"k": 1, "app:x": 2}))
    await service.append_event(session, fixed)
    again = await stored(service, "ann", "s1")
    assert [e.invocation_id for e in again.events] == ["i1"]
    assert again.state == {"k": 1, "app:x": 2}


async def test_create_list_and_delete(store_backend: BackendBase) -> None:
    service = CognitiaSessionService(store_backend)
    created = await service.create_session(app_name=APP, user_id="ann:1", state={"user:tier": "gold"})
    assert created.id and created.state == {"user:tier": "gold"}
    with pytest.raises(AlreadyExistsError):
        await service.create_session(app_name=APP, user_id="ann:1", session_id=created.id)
    await service.create_session(app_name=APP, user_id="ann", session_id="s:2")
    await service.create_session(app_name="other", user_id="ann:1", session_id="s3")

    listed = await service.list_sessions(app_name=APP, user_id="ann:1")
    assert [(s.id, s.state, s.events) for s in listed.sessions] == [(created.id, {"user:tier": "gold"}, [])]
    assert [s.id for s in (await service.list_sessions(app_name=APP)).sessions] == [created.id, "s:2"]

    await service.delete_session(app_name=APP, user_id="ann:1", session_id=created.id)
    assert await service.get_session(app_name=APP, user_id="ann:1", session_id=created.id) is None
    assert (await service.list_sessions(app_name=APP, user_id="ann:1")).sessions == []
    assert await service.get_user_state(app_name=APP, user_id="ann:1") == {"tier": "gold"}
    with pytest.raises(SessionNotFoundError):
        await service.append_event(created, Event(author="user", invocation_id="late"))


async def test_listing_sessions_leaves_the_live_set_as_it_found_it(store_backend: BackendBase) -> None:
    """Listing reads every session of the app: those that were not live are let go once
    read, so a listing neither holds the store in memory nor pushes the sessions in use
    (with their validated events) out of the live set."""
    writer = CognitiaSessionService(store_backend)
    for i in range(6):
        state = {"app:theme": "dark", f"user:n{i}": i}
        await writer.create_session(app_name=APP, user_id=f"u{i}", session_id=f"s{i}", state=state)
    service = CognitiaSessionService(InMemorySessionManager(store_backend, max_sessions=4))
    hot = await stored(service, "u0", "s0")
    live = sorted(service.manager.live_keys())
    assert service.session_key(APP, "u0", "s0") in live

    listed = await service.list_sessions(app_name=APP)
    assert [(s.id, s.state) for s in listed.sessions] == [
        (f"s{i}", {"app:theme": "dark", f"user:n{i}": i}) for i in range(6)
    ]
    assert sorted(service.manager.live_keys()) == live
    assert (await stored(service, "u0", "s0")).id == hot.id


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_sync_runner_from_trio_through_a_thread(tmp_path: Path, agent: Agent) -> None:
    """cognitia on trio; ADK's sync Runner.run runs its own asyncio loop in a worker thread."""
    async with SqliteSessionBackend(tmp_path / "adk.db") as backend:
        service = CognitiaSessionService(backend)  # used from trio
        await service.create_session(app_name=APP, user_id="ann", session_id="s1")
        # The runner's service gets its own manager: a manager belongs to one event loop.
        runner = Runner(agent=agent, app_name=APP, session_service=CognitiaSessionService(backend))

        def run(text: str) -> list[Event]:
            message = types.Content(role="user", parts=[types.Part(text=text)])
            return list(runner.run(user_id="ann", session_id="s1", new_message=message))

        answers = []
        for text in ("trio one", "trio two"):
            events = await anyio.to_thread.run_sync(run, text)
            answers.append(
                events[-1].content.parts[0].text if events[-1].content and events[-1].content.parts else ""
            )
        assert answers == ["rolled 4; prompts seen: trio one", "rolled 4; prompts seen: trio one | trio two"]
        session = await stored(CognitiaSessionService(backend), "ann", "s1")
        assert user_texts(session) == ["trio one", "trio two"]


async def test_a_retried_append_of_the_same_event_is_stored_once(store_backend: BackendBase) -> None:
    """A caller that retries ``append_event`` (its first call stored the event, then failed
    or lost the answer) stores nothing twice, as ADK's in-memory service does."""
    service = CognitiaSessionService(store_backend)
    session = await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    event = Event(author="user", invocation_id="i1", actions=EventActions(state_delta={"k": 1, "user:n": 1}))
    await service.append_event(session, event)
    version = session._storage_update_marker

    await service.append_event(session, event)  # same object
    await service.append_event(session, event.model_copy(deep=True))  # an equal copy
    assert [e.id for e in session.events] == [event.id]
    assert session._storage_update_marker == version  # nothing written

    # The retry may come through a copy read before the first call stored the event.
    before = await stored(service, "ann", "s1")
    later = Event(author="user", invocation_id="i2")
    await service.append_event(session, later)
    await service.append_event(before, later)
    assert [e.invocation_id for e in before.events] == ["i1", "i2"]
    await service.append_event(before, Event(author="user", invocation_id="i3"))  # and it goes on

    again = await stored(service, "ann", "s1")
    assert [e.invocation_id for e in again.events] == ["i1", "i2", "i3"]
    assert again.state == {"k": 1, "user:n": 1}

    # An event that only shares the id is a different event: it is stored.
    clash = Event(id=later.id, author="user", invocation_id="other")
    await service.append_event(again, clash)
    assert len((await stored(service, "ann", "s1")).events) == 4


async def test_a_retry_arriving_after_later_events_is_stored_once(store_backend: BackendBase) -> None:
    """The retried event need not be the newest: its state delta is not applied again and
    the session object does not get it twice, as with ADK's in-memory service."""
    reference = InMemorySessionService()
    service = CognitiaSessionService(store_backend)
    results = []
    for subject in (reference, service):
        session = await subject.create_session(app_name=APP, user_id="ann", session_id="s1")
        first, second, third = (
            Event(
                author="user",
                invocation_id=f"i{n}",
                timestamp=float(n),
                actions=EventActions(state_delta={"count": n}),
            )
            for n in (1, 2, 3)
        )
        for event in (first, second, third, first.model_copy(deep=True), second):
            await subject.append_event(session, event)
        read = await stored(subject, "ann", "s1")
        results.append(
            ([e.invocation_id for e in session.events], [e.invocation_id for e in read.events], read.state)
        )
    assert results[0] == results[1] == (["i1", "i2", "i3"], ["i1", "i2", "i3"], {"count": 3})


async def test_a_retry_through_a_copy_that_fell_behind_leaves_it_behind(store_backend: BackendBase) -> None:
    """A retry finds its event stored, but the copy it came through missed events stored
    since: the copy does not take the retried event or a newer version, so its next
    append is refused instead of overwriting what it never saw."""
    service = CognitiaSessionService(store_backend)
    await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    behind = await stored(service, "ann", "s1")
    current = await stored(service, "ann", "s1")
    first, second = (
        Event(author="user", invocation_id=f"i{n}", actions=EventActions(state_delta={"count": n}))
        for n in (1, 2)
    )
    await service.append_event(current, first)
    await service.append_event(current, second)
    for retried in (first, second):  # deep in the log, or the newest one two versions on
        assert await service.append_event(behind, retried.model_copy(deep=True)) == retried
        assert behind.events == [] and behind.state == {}
    with pytest.raises(StaleSessionError):
        await service.append_event(
            behind, Event(author="user", invocation_id="i3", actions=EventActions(state_delta={"count": 1}))
        )
    read = await stored(service, "ann", "s1")
    assert [e.invocation_id for e in read.events] == ["i1", "i2"] and read.state == {"count": 2}


async def test_a_retry_after_an_event_with_an_older_timestamp_is_stored_once(
    store_backend: BackendBase,
) -> None:
    """Parallel agents append events out of timestamp order: the retried event is still
    found, as in ADK's in-memory service, and its old values do not come back."""
    reference = InMemorySessionService()
    service = CognitiaSessionService(store_backend)
    results = []
    for subject in (reference, service):
        session = await subject.create_session(app_name=APP, user_id="ann", session_id="s1")
        late, early = (
            Event(
                author=f"agent-{n}",
                invocation_id=f"i{n}",
                timestamp=stamp,
                actions=EventActions(state_delta={"n": n, "user:c": n}),
            )
            for n, stamp in ((1, 10.0), (2, 5.0))
        )
        for event in (late, early, late.model_copy(deep=True)):
            await subject.append_event(session, event)
        read = await stored(subject, "ann", "s1")
        results.append(([e.invocation_id for e in read.events], read.state))
    assert results[0] == results[1] == (["i1", "i2"], {"n": 2, "user:c": 2})


async def test_a_retry_does_not_bring_back_shared_values_changed_since(store_backend: BackendBase) -> None:
    """The event and its ``user:`` values were stored in one commit, so a retry writes
    neither again: another session's newer value stays."""
    service = CognitiaSessionService(store_backend)
    one = await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    two = await service.create_session(app_name=APP, user_id="ann", session_id="s2")
    event = Event(author="user", invocation_id="i1", actions=EventActions(state_delta={"user:c": 1}))
    await service.append_event(one, event)
    await service.append_event(
        two, Event(author="user", invocation_id="i2", actions=EventActions(state_delta={"user:c": 2}))
    )
    await service.append_event(one, event.model_copy(deep=True))
    assert await service.get_user_state(app_name=APP, user_id="ann") == {"c": 2}


async def test_a_retry_on_a_four_method_backend_completes_a_write_that_stopped_part_way() -> None:
    """A backend without multi-key commits stores the keys of an append one by one: a
    failure after the event's key leaves its ``user:`` values out, and the retry adds them."""

    class Dict:
        def __init__(self) -> None:
            self.data: dict[str, dict[str, Any]] = {}
            self.fail_next_user_write = False

        async def save(self, key: str, state: dict[str, Any]) -> None:
            if self.fail_next_user_write and key.startswith("adk:user:"):
                self.fail_next_user_write = False
                raise OSError("disk full")
            self.data[key] = json.loads(json.dumps(state))

        async def load(self, key: str) -> dict[str, Any] | None:
            return self.data.get(key)

        async def delete(self, key: str) -> bool:
            return self.data.pop(key, None) is not None

        async def list_keys(self, prefix: str = "") -> list[str]:
            return sorted(k for k in self.data if k.startswith(prefix))

    backend = Dict()
    service = CognitiaSessionService(backend)
    session = await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    event = Event(author="user", invocation_id="i1", actions=EventActions(state_delta={"user:c": 1, "k": 1}))
    backend.fail_next_user_write = True
    with pytest.raises(Exception, match="but not 'adk:user:dice:ann'"):
        await service.append_event(session, event)
    assert await service.get_user_state(app_name=APP, user_id="ann") == {}
    await service.append_event(session, event)
    read = await stored(service, "ann", "s1")
    assert [e.invocation_id for e in read.events] == ["i1"]
    assert read.state == {"k": 1, "user:c": 1}
    assert [e.invocation_id for e in session.events] == ["i1"]


@pytest.mark.parametrize("argument", ["app_name", "user_id", "session_id"])
async def test_ids_that_are_not_strings_are_refused_by_name(argument: str) -> None:
    service = CognitiaSessionService(InMemorySessionManager())
    ids: dict[str, Any] = {"app_name": APP, "user_id": "ann", "session_id": "s1", argument: 7}
    match = f"{argument} must be a str, got int"
    with pytest.raises(TypeError, match=match):
        await service.create_session(**ids)
    with pytest.raises(TypeError, match=match):
        await service.get_session(**ids)
    with pytest.raises(TypeError, match=match):
        await service.delete_session(**ids)
    if argument != "session_id":
        with pytest.raises(TypeError, match=match):
            await service.list_sessions(app_name=ids["app_name"], user_id=ids["user_id"])
    assert await service.manager.list_keys() == []


async def test_no_session_id_reads_and_deletes_nothing_as_in_adk() -> None:
    service = CognitiaSessionService(InMemorySessionManager())
    await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    none: Any = None
    assert await service.get_session(app_name=APP, user_id="ann", session_id=none) is None
    await service.delete_session(app_name=APP, user_id="ann", session_id=none)
    assert [s.id for s in (await service.list_sessions(app_name=APP, user_id="ann")).sessions] == ["s1"]


async def test_session_ids_with_surrounding_whitespace_name_the_stripped_session(
    store_backend: BackendBase,
) -> None:
    """As in ADK's in-memory service: created, read and deleted under the stripped id."""
    service = CognitiaSessionService(store_backend)
    created = await service.create_session(app_name=APP, user_id="ann", session_id=" s1 ")
    assert created.id == "s1"
    assert (await stored(service, "ann", " s1\t")).id == "s1"
    await service.delete_session(app_name=APP, user_id="ann", session_id="s1 ")
    assert await service.get_session(app_name=APP, user_id="ann", session_id="s1") is None


@pytest.mark.parametrize("cached_events", [1_000, 1, 0])
async def test_sessions_read_back_share_nothing_with_storage(
    store_backend: BackendBase, cached_events: int
) -> None:
    """Changing an event or the state of a session object read from the service (ADK's code
    and tools do) never changes what the next read returns, whether the event came from the
    cache of validated events (with 1, the newest one does) or was built for the read."""
    service = CognitiaSessionService(store_backend, cached_events=cached_events)
    session = await service.create_session(
        app_name=APP, user_id="ann", session_id="s1", state={"app:cfg": {"a": 1}}
    )
    delta = {"plan": {"steps": ["a"]}, "user:prefs": {"tone": "dry"}}
    for invocation in ("i1", "i2"):
        event = Event(author="user", invocation_id=invocation, actions=EventActions(state_delta=delta))
        await service.append_event(session, event)

    first = await stored(service, "ann", "s1")
    for event in first.events:
        event.actions.state_delta["plan"]["steps"].append("b")
        event.invocation_id = "changed"
    first.state["plan"]["steps"].append("c")
    first.state["user:prefs"]["tone"] = "warm"
    first.state["app:cfg"]["a"] = 2

    second = await stored(service, "ann", "s1")
    assert [event.invocation_id for event in second.events] == ["i1", "i2"]
    for event in second.events:
        assert event.actions.state_delta == {"plan": {"steps": ["a"]}, "user:prefs": {"tone": "dry"}}
    assert second.state == {"plan": {"steps": ["a"]}, "user:prefs": {"tone": "dry"}, "app:cfg": {"a": 1}}


def count_validations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One item per ADK event built from JSON, from now on (ADK's own validation still runs)."""
    calls: list[int] = []
    validate = Event.model_validate_json

    def counted(json_data: str | bytes, **kwargs: Any) -> Event:
        calls.append(1)
        return validate(json_data, **kwargs)

    monkeypatch.setattr(Event, "model_validate_json", staticmethod(counted))
    return calls


@pytest.mark.parametrize("cached_events", [1_000, 0])
async def test_a_live_session_validates_each_event_once(
    store_backend: BackendBase, agent: Agent, monkeypatch: pytest.MonkeyPatch, cached_events: int
) -> None:
    """The Runner reads the whole session every turn; with the cache on, each stored event
    is built from JSON once, and every read still gets events of its own."""
    service = CognitiaSessionService(store_backend, cached_events=cached_events)
    runner = Runner(agent=agent, app_name=APP, session_service=service)
    await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    validations = count_validations(monkeypatch)
    for turn in range(5):
        await ask(runner, "ann", "s1", f"turn {turn}")

    session = await stored(service, "ann", "s1")
    assert len(session.events) == 20  # user, call, response, answer per turn
    if cached_events:
        assert len(validations) == 20
    else:
        assert len(validations) == sum(4 * turn for turn in range(6))  # every read, every event
    again = await stored(service, "ann", "s1")
    assert again.events == session.events
    assert all(a is not b for a, b in zip(again.events, session.events, strict=True))
    assert again.events[1].content is not session.events[1].content


async def test_the_cached_events_follow_changes_made_around_the_service(store_backend: BackendBase) -> None:
    """Saves through the manager itself, and turns appended to the live session and not saved
    yet, show in the next read as they would without the cache."""
    service = CognitiaSessionService(store_backend)
    session = await service.create_session(app_name=APP, user_id="ann", session_id="s1")
    for name in ("one", "two", "three"):
        await service.append_event(session, Event(author="user", invocation_id=name))
    key = service.session_key(APP, "ann", "s1")
    invocations = [event.invocation_id for event in (await stored(service, "ann", "s1")).events]
    assert invocations == ["one", "two", "three"]

    async def drop_newest(live: Any) -> None:
        await live.turns.pop()

    await service.manager.update(key, drop_newest)
    invocations = [event.invocation_id for event in (await stored(service, "ann", "s1")).events]
    assert invocations == ["one", "two"]

    live = await service.manager.get(key)
    live.turns.append(
        Event(author="user", invocation_id="unsaved").model_dump(mode="json", exclude_none=True)
    )
    invocations = [event.invocation_id for event in (await stored(service, "ann", "s1")).events]
    assert invocations == ["one", "two", "unsaved"]
    await service.manager.save(live)
    copy = await stored(service, "ann", "s1")
    await service.append_event(copy, Event(author="user", invocation_id="four"))
    invocations = [event.invocation_id for event in (await stored(service, "ann", "s1")).events]
    assert invocations == ["one", "two", "unsaved", "four"]


async def test_the_caches_of_all_sessions_together_stay_within_cached_events_total(
    store_backend: BackendBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four sessions of 10 events, 25 cached at most together: reading them in turn keeps
    the two read last cached (read again, nothing is validated) and lets the others go
    (read again, every event is validated)."""
    service = CognitiaSessionService(store_backend, cached_events=10, cached_events_total=25)
    for i in range(4):
        session = await service.create_session(app_name=APP, user_id="ann", session_id=f"s{i}")
        for n in range(10):
            await service.append_event(session, Event(author="user", invocation_id=f"e{n}"))
    for i in range(4):
        await stored(service, "ann", f"s{i}")  # fills each session's cache
    validations = count_validations(monkeypatch)
    for i in (3, 2):
        assert len((await stored(service, "ann", f"s{i}")).events) == 10
    assert validations == []
    assert len((await stored(service, "ann", "s0")).events) == 10
    assert len(validations) == 10
    # s0 is cached again and s1 is not; s3, read longest ago now, was let go for it.
    validations.clear()
    await stored(service, "ann", "s2")
    await stored(service, "ann", "s0")
    assert validations == []
    await stored(service, "ann", "s3")
    assert len(validations) == 10


@pytest.mark.parametrize("name", ["cached_events", "cached_events_total"])
@pytest.mark.parametrize("bad", [-1, 1.5, "10", None])
def test_cached_events_must_be_a_count(bad: Any, name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a non-negative int, got {bad!r}"):
        CognitiaSessionService(InMemorySessionManager(), **{name: bad})
