"""Bad input: unstorable states and unusable keys are refused with a clear error, and nothing is written."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from _nesting import deep, deepest_storable, innermost

import cognitia
from cognitia import (
    BackendClosedError,
    CognitiaError,
    HookError,
    InMemorySessionManager,
    InvalidKeyError,
    MissingDependencyError,
    Session,
    SessionNotFound,
    StateNotSerializableError,
    StorageError,
    VersionConflictError,
    persisted_session,
)
from cognitia._json import dumps
from cognitia.session.backends import BackendBase, InMemorySessionBackend, SqliteSessionBackend, Write

pytestmark = pytest.mark.anyio


def _cycle() -> dict[str, Any]:
    history: list[Any] = [{"ts": 1}]
    history.append(history)
    return {"history": history}


class Opaque:
    pass


# (state, the path the error must name, a word of the problem)
BAD_STATES: list[tuple[str, dict[str, Any], str, str]] = [
    ("object", {"history": [{}, {}, {}, {"ts": Opaque()}]}, 'state["history"][3]["ts"]', "Opaque"),
    ("set", {"tags": {"a", "b"}}, 'state["tags"]', "set"),
    ("bytes", {"blob": b"\x00\x01"}, 'state["blob"]', "bytes"),
    ("nan", {"score": math.nan}, 'state["score"]', "nan"),
    ("inf", {"nested": {"x": [1.0, -math.inf]}}, 'state["nested"]["x"][1]', "inf"),
    ("cycle", _cycle(), 'state["history"][1]', "cycle"),
    ("tuple key", {"map": {("a", 1): "v"}}, 'state["map"]', "tuple"),
    ("nan key", {"scores": {"a": 1.0, math.nan: 2.0}}, 'state["scores"]', "nan"),
    ("inf key", {"scores": {-math.inf: 2.0}}, 'state["scores"]', "-inf"),
    ("huge int", {"ids": [1, 10**5000]}, 'state["ids"][1]', "digits"),
    ("huge int key", {"by_id": {10**5000: "x"}}, 'state["by_id"]', "digits"),
    ("not a dict", ["a", "list"], "state", "dict"),  # type: ignore[list-item]
]


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BackendBase]:
    made: BackendBase
    if request.param == "memory":
        made = InMemorySessionBackend()
    else:
        made = SqliteSessionBackend(db_path=tmp_path / "bad.db")
    async with made:
        yield made


@pytest.mark.parametrize(("label", "state", "path", "word"), BAD_STATES, ids=[b[0] for b in BAD_STATES])
async def test_backend_refuses_unstorable_state(
    backend: BackendBase, label: str, state: dict[str, Any], path: str, word: str
) -> None:
    await backend.save("agent:k", {"good": 1})
    with pytest.raises(StateNotSerializableError) as info:
        await backend.save("agent:k", state)
    error = info.value
    assert error.key == "agent:k"
    assert error.path == path
    assert "'agent:k'" in str(error) and path in str(error)
    assert word.lower() in str(error).lower()
    assert "nothing was written" in str(error)
    record = await backend.load_record("agent:k")
    assert record is not None
    assert record.state == {"good": 1}
    assert record.version == 1


async def test_backend_refuses_unstorable_state_for_a_new_key(backend: BackendBase) -> None:
    with pytest.raises(StateNotSerializableError):
        await backend.save("agent:new", {"x": {1, 2}})
    assert await backend.load("agent:new") is None
    assert await backend.list_keys() == []


async def test_backend_refuses_unstorable_turns(backend: BackendBase) -> None:
    await backend.commit("k", {"n": 1}, turns=[{"i": 0}])
    with pytest.raises(StateNotSerializableError) as info:
        await backend.commit("k", {"n": 2}, turns=[{"i": 1}, {"i": 2, "at": Opaque()}])
    assert info.value.path == 'turns[1]["at"]'
    assert await backend.load("k") == {"n": 1}
    assert await backend.load_turns("k") == [{"i": 0}]


async def test_too_deeply_nested_state_is_refused_cleanly(backend: BackendBase) -> None:
    levels = deepest_storable()
    with pytest.raises(StateNotSerializableError) as info:
        await backend.save("k", deep(levels + 1))
    # The path names the first dict past the deepest level JSON encodes on this Python.
    assert info.value.path == "state" + '["a"]' * levels
    assert "nested too deeply" in info.value.problem and "recursion limit" in info.value.problem
    assert await backend.load("k") is None


async def test_a_bad_value_at_the_deepest_level_is_named_for_what_it_is(store_backend: BackendBase) -> None:
    """Nesting JSON can encode is never taken for too much nesting: however deep the value
    at fault, it is found and named (the search for it keeps its own stack)."""
    # The deepest dict of the deepest state JSON encodes holds the value.
    levels = deepest_storable()
    path = "state" + '["a"]' * (levels - 1) + '["x"]'
    state = deep(levels)
    innermost(state)["x"] = float("nan")
    with pytest.raises(StateNotSerializableError) as info:
        await store_backend.save("k", state)
    assert (info.value.path, info.value.problem) == (path, "is nan, which JSON cannot represent")

    # PostgreSQL's jsonb refuses a lone surrogate, named by path at any depth; the others store it.
    innermost(state)["x"] = "\ud800"
    if store_backend.name != "postgres":
        await store_backend.save("k", state)
        loaded = await store_backend.load("k")
        assert loaded is not None and dumps("k", loaded) == dumps("k", state)
        return
    with pytest.raises(StateNotSerializableError) as info:
        await store_backend.save("k", state)
    assert info.value.path == path and "lone surrogate" in info.value.problem
    assert await store_backend.load("k") is None


async def test_lone_surrogates_are_stored_and_read_back(store_backend: BackendBase) -> None:
    """JSON can carry any Python str (a lone surrogate as a \\udXXX escape), and every backend
    but PostgreSQL stores it; jsonb holds only Unicode text, so PostgreSQL refuses the state,
    naming the string's path and the character without quoting the text."""
    state = {"notes": ["fine", "broken \ud800 half"], "ok": "é", "\udc80 key": 1}
    if store_backend.name == "postgres":
        with pytest.raises(StateNotSerializableError) as info:
            await store_backend.save("k", state)
        assert info.value.key == "k"
        assert info.value.path == 'state["notes"][1]'
        assert info.value.problem == "holds a lone surrogate (U+D800), which PostgreSQL jsonb cannot store"
        assert "broken" not in str(info.value) and info.value.__cause__ is None
        with pytest.raises(StateNotSerializableError, match="state has a key that holds a lone surrogate"):
            await store_backend.save("k", {"\udc80 key": 1})
        assert await store_backend.load("k") is None
        return
    await store_backend.save("k", state)
    assert await store_backend.load("k") == state
    record = await store_backend.load_record("k")
    assert record is not None and record.size > 0


@pytest.mark.parametrize(("label", "state", "path", "word"), BAD_STATES, ids=[b[0] for b in BAD_STATES])
async def test_manager_refuses_unstorable_state(
    backend: BackendBase, label: str, state: dict[str, Any], path: str, word: str
) -> None:
    manager = InMemorySessionManager(backend=backend)
    session = await manager.register("agent:k", {"good": 1})
    session.state = state
    with pytest.raises(StateNotSerializableError) as info:
        await manager.save(session)
    assert info.value.path == path
    assert session.version == 1
    assert await backend.load("agent:k") == {"good": 1}
    assert (await backend.load_record("agent:k")).version == 1  # type: ignore[union-attr]


async def test_manager_register_refuses_unstorable_state_and_keeps_nothing(backend: BackendBase) -> None:
    manager = InMemorySessionManager(backend=backend)
    with pytest.raises(StateNotSerializableError):
        await manager.register("agent:k", {"when": Opaque()})
    assert "agent:k" not in manager
    assert await backend.load("agent:k") is None


async def test_manager_refuses_unstorable_turn(backend: BackendBase) -> None:
    manager = InMemorySessionManager(backend=backend)
    session = await manager.register("k", {"n": 1})
    session.state["n"] = 2
    session.turns.append({"said": b"bytes"})
    with pytest.raises(StateNotSerializableError) as info:
        await manager.save(session)
    assert info.value.path == 'turn["said"]'
    assert await backend.load("k") == {"n": 1}
    assert await backend.load_turns("k") == []


async def test_update_with_an_unstorable_change_writes_nothing(backend: BackendBase) -> None:
    manager = InMemorySessionManager(backend=backend)
    await manager.register("k", {"n": 1})

    def change(session: Session) -> None:
        session.state["n"] = 2
        session.state["bad"] = {1.5, 2.5}

    with pytest.raises(StateNotSerializableError):
        await manager.update("k", change)
    assert await backend.load("k") == {"n": 1}
    # The failed change does not linger in the live session either.
    assert (await manager.get("k")).state == {"n": 1}


async def test_decorator_refuses_unstorable_state_and_output(backend: BackendBase) -> None:
    @persisted_session(backend, key="session_id")
    async def chat(message: Any, *, session_id: str, session: Session, poison: bool = False) -> Any:
        session.state["count"] = session.state.get("count", 0) + 1
        if poison:
            session.state["history"] = [{"ts": 1}, {"ts": 2}, {"ts": 3}, {"ts": Opaque()}]
        return message

    assert await chat("hi", session_id="user:42") == "hi"
    with pytest.raises(StateNotSerializableError) as info:
        await chat("bad", session_id="user:42", poison=True)
    assert info.value.key == "user:42"
    assert info.value.path == 'state["history"][3]["ts"]'

    with pytest.raises(StateNotSerializableError) as info:
        await chat({"when": {1, 2}}, session_id="user:42")  # an input JSON cannot hold
    assert info.value.path == 'turn["input"]["message"]["when"]'

    @persisted_session(backend, key="session_id")
    async def answer(*, session_id: str, session: Session) -> object:
        session.state["count"] = session.state.get("count", 0) + 1
        return {"score": math.inf}

    with pytest.raises(StateNotSerializableError) as info:
        await answer(session_id="user:42")
    assert info.value.path == 'turn["output"]["score"]'

    assert await backend.load("user:42") == {"count": 1}
    assert len(await backend.load_turns("user:42")) == 1
    assert (await backend.load_record("user:42")).version == 1  # type: ignore[union-attr]
    assert await chat("ok", session_id="user:42") == "ok"
    assert await backend.load("user:42") == {"count": 2}


BAD_KEYS: list[tuple[str, object]] = [
    ("empty", ""),
    ("blank", "   "),
    ("int", 42),
    ("none", None),
    ("bytes", b"key"),
    ("nul", "a\x00b"),
    ("too long", "k" * 1025),
    ("too many bytes", "\U0001f413" * 513),  # 513 characters, 2052 bytes in UTF-8
    ("lone surrogate", "user:\ud800"),
]


@pytest.mark.parametrize(("label", "key"), BAD_KEYS, ids=[k[0] for k in BAD_KEYS])
async def test_backend_refuses_bad_keys(backend: BackendBase, label: str, key: Any) -> None:
    for call in (
        lambda: backend.save(key, {}),
        lambda: backend.load(key),
        lambda: backend.delete(key),
        lambda: backend.load_record(key),
        lambda: backend.load_turns(key),
        lambda: backend.commit(key, {}),
    ):
        with pytest.raises(InvalidKeyError):
            await call()
    assert await backend.list_keys() == []


async def test_the_longest_allowed_key_works(backend: BackendBase) -> None:
    key = "k" * 1024
    await backend.save(key, {"ok": True})
    assert await backend.load(key) == {"ok": True}


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ({"role": "user"}, "turns must be a sequence of dicts, got dict (session 'agent:k'); a single turn"),
        ("bye", "turns must be a sequence of dicts, got str (session 'agent:k')"),
        (7, "turns must be a sequence of dicts, got int (session 'agent:k')"),
        ([{"i": 1}, "not a dict"], "turns[1] must be a dict, got str (session 'agent:k')"),
    ],
    ids=["a dict", "a str", "an int", "a str item"],
)
async def test_a_commit_refuses_turns_that_are_not_a_sequence_of_dicts(
    backend: BackendBase, turns: Any, problem: str
) -> None:
    await backend.commit("agent:k", {"n": 1}, turns=[{"i": 0}])
    with pytest.raises(TypeError, match=re.escape(problem)):
        await backend.commit("agent:k", {"n": 2}, turns=turns)
    with pytest.raises(TypeError, match=re.escape(problem)):
        await backend.commit_many([Write("agent:k", {"n": 2}, turns=turns)])
    assert await backend.load("agent:k") == {"n": 1}
    assert await backend.load_turns("agent:k") == [{"i": 0}]


@pytest.mark.parametrize("bad", [-1, 2**63, True, "1"], ids=repr)
async def test_a_commit_refuses_an_expected_version_it_cannot_mean(backend: BackendBase, bad: Any) -> None:
    await backend.commit("agent:k", {"n": 1})
    message = f"expected_version must be None or an int from 0 to 2**63 - 1, got {bad!r} (session 'agent:k')"
    with pytest.raises(ValueError, match=re.escape(message)):
        await backend.commit("agent:k", {"n": 2}, expected_version=bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        await backend.commit_many([Write("agent:k", {"n": 2}, expected_version=bad)])
    assert await backend.commit("agent:k", {"n": 3}, expected_version=1) == 2


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "1", 2**63], ids=repr)
async def test_a_delete_refuses_an_expected_version_it_cannot_mean(backend: BackendBase, bad: Any) -> None:
    """Only None or an int from 1 to 2**63 - 1: 0 ("only if nothing is stored") would leave
    nothing to delete, and no engine stores a version past 64 bits."""
    await backend.commit("agent:k", {"n": 1})
    managers = [InMemorySessionManager(backend), InMemorySessionManager()]
    await managers[1].register("agent:k", {"n": 1})
    for delete in (backend.delete, *(manager.delete for manager in managers)):
        message = (
            f"expected_version must be None or an int from 1 to 2**63 - 1, got {bad!r} (session 'agent:k')"
        )
        with pytest.raises(ValueError, match=re.escape(message)):
            await delete("agent:k", expected_version=bad)
    assert await backend.load("agent:k") == {"n": 1}
    assert "agent:k" in managers[1]


@pytest.mark.parametrize(("label", "key"), BAD_KEYS, ids=[k[0] for k in BAD_KEYS])
async def test_manager_and_decorator_refuse_bad_keys(label: str, key: Any) -> None:
    manager = InMemorySessionManager(backend=InMemorySessionBackend())
    calls: list[Callable[[], Any]] = [
        lambda: manager.register(key, {}),
        lambda: manager.get(key),
        lambda: manager.open(key),
        lambda: manager.close(key),
        lambda: manager.delete(key),
        lambda: manager.turns(key),
        lambda: manager.update(key, lambda s: None),
    ]
    for call in calls:
        with pytest.raises(InvalidKeyError):
            await call()

    @persisted_session(manager, key="session_id")
    async def chat(*, session_id: Any, session: Session) -> None:
        raise AssertionError("never called with a bad key")

    with pytest.raises(InvalidKeyError):
        await chat(session_id=key)
    assert len(manager) == 0


def test_scoped_key_refuses_bad_keys() -> None:
    from cognitia.session.backends import MemoryScope, scoped_key

    with pytest.raises(InvalidKeyError):
        scoped_key(MemoryScope.AGENT, "")
    with pytest.raises(InvalidKeyError):
        scoped_key(MemoryScope.AGENT, "k" * 1024)  # too long once prefixed


def test_errors_subclass_the_documented_builtins() -> None:
    expected: dict[type[Exception], tuple[type[BaseException], ...]] = {
        InvalidKeyError: (ValueError,),
        StateNotSerializableError: (TypeError,),
        SessionNotFound: (LookupError,),
        BackendClosedError: (RuntimeError,),
        StorageError: (OSError,),
        MissingDependencyError: (ImportError,),
        VersionConflictError: (),
        HookError: (),
    }
    for error, builtins in expected.items():
        assert issubclass(error, CognitiaError), error
        for builtin in builtins:
            assert issubclass(error, builtin), (error, builtin)
    assert issubclass(CognitiaError, Exception)
    assert not issubclass(VersionConflictError, (ValueError, LookupError, RuntimeError, OSError))

    assert SessionNotFound("k").key == "k"
    conflict = VersionConflictError("k", 3, None)
    assert (conflict.key, conflict.expected, conflict.actual) == ("k", 3, None)
    assert "no stored session" in str(conflict)
    missing = MissingDependencyError("Redis", "redis", "coredis")
    assert "pip install 'cognitia-sessions[redis]'" in str(missing)
    for name in cognitia.errors.__all__:
        assert getattr(cognitia, name) is getattr(cognitia.errors, name)


async def test_missing_session_is_a_lookup_error() -> None:
    manager = InMemorySessionManager(backend=InMemorySessionBackend())
    with pytest.raises(LookupError):
        await manager.get("nobody")
    with pytest.raises(SessionNotFound):
        await manager.save("nobody")


def test_the_json_codec_matches_the_standard_library() -> None:
    """States are encoded with the standard library's C encoder built once (not per call)
    and decoded with its scanner; both give exactly what ``json`` gives."""
    import json
    import platform

    from cognitia import _json

    if platform.python_implementation() == "CPython":
        assert _json._encode is not _json._encoder.encode  # the prebuilt encoder is in use
    value = {"a": [1, -2.5, 1e300, None, True, 'é\n"q'], "nested": {"t": (1, 2)}, "big": 10**40, "": {}}
    text = _json.dumps("k", value)
    assert text == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert _json.loads(text) == json.loads(text)
    assert _json.loads(' {"a": 1} \n') == {"a": 1}  # whitespace around the value
    with pytest.raises(json.JSONDecodeError, match="Extra data"):
        _json.loads('{"a": 1} {}')
    with pytest.raises(json.JSONDecodeError):
        _json.loads("")


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), 1e16])
def test_a_ttl_no_engine_can_store_is_refused(ttl: float, tmp_path: Path) -> None:
    """A deadline past what Redis's PEXPIRE takes would fail halfway through a commit there;
    every backend refuses it when it is made."""
    for make in (
        lambda: InMemorySessionBackend(ttl=ttl),
        lambda: SqliteSessionBackend(tmp_path / "t.db", ttl=ttl),
    ):
        with pytest.raises(ValueError, match="ttl must be a positive number of seconds up to"):
            make()
