"""SqliteSessionBackend: durability, file hygiene, schema versioning, errors, closing and cancellation."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sqlite3
import stat
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _cancel_twice import cancel_twice_while_waiting

from cognitia import BackendClosedError, StorageError, VersionConflictError
from cognitia.session.backends import MemoryScope, SqliteSessionBackend, _sqlite
from cognitia.session.backends._sqlite import CHECKPOINT_EVERY, SCHEMA_VERSION, _InlineConnection

pytestmark = pytest.mark.anyio


def _script(body: str) -> str:
    """A child program: ``body`` is the inside of ``async def main(backend)``, run under argv[2]'s runtime."""
    return textwrap.dedent(
        """
        import sys, anyio
        from cognitia.session.backends import SqliteSessionBackend

        async def main():
            backend = SqliteSessionBackend(db_path=sys.argv[1])
        {body}

        anyio.run(main, backend=sys.argv[2])
        """
    ).format(body=textwrap.indent(textwrap.dedent(body), "    "))


async def test_state_persists_across_a_process_restart(tmp_path: Path, anyio_backend: str) -> None:
    db = tmp_path / "sessions.db"
    child = _script(
        """
        await backend.commit("agent:u1", {"role": "coach", "turn": 7}, turns=[{"said": "hi"}, {"said": "yo"}])
        await backend.save("global:settings", {"lang": "fr"})
        await backend.aclose()
        """
    )
    result = await anyio.run_process([sys.executable, "-c", child, str(db), anyio_backend])
    assert result.returncode == 0, result.stderr.decode()

    async with SqliteSessionBackend(db_path=db) as backend:
        assert await backend.load("agent:u1") == {"role": "coach", "turn": 7}
        assert await backend.load_turns("agent:u1") == [{"said": "hi"}, {"said": "yo"}]
        assert await backend.list_keys() == ["agent:u1", "global:settings"]
        record = await backend.load_record("agent:u1")
        assert record is not None and record.version == 1 and record.turn_count == 2


async def test_a_returned_save_survives_sigkill(tmp_path: Path, anyio_backend: str) -> None:
    db = tmp_path / "sessions.db"
    child = _script(
        """
        for i in range(20):
            await backend.commit("agent:u1", {"turn": i}, turns=[{"i": i}])
        print("ok", flush=True)
        await anyio.sleep(60)
        """
    )
    async with await anyio.open_process([sys.executable, "-c", child, str(db), anyio_backend]) as process:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        assert line == b"ok\n"
        process.send_signal(signal.SIGKILL)  # no chance to close, checkpoint or flush anything
        assert await process.wait() == -signal.SIGKILL

    async with SqliteSessionBackend(db_path=db) as backend:
        assert await backend.load("agent:u1") == {"turn": 19}
        assert await backend.load_turns("agent:u1") == [{"i": i} for i in range(20)]


async def test_file_is_private_to_its_owner(tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    old = os.umask(0o022)
    try:
        async with SqliteSessionBackend(db_path=db) as backend:
            await backend.save("k", {"secret": True})
            for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                if path.exists():
                    assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        os.umask(old)


async def test_wal_mode_and_schema_version_are_recorded(tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    async with SqliteSessionBackend(db_path=db) as backend:
        await backend.save("k", {})
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    finally:
        conn.close()


async def test_a_version_1_file_is_migrated_and_keeps_its_sessions(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    conn = sqlite3.connect(db)
    # The tables as schema version 1 created them, with a session at version 7 in them.
    conn.executescript(
        """
        CREATE TABLE cognitia_sessions (key TEXT PRIMARY KEY, state TEXT NOT NULL,
            version INTEGER NOT NULL, turn_count INTEGER NOT NULL, created_at REAL NOT NULL,
            updated_at REAL NOT NULL, expires_at REAL);
        CREATE INDEX cognitia_sessions_expiry ON cognitia_sessions (expires_at)
            WHERE expires_at IS NOT NULL;
        CREATE TABLE cognitia_turns (key TEXT NOT NULL, seq INTEGER NOT NULL, turn TEXT NOT NULL,
            PRIMARY KEY (key, seq));
        INSERT INTO cognitia_sessions VALUES ('agent:old', '{"n": 7}', 7, 1, 1.0, 2.0, NULL);
        INSERT INTO cognitia_turns VALUES ('agent:old', 0, '{"t": 0}');
        PRAGMA user_version = 1;
        """
    )
    conn.close()

    async with SqliteSessionBackend(db_path=db) as backend:
        record = await backend.load_record("agent:old")
        assert record is not None and (record.state, record.version, record.turn_count) == ({"n": 7}, 7, 1)
        assert await backend.load_turns("agent:old") == [{"t": 0}]
        assert await backend.delete("agent:old", expected_version=7) is True
        assert await backend.commit("agent:old", {"n": 0}, expected_version=0) == 8
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT name, value FROM cognitia_meta").fetchall() == [("removed_version", 7)]
    finally:
        conn.close()


async def test_a_file_with_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE cognitia_sessions (key TEXT PRIMARY KEY, shape_of_the_future BLOB)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()

    async with SqliteSessionBackend(db_path=db) as backend:
        for attempt in (backend.save("k", {}), backend.load("k"), backend.list_keys()):
            with pytest.raises(
                StorageError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer.*upgrade cognitia-sessions"
            ):
                await attempt

    conn = sqlite3.connect(db)
    try:  # the file was left alone
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        columns = [row[1] for row in conn.execute("PRAGMA table_info(cognitia_sessions)")]
        assert columns == ["key", "shape_of_the_future"]
    finally:
        conn.close()


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
async def test_storage_failures_are_wrapped(tmp_path: Path, where: str) -> None:
    db = tmp_path / "no" / "such" / "dir" / "s.db" if where == "missing directory" else tmp_path
    async with SqliteSessionBackend(db_path=db) as backend:
        with pytest.raises(StorageError) as info:
            await backend.save("agent:k", {"x": 1})
        assert isinstance(info.value, OSError)
        assert info.value.__cause__ is not None
        assert isinstance(info.value.__cause__, (sqlite3.Error, OSError))
        assert "'agent:k'" in str(info.value) and "sqlite" in str(info.value)
        with pytest.raises(StorageError) as info:
            await backend.load("agent:k")
        assert info.value.__cause__ is not None


async def test_a_failed_open_is_retried_by_the_next_operation(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    async with SqliteSessionBackend(db_path=folder / "s.db") as backend:
        with pytest.raises(StorageError):
            await backend.save("k", {"n": 1})
        folder.mkdir()
        await backend.save("k", {"n": 2})
        assert await backend.load("k") == {"n": 2}


def _every_operation(backend: SqliteSessionBackend) -> list[Callable[[], Awaitable[Any]]]:
    return [
        lambda: backend.save("k", {"n": 1}),
        lambda: backend.load("k"),
        lambda: backend.delete("k"),
        lambda: backend.list_keys(),
        lambda: backend.list_keys(MemoryScope.AGENT),
        lambda: backend.load_record("k"),
        lambda: backend.commit("k", {"n": 2}, expected_version=1, turns=[{"t": 1}]),
        lambda: backend.load_turns("k"),
        lambda: backend.load_turns("k", last=0),
        lambda: backend.prune(),
        lambda: backend.prune(dry_run=True),
    ]


@pytest.mark.parametrize("how", ["close", "aclose", "never used"])
async def test_a_closed_backend_refuses_every_operation(tmp_path: Path, how: str) -> None:
    backend = SqliteSessionBackend(db_path=tmp_path / "s.db")
    if how != "never used":
        await backend.save("k", {"n": 0})
    if how == "aclose":
        await backend.aclose()
    else:
        backend.close()
    assert backend.closed
    assert "closed" in repr(backend)
    for operation in _every_operation(backend):
        with anyio.fail_after(5):  # an error, never a hang
            with pytest.raises(BackendClosedError, match="closed"):
                await operation()


async def test_closing_twice_is_fine(tmp_path: Path) -> None:
    backend = SqliteSessionBackend(db_path=tmp_path / "s.db")
    await backend.save("k", {})
    backend.close()
    backend.close()
    await backend.aclose()
    async with backend:
        pass
    assert backend.closed


async def test_closing_waits_for_writes_already_submitted(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    backend = SqliteSessionBackend(db_path=db)
    outcomes: list[str] = []

    async def save(i: int) -> None:
        try:
            await backend.save(f"k{i:03}", {"i": i})
            outcomes.append("saved")
        except BackendClosedError:
            outcomes.append("refused")

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(save, i)
        await anyio.lowlevel.checkpoint()
        await backend.aclose()
    async with SqliteSessionBackend(db_path=db) as again:
        assert len(await again.list_keys()) == outcomes.count("saved")
    assert len(outcomes) == 100


async def test_in_memory_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with SqliteSessionBackend(db_path=":memory:") as backend:
        assert await backend.load("k") is None
        await backend.commit("agent:k", {"n": 1}, turns=[{"t": 1}])
        assert await backend.load("agent:k") == {"n": 1}
        assert await backend.load_turns("agent:k") == [{"t": 1}]
        assert await backend.list_keys(MemoryScope.AGENT) == ["agent:k"]
        assert await backend.delete("agent:k")
        assert await backend.list_keys() == []
    assert os.listdir(tmp_path) == []  # no file named ":memory:" was created


PREFIX_KEYS = [
    "a",
    "ab",
    "abc",
    "abd",
    "ac",
    "b",
    "agent:1",
    "agent:10",
    "agent:2",
    "agent;x",
    "agent",
    "%wild",
    "_under",
    "zz\U0010ffff",
    "zz\U0010ffffa",
    "zz\U0010fffe",
    "é",
    "éa",
    "\U0001f600 smile",
    "\ud7ff-edge",
    "\ud7ffz",
    "\ue000-after",
    "a'quote",
    'a"dq',
]

PREFIXES = [
    "",
    "a",
    "ab",
    "abc",
    "abcd",
    "agent:",
    "agent",
    "%",
    "_",
    "zz\U0010ffff",
    "zz",
    "é",
    "\U0001f600",
    "\ud7ff",
    "\ue000",
    "a'",
    "\U0010ffff",
    "zzz",
]


async def test_prefix_listing_edge_cases(tmp_path: Path) -> None:
    async with SqliteSessionBackend(db_path=tmp_path / "s.db") as backend:
        for key in PREFIX_KEYS:
            await backend.save(key, {"key": key})
        for prefix in PREFIXES:
            expected = sorted(k for k in PREFIX_KEYS if k.startswith(prefix))
            assert await backend.list_keys(prefix) == expected, repr(prefix)
        with pytest.raises(TypeError):
            await backend.list_keys(3)  # type: ignore[arg-type]


async def test_cancelling_concurrent_saves_leaves_each_one_whole_or_absent(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writers, steps = 100, 5
    async with SqliteSessionBackend(db_path=db) as backend:
        for delay in (0, 2, 5, 20):
            await backend.save("shared", {"n": 0})
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def write(i: int) -> None:
                        for step in range(steps):
                            for _ in range(i % 4):
                                await anyio.lowlevel.checkpoint()
                            turns = [{"writer": i, "step": step, "part": p} for p in range(3)]
                            await backend.commit(f"k{i:03}", {"writer": i, "step": step}, turns=turns)
                            await backend.commit("shared", {"n": i}, turns=[{"writer": i}])

                    for i in range(writers):
                        tg.start_soon(write, i)
                    for _ in range(delay):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()

            # Every commit is whole (its state and all three of its turns) or absent.
            total = 0
            for key in await backend.list_keys("k"):
                record = await backend.load_record(key)
                assert record is not None
                turns = await backend.load_turns(key)
                # Versions of a key created after "shared" was deleted start above it, so
                # the commits are counted by their turns: three per commit, in order.
                assert len(turns) == record.turn_count > 0
                assert [t["part"] for t in turns] == [0, 1, 2] * (len(turns) // 3)
                assert all(t["step"] == turns[i - i % 3]["step"] for i, t in enumerate(turns))
                assert turns[-1]["step"] == record.state["step"]
                assert all(t["writer"] == record.state["writer"] for t in turns)
                total += len(turns) // 3
            assert total < writers * steps * 4  # the cancellation did stop some writes
            await backend.delete("shared")

    # The committed picture is the same from a fresh connection, and the file is usable.
    async with SqliteSessionBackend(db_path=db) as again:
        for key in await again.list_keys("k"):
            record = await again.load_record(key)
            assert record is not None and record.turn_count == len(await again.load_turns(key)) > 0
        await again.save("after", {"ok": True})


async def test_a_save_cancelled_twice_returns_only_once_its_write_is_done(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A save waiting for another process's write lock, cancelled twice (a timeout fires as a
    failing sibling cancels the task group), still returns only after its write: on asyncio
    a second task.cancel() gets through anyio's shield."""
    path = tmp_path / "s.db"
    async with SqliteSessionBackend(db_path=path, busy_timeout=60) as backend:
        await backend.save("agent:k", {"v": "old"})
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        events: list[str] = []

        def stored() -> str:
            db = sqlite3.connect(path)
            try:
                return str(db.execute("SELECT state FROM cognitia_sessions").fetchone()[0])
            finally:
                db.close()

        async def save() -> None:
            try:
                await backend.save("agent:k", {"v": "new"})
                events.append("returned")
            finally:
                events.append(f"finished, stored {stored()}")

        async with anyio.create_task_group() as tg:
            task = await cancel_twice_while_waiting(tg, anyio_backend, save)
            assert events == []  # still waiting for its write
            assert await backend.load("agent:k") == {"v": "old"}
            other.execute("COMMIT")
            other.close()
            if task is not None:
                with pytest.raises(asyncio.CancelledError):
                    await task
        assert events == ['finished, stored {"v":"new"}']


async def test_inline_reads_fall_back_to_the_reader_thread_instead_of_waiting(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A point read that meets a lock (SQLite says "database is locked") never waits on the
    event loop: it is retried on the reader thread, which has the busy timeout."""
    path = tmp_path / "sessions.db"
    async with SqliteSessionBackend(db_path=path) as backend:
        await backend.save("agent:k", {"n": 1})
        assert await backend.load("agent:k") == {"n": 1}
        # In WAL mode readers are practically never refused a lock, so give this thread's
        # inline connection a database that really is locked: a copy held in exclusive mode.
        locked = tmp_path / "locked.db"
        with sqlite3.connect(path) as source, sqlite3.connect(locked) as copy:
            source.backup(copy)
        holder = sqlite3.connect(locked, isolation_level=None)
        holder.execute("PRAGMA journal_mode = DELETE")
        holder.execute("BEGIN EXCLUSIVE")
        refused = sqlite3.connect(locked, timeout=0, isolation_level=None, check_same_thread=False)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            refused.execute("SELECT 1 FROM cognitia_sessions").fetchall()
        backend._inline.held = _InlineConnection(refused)
        await backend.save("agent:k", {"n": 2})
        # The locked copy cannot answer, and holds the old state anyway: this is the reader thread.
        assert await backend.load("agent:k") == {"n": 2}
        holder.close()
        refused.close()


async def test_inline_reads_can_be_turned_off(anyio_backend: str, tmp_path: Path) -> None:
    async with SqliteSessionBackend(db_path=tmp_path / "s.db", inline_reads=False) as backend:
        await backend.commit("agent:k", {"n": 1}, turns=[{"i": 0}])
        assert await backend.load("agent:k") == {"n": 1}
        assert await backend.load_turns("agent:k", last=1) == [{"i": 0}]
        assert not backend._inline_conns


async def test_the_wal_is_checkpointed_and_stays_small(anyio_backend: str, tmp_path: Path) -> None:
    """The writer checkpoints between saves (not inside one), and the WAL starts over."""
    path = tmp_path / "busy.db"
    state = {"text": "x" * 1000}
    async with SqliteSessionBackend(db_path=path) as backend:
        for i in range(3000):
            await backend.save(f"agent:{i % 50}", state)
        # 3,000 saves of 1 KB would leave 12+ MB of WAL if it were never reset. A busy
        # writer checkpoints less often (when its queue is never empty), so the bound
        # leaves room for that: about 2.5 MB at worst, against 12.
        assert (await anyio.Path(f"{path}-wal").stat()).st_size < 4 * 1024 * 1024
        assert await backend.load("agent:7") == state


@pytest.mark.parametrize("with_expired", [False, True], ids=["all-live", "one-expired"])
async def test_writes_queued_together_end_exactly_as_if_run_one_at_a_time(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_expired: bool
) -> None:
    """Saves queued behind a busy writer are committed together (plain saves as multi-row
    statements); an expired key, a repeated key, a version conflict, commits with turns and
    conditional deletes in the same batch all come out as they do one by one."""
    now = [1000.0]
    ops: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
        ("save", "a", {"n": 1}, {}),
        ("save", "b", {"n": 1}, {}),
        ("save", "a", {"n": 2}, {}),
        ("save", "expired", {"n": 3}, {}),
        ("commit", "c", {"n": 1}, {"expected_version": 0, "turns": [{"t": 1}]}),
        ("save", "c", {"n": 2}, {}),
        ("save", "b", {"n": 2}, {}),
        ("commit", "a", {"n": 3}, {"expected_version": 1}),  # a is at version 3 by now
        ("commit", "a", {"n": 4}, {"expected_version": 3, "turns": [{"t": 2}]}),
        ("save", "d", {"n": 1}, {}),
        ("save", "d", {"n": 2}, {}),
        ("delete", "d", {}, {"expected_version": 1}),  # d is at version 2: a conflict
        ("delete", "c", {}, {"expected_version": 2}),
        ("save", "d", {"n": 3}, {}),
    ]
    if not with_expired:
        ops.remove(("save", "expired", {"n": 3}, {}))
    multi_row: list[bool] = []
    save_many = _sqlite._save_many

    def spy(conn: sqlite3.Connection, jobs: list[Any]) -> bool:
        multi_row.append(save_many(conn, jobs))
        return multi_row[-1]

    monkeypatch.setattr(_sqlite, "_save_many", spy)

    async def run(
        backend: SqliteSessionBackend, op: tuple[str, str, dict[str, Any], dict[str, Any]]
    ) -> object:
        kind, key, state, kwargs = op
        try:
            if kind == "save":
                await backend.save(key, state)
                return None
            if kind == "delete":
                return await backend.delete(key, **kwargs)
            return await backend.commit(key, state, **kwargs)
        except VersionConflictError as exc:
            return ("conflict", exc.expected, exc.actual)

    async def prepared(name: str) -> SqliteSessionBackend:
        backend = SqliteSessionBackend(db_path=tmp_path / name, ttl=10, clock=lambda: now[0])
        now[0] = 1000.0
        await backend.commit("expired", {"old": True}, turns=[{"t": 0}, {"t": 0}])
        await backend.save("b", {"n": 0})
        return backend

    one_by_one = await prepared("one.db")
    now[0] = 1005.0  # b is still alive, "expired" is not
    await one_by_one.save("b", {"n": 0})
    now[0] = 1011.0
    expected = [await run(one_by_one, op) for op in ops]
    assert expected[-3:] == [("conflict", 1, 2), True, None]

    together = await prepared("together.db")
    now[0] = 1005.0
    await together.save("b", {"n": 0})
    now[0] = 1011.0
    batches: list[int] = []
    run_batch = together._writer._batch
    assert run_batch is not None

    def counting(conn: sqlite3.Connection, jobs: list[Any]) -> None:
        batches.append(len(jobs))
        run_batch(conn, jobs)

    together._writer._batch = counting
    gate, holding = threading.Event(), threading.Event()
    outcomes: dict[int, object] = {}
    async with anyio.create_task_group() as tg:

        def hold(conn: sqlite3.Connection) -> None:
            holding.set()
            gate.wait(10)

        tg.start_soon(lambda: together._writer.call(hold))
        await anyio.to_thread.run_sync(holding.wait)

        async def one(i: int) -> None:
            outcomes[i] = await run(together, ops[i])

        for i in range(len(ops)):  # queued in this order behind the held writer
            tg.start_soon(one, i)
            await anyio.wait_all_tasks_blocked()
        gate.set()
    assert batches[-1] == len(ops)
    # The expired key makes the first multi-row statement write less than asked: the batch
    # is rolled back and its jobs run one by one. Otherwise every run of saves is one statement.
    assert multi_row == ([False] if with_expired else [True, True, True])
    assert [outcomes[i] for i in range(len(ops))] == expected

    for key in ("a", "b", "c", "d", "expired"):
        mine, theirs = await together.load_record(key), await one_by_one.load_record(key)
        if mine is None or theirs is None:
            assert mine is theirs is None and (key == "c" or (key == "expired" and not with_expired))
            continue
        assert (mine.state, mine.version, mine.turn_count) == (
            theirs.state,
            theirs.version,
            theirs.turn_count,
        ), key
        assert await together.load_turns(key) == await one_by_one.load_turns(key), key
    expired = await together.load_record("expired")
    if with_expired:
        assert expired is not None and (expired.state, expired.turn_count) == ({"n": 3}, 0)
    else:
        assert expired is None
    await together.aclose()
    await one_by_one.aclose()


async def test_backends_opening_a_new_file_at_the_same_moment_all_succeed(
    anyio_backend: str, tmp_path: Path
) -> None:
    """Switching a new file to WAL takes an exclusive lock that SQLite does not wait for;
    a backend that meets another one doing the same waits its busy timeout instead of failing."""
    for round_ in range(10):
        db = tmp_path / f"race-{round_}.db"
        backends = [SqliteSessionBackend(db_path=db) for _ in range(6)]
        async with anyio.create_task_group() as tg:
            for i, backend in enumerate(backends):
                tg.start_soon(backend.save, f"agent:{i}", {"i": i})
        assert await backends[0].list_keys() == [f"agent:{i}" for i in range(6)]
        for backend in backends:
            await backend.aclose()


@pytest.mark.parametrize(
    ("options", "inline"),
    [
        ({}, True),
        ({"synchronous": "OFF"}, True),
        ({"synchronous": "FULL"}, False),
        ({"inline_writes": False}, False),
    ],
    ids=["normal", "off", "full", "turned-off"],
)
async def test_a_write_arriving_alone_is_committed_on_the_calling_thread(
    anyio_backend: str, tmp_path: Path, options: dict[str, Any], inline: bool
) -> None:
    """With synchronous NORMAL or OFF a commit does not wait for the disk: a lone write runs
    on the caller's thread. Writes arriving together still share one transaction on the
    writer thread, and a commit that waits for the disk (FULL) always runs there."""
    async with SqliteSessionBackend(db_path=tmp_path / "s.db", **options) as backend:
        await backend.save("agent:k", {"n": 0})  # opens the writer's connection
        conn = backend._writer._resource
        assert conn is not None
        writes: list[tuple[int, str]] = []
        conn.set_trace_callback(
            lambda sql: (
                writes.append((threading.get_ident(), sql.split()[0]))
                if sql.startswith(("INSERT", "UPDATE", "DELETE"))
                else None
            )
        )
        me = threading.get_ident()
        await backend.save("agent:k", {"n": 1})
        await backend.commit("agent:k", {"n": 2}, expected_version=2, turns=[{"t": 1}])
        assert await backend.delete("agent:k", expected_version=3)
        assert len(writes) >= 4 and all((thread == me) is inline for thread, _ in writes)

        del writes[:]

        async def save(i: int) -> None:
            await backend.save(f"agent:{i}", {"n": i})

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(save, i)
        assert writes and all(thread != me for thread, _ in writes)
        assert len(writes) < 20  # plain saves queued together: multi-row statements
        assert [await backend.load(f"agent:{i}") for i in range(20)] == [{"n": i} for i in range(20)]
        conn.set_trace_callback(None)


async def test_the_first_write_after_a_checkpoint_runs_on_the_writer_thread(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A checkpoint that copied the whole WAL makes the next commit start the WAL over, which
    syncs its header to disk even with NORMAL: that commit never runs on the event loop's
    thread. The writes after it do again."""
    async with SqliteSessionBackend(db_path=tmp_path / "s.db") as backend:
        await backend.save("agent:k", {"n": 0})
        conn = backend._writer._resource
        assert conn is not None
        threads: list[int] = []
        insert = "INSERT"
        conn.set_trace_callback(lambda sql: threads.append(threading.get_ident()) if insert in sql else None)
        me = threading.get_ident()
        await backend.save("agent:k", {"n": 1})
        # The checkpoint the writer thread runs when it is idle and one is due, run here.
        backend._unchecked_writes = CHECKPOINT_EVERY
        backend._checkpoint(conn, True)
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and frames == copied, "the WAL is all in the database: the next commit restarts it"
        for n in range(2, 5):
            await backend.save("agent:k", {"n": n})
        conn.set_trace_callback(None)
        assert [thread == me for thread in threads] == [True, False, True, True]


async def test_a_write_on_the_calling_thread_never_waits_for_a_lock(
    anyio_backend: str, tmp_path: Path
) -> None:
    """Another process holds the write lock: the write goes to the writer thread, which waits
    with the busy timeout while the event loop goes on; the writer keeps its busy timeout."""
    path = tmp_path / "s.db"
    async with SqliteSessionBackend(db_path=path, busy_timeout=30) as backend:
        await backend.save("agent:k", {"v": "old"})
        await backend.save("agent:k", {"v": "older"})
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        loop_ran = threading.Event()
        blocked: list[bool] = []

        def release() -> None:
            # Released once the event loop has run on while the save waits (if the save held
            # the loop, that never happens: released after 10 s, and the test fails).
            blocked.append(not loop_ran.wait(10))
            other.execute("COMMIT")
            other.close()

        releaser = threading.Thread(target=release)
        releaser.start()
        saved = anyio.Event()

        async def save() -> None:
            await backend.save("agent:k", {"v": "new"})
            saved.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(save)
            for _ in range(5):
                await anyio.sleep(0.01)
            assert not saved.is_set()
            loop_ran.set()
        await anyio.to_thread.run_sync(releaser.join)
        assert blocked == [False]
        assert await backend.load("agent:k") == {"v": "new"}
        conn = backend._writer._resource
        assert conn is not None and conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000


def test_trio_run_as_a_guest_of_an_asyncio_loop_is_trio(tmp_path: Path) -> None:
    """``trio.lowlevel.start_guest_run`` runs trio tasks on a thread with a running asyncio
    loop (a trio app embedded in an asyncio one): they get trio's way of waiting."""
    import trio  # a test dependency, as for every test that runs on both runtimes

    async def trio_main() -> list[Any]:
        async with SqliteSessionBackend(db_path=tmp_path / "guest.db") as backend:
            await backend.save("agent:k", {"n": 0})  # alone: on this thread
            async with trio.open_nursery() as nursery:  # together: on the writer thread
                for i in range(10):
                    nursery.start_soon(backend.save, f"agent:{i}", {"n": i})
            with trio.move_on_after(0.01):
                await trio.sleep_forever()
            return [await backend.load(f"agent:{i}") for i in ("k", *range(10))]

    async def host() -> list[Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        trio.lowlevel.start_guest_run(
            trio_main, run_sync_soon_threadsafe=loop.call_soon_threadsafe, done_callback=done.set_result
        )
        outcome = await asyncio.wait_for(done, 30)
        return outcome.unwrap()  # type: ignore[no-any-return]

    assert asyncio.run(host()) == [{"n": 0}, *({"n": i} for i in range(10))]


def test_a_threads_read_connection_is_closed_when_the_thread_ends(tmp_path: Path) -> None:
    """Each thread that loads a session gets a read-only connection of its own (two file
    descriptors). Threads that come and go (an ``asyncio.run`` per request) do not pile them up."""
    backend = SqliteSessionBackend(db_path=tmp_path / "s.db")
    try:
        asyncio.run(backend.save("agent:k", {"n": 1}))
        loaded: list[Any] = []

        def request() -> None:
            loaded.append(asyncio.run(backend.load("agent:k")))

        for _ in range(50):
            thread = threading.Thread(target=request)
            thread.start()
            thread.join()
        gc.collect()
        assert loaded == [{"n": 1}] * 50
        assert len(backend._inline_conns) <= 1  # at most the main thread's
        asyncio.run(backend.load("agent:k"))
        assert len(backend._inline_conns) == 1
    finally:
        backend.close()
    assert len(backend._inline_conns) == 0


async def test_a_commit_that_fails_leaves_no_transaction_open(anyio_backend: str, tmp_path: Path) -> None:
    """The save whose COMMIT failed raises; the next save is committed on its own, not swallowed
    by a transaction left open."""
    path = tmp_path / "s.db"
    async with SqliteSessionBackend(db_path=path) as backend:
        await backend.save("agent:k", {"n": 0})
        conn = backend._writer._resource
        assert conn is not None
        refusals = [1]

        def authorizer(action: int, *args: object) -> int:
            if action == sqlite3.SQLITE_TRANSACTION and args[0] == "COMMIT" and refusals:
                refusals.pop()
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK

        conn.set_authorizer(authorizer)
        with pytest.raises(StorageError):
            await backend.commit("agent:k", {"n": 1}, expected_version=1, turns=[{"t": 1}])
        conn.set_authorizer(None)
        assert not conn.in_transaction
        await backend.commit("agent:k", {"n": 2}, expected_version=1, turns=[{"t": 2}])
        with closing(sqlite3.connect(path)) as other:
            assert other.execute(
                "SELECT version FROM cognitia_sessions WHERE key = 'agent:k'"
            ).fetchone() == (2,)
        assert await backend.load_turns("agent:k") == [{"t": 2}]
