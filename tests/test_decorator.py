"""@persisted_session: the issue's shape, every handler kind, failures, cancellation, concurrency."""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from cognitia import (
    InMemorySessionManager,
    Session,
    SessionEvent,
    StateNotSerializableError,
    VersionConflictError,
    persisted_session,
)
from cognitia.decorator import PersistedHandler
from cognitia.session.backends import BackendBase, InMemorySessionBackend, MemoryScope, SqliteSessionBackend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BackendBase]:
    made: BackendBase = (
        InMemorySessionBackend()
        if request.param == "memory"
        else SqliteSessionBackend(db_path=tmp_path / "d.db")
    )
    async with made:
        yield made


def numbers(turns: list[dict[str, Any]]) -> list[int]:
    """The reply numbers in turn outputs like ``"reply #3 to hi"``."""
    return [int(turn["output"].split("#")[1].split()[0]) for turn in turns]


async def test_the_issue_example(backend: BackendBase) -> None:
    @persisted_session(backend, key="session_id")
    async def chat(message: str, *, session_id: str, session: Session) -> str:
        session.state["count"] = session.state.get("count", 0) + 1
        return f"reply #{session.state['count']} to {message}"

    assert await chat("hi", session_id="user:42") == "reply #1 to hi"
    assert await chat("again", session_id="user:42") == "reply #2 to again"
    assert await chat("hi", session_id="user:7") == "reply #1 to hi"

    assert await backend.load("user:42") == {"count": 2}
    turns = await backend.load_turns("user:42")
    assert [t["input"] for t in turns] == [
        {"message": "hi", "session_id": "user:42"},
        {"message": "again", "session_id": "user:42"},
    ]
    assert [t["output"] for t in turns] == ["reply #1 to hi", "reply #2 to again"]
    assert all(isinstance(t["at"], float) and t["duration"] >= 0 for t in turns)
    assert await backend.list_keys() == ["user:42", "user:7"]


async def test_key_callable_and_scope() -> None:
    backend = InMemorySessionBackend()

    def user_key(call: inspect.BoundArguments) -> str:
        return f"user:{call.arguments['user']['id']}"

    @persisted_session(backend, key=user_key, scope=MemoryScope.AGENT)
    async def chat(message: str, user: dict[str, Any], *, session: Session) -> int:
        session.state["n"] = session.state.get("n", 0) + 1
        return int(session.state["n"])

    assert await chat("hi", {"id": 42}) == 1
    assert await chat("hi", user={"id": 42}) == 2
    assert await backend.list_keys() == ["agent:user:42"]
    assert await backend.list_keys(MemoryScope.AGENT) == ["agent:user:42"]


async def test_a_manager_instead_of_a_backend(backend: BackendBase) -> None:
    manager = InMemorySessionManager(backend=backend)
    events: list[str] = []
    manager.on("saved", lambda e: events.append(f"saved {e.key} v{e.version}"))
    manager.on("loaded", lambda e: events.append(f"loaded {e.key}"))

    @persisted_session(manager)
    async def chat(*, session_id: str, session: Session) -> None:
        session.state["seen"] = True

    assert chat.manager is manager
    await chat(session_id="k")
    await manager.close("k")
    await chat(session_id="k")
    assert events == ["saved k v1", "loaded k", "saved k v2"]
    assert (await manager.get("k")).state == {"seen": True}


async def test_signature_name_and_docstring_are_preserved() -> None:
    @persisted_session(InMemorySessionBackend(), key="session_id")
    async def chat(message: str, *, session_id: str, session: Session, tone: str = "kind") -> str:
        """Answer the user."""
        return message

    assert chat.__name__ == "chat"
    assert chat.__qualname__.endswith("chat")
    assert chat.__doc__ == "Answer the user."
    assert chat.__module__ == __name__
    assert not hasattr(chat, "__wrapped__")  # or inspect.signature would show `session` again
    signature = inspect.signature(chat)
    assert list(signature.parameters) == ["message", "session_id", "tone"]
    assert "Session" not in str(signature) and "session:" not in str(signature)
    assert inspect.iscoroutinefunction(chat)


async def test_a_sync_handler(backend: BackendBase) -> None:
    @persisted_session(backend)
    def chat(message: str, *, session_id: str, session: Session) -> str:
        session.state["last"] = message
        return message.upper()

    assert inspect.iscoroutinefunction(chat)
    assert await chat("hi", session_id="k") == "HI"
    assert await backend.load("k") == {"last": "hi"}
    assert [t["output"] for t in await backend.load_turns("k")] == ["HI"]


async def test_an_async_generator_handler_stores_the_turn_when_the_stream_ends(backend: BackendBase) -> None:
    @persisted_session(backend)
    async def stream(message: str, *, session_id: str, session: Session) -> AsyncIterator[str]:
        session.state["n"] = session.state.get("n", 0) + 1
        for word in message.split():
            await anyio.lowlevel.checkpoint()
            yield word + " "

    chunks = [chunk async for chunk in stream("a b c", session_id="k")]
    assert chunks == ["a ", "b ", "c "]
    assert await backend.load("k") == {"n": 1}
    assert [t["output"] for t in await backend.load_turns("k")] == ["a b c "]

    @persisted_session(backend)
    async def numbers_stream(*, session_id: str, session: Session) -> AsyncIterator[int]:
        for i in range(3):
            yield i

    assert [i async for i in numbers_stream(session_id="nums")] == [0, 1, 2]
    assert [t["output"] for t in await backend.load_turns("nums")] == [[0, 1, 2]]


async def test_a_stream_stopped_early_stores_nothing(backend: BackendBase) -> None:
    @persisted_session(backend)
    async def stream(message: str, *, session_id: str, session: Session) -> AsyncIterator[str]:
        session.state["n"] = session.state.get("n", 0) + 1
        for word in message.split():
            yield word

    assert [w async for w in stream("a b", session_id="k")] == ["a", "b"]
    async with aclosing(stream("x y z", session_id="k")) as words:
        async for _ in words:
            break
    assert await backend.load("k") == {"n": 1}
    assert len(await backend.load_turns("k")) == 1
    assert [w async for w in stream("c", session_id="k")] == ["c"]
    assert await backend.load("k") == {"n": 2}  # the abandoned turn's change was rolled back


async def test_an_abandoned_stream_releases_its_key(backend: BackendBase) -> None:
    @persisted_session(backend)
    async def stream(*, session_id: str, session: Session) -> AsyncIterator[int]:
        session.state["n"] = session.state.get("n", 0) + 1
        for i in range(10):
            yield i

    @persisted_session(stream.manager)
    async def chat(*, session_id: str, session: Session) -> int:
        session.state["n"] = session.state.get("n", 0) + 1
        return int(session.state["n"])

    def start() -> Iterator[Any]:
        yield stream(session_id="k")

    agen = next(start())
    assert await agen.__anext__() == 0  # the stream now holds the key
    async with anyio.create_task_group() as tg:
        results: list[int] = []
        done = anyio.Event()

        async def wait_for_key() -> None:
            results.append(await chat(session_id="k"))
            done.set()

        tg.start_soon(wait_for_key)
        await anyio.sleep(0.01)
        assert results == []
        del agen  # dropped without aclose(): the runtime's finalizer closes it, in another task
        gc.collect()
        with anyio.fail_after(5):
            await done.wait()
    assert results == [1]
    assert await backend.load("k") == {"n": 1}


async def test_a_stream_left_by_break_then_called_again_in_the_same_task(backend: BackendBase) -> None:
    @persisted_session(backend)
    async def stream(message: str, *, session_id: str, session: Session) -> AsyncIterator[str]:
        session.state["n"] = session.state.get("n", 0) + 1
        for word in message.split():
            yield word

    async for _ in stream("a b c", session_id="k"):
        break  # no aclosing(): the runtime's finalizer closes the stream, in a task of its own
    with anyio.fail_after(5):
        assert [w async for w in stream("d e", session_id="k")] == ["d", "e"]
    assert await backend.load("k") == {"n": 1}  # the abandoned turn stored nothing
    assert [t["output"] for t in await backend.load_turns("k")] == ["de"]

    # A stream the caller still holds is not waited for: that would be forever.
    kept = stream("f g", session_id="k")
    assert await kept.__anext__() == "f"
    with pytest.raises(RuntimeError, match="held by a streaming handler this task started"):
        await stream.manager.get("k")
    await kept.aclose()
    assert (await stream.manager.get("k")).state == {"n": 1}


async def test_a_stream_resumed_by_another_task_holds_the_key_there(backend: BackendBase) -> None:
    """The task that resumes a stream holds its key: the one that started it may use the manager."""

    @persisted_session(backend)
    async def stream(*, session_id: str, session: Session) -> AsyncIterator[int]:
        session.state["n"] = session.state.get("n", 0) + 1
        for i in range(3):
            yield i

    @persisted_session(stream.manager)
    async def chat(*, session_id: str, session: Session) -> int:
        session.state["n"] = session.state.get("n", 0) + 1
        return int(session.state["n"])

    agen = stream(session_id="k")
    assert await agen.__anext__() == 0
    rest: list[int] = []

    async def finish() -> None:
        rest.extend([i async for i in agen])

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish)
        with anyio.fail_after(5):
            # Waits for the stream, finished by the other task, instead of refusing.
            assert await chat(session_id="k") == 2
    assert rest == [1, 2]
    assert await backend.load("k") == {"n": 2}


async def test_handlers_that_are_not_async_def_functions_but_return_awaitables(backend: BackendBase) -> None:
    async def reply(message: str, *, session_id: str, session: Session) -> str:
        session.state["n"] = session.state.get("n", 0) + 1
        return f"{message} #{session.state['n']}"

    def traced(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        return call

    class Agent:
        async def __call__(self, message: str, *, session_id: str, session: Session) -> str:
            return await reply(message, session_id=session_id, session=session)

    class Streamer:
        async def __call__(self, message: str, *, session_id: str, session: Session) -> AsyncIterator[str]:
            yield message.upper()

    assert await persisted_session(backend)(traced(reply))("hi", session_id="a") == "hi #1"
    assert await persisted_session(backend)(Agent())("hi", session_id="b") == "hi #1"
    chunks = [c async for c in persisted_session(backend)(Streamer())("hi", session_id="c")]
    assert chunks == ["HI"]
    assert [t["output"] for t in await backend.load_turns("a")] == ["hi #1"]
    assert [t["output"] for t in await backend.load_turns("b")] == ["hi #1"]
    assert [t["output"] for t in await backend.load_turns("c")] == ["HI"]


async def test_a_session_parameter_last_among_the_positional_ones_works(backend: BackendBase) -> None:
    @persisted_session(backend, key="sid")
    async def last(sid: str, msg: str, session: Session) -> str:
        return f"{msg} {session.key}"

    assert list(inspect.signature(last).parameters) == ["sid", "msg"]
    assert await last("chat:1", "hi") == "hi chat:1"


def test_misuse_is_refused_at_decoration_time() -> None:
    backend = InMemorySessionBackend()
    with pytest.raises(TypeError, match="sync generator"):

        @persisted_session(backend)
        def gen(*, session_id: str, session: Session) -> Iterator[str]:
            yield "x"

    with pytest.raises(TypeError, match="key='user_id' is not a parameter"):

        @persisted_session(backend, key="user_id")
        async def bad_key(*, session_id: str, session: Session) -> None: ...

    with pytest.raises(TypeError, match="no parameter 'session'"):

        @persisted_session(backend)
        async def no_session(*, session_id: str) -> None: ...

    with pytest.raises(TypeError, match="must accept a keyword"):

        @persisted_session(backend)
        async def positional(session: Session, /, *, session_id: str) -> None: ...

    # Callers leave the session out, so their positional arguments would land on it.
    with pytest.raises(TypeError, match=r"'session' of .*first comes before the positional parameter 'msg'"):

        @persisted_session(backend)
        async def first(session: Session, msg: str, *, session_id: str) -> None: ...

    with pytest.raises(TypeError, match="before the positional parameter 'rest'"):

        @persisted_session(backend, key="sid")
        async def middle(sid: str, session: Session, *rest: str) -> None: ...

    with pytest.raises(TypeError, match="initial"):
        persisted_session(backend, initial=5)  # type: ignore[arg-type]
    # An initial state JSON cannot hold is refused here, not at every call.
    with pytest.raises(TypeError, match=r'initial\["seen"\] is a set'):
        persisted_session(backend, initial={"seen": {"a"}})
    with pytest.raises(ValueError, match="on_conflict"):

        @persisted_session(backend, on_conflict="ignore")  # type: ignore[arg-type]
        async def handler(*, session_id: str, session: Session) -> None: ...

    async def plain(*, session_id: str, session: Session) -> None: ...

    # Arguments that would fail every call are refused when decorating.
    with pytest.raises(ValueError, match="retries must be an int >= 0, got -1"):
        persisted_session(backend, retries=-1)(plain)
    with pytest.raises(ValueError, match=r"scope must be a MemoryScope .*got 'bogus'"):
        persisted_session(backend, scope="bogus")(plain)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"key must be the name of a parameter of .*plain or a callable, got int"
    ):
        persisted_session(backend, key=123)(plain)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encoder must be a callable, got str"):
        persisted_session(backend, encoder="json")(plain)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a backend or a session manager is needed, got None"):
        persisted_session(None)(plain)  # type: ignore[arg-type]
    # A scope given as its string value is accepted, as MemoryScope accepts it.
    assert persisted_session(backend, scope="agent")(plain)  # type: ignore[arg-type]


async def test_the_caller_cannot_pass_the_session() -> None:
    @persisted_session(InMemorySessionBackend())
    async def chat(*, session_id: str, session: Session) -> None:
        raise AssertionError("not called")

    with pytest.raises(TypeError, match="passes the session itself"):
        await chat(session_id="k", session=Session("k", {}))  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await chat()  # type: ignore[call-arg]  # the key argument is missing


async def test_state_persists_across_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "restart.db"

    def make(backend: SqliteSessionBackend) -> Callable[..., Any]:
        @persisted_session(backend, key="session_id")
        async def chat(message: str, *, session_id: str, session: Session) -> str:
            session.state["count"] = session.state.get("count", 0) + 1
            return f"reply #{session.state['count']} to {message}"

        return chat

    async with SqliteSessionBackend(db_path=db) as first:
        chat = make(first)
        for _ in range(3):
            await chat("hi", session_id="user:42")
    async with SqliteSessionBackend(db_path=db) as second:
        chat = make(second)
        assert await chat("back", session_id="user:42") == "reply #4 to back"
        assert numbers(await second.load_turns("user:42")) == [1, 2, 3, 4]


class Boom(Exception):
    pass


async def test_a_failing_handler_stores_nothing_of_its_turn(backend: BackendBase) -> None:
    boom = Boom("model down")

    @persisted_session(backend)
    async def chat(message: str, *, session_id: str, session: Session) -> str:
        session.state["count"] = session.state.get("count", 0) + 1
        session.state.setdefault("log", []).append(message)
        if message == "fail":
            session.turns.append({"extra": "turn"})
            await session.turns.pop()
            await session.turns.pop()  # even a stored turn
            raise boom
        if message == "clear-then-fail":
            session.turns.clear()
            raise boom
        return f"reply #{session.state['count']}"

    await chat("one", session_id="k")
    await chat("two", session_id="k")
    for message in ("fail", "clear-then-fail"):
        with pytest.raises(Boom) as info:
            await chat(message, session_id="k")
        assert info.value is boom  # unchanged
        assert await backend.load("k") == {"count": 2, "log": ["one", "two"]}
        assert (await backend.load_record("k")).version == 2  # type: ignore[union-attr]
        live = await chat.manager.get("k")
        assert live.state == {"count": 2, "log": ["one", "two"]}
        assert len(live.turns) == 2

    assert await chat("three", session_id="k") == "reply #3"
    assert numbers(await backend.load_turns("k")) == [1, 2, 3]

    with pytest.raises(Boom):
        await chat("fail", session_id="new")  # a new key stays absent
    assert await backend.load("new") is None
    assert "new" not in chat.manager


@pytest.mark.parametrize("where", ["handler", "hooks"])
async def test_cancellation_at_every_await_point(backend: BackendBase, where: str) -> None:
    manager = InMemorySessionManager(backend=backend)

    async def slow_hook(event: SessionEvent) -> None:
        for _ in range(3):
            await anyio.lowlevel.checkpoint()

    if where == "hooks":
        for name in ("loaded", "saved", "expired", "evicted"):
            manager.on(name, slow_hook)

    @persisted_session(manager)
    async def chat(message: str, *, session_id: str, session: Session) -> str:
        session.state["count"] = session.state.get("count", 0) + 1
        session.state.setdefault("log", []).append(message)
        for _ in range(3 if where == "handler" else 0):
            await anyio.lowlevel.checkpoint()
        session.state["done"] = session.state["count"]
        return f"reply #{session.state['count']} to {message}"

    async def stored() -> tuple[int, list[int]]:
        state = await backend.load("k") or {"count": 0, "done": 0, "log": []}
        turns = await backend.load_turns("k")
        assert state["count"] == state["done"] == len(state["log"]) == len(turns)
        assert numbers(turns) == list(range(1, len(turns) + 1))
        return state["count"], numbers(turns)

    await chat("first", session_id="k")
    cancelled = completed_in_a_row = 0
    for step in range(3000):
        if step % 2 == 0:
            await manager.close("k")  # every other call starts with a load, whose await points count too
        before, _ = await stored()
        result: list[str] = []
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def call(result: list[str] = result, step: int = step) -> None:
                    result.append(await chat(f"m{step}", session_id="k"))

                tg.start_soon(call)
                for _ in range(step // 2):
                    await anyio.lowlevel.checkpoint()
                if isinstance(backend, SqliteSessionBackend) and step >= 60:
                    await anyio.sleep((step - 60) * 0.00001)  # thread hops take wall-clock time
                scope.cancel()
        after, _ = await stored()
        assert after in (before, before + 1)
        if result:
            assert after == before + 1
            completed_in_a_row += 1
        else:
            cancelled += 1
            completed_in_a_row = 0
        for live in manager.sessions():  # a live copy never runs ahead of, or behind, storage
            record = await backend.load_record("k")
            assert record is not None
            assert (live.state, live.version) == (record.state, record.version)
        if completed_in_a_row >= 6:
            break
    else:
        pytest.fail("the call never completed")
    # Hooks run shielded (a step that happened is always reported), so with where="hooks"
    # the points a cancellation can land on are those of the load and the save themselves.
    assert cancelled > (5 if where == "handler" else 2)
    count, _ = await stored()
    assert await chat("after", session_id="k") == f"reply #{count + 1} to after"
    await stored()


async def test_one_hundred_concurrent_calls_on_one_key(backend: BackendBase) -> None:
    @persisted_session(backend, key="session_id")
    async def chat(message: str, *, session_id: str, session: Session) -> str:
        count = session.state.get("count", 0) + 1
        await anyio.lowlevel.checkpoint()
        session.state["count"] = count
        return f"reply #{count} to {message}"

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(functools.partial(chat, f"m{i}", session_id="user:42"))
    assert await backend.load("user:42") == {"count": 100}
    turns = await backend.load_turns("user:42")
    assert numbers(turns) == list(range(1, 101))
    assert sorted(t["input"]["message"] for t in turns) == sorted(f"m{i}" for i in range(100))


async def test_many_keys_run_in_parallel(backend: BackendBase) -> None:
    keys = 40
    inside = 0
    everyone_inside = anyio.Event()

    @persisted_session(backend)
    async def chat(*, session_id: str, session: Session) -> None:
        nonlocal inside
        session.state["n"] = session.state.get("n", 0) + 1
        if session.state["n"] == 1:
            inside += 1
            if inside == keys:
                everyone_inside.set()
            await everyone_inside.wait()  # only possible if no key waits for another

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(keys):
                for _ in range(3):
                    tg.start_soon(functools.partial(chat, session_id=f"user:{i}"))
    assert len(await backend.list_keys()) == keys
    for i in range(keys):
        assert await backend.load(f"user:{i}") == {"n": 3}


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def test_the_encoder_option(backend: BackendBase) -> None:
    def encode(value: object) -> object:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        raise TypeError(f"cannot encode {type(value).__name__}")

    @persisted_session(backend, encoder=encode)
    async def move(to: Point, *, session_id: str, session: Session) -> Point:
        session.state["moves"] = session.state.get("moves", 0) + 1
        return Point(to.x + 1, to.y + 1)

    assert await move(Point(1, 2), session_id="k") == Point(2, 3)
    turn = (await backend.load_turns("k"))[0]
    assert turn["input"]["to"] == {"x": 1, "y": 2}
    assert turn["output"] == {"x": 2, "y": 3}

    @persisted_session(backend)
    async def plain(to: Point, *, session_id: str, session: Session) -> None: ...

    with pytest.raises(StateNotSerializableError) as info:
        await plain(Point(0, 0), session_id="k")
    assert info.value.key == "k" and info.value.path == 'turn["input"]["to"]'

    @persisted_session(backend, encoder=encode)
    async def rejected(to: object, *, session_id: str, session: Session) -> None: ...

    with pytest.raises(StateNotSerializableError, match="converter rejected"):
        await rejected({1, 2}, session_id="k")
    assert len(await backend.load_turns("k")) == 1


async def test_initial_state_and_record_turns(backend: BackendBase) -> None:
    @persisted_session(backend, initial={"items": []}, record_turns=False)
    async def add(item: str, *, session_id: str, session: Session) -> list[str]:
        session.state["items"].append(item)
        return list(session.state["items"])

    assert await add("a", session_id="one") == ["a"]
    assert await add("b", session_id="two") == ["b"]  # the initial dict is not shared
    assert await add("c", session_id="one") == ["a", "c"]
    assert await backend.load_turns("one") == []

    @persisted_session(backend, initial=lambda: {"greeting": "hello"})
    async def greet(*, session_id: str, session: Session) -> str:
        return str(session.state["greeting"])

    assert await greet(session_id="three") == "hello"


Workers = tuple[list[SqliteSessionBackend], list[PersistedHandler[..., str]]]


def _two_workers(tmp_path: Path, **options: Any) -> Workers:
    backends = [SqliteSessionBackend(db_path=tmp_path / "shared.db") for _ in range(2)]
    handlers = []
    for backend in backends:
        manager = InMemorySessionManager(backend=backend, **options)

        @persisted_session(manager)
        async def chat(message: str, *, session_id: str, session: Session) -> str:
            session.state["count"] = session.state.get("count", 0) + 1
            await anyio.lowlevel.checkpoint()
            return f"reply #{session.state['count']} to {message}"

        handlers.append(chat)
    return backends, handlers


async def test_conflicts_between_two_workers_are_retried(tmp_path: Path) -> None:
    backends, (chat1, chat2) = _two_workers(tmp_path)
    conflicts: list[SessionEvent] = []
    chat1.manager.on("conflict", conflicts.append)
    chat2.manager.on("conflict", conflicts.append)
    async with backends[0], backends[1]:
        assert await chat1("a", session_id="k") == "reply #1 to a"
        assert await chat2("b", session_id="k") == "reply #2 to b"
        assert await chat1("c", session_id="k") == "reply #3 to c"  # stale copy: conflict, rerun
        assert await chat2("d", session_id="k") == "reply #4 to d"
        assert len(conflicts) == 2
        assert numbers(await backends[0].load_turns("k")) == [1, 2, 3, 4]

        @persisted_session(chat1.manager, on_conflict="raise")
        async def strict(*, session_id: str, session: Session) -> None:
            session.state["count"] += 1

        await chat2("e", session_id="k")
        with pytest.raises(VersionConflictError):
            await strict(session_id="k")
        assert numbers(await backends[0].load_turns("k")) == [1, 2, 3, 4, 5]


async def test_two_workers_hammering_one_key(tmp_path: Path) -> None:
    backends, (chat1, chat2) = _two_workers(tmp_path, retries=100)
    async with backends[0], backends[1]:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(functools.partial(chat1, f"w1-{i}", session_id="k"))
                tg.start_soon(functools.partial(chat2, f"w2-{i}", session_id="k"))
        assert await backends[0].load("k") == {"count": 40}
        assert numbers(await backends[1].load_turns("k")) == list(range(1, 41))


class CountingBackend(InMemorySessionBackend):
    """The in-memory backend, recording how the turn log is read."""

    def __init__(self) -> None:
        super().__init__()
        self.turn_reads: list[int | None] = []

    async def load_turns(self, key: str, *, last: int | None = None) -> list[dict[str, Any]]:
        self.turn_reads.append(last)
        return await super().load_turns(key, last=last)


async def test_the_turn_log() -> None:
    backend = CountingBackend()

    @persisted_session(backend)
    async def chat(message: str, *, session_id: str, session: Session) -> str:
        return message

    for i in range(50):
        await chat(f"m{i}", session_id="k")

    seen: dict[str, Any] = {}

    @persisted_session(InMemorySessionManager(backend=backend))  # a fresh process's view
    async def inspect_log(action: str, *, session_id: str, session: Session) -> str:
        turns = session.turns
        seen["len"] = len(turns)
        if action == "tail":
            seen["last3"] = [t["output"] for t in await turns.last(3)]
            seen["last2"] = [t["output"] for t in await turns.last(2)]
        elif action == "pop":
            seen["popped"] = (await turns.pop() or {}).get("output")
            seen["after pop"] = [t["output"] for t in await turns.last(2)]
            seen["len after pop"] = len(turns)
        elif action == "clear":
            turns.clear()
            seen["after clear"] = await turns.all()
        return action

    await inspect_log("tail", session_id="k")
    assert seen["len"] == 50
    assert seen["last3"] == ["m47", "m48", "m49"]
    assert seen["last2"] == ["m48", "m49"]
    assert backend.turn_reads == [3]  # only the tail was read, once

    await inspect_log("pop", session_id="k")
    assert seen["len"] == 51
    assert seen["popped"] == "tail"
    assert seen["after pop"] == ["m48", "m49"]
    assert seen["len after pop"] == 50
    stored = [t["output"] for t in await backend.load_turns("k")]
    assert stored == [f"m{i}" for i in range(50)] + ["pop"]

    await inspect_log("clear", session_id="k")
    assert seen["after clear"] == []
    assert [t["output"] for t in await backend.load_turns("k")] == ["clear"]


async def test_turns_converted_by_the_encoder_read_back_the_same_live_and_stored(anyio_backend: str) -> None:
    import datetime

    backend = InMemorySessionBackend()

    @persisted_session(backend, key="session_id", encoder=lambda v: v.isoformat())
    async def stamp(when: datetime.datetime, *, session_id: str, session: Session) -> datetime.datetime:
        return when

    moment = datetime.datetime(2026, 1, 2, 3, 4, 5)
    await stamp(moment, session_id="agent:stamp")
    live = await stamp.manager.turns("agent:stamp")
    stored = await backend.load_turns("agent:stamp")
    assert live[0]["output"] == stored[0]["output"] == "2026-01-02T03:04:05"


async def test_a_handler_reading_its_own_turns_through_a_revalidating_manager(tmp_path: Path) -> None:
    """manager.turns(key) inside the key's own handler answers from the live session instead
    of waiting for the key the handler holds."""
    backend = SqliteSessionBackend(db_path=tmp_path / "s.db")
    manager = InMemorySessionManager(backend, revalidate=True)

    @persisted_session(manager, key="sid")
    async def chat(message: str, *, sid: str, session: Session) -> int:
        return len(await manager.turns(sid))

    with anyio.fail_after(10):
        assert [await chat(m, sid="agent:k") for m in "abc"] == [0, 1, 2]
    other = InMemorySessionManager(backend, revalidate=True)
    await other.update("agent:k", lambda s: s.turns.append({"from": "elsewhere"}))
    assert len(await manager.turns("agent:k")) == 4  # outside a handler: revalidated
    await backend.aclose()
