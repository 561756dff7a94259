"""PostgresSessionBackend against a real server (``COGNITIA_TEST_POSTGRES_DSN``).

Every test gets a schema of its own, created by the backend and dropped afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from _servers import postgres_query as _sql
from _servers import require_driver

from cognitia.errors import (
    BackendClosedError,
    MissingDependencyError,
    StateNotSerializableError,
    StorageError,
    VersionConflictError,
)
from cognitia.testing import ConformanceRule, conformance_rules

try:
    from cognitia.session.backends import PostgresSessionBackend
except MissingDependencyError:  # the fixtures below skip (or, in CI, fail) every test that needs it
    pass

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

RULES = conformance_rules()

Schemas = Callable[[], str]


@pytest.fixture
def driver() -> None:
    """For tests that need psycopg but no server."""
    require_driver("psycopg", "postgres", "PostgreSQL")


@pytest.fixture
def schema(postgres_schemas: Schemas) -> str:
    return postgres_schemas()


@pytest.mark.parametrize("rule", RULES, ids=str)
async def test_conformance(rule: ConformanceRule, postgres_dsn: str, schema: str) -> None:
    assert await rule.check(lambda: PostgresSessionBackend(postgres_dsn, schema=schema))


@pytest.mark.parametrize("readers", [0, 3])
async def test_reads_through_the_writer_or_several_readers(
    postgres_dsn: str, schema: str, readers: int
) -> None:
    loaded: dict[int, Any] = {}
    async with PostgresSessionBackend(postgres_dsn, schema=schema, readers=readers) as backend:

        async def commit(i: int) -> None:
            await backend.commit(f"agent:{i}", {"i": i}, turns=[{"t": i}])

        async def load(i: int) -> None:
            loaded[i] = (await backend.load(f"agent:{i}"), await backend.load_turns(f"agent:{i}", last=1))

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(commit, i)
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(load, i)
    assert loaded == {i: ({"i": i}, [{"t": i}]) for i in range(40)}


async def test_reads_batched_with_writes_on_the_writer(postgres_dsn: str, schema: str) -> None:
    """With ``readers=0`` reads queue with writes on the writer and run in their batches,
    beside deletes and creates that lock the removed version's row first."""
    async with PostgresSessionBackend(postgres_dsn, schema=schema, readers=0) as backend:
        for i in range(20):
            await backend.save(f"agent:old:{i}", {"i": i})
        results: dict[str, Any] = {}

        async def run(name: str, op: Any) -> None:
            results[name] = await op

        for _ in range(5):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(run, f"load {i}", backend.load(f"agent:old:{i}"))
                    tg.start_soon(run, f"create {i}", backend.commit(f"agent:new:{i}", {"n": i}))
                    tg.start_soon(run, f"delete {i}", backend.delete(f"agent:new:{i}"))
                    tg.start_soon(run, f"save {i}", backend.save(f"agent:old:{i}", {"i": i}))
            assert all(results[f"load {i}"] == {"i": i} for i in range(20))
        assert await backend.list_keys("agent:old:") == sorted(f"agent:old:{i}" for i in range(20))


# -- schema management ---------------------------------------------------------------------------


async def test_the_schema_is_created_and_its_version_recorded(postgres_dsn: str, schema: str) -> None:
    async with PostgresSessionBackend(postgres_dsn, schema=schema) as backend:
        await backend.save("agent:a", {})
    tables = _sql(
        postgres_dsn,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
        schema,
    )
    assert tables == [
        ("cognitia_meta",),
        ("cognitia_schema_version",),
        ("cognitia_sessions",),
        ("cognitia_turns",),
    ]
    versions = _sql(postgres_dsn, f'SELECT version FROM "{schema}".cognitia_schema_version ORDER BY 1')
    assert versions == [(1,), (2,)]


async def test_a_version_1_schema_is_migrated_and_keeps_its_sessions(postgres_dsn: str, schema: str) -> None:
    # The tables as release 1 of the schema created them, with a session in them.
    quoted = f'"{schema}"'
    for statement in [
        f"CREATE SCHEMA {quoted}",
        f"CREATE TABLE {quoted}.cognitia_schema_version "
        "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        f"INSERT INTO {quoted}.cognitia_schema_version (version) VALUES (1)",
        f'CREATE TABLE {quoted}.cognitia_sessions (key text COLLATE "C" PRIMARY KEY, state jsonb NOT NULL, '
        "version bigint NOT NULL, turn_count integer NOT NULL, created_at double precision NOT NULL, "
        "updated_at double precision NOT NULL, expires_at double precision)",
        f'CREATE TABLE {quoted}.cognitia_turns (key text COLLATE "C" NOT NULL, seq integer NOT NULL, '
        "turn jsonb NOT NULL, PRIMARY KEY (key, seq))",
    ]:
        _sql(postgres_dsn, statement)
    _sql(
        postgres_dsn,
        f"INSERT INTO {quoted}.cognitia_sessions VALUES (%s, %s, 7, 1, 1.0, 2.0, NULL)",
        "agent:old",
        '{"n": 7}',
    )
    _sql(postgres_dsn, f"INSERT INTO {quoted}.cognitia_turns VALUES (%s, 0, %s)", "agent:old", '{"t": 0}')
    async with PostgresSessionBackend(postgres_dsn, schema=schema) as backend:
        record = await backend.load_record("agent:old")
        assert record is not None and (record.state, record.version, record.turn_count) == ({"n": 7}, 7, 1)
        assert await backend.load_turns("agent:old") == [{"t": 0}]
        assert await backend.delete("agent:old", expected_version=7) is True
        assert await backend.commit("agent:old", {"n": 0}, expected_version=0) == 8
    versions = _sql(postgres_dsn, f"SELECT version FROM {quoted}.cognitia_schema_version ORDER BY 1")
    assert versions == [(1,), (2,)]


async def test_a_newer_schema_is_refused(postgres_dsn: str, schema: str) -> None:
    async with PostgresSessionBackend(postgres_dsn, schema=schema) as backend:
        await backend.save("agent:a", {})
    _sql(postgres_dsn, f'INSERT INTO "{schema}".cognitia_schema_version (version) VALUES (99)')
    async with PostgresSessionBackend(postgres_dsn, schema=schema) as newer:
        with pytest.raises(StorageError, match="schema version 99, newer than this release"):
            await newer.load("agent:a")


async def test_backends_starting_together_migrate_once(postgres_dsn: str, schema: str) -> None:
    backends = [PostgresSessionBackend(postgres_dsn, schema=schema) for _ in range(8)]
    try:
        async with anyio.create_task_group() as tg:
            for i, backend in enumerate(backends):
                tg.start_soon(backend.save, f"agent:{i}", {"i": i})
        versions = _sql(postgres_dsn, f'SELECT version FROM "{schema}".cognitia_schema_version ORDER BY 1')
        assert versions == [(1,), (2,)]
        assert await backends[0].list_keys() == [f"agent:{i}" for i in range(8)]
    finally:
        for backend in backends:
            await backend.aclose()


async def test_schemas_and_table_prefixes_keep_stores_apart(
    postgres_dsn: str, postgres_schemas: Schemas
) -> None:
    first, odd = postgres_schemas(), postgres_schemas() + ' "odd"; name'
    stores = [
        PostgresSessionBackend(postgres_dsn, schema=first, table_prefix="tenant_a_"),
        PostgresSessionBackend(postgres_dsn, schema=first, table_prefix="tenant_b_"),
        PostgresSessionBackend(postgres_dsn, schema=odd, table_prefix='x"y '),
    ]
    try:
        for i, store in enumerate(stores):
            await store.commit("agent:same", {"store": i}, turns=[{"store": i}])
        for i, store in enumerate(stores):
            assert await store.load("agent:same") == {"store": i}
            assert await store.load_turns("agent:same") == [{"store": i}]
            assert await store.list_keys() == ["agent:same"]
        assert await stores[0].delete("agent:same")
        assert await stores[1].load("agent:same") == {"store": 1}
        assert await stores[2].load("agent:same") == {"store": 2}
        tables = _sql(
            postgres_dsn,
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema IN (%s, %s) ORDER BY 1, 2",
            first,
            odd,
        )
        assert tables == sorted(
            [
                (first, f"tenant_{t}_{n}")
                for t in "ab"
                for n in ("meta", "schema_version", "sessions", "turns")
            ]
            + [(odd, f'x"y {n}') for n in ("meta", "schema_version", "sessions", "turns")]
        )
    finally:
        _sql(postgres_dsn, 'DROP SCHEMA IF EXISTS "{}" CASCADE'.format(odd.replace('"', '""')))
        for store in stores:
            await store.aclose()


def test_bad_names_and_options_are_refused_up_front(driver: None) -> None:
    dsn = "postgresql://u@localhost/db"
    with pytest.raises(ValueError, match="too long"):
        PostgresSessionBackend(dsn, table_prefix="p" * 60)
    with pytest.raises(ValueError, match="schema"):
        PostgresSessionBackend(dsn, schema="")
    with pytest.raises(ValueError, match="readers"):
        PostgresSessionBackend(dsn, readers=-1)
    for bad in (0, -1, float("inf"), float("nan"), 3e6):
        with pytest.raises(ValueError, match="statement_timeout"):
            PostgresSessionBackend(dsn, statement_timeout=bad)
    for bad in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="connect_timeout"):
            PostgresSessionBackend(dsn, connect_timeout=bad)
    # A timeout under a millisecond is one millisecond: 0 would turn it off.
    assert PostgresSessionBackend(dsn, statement_timeout=1e-9)._statement_timeout_ms == "1"
    with pytest.raises(ValueError, match="ttl"):
        PostgresSessionBackend(dsn, ttl=0)
    with pytest.raises(ValueError, match="dsn is not a valid") as caught:
        PostgresSessionBackend("host=db password=s3cret nonsense")
    assert "s3cret" not in str(caught.value)


def test_repr_names_the_server_but_never_the_password(driver: None) -> None:
    backend = PostgresSessionBackend("postgresql://app:s3cret@db.internal:6543/sessions", schema="tenant")
    text = repr(backend)
    assert "s3cret" not in text
    assert "db.internal:6543/sessions" in text and "tenant" in text


# -- what is stored ------------------------------------------------------------------------------


async def test_state_and_turns_are_jsonb_queryable_in_sql(postgres_dsn: str, schema: str) -> None:
    async with PostgresSessionBackend(postgres_dsn, schema=schema) as backend:
        await backend.commit(
            "agent:q", {"role": "coach", "turn": 7}, turns=[{"role": "user", "content": "hi"}]
        )
    rows = _sql(
        postgres_dsn,
        "SELECT pg_typeof(state)::text, state->>'role', (state->>'turn')::int "
        f'FROM "{schema}".cognitia_sessions WHERE key = %s',
        "agent:q",
    )
    assert rows == [("jsonb", "coach", 7)]
    turns = _sql(
        postgres_dsn,
        f"SELECT seq, turn->>'content' FROM \"{schema}\".cognitia_turns WHERE key = %s",
        "agent:q",
    )
    assert turns == [(0, "hi")]


@pytest.mark.parametrize(
    ("text", "character"),
    [("secret\x00text", "the character U+0000"), ("secret\udfff", "a lone surrogate (U+DFFF)")],
)
async def test_a_string_jsonb_cannot_hold_is_refused_naming_its_path(
    postgres_dsn: str, schema: str, text: str, character: str
) -> None:
    """jsonb holds only Unicode text without NUL. The error names the string's path and the
    character, and neither it nor its cause quotes the text (the driver's message would)."""
    problem = f"holds {character}, which PostgreSQL jsonb cannot store"
    async with PostgresSessionBackend(postgres_dsn, schema=schema) as backend:
        await backend.commit("agent:k", {"n": 1}, turns=[{"said": "hi"}])
        cases: list[tuple[Callable[[], Awaitable[object]], str]] = [
            (
                lambda: backend.save("agent:k", {"history": [{"said": "ok"}, {"said": text}]}),
                'state["history"][1]["said"]',
            ),
            (
                lambda: backend.commit("agent:k", {"n": 2}, turns=[{"said": "ok"}, {"said": text}]),
                'turns[1]["said"]',
            ),
            (lambda: backend.commit("agent:k", {"by": {text: 1}}, expected_version=1), 'state["by"]'),
            (lambda: backend.save("agent:new", {"said": text}), 'state["said"]'),
        ]
        for write, path in cases:
            with pytest.raises(StateNotSerializableError) as info:
                await write()
            assert info.value.path == path
            assert info.value.problem in (problem, f"has a key that {problem}")
            assert "secret" not in str(info.value)
            assert info.value.__cause__ is None and info.value.__suppress_context__
        assert await backend.load("agent:k") == {"n": 1}
        assert await backend.load_turns("agent:k") == [{"said": "hi"}]
        assert await backend.list_keys() == ["agent:k"]


async def test_a_state_jsonb_cannot_hold_fails_alone(postgres_dsn: str, schema: str) -> None:
    async with PostgresSessionBackend(postgres_dsn, schema=schema) as backend:
        with pytest.raises(StateNotSerializableError, match="U\\+0000"):
            await backend.save("agent:nul", {"text": "a\x00b"})
        # Queued together, the bad write fails and the others in its transaction still land.
        errors: list[BaseException] = []

        async def save(i: int) -> None:
            try:
                await backend.save(f"agent:{i}", {"text": "a\x00b" if i == 5 else str(i)})
            except StateNotSerializableError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(save, i)
        assert len(errors) == 1
        assert await backend.list_keys() == sorted(f"agent:{i}" for i in range(20) if i != 5)


async def test_conflicts_between_two_backend_objects(postgres_dsn: str, schema: str) -> None:
    one = PostgresSessionBackend(postgres_dsn, schema=schema)
    two = PostgresSessionBackend(postgres_dsn, schema=schema)
    async with one, two:
        await one.commit("agent:shared", {"n": 0})
        results: list[object] = []

        async def attempt(backend: PostgresSessionBackend, n: int) -> None:
            try:
                results.append(
                    await backend.commit("agent:shared", {"n": n}, expected_version=1, turns=[{"n": n}])
                )
            except VersionConflictError as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(attempt, (one, two)[n % 2], n)
        assert results.count(2) == 1
        conflicts = [r for r in results if isinstance(r, VersionConflictError)]
        assert len(conflicts) == 5 and {c.actual for c in conflicts} == {2}
        record = await two.load_record("agent:shared")
        assert record is not None and record.version == 2 and record.turn_count == 1


# -- expiry --------------------------------------------------------------------------------------


async def test_expired_sessions_are_invisible_and_pruned(postgres_dsn: str, schema: str) -> None:
    now = [1000.0]
    async with PostgresSessionBackend(postgres_dsn, schema=schema, ttl=10, clock=lambda: now[0]) as backend:
        await backend.commit("agent:a", {"n": 1}, turns=[{"i": 0}, {"i": 1}])
        await backend.save("agent:b", {"n": 2})
        now[0] = 1008.0
        await backend.save("agent:c", {"n": 3})
        now[0] = 1012.0
        assert await backend.load("agent:a") is None
        assert await backend.load_turns("agent:a") == []
        assert await backend.list_keys() == ["agent:c"]
        record = await backend.load_record("agent:c")
        assert record is not None and record.expires_at == 1018.0
        assert await backend.delete("agent:b") is False  # expired: gone already, as far as callers know

        assert await backend.prune(dry_run=True) == ["agent:a"]
        stored = f'SELECT key FROM "{schema}".cognitia_sessions ORDER BY key'
        assert _sql(postgres_dsn, stored) == [("agent:a",), ("agent:c",)]
        assert await backend.prune() == ["agent:a"]
        assert _sql(postgres_dsn, stored) == [("agent:c",)]
        assert _sql(postgres_dsn, f'SELECT count(*) FROM "{schema}".cognitia_turns') == [(0,)]
        assert await backend.prune() == []


async def test_an_expired_session_is_replaced_by_a_new_one(postgres_dsn: str, schema: str) -> None:
    now = [0.0]
    async with PostgresSessionBackend(postgres_dsn, schema=schema, ttl=5, clock=lambda: now[0]) as backend:
        await backend.commit("agent:x", {"old": True}, turns=[{"i": 0}, {"i": 1}, {"i": 2}])
        now[0] = 10.0
        with pytest.raises(VersionConflictError) as caught:
            await backend.commit("agent:x", {}, expected_version=1)
        assert caught.value.actual is None
        await backend.commit("agent:x", {"new": True}, expected_version=0, turns=[{"i": "new"}])
        assert await backend.load("agent:x") == {"new": True}
        assert await backend.load_turns("agent:x") == [{"i": "new"}]
        assert _sql(postgres_dsn, f'SELECT count(*) FROM "{schema}".cognitia_turns') == [(1,)]


# -- connections ---------------------------------------------------------------------------------


async def test_a_killed_connection_fails_one_operation_then_is_replaced(
    postgres_dsn: str, schema: str
) -> None:
    import psycopg

    app = f"cognitia-test-{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in postgres_dsn else "?"
    async with PostgresSessionBackend(
        f"{postgres_dsn}{separator}application_name={app}", schema=schema
    ) as backend:
        await backend.save("agent:k", {"n": 1})
        assert await backend.load("agent:k") == {"n": 1}
        killed = _sql(
            postgres_dsn,
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = %s",
            app,
        )
        assert killed == [(True,), (True,)]  # the writer's and the reader's connections
        with pytest.raises(StorageError) as caught:
            await backend.save("agent:k", {"n": 2})
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        with pytest.raises(StorageError):
            await backend.load("agent:k")
        assert await backend.load("agent:k") == {"n": 1}  # the failed save wrote nothing
        assert await backend.commit("agent:k", {"n": 3}, expected_version=1) == 2
        assert await backend.load("agent:k") == {"n": 3}
        pids = _sql(postgres_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", app)
        assert pids == [(2,)]


async def test_statement_timeout_cancels_a_blocked_write(postgres_dsn: str, schema: str) -> None:
    import psycopg

    async with PostgresSessionBackend(postgres_dsn, schema=schema) as setup:
        # The schema is created under the default timeout: a slow server must not fail it.
        await setup.save("agent:locked", {"n": 1})
    async with PostgresSessionBackend(postgres_dsn, schema=schema, statement_timeout=0.3) as backend:
        assert await backend.load("agent:locked") == {"n": 1}
        with psycopg.connect(postgres_dsn) as blocker:  # holds the row lock until the block ends
            blocker.execute(
                f'SELECT 1 FROM "{schema}".cognitia_sessions WHERE key = %s FOR UPDATE', ("agent:locked",)
            )
            with anyio.fail_after(10):
                with pytest.raises(StorageError) as caught:
                    await backend.save("agent:locked", {"n": 2})
            assert isinstance(caught.value.__cause__, psycopg.errors.QueryCanceled)
            blocker.rollback()
        assert await backend.commit("agent:locked", {"n": 3}, expected_version=1) == 2


async def test_a_write_cancelled_by_statement_timeout_in_a_batch_is_not_sent_again(
    postgres_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes queued together share a transaction; one cancelled by statement_timeout fails
    alone, and only the others are sent again (the cancelled one would wait once more)."""
    import psycopg

    from cognitia.session.backends import _postgres

    sent: dict[str, int] = {}
    commit = _postgres._commit

    def counted(conn: Any, q: Any, key: str, *args: Any) -> Any:
        sent[key] = sent.get(key, 0) + 1
        return commit(conn, q, key, *args)

    keys = ["agent:first", *(f"agent:{i}" for i in range(6)), "agent:locked"]
    async with PostgresSessionBackend(postgres_dsn, schema=schema) as setup:
        for key in keys:
            await setup.save(key, {"n": 0})
    monkeypatch.setattr(_postgres, "_commit", counted)
    outcome: dict[str, str] = {}
    async with PostgresSessionBackend(postgres_dsn, schema=schema, statement_timeout=0.3) as backend:

        async def save(key: str) -> None:
            try:
                await backend.save(key, {"n": 1})
                outcome[key] = "saved"
            except StorageError as exc:
                outcome[key] = type(exc.__cause__).__name__

        with psycopg.connect(postgres_dsn) as blocker:
            blocker.execute(
                f'SELECT 1 FROM "{schema}".cognitia_sessions WHERE key = ANY(%s) FOR UPDATE',
                (["agent:first", "agent:locked"],),
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(save, "agent:first")  # holds the writer until it is cancelled
                await anyio.sleep(0.05)
                for key in keys[1:]:  # queued behind it: sent together
                    tg.start_soon(save, key)
            blocker.rollback()
        assert outcome == {
            "agent:first": "QueryCanceled",
            "agent:locked": "QueryCanceled",
            **{f"agent:{i}": "saved" for i in range(6)},
        }
        assert sent["agent:locked"] == 1
        assert all(sent[f"agent:{i}"] == 2 for i in range(6))  # rolled back with it, sent again
        assert await backend.load("agent:locked") == {"n": 0}
        assert await backend.load("agent:3") == {"n": 1}


async def test_an_unreachable_server_is_a_storage_error(driver: None) -> None:
    # Port 1 on the loopback interface refuses connections at once.
    async with PostgresSessionBackend("postgresql://nobody@127.0.0.1:1/none", connect_timeout=2) as backend:
        with anyio.fail_after(10):
            with pytest.raises(StorageError, match="postgres backend failed to save"):
                await backend.save("agent:a", {})
            with pytest.raises(StorageError):  # retried, not remembered
                await backend.load("agent:a")


async def test_a_closed_backend_refuses_everything(postgres_dsn: str, schema: str) -> None:
    backend = PostgresSessionBackend(postgres_dsn, schema=schema)
    await backend.save("agent:a", {})
    await backend.aclose()
    await backend.aclose()
    backend.close()
    assert backend.closed and "closed" in repr(backend)
    with pytest.raises(BackendClosedError):
        await backend.save("agent:a", {})
    with pytest.raises(BackendClosedError):
        await backend.load("agent:a")
    with pytest.raises(BackendClosedError):
        await backend.list_keys()
    with pytest.raises(BackendClosedError):
        await backend.prune()

    synchronous = PostgresSessionBackend(postgres_dsn, schema=schema)
    assert await synchronous.load("agent:a") == {}
    synchronous.close()
    with pytest.raises(BackendClosedError):
        await synchronous.delete("agent:a")


def test_a_missing_driver_names_the_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from cognitia.errors import MissingDependencyError\n"
        "try:\n"
        "    from cognitia.session.backends import PostgresSessionBackend\n"
        "except MissingDependencyError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "PostgresSessionBackend needs 'psycopg'" in result.stdout
    assert "pip install 'cognitia-sessions[postgres]'" in result.stdout
    assert issubclass(MissingDependencyError, ImportError)


async def test_a_session_created_while_a_delete_is_committing_starts_above_it(
    postgres_dsn: str, schema: str
) -> None:
    """A commit that creates the key while another process's delete of it is in flight waits for
    that delete, then numbers the new session above the deleted one (not from a stale read)."""
    import psycopg

    async with PostgresSessionBackend(postgres_dsn, schema=schema) as backend:
        for i in range(3):
            stale = await backend.commit("agent:k", {"life": "old", "i": i})
        created: list[int] = []

        async def create() -> None:
            created.append(await backend.commit("agent:k", {"life": "new"}, expected_version=0))

        with psycopg.connect(postgres_dsn) as deleter:  # one open transaction, as a delete runs
            meta, sessions = f'"{schema}".cognitia_meta', f'"{schema}".cognitia_sessions'
            deleter.execute(f"SELECT 1 FROM {meta} WHERE name = 'removed_version' FOR NO KEY UPDATE")
            deleter.execute(f"DELETE FROM {sessions} WHERE key = %s", ("agent:k",))
            deleter.execute(f"UPDATE {meta} SET value = greatest(value, %s)", (stale,))
            async with anyio.create_task_group() as tg:
                tg.start_soon(create)
                # Commit the delete only once the create is waiting for it.
                waiting = (
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s"
                )
                for _ in range(500):
                    if _sql(postgres_dsn, waiting, f"%{schema}%cognitia_sessions%") != [(0,)]:
                        break
                    await anyio.sleep(0.01)
                else:
                    raise AssertionError("the create never waited for the delete")
                assert created == []
                deleter.commit()
        assert created == [stale + 1]
        assert await backend.load("agent:k") == {"life": "new"}
