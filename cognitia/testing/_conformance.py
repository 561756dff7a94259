from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from ..errors import VersionConflictError
from ..session.backends._protocol import Capability, SessionBackend, Write, capabilities_of
from ..session.backends._scope import MemoryScope, scoped_key

__all__ = ["ConformanceRule", "conformance_rules"]

Factory = Callable[[], "SessionBackend | Awaitable[SessionBackend]"]
RuleFn = Callable[[Factory], Awaitable[None]]

_RULES: list[ConformanceRule] = []


@dataclass(frozen=True)
class ConformanceRule:
    """One rule of the backend protocol, checked against backends made by a factory."""

    name: str
    doc: str
    requires: frozenset[Capability]
    persistent_only: bool
    fn: RuleFn

    def __str__(self) -> str:
        return self.name

    def applies_to(self, backend: object, *, persistent: bool = True) -> bool:
        """Whether the backend declares what this rule needs."""
        return self.requires <= capabilities_of(backend) and (persistent or not self.persistent_only)

    async def check(self, factory: Factory, *, persistent: bool | None = None) -> bool:
        """Run the rule; returns ``False`` (having checked nothing) if it does not apply.

        ``persistent``: whether a second backend from ``factory`` sees the first one's data
        (default: ``True`` unless the backend's ``name`` is ``"memory"``).
        """
        probe = await _make(factory)
        try:
            is_persistent = persistent if persistent is not None else getattr(probe, "name", "") != "memory"
            applies = self.applies_to(probe, persistent=is_persistent)
        finally:
            await _close(probe)
        if not applies:
            return False
        await self.fn(factory)
        return True


def conformance_rules() -> list[ConformanceRule]:
    """Every rule, in a stable order (for ``pytest.mark.parametrize``)."""
    return list(_RULES)


def _rule(*requires: Capability, persistent_only: bool = False) -> Callable[[RuleFn], RuleFn]:
    def register(fn: RuleFn) -> RuleFn:
        doc = (fn.__doc__ or "").strip()
        _RULES.append(ConformanceRule(fn.__name__, doc, frozenset(requires), persistent_only, fn))
        return fn

    return register


async def _make(factory: Factory) -> Any:
    backend = factory()
    if inspect.isawaitable(backend):
        backend = await backend
    if not isinstance(backend, SessionBackend):
        raise AssertionError(
            f"factory returned {type(backend).__name__}, which does not implement SessionBackend"
        )
    return backend


async def _close(backend: Any) -> None:
    aclose = getattr(backend, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    close = getattr(backend, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result


class _Opened:
    def __init__(self, factory: Factory) -> None:
        self.factory = factory

    async def __aenter__(self) -> Any:
        self.backend = await _make(self.factory)
        return self.backend

    async def __aexit__(self, *exc: object) -> None:
        await _close(self.backend)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# -- the four protocol methods ------------------------------------------------------------------


@_rule()
async def load_of_missing_key_is_none(factory: Factory) -> None:
    """load() of a key never saved returns None."""
    async with _Opened(factory) as backend:
        _expect(await backend.load("agent:never-saved") is None, "load() of a missing key must return None")


@_rule()
async def save_then_load_round_trips(factory: Factory) -> None:
    """A saved state loads back equal, nested values, unicode and numbers included."""
    state = {
        "role": "coach",
        "turn": 7,
        "ratio": 0.25,
        "big": 2**53,
        "flag": True,
        "nothing": None,
        "text": 'héllo ✓ 日本 \n\t"quoted"',
        "history": [{"role": "user", "content": "hi"}, [1, 2, [3]]],
        "empty": {},
    }
    async with _Opened(factory) as backend:
        await backend.save("agent:user:42:session:abc", state)
        loaded = await backend.load("agent:user:42:session:abc")
        _expect(loaded == state, f"loaded state differs from the saved one: {loaded!r}")


@_rule()
async def save_replaces_the_whole_state(factory: Factory) -> None:
    """A second save replaces the state; keys absent from it are gone."""
    async with _Opened(factory) as backend:
        await backend.save("global:settings", {"a": 1, "b": 2})
        await backend.save("global:settings", {"b": 3})
        _expect(await backend.load("global:settings") == {"b": 3}, "save() must replace, not merge")


@_rule()
async def loaded_state_is_independent(factory: Factory) -> None:
    """Mutating a loaded (or saved) dict does not change what is stored."""
    async with _Opened(factory) as backend:
        state: dict[str, Any] = {"items": [1]}
        await backend.save("k:copy", state)
        state["items"].append(2)
        loaded = await backend.load("k:copy")
        assert loaded is not None
        loaded["items"].append(3)
        _expect(await backend.load("k:copy") == {"items": [1]}, "stored state must not alias caller dicts")


@_rule()
async def delete_reports_whether_something_was_deleted(factory: Factory) -> None:
    """delete() returns True for a stored key, then False, and the key no longer loads."""
    async with _Opened(factory) as backend:
        await backend.save("agent:doomed", {"x": 1})
        _expect(await backend.delete("agent:doomed") is True, "delete() of a stored key must return True")
        _expect(await backend.load("agent:doomed") is None, "a deleted key must not load")
        _expect(await backend.delete("agent:doomed") is False, "a second delete() must return False")
        _expect(await backend.delete("agent:never") is False, "delete() of a missing key must return False")


@_rule()
async def list_keys_lists_exactly_the_stored_keys(factory: Factory) -> None:
    """list_keys() returns every stored key once, and not deleted ones."""
    keys = ["agent:a", "agent:b", "global:settings", "shared:team", "plain"]
    async with _Opened(factory) as backend:
        _expect(list(await backend.list_keys()) == [], "list_keys() of empty storage must be empty")
        for i, key in enumerate(keys):
            await backend.save(key, {"i": i})
        await backend.save("agent:a", {"i": 99})
        await backend.delete("plain")
        listed = list(await backend.list_keys())
        _expect(sorted(listed) == sorted(keys[:-1]), f"list_keys() returned {listed!r}")
        _expect(len(listed) == len(set(listed)), "list_keys() must not repeat keys")


@_rule()
async def keys_are_opaque_strings(factory: Factory) -> None:
    """Keys with quotes, wildcards, spaces and non-ASCII text are stored verbatim."""
    keys = ["agent:it's", 'agent:"q"', "agent:100%_done", "agent:a*b?[c]", "agent:with space", "agent:日本:✓"]
    async with _Opened(factory) as backend:
        for i, key in enumerate(keys):
            await backend.save(key, {"i": i})
        for i, key in enumerate(keys):
            _expect(await backend.load(key) == {"i": i}, f"key {key!r} did not round-trip")
        _expect(sorted(await backend.list_keys()) == sorted(keys), "odd keys must be listed verbatim")


@_rule()
async def concurrent_saves_to_different_keys_all_land(factory: Factory) -> None:
    """Fifty concurrent saves to different keys are all stored."""
    async with _Opened(factory) as backend:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(backend.save, f"agent:c{i:02d}", {"i": i})
        for i in range(50):
            _expect(await backend.load(f"agent:c{i:02d}") == {"i": i}, f"save of agent:c{i:02d} was lost")


@_rule(persistent_only=True)
async def state_survives_a_new_backend_object(factory: Factory) -> None:
    """What one backend object saved, a new one over the same storage loads."""
    async with _Opened(factory) as first:
        await first.save("agent:user:42", {"role": "coach", "turn": 7})
    async with _Opened(factory) as second:
        _expect(await second.load("agent:user:42") == {"role": "coach", "turn": 7}, "state did not persist")
        _expect("agent:user:42" in await second.list_keys(), "persisted key is not listed")


# -- prefix listing -----------------------------------------------------------------------------


@_rule(Capability.PREFIX_LISTING)
async def list_keys_filters_by_prefix_and_scope(factory: Factory) -> None:
    """list_keys(prefix) returns only keys starting with it; a MemoryScope lists its namespace."""
    async with _Opened(factory) as backend:
        for key in ["agent:a", "agent:b", "agentx", "global:a", "shared:t", "agent;"]:
            await backend.save(key, {})
        _expect(
            list(await backend.list_keys("agent:")) == ["agent:a", "agent:b"], "prefix 'agent:' mis-listed"
        )
        _expect(list(await backend.list_keys(MemoryScope.GLOBAL)) == ["global:a"], "scope GLOBAL mis-listed")
        _expect(list(await backend.list_keys("nothing:")) == [], "an unmatched prefix must list nothing")


@_rule(Capability.PREFIX_LISTING)
async def prefix_is_literal_not_a_pattern(factory: Factory) -> None:
    """Wildcard characters in a prefix (% _ * ? [) match only themselves."""
    async with _Opened(factory) as backend:
        for key in ["a%b:1", "axb:1", "a_b:1", "a*b:1", "a?b:1", "a[b:1", "abb:1"]:
            await backend.save(key, {})
        for prefix in ["a%b", "a_b", "a*b", "a?b", "a[b"]:
            listed = list(await backend.list_keys(prefix))
            _expect(listed == [prefix + ":1"], f"prefix {prefix!r} listed {listed!r}")


# -- versioned commits --------------------------------------------------------------------------


@_rule(Capability.VERSIONED_COMMIT)
async def versions_start_at_one_and_grow_by_one(factory: Factory) -> None:
    """The first commit gives version 1; each commit (and save) adds one."""
    async with _Opened(factory) as backend:
        _expect(await backend.commit("agent:v", {"n": 1}) == 1, "first commit must return version 1")
        _expect(await backend.commit("agent:v", {"n": 2}) == 2, "second commit must return version 2")
        await backend.save("agent:v", {"n": 3})
        record = await backend.load_record("agent:v")
        _expect(record is not None and record.version == 3 and record.state == {"n": 3}, f"got {record!r}")
        _expect(await backend.load_record("agent:none") is None, "load_record of a missing key must be None")


@_rule(Capability.VERSIONED_COMMIT)
async def a_stale_expected_version_conflicts_and_writes_nothing(factory: Factory) -> None:
    """commit(expected_version=stale) raises VersionConflictError and leaves the state as it was."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:c", {"n": 1}, expected_version=0)
        await backend.commit("agent:c", {"n": 2}, expected_version=1)
        try:
            await backend.commit("agent:c", {"n": "lost"}, expected_version=1, turns=[{"t": 1}])
        except VersionConflictError as exc:
            _expect(exc.key == "agent:c" and exc.expected == 1 and exc.actual == 2, f"conflict says {exc}")
        else:
            raise AssertionError("a stale expected_version must raise VersionConflictError")
        record = await backend.load_record("agent:c")
        _expect(record is not None and record.state == {"n": 2} and record.version == 2, f"got {record!r}")
        _expect(record.turn_count == 0, "a conflicting commit must not append its turns")


@_rule(Capability.VERSIONED_COMMIT)
async def expected_version_zero_means_create_only(factory: Factory) -> None:
    """expected_version=0 creates a new key and conflicts if the key exists."""
    async with _Opened(factory) as backend:
        _expect(await backend.commit("agent:new", {}, expected_version=0) == 1, "create must give version 1")
        try:
            await backend.commit("agent:new", {"again": True}, expected_version=0)
        except VersionConflictError as exc:
            _expect(exc.actual == 1, f"conflict must report the stored version, got {exc.actual}")
        else:
            raise AssertionError("expected_version=0 on an existing key must conflict")
        try:
            await backend.commit("agent:absent", {}, expected_version=3)
        except VersionConflictError as exc:
            _expect(exc.actual is None, "a conflict on a missing key must report actual=None")
        else:
            raise AssertionError("expected_version=3 on a missing key must conflict")


@_rule(Capability.VERSIONED_COMMIT)
async def concurrent_commits_with_one_expected_version_let_one_win(factory: Factory) -> None:
    """Of ten concurrent commits expecting the same version, exactly one succeeds."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:race", {"winner": None})
        wins: list[int] = []
        conflicts: list[int] = []

        async def attempt(i: int) -> None:
            try:
                await backend.commit("agent:race", {"winner": i}, expected_version=1)
                wins.append(i)
            except VersionConflictError:
                conflicts.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(attempt, i)
        _expect(len(wins) == 1 and len(conflicts) == 9, f"wins={wins} conflicts={conflicts}")
        _expect(await backend.load("agent:race") == {"winner": wins[0]}, "the winner's state must be stored")


@_rule(Capability.VERSIONED_COMMIT)
async def delete_with_the_stored_version_deletes(factory: Factory) -> None:
    """delete(expected_version=stored version) deletes the session (and its turns) and returns True."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:d", {"n": 1}, turns=[{"t": 0}])
        await backend.commit("agent:d", {"n": 2}, turns=[{"t": 1}])
        deleted = await backend.delete("agent:d", expected_version=2)
        _expect(deleted is True, f"a conditional delete that succeeded must return True, got {deleted!r}")
        _expect(await backend.load_record("agent:d") is None, "a deleted session must not load")
        _expect("agent:d" not in await backend.list_keys(), "a deleted session must not be listed")
        _expect(await backend.commit("agent:d", {}, expected_version=0) > 2, "the key must be free again")
        if Capability.TURN_LOG in capabilities_of(backend):
            _expect(await backend.load_turns("agent:d") == [], "a conditional delete must remove the turns")


@_rule(Capability.VERSIONED_COMMIT)
async def delete_with_another_version_conflicts_and_deletes_nothing(factory: Factory) -> None:
    """delete(expected_version=n) raises VersionConflictError unless version n is stored, deleting nothing."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:k", {"n": 1}, turns=[{"t": 0}])
        await backend.commit("agent:k", {"n": 2}, turns=[{"t": 1}])
        for stale in (1, 3):
            try:
                await backend.delete("agent:k", expected_version=stale)
            except VersionConflictError as exc:
                _expect(
                    (exc.key, exc.expected, exc.actual) == ("agent:k", stale, 2),
                    f"conflict says {exc}",
                )
            else:
                raise AssertionError(f"delete(expected_version={stale}) of version 2 must conflict")
        record = await backend.load_record("agent:k")
        _expect(
            record is not None and (record.state, record.version, record.turn_count) == ({"n": 2}, 2, 2),
            f"a conflicting delete must leave the session as it was, got {record!r}",
        )
        if Capability.TURN_LOG in capabilities_of(backend):
            turns = await backend.load_turns("agent:k")
            _expect(turns == [{"t": 0}, {"t": 1}], f"a conflicting delete must keep the turns, got {turns!r}")
        try:
            await backend.delete("agent:never", expected_version=1)
        except VersionConflictError as exc:
            _expect(
                exc.actual is None, f"a conflict on a missing key must report actual=None, not {exc.actual}"
            )
        else:
            raise AssertionError("delete(expected_version=1) of a missing key must conflict")


@_rule(Capability.VERSIONED_COMMIT)
async def concurrent_deletes_and_commits_expecting_one_version_let_one_win(factory: Factory) -> None:
    """Of concurrent conditional deletes and commits all expecting one version, exactly one succeeds."""
    async with _Opened(factory) as backend:
        for round_ in range(3):
            key = f"agent:race{round_}"
            start = await backend.commit(key, {"n": 0})
            won, conflicts = await _delete_commit_race(backend, key, start, deletes_first=round_ % 2 == 0)
            _expect(len(won) == 1 and len(conflicts) == 9, f"won={won} conflicts={conflicts}")
            record = await backend.load_record(key)
            if won[0] == "delete":
                _expect(record is None, f"the winning delete must have deleted {key!r}, found {record!r}")
            else:
                _expect(
                    record is not None and record.version == start + 1,
                    f"the winning commit is not stored: {record!r}",
                )


async def _delete_commit_race(
    backend: Any, key: str, version: int, *, deletes_first: bool
) -> tuple[list[str], list[str]]:
    """Five deletes and five commits expecting ``version``, taking turns at the head of the queue."""
    won: list[str] = []
    conflicts: list[str] = []

    async def attempt(kind: str) -> None:
        try:
            if kind == "delete":
                await backend.delete(key, expected_version=version)
            else:
                await backend.commit(key, {"by": kind}, expected_version=version)
            won.append(kind)
        except VersionConflictError:
            conflicts.append(kind)

    order = ("delete", "commit") if deletes_first else ("commit", "delete")
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            for kind in order:
                tg.start_soon(attempt, kind)
    return won, conflicts


@_rule(Capability.VERSIONED_COMMIT)
async def a_deleted_sessions_versions_never_name_the_session_created_again(factory: Factory) -> None:
    """After a delete, a stale expected_version never matches the session created again under the key."""
    async with _Opened(factory) as backend:
        for conditional in (False, True):
            key = f"agent:again:{'conditional' if conditional else 'plain'}"
            stale = await _commit_times(backend, key, 3)
            if conditional:
                await backend.delete(key, expected_version=stale)
            else:
                await backend.delete(key)
            await _expect_a_new_life(backend, key, stale)


@_rule(Capability.VERSIONED_COMMIT, persistent_only=True)
async def removed_versions_survive_a_new_backend_object(factory: Factory) -> None:
    """A session deleted through one backend object and created again through a new one starts above it."""
    async with _Opened(factory) as first:
        stale = await _commit_times(first, "agent:reborn", 3)
        await first.delete("agent:reborn")
    async with _Opened(factory) as second:
        await _expect_a_new_life(second, "agent:reborn", stale)


async def _commit_times(backend: Any, key: str, times: int) -> int:
    version = 0
    for i in range(times):
        version = await backend.commit(key, {"life": "old", "i": i}, turns=[{"old": i}])
    return int(version)


async def _expect_a_new_life(backend: Any, key: str, stale: int) -> None:
    """Create ``key`` again, commit until it reached ``stale``, and check that ``stale`` is refused."""
    first = version = await backend.commit(key, {"life": "new"}, expected_version=0, turns=[{"new": 0}])
    while version < stale:  # a new life numbered from 1 again would now collide with `stale`
        version = await backend.commit(key, {"life": "new"}, expected_version=version)
    try:
        await backend.commit(key, {"life": "stale"}, expected_version=stale, turns=[{"stale": True}])
    except VersionConflictError as exc:
        _expect(exc.actual == version, f"conflict must report the new session's version, got {exc.actual}")
    else:
        raise AssertionError(
            f"commit(expected_version={stale}) of the deleted session overwrote the one created again"
        )
    try:
        await backend.delete(key, expected_version=stale)
    except VersionConflictError as exc:
        _expect(exc.actual == version, f"conflict must report the new session's version, got {exc.actual}")
    else:
        raise AssertionError(
            f"delete(expected_version={stale}) of the deleted session deleted the one created again"
        )
    record = await backend.load_record(key)
    _expect(
        record is not None and (record.state, record.version) == ({"life": "new"}, version),
        f"stale writes must leave the session created again as it was, got {record!r}",
    )
    if Capability.TURN_LOG in capabilities_of(backend):
        turns = await backend.load_turns(key)
        _expect(turns == [{"new": 0}], f"stale writes must leave the new turn log alone, got {turns!r}")
    _expect(
        first > stale,
        f"the session created again under {key!r} started at version {first}, "
        f"not above the deleted session's version {stale}",
    )


# -- turn log -----------------------------------------------------------------------------------


@_rule(Capability.TURN_LOG)
async def turns_append_in_order_and_the_tail_reads_alone(factory: Factory) -> None:
    """Turns committed over several commits read back in order; last=N gives the newest N."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:t", {"n": 0}, turns=[{"i": 0}, {"i": 1}])
        for i in range(2, 10):
            await backend.commit("agent:t", {"n": i}, turns=[{"i": i}])
        _expect(await backend.load_turns("agent:t") == [{"i": i} for i in range(10)], "turns out of order")
        _expect(await backend.load_turns("agent:t", last=3) == [{"i": 7}, {"i": 8}, {"i": 9}], "wrong tail")
        _expect(await backend.load_turns("agent:t", last=50) == [{"i": i} for i in range(10)], "tail > count")
        record = await backend.load_record("agent:t")
        _expect(record is not None and record.turn_count == 10, f"turn_count wrong: {record!r}")
        _expect(await backend.load_turns("agent:none") == [], "turns of a missing key must be empty")


@_rule(Capability.TURN_LOG)
async def saving_state_keeps_turns_and_delete_removes_them(factory: Factory) -> None:
    """A plain save() keeps the turn log; delete() removes state and turns."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:d", {}, turns=[{"i": 0}])
        await backend.save("agent:d", {"x": 1})
        _expect(await backend.load_turns("agent:d") == [{"i": 0}], "save() must not drop turns")
        await backend.delete("agent:d")
        await backend.commit("agent:d", {}, turns=[{"i": "new"}])
        _expect(await backend.load_turns("agent:d") == [{"i": "new"}], "delete() must remove old turns")


@_rule(Capability.TURN_LOG)
async def truncate_drops_the_newest_turns_atomically(factory: Factory) -> None:
    """commit(truncate=n) keeps the oldest n turns, then appends; truncate=0 clears the log."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:p", {}, turns=[{"i": i} for i in range(5)])
        await backend.commit("agent:p", {}, turns=[{"i": "x"}], truncate=3)
        _expect(
            await backend.load_turns("agent:p") == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": "x"}],
            "truncate then append gave the wrong log",
        )
        await backend.commit("agent:p", {}, truncate=0)
        _expect(await backend.load_turns("agent:p") == [], "truncate=0 must clear the log")
        record = await backend.load_record("agent:p")
        _expect(record is not None and record.turn_count == 0, "turn_count must follow truncation")


@_rule(Capability.TURN_LOG)
async def counts_past_any_log_mean_all_of_it(factory: Factory) -> None:
    """truncate and last larger than any log (beyond 64-bit integers too) keep and read every turn."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:big", {}, turns=[{"i": 0}, {"i": 1}])
        for huge in (2**31, 10**18, 2**70):
            await backend.commit("agent:big", {}, truncate=huge)
            _expect(
                await backend.load_turns("agent:big", last=huge) == [{"i": 0}, {"i": 1}],
                f"truncate={huge} or last={huge} lost turns or failed",
            )


@_rule(Capability.TURN_LOG, persistent_only=True)
async def turns_survive_a_new_backend_object(factory: Factory) -> None:
    """Turns written by one backend object are read by a new one over the same storage."""
    async with _Opened(factory) as first:
        await first.commit(scoped_key(MemoryScope.AGENT, "log"), {"n": 2}, turns=[{"i": 0}, {"i": 1}])
    async with _Opened(factory) as second:
        _expect(await second.load_turns("agent:log", last=1) == [{"i": 1}], "turns did not persist")


# -- commits of several sessions -----------------------------------------------------------------


async def _snapshot(backend: Any, keys: list[str]) -> list[tuple[Any, ...]]:
    """What a reader sees of ``keys``: state, version and turns of each (``None`` if absent)."""
    seen: list[tuple[Any, ...]] = []
    for key in keys:
        record = await backend.load_record(key)
        seen.append(
            None if record is None else (record.state, record.version, await backend.load_turns(key))  # type: ignore[arg-type]
        )
    return seen


@_rule(Capability.MULTI_KEY_COMMIT)
async def commit_many_writes_each_session_as_commit_would(factory: Factory) -> None:
    """commit_many creates, updates, truncates and appends as commit does, returning versions in order."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:b", {"n": 1}, turns=[{"i": 0}, {"i": 1}, {"i": 2}])
        await backend.commit("agent:c", {"n": 1})
        await backend.commit("agent:c", {"n": 2})
        versions = await backend.commit_many(
            [
                Write("agent:c", {"n": 3}, expected_version=2, turns=[{"i": "c"}]),
                Write("agent:a", {"new": True}, expected_version=0, turns=[{"i": "a0"}, {"i": "a1"}]),
                Write("agent:b", {"n": 2}, turns=[{"i": "b"}], truncate=1),
            ]
        )
        _expect(versions == [3, 1, 2], f"commit_many must return each new version in order, got {versions}")
        seen = await _snapshot(backend, ["agent:a", "agent:b", "agent:c"])
        _expect(
            seen
            == [
                ({"new": True}, 1, [{"i": "a0"}, {"i": "a1"}]),
                ({"n": 2}, 2, [{"i": 0}, {"i": "b"}]),
                ({"n": 3}, 3, [{"i": "c"}]),
            ],
            f"commit_many stored {seen}",
        )
        _expect(await backend.commit_many([]) == [], "commit_many of nothing must return []")
        await backend.delete("agent:a")
        again = await backend.commit_many([Write("agent:a", {}), Write("agent:c", {"n": 4})])
        _expect(
            again[0] > 1 and again[1] == 4, f"a key created anew must start above its deleted life: {again}"
        )


@_rule(Capability.MULTI_KEY_COMMIT)
async def a_conflict_in_commit_many_writes_none_of_it(factory: Factory) -> None:
    """One stale expected_version fails the whole commit_many, naming that session; nothing is written."""
    async with _Opened(factory) as backend:
        await backend.commit("agent:x", {"n": 1}, turns=[{"i": 0}])
        await backend.commit("agent:y", {"n": 1})
        await backend.commit("agent:y", {"n": 2})
        keys = ["agent:new", "agent:x", "agent:y"]
        before = await _snapshot(backend, keys)
        for stale in (
            [
                Write("agent:x", {"lost": 1}, expected_version=1, turns=[{"i": "lost"}], truncate=0),
                Write("agent:new", {"lost": 1}, expected_version=0),
                Write("agent:y", {"lost": 1}, expected_version=1),
            ],
            [
                Write("agent:y", {"lost": 1}, expected_version=None, turns=[{"i": "lost"}]),
                Write("agent:new", {"lost": 1}, expected_version=4),
            ],
            [Write("agent:new", {"lost": 1}), Write("agent:x", {"lost": 1}, expected_version=0)],
            # Two stale writes: the first in the order given is named, whatever the key order.
            [
                Write("agent:y", {"lost": 1}, expected_version=1),
                Write("agent:x", {"lost": 1}, expected_version=5),
            ],
        ):
            try:
                await backend.commit_many(stale)
            except VersionConflictError as exc:
                stored = {"agent:y": 2, "agent:new": None, "agent:x": 1}
                first = next(w.key for w in stale if w.expected_version not in (None, stored[w.key] or 0))
                _expect(
                    exc.key == first and exc.actual == stored[first], f"conflict says {exc}, not {first!r}"
                )
            else:
                raise AssertionError(f"commit_many with a stale version must conflict: {stale}")
            after = await _snapshot(backend, keys)
            _expect(
                after == before, f"a conflicting commit_many wrote part of its writes: {after} != {before}"
            )


@_rule(Capability.MULTI_KEY_COMMIT)
async def commit_many_refuses_bad_input_before_writing(factory: Factory) -> None:
    """A key given twice, an unencodable state or a bad argument: an error naming the key, nothing written."""
    from ..errors import StateNotSerializableError

    async with _Opened(factory) as backend:
        await backend.commit("agent:ok", {"n": 1})
        before = await _snapshot(backend, ["agent:ok", "agent:bad"])
        bad: list[tuple[list[Any], type[Exception]]] = [
            ([Write("agent:ok", {"n": 2}), Write("agent:ok", {"n": 3})], ValueError),
            ([Write("agent:ok", {"n": 2}), Write("agent:bad", {"f": object()})], StateNotSerializableError),
            (
                [Write("agent:ok", {"n": 2}), Write("agent:bad", {}, turns=[{"f": {1, 2}}])],
                StateNotSerializableError,
            ),
            ([Write("agent:ok", {"n": 2}), Write("agent:bad", {}, expected_version=-1)], ValueError),
            ([Write("agent:ok", {"n": 2}), Write("agent:bad", {}, expected_version=2**63)], ValueError),
            ([Write("agent:ok", {"n": 2}), Write("agent:bad", {}, truncate=-2)], ValueError),
            # A single turn not in a list, and a turn that is not a dict.
            ([Write("agent:ok", {"n": 2}), Write("agent:bad", {}, turns={"role": "user"})], TypeError),  # type: ignore[arg-type]
            ([Write("agent:ok", {"n": 2}), Write("agent:bad", {}, turns=["hi"])], TypeError),  # type: ignore[list-item]
        ]
        for writes, error in bad:
            try:
                await backend.commit_many(writes)
            except error as exc:
                named = "agent:ok" if error is ValueError and writes[1].key == "agent:ok" else "agent:bad"
                _expect(named in str(exc), f"the error must name {named!r}: {exc}")
            else:
                raise AssertionError(f"commit_many({writes}) must raise {error.__name__}")
            after = await _snapshot(backend, ["agent:ok", "agent:bad"])
            _expect(after == before, f"a refused commit_many wrote something: {after} != {before}")


@_rule(Capability.MULTI_KEY_COMMIT)
async def concurrent_commit_many_on_shared_keys_never_interleave(factory: Factory) -> None:
    """Writers updating two sessions together with version checks: both move together or not at all."""
    async with _Opened(factory) as backend:
        await backend.commit("shared:left", {"writer": None})
        await backend.commit("shared:right", {"writer": None})
        wins: list[int] = []

        async def writer(i: int) -> None:
            for _ in range(5):
                left = await backend.load_record("shared:left")
                right = await backend.load_record("shared:right")
                writes = [
                    Write("shared:right", {"writer": i}, expected_version=right.version, turns=[{"w": i}]),
                    Write("shared:left", {"writer": i}, expected_version=left.version, turns=[{"w": i}]),
                ]
                try:
                    await backend.commit_many(writes if i % 2 else writes[::-1])
                except VersionConflictError:
                    continue
                wins.append(i)

        async def alone(i: int) -> None:
            # Single commits at the same time, so that engines that batch writes mix both kinds.
            for n in range(5):
                await backend.commit(f"shared:alone{i}", {"n": n}, turns=[{"n": n}])

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(writer, i)
                tg.start_soon(alone, i)
        for i in range(8):
            alone_seen = await _snapshot(backend, [f"shared:alone{i}"])
            _expect(
                alone_seen == [({"n": 4}, 5, [{"n": n} for n in range(5)])],
                f"a single commit next to commit_many went wrong: {alone_seen}",
            )
        left, right = await _snapshot(backend, ["shared:left", "shared:right"])
        _expect(left[0] == right[0] and left[2] == right[2], f"the sessions diverged: {left} / {right}")
        _expect(left[1] == right[1] == len(wins) + 1, f"versions {left[1]}, {right[1]} for {len(wins)} wins")
        _expect(sorted(t["w"] for t in left[2]) == sorted(wins), f"turns {left[2]} are not the wins {wins}")
