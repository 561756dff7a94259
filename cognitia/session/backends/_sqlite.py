from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from ..._worker import Job, RunOnThread, ThreadWorker, astop_workers, checkpoint, stop_workers
from ...errors import StorageError, VersionConflictError
from ._base import BackendBase, EncodedWrite, RawRecord, check_version, prefix_bounds

__all__ = ["SCHEMA_VERSION", "SqliteSessionBackend"]

SCHEMA_VERSION = 2
"""Recorded in the file as ``PRAGMA user_version``; a newer file is refused, an older one migrated."""

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS cognitia_sessions (
            key TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            version INTEGER NOT NULL,
            turn_count INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            expires_at REAL
        )""",
        """CREATE INDEX IF NOT EXISTS cognitia_sessions_expiry
            ON cognitia_sessions (expires_at) WHERE expires_at IS NOT NULL""",
        """CREATE TABLE IF NOT EXISTS cognitia_turns (
            key TEXT NOT NULL,
            seq INTEGER NOT NULL,
            turn TEXT NOT NULL,
            PRIMARY KEY (key, seq)
        )""",
    ),
    2: (
        # One row, 'removed_version': the highest version of any session deleted or pruned,
        # so that a session created anew under a removed key starts above it.
        """CREATE TABLE IF NOT EXISTS cognitia_meta (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )""",
        "INSERT OR IGNORE INTO cognitia_meta (name, value) VALUES ('removed_version', 0)",
    ),
}

_ALIVE = "(expires_at IS NULL OR expires_at > ?)"
_REMOVED_VERSION = "coalesce((SELECT value FROM cognitia_meta WHERE name = 'removed_version'), 0)"
_FIRST_VERSION = f"{_REMOVED_VERSION} + 1"
"""The version of a session created anew: one above every version removed before."""
_RECORD_REMOVED = "UPDATE cognitia_meta SET value = max(value, ?) WHERE name = 'removed_version'"
_SELECT_RECORD = (
    "SELECT state, version, turn_count, updated_at, expires_at FROM cognitia_sessions "
    f"WHERE key = ? AND {_ALIVE}"
)
_SELECT_STATE = f"SELECT state FROM cognitia_sessions WHERE key = ? AND {_ALIVE}"
_SELECT_TURNS_TAIL = (
    "SELECT t.turn FROM cognitia_turns AS t JOIN cognitia_sessions AS s ON s.key = t.key "
    "WHERE t.key = ? AND (s.expires_at IS NULL OR s.expires_at > ?) AND t.seq >= s.turn_count - ? "
    "ORDER BY t.seq"
)
_SELECT_TURNS_ALL = (
    "SELECT t.turn FROM cognitia_turns AS t JOIN cognitia_sessions AS s ON s.key = t.key "
    "WHERE t.key = ? AND (s.expires_at IS NULL OR s.expires_at > ?) ORDER BY t.seq"
)
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
CHECKPOINT_EVERY = 64
"""Writes between WAL checkpoints (SQLite's own default is every 1,000 pages, inside a commit)."""
_INLINE_TAIL = 64
"""Tails of at most this many turns are read inline (see SqliteSessionBackend._point_read)."""

# One-statement fast paths for the common commits. Each changes nothing when its condition
# does not hold (an expired row, another version), and the general path in _commit then
# decides, so the outcome is the same either way.
_FAST_COMMITS = sqlite3.sqlite_version_info >= (3, 35, 0)  # RETURNING
# Parameters are plain "?" (numbered ones bound from a sequence are deprecated since Python
# 3.12); the update half of the upsert reads the new values back from `excluded`.
_UPSERT_ALIVE = (
    "INSERT INTO cognitia_sessions (key, state, version, turn_count, created_at, updated_at, expires_at) "
    f"VALUES (?, ?, {_FIRST_VERSION}, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET state = excluded.state, version = version + 1, "
    "turn_count = turn_count + excluded.turn_count, updated_at = excluded.updated_at, "
    "expires_at = excluded.expires_at "
    "WHERE expires_at IS NULL OR expires_at > excluded.updated_at RETURNING version, turn_count"
)
_INSERT_NEW = (
    "INSERT INTO cognitia_sessions (key, state, version, turn_count, created_at, updated_at, expires_at) "
    f"VALUES (?, ?, {_FIRST_VERSION}, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO NOTHING RETURNING version, turn_count"
)
_UPDATE_AT_VERSION = (
    "UPDATE cognitia_sessions SET state = ?, version = version + 1, turn_count = turn_count + ?, "
    "updated_at = ?, expires_at = ? WHERE key = ? AND (expires_at IS NULL OR expires_at > ?) "
    "AND version = ? RETURNING version, turn_count"
)
_INSERT_TURN = "INSERT INTO cognitia_turns (key, seq, turn) VALUES (?, ?, ?)"


class SqliteSessionBackend(BackendBase):
    """Sessions in one SQLite file: the embedded default, persistent across restarts.

    Runs the same on asyncio and trio, on the standard library's ``sqlite3``. Writes go to a
    writer thread the backend owns; writes that arrive while a transaction is running are
    committed together in the next one (a failing write is retried alone, so it never fails
    its neighbours), and ``save`` returns once its transaction is committed. A write that
    arrives alone, while the writer is idle, is committed on the calling thread instead: with
    ``synchronous="NORMAL"`` a WAL commit does not wait for the disk and takes less time than
    the hop to the writer would. (The first commit after a checkpoint may start the WAL
    over, which syncs its header to disk: that one goes to the writer thread. After a
    checkpoint run by another process, a commit here may wait for that sync once.) It never
    waits for a lock either; if another process holds the write lock, the write goes to the
    writer thread, which waits. Reads never
    queue behind writes: loading one session is a primary-key lookup on a WAL snapshot,
    served on the calling thread's own read-only connection (it never waits for a lock; if
    it would, the read goes to the backend's reader thread), and larger reads (listing keys,
    long turn histories) run on the reader thread.

    The file uses WAL mode and a busy timeout so several processes can share it, is created
    readable and writable by its owner only, and records its schema version.

    Args:
        db_path: the database file (created if missing), or ``":memory:"``.
        ttl: seconds after the last save when a session expires (``None``: never).
        synchronous: SQLite's ``synchronous`` setting. ``"NORMAL"`` (default) keeps every
            committed save across a process crash; ``"FULL"`` also across power loss.
        busy_timeout: seconds to wait for another process's write lock.
        inline_reads: serve single-session reads on the calling thread (default). Turn it
            off when the file lives on slow or network storage, where even a point read may
            take long enough to matter to the event loop.
        inline_writes: commit a write that arrives alone on the calling thread (default),
            when ``synchronous`` is ``"NORMAL"`` or ``"OFF"``; with ``"FULL"`` or ``"EXTRA"``
            a commit waits for the disk and always runs on the writer thread. Turn it off
            for the same reason as ``inline_reads``.
        read_only: open an existing file for reading only: nothing is created, migrated or
            switched to WAL, and every write is refused by SQLite (``StorageError``). A
            file of an older schema is read as it is. For inspecting a database (the
            ``cognitia`` command's reading commands do so).

    >>> backend = SqliteSessionBackend(db_path="sessions.db")
    """

    name = "sqlite"
    # OSError: creating the file can fail before SQLite is involved (a missing directory).
    _driver_errors = (sqlite3.Error, OSError)

    def __init__(
        self,
        db_path: str | os.PathLike[str] = "sessions.db",
        *,
        ttl: float | None = None,
        synchronous: str = "NORMAL",
        busy_timeout: float = 5.0,
        inline_reads: bool = True,
        inline_writes: bool = True,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl=ttl, clock=clock)
        synchronous = synchronous.upper()
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}")
        self.db_path = os.fspath(db_path)
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._memory = self.db_path == ":memory:"
        self._read_only = read_only and not self._memory
        self._inline_reads = inline_reads and not self._memory
        self._inline = threading.local()
        self._inline_conns: weakref.WeakSet[_InlineConnection] = weakref.WeakSet()
        self._inline_lock = threading.Lock()
        self._schema_ready = threading.Event()
        self._unchecked_writes = 0
        # Set by a checkpoint: the next commit may start the WAL over, and with NORMAL that
        # syncs the WAL header to disk. That commit is the writer thread's.
        self._wal_checkpointed = False
        self._inline_writes = inline_writes and synchronous in ("OFF", "NORMAL") and not self._read_only
        self._writer: ThreadWorker[sqlite3.Connection] = ThreadWorker(
            f"cognitia-sqlite-writer:{self.db_path}",
            self._open_writer,
            sqlite3.Connection.close,
            batch=self._write_batch,
            idle=None if self._memory or self._read_only else self._checkpoint,
            here=self._write_here if self._inline_writes else None,
        )
        self._reader: ThreadWorker[sqlite3.Connection] = (
            self._writer
            if self._memory
            else ThreadWorker(
                f"cognitia-sqlite-reader:{self.db_path}", self._open_reader, sqlite3.Connection.close
            )
        )

    # -- connections ------------------------------------------------------------------------

    def _connect(self, timeout: float | None = None) -> sqlite3.Connection:
        timeout = self._busy_timeout if timeout is None else timeout
        if self._read_only:
            # mode=ro: SQLite itself refuses every write, and a missing file is an error.
            uri = f"{Path(self.db_path).resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        else:
            conn = sqlite3.connect(
                self.db_path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        if not self._memory and not self._read_only:
            path = Path(self.db_path)
            if not path.exists():
                # Create the file ourselves so it is private: SQLite gives its WAL and
                # shared-memory files the same permissions as the database file.
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = self._connect()
        try:
            if self._read_only:
                # The file is read as it is: its schema is checked, never changed.
                _check_schema(conn, self.db_path)
            else:
                if not self._memory:
                    self._switch_to_wal(conn)
                    # The writer checkpoints when it is idle (see _checkpoint), not inside a save.
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                _migrate(conn, self.db_path)
        except BaseException:
            conn.close()
            raise
        self._schema_ready.set()
        return conn

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        """``PRAGMA journal_mode = WAL``, waiting out other connections for the busy timeout.

        Switching a new file to WAL needs an exclusive lock, and SQLite reports "database is
        locked" at once instead of calling the busy handler; two processes opening a new
        file together would otherwise fail one of them.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)  # the writer thread's own time, not the event loop's
            pause = min(pause * 2, 0.05)

    def _write_batch(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        _run_batch(conn, jobs)
        self._unchecked_writes += len(jobs)
        self._wal_checkpointed = False

    def _write_here(
        self, conn: sqlite3.Connection, fn: Callable[..., object], args: tuple[object, ...]
    ) -> object:
        """Run a write on the calling thread, on the writer's connection (the worker holds it
        for us), without waiting for a lock: busy, it goes to the writer thread instead."""
        if (self._unchecked_writes >= CHECKPOINT_EVERY or self._wal_checkpointed) and not self._memory:
            # Due for a checkpoint, which the writer thread runs once it has woken the
            # caller; or just after one, when the commit may restart the WAL and wait for
            # the disk to sync its header.
            raise RunOnThread
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            result = fn(conn, *args)
        except sqlite3.OperationalError as exc:
            # Every write runs in a transaction of its own, rolled back on error: a write
            # that could not take the lock has left nothing behind.
            if _is_busy(exc) and not conn.in_transaction:
                raise RunOnThread from None
            raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        self._unchecked_writes += 1
        return result

    def _checkpoint(self, conn: sqlite3.Connection, idle: bool) -> None:
        """Copy the WAL back into the database: small and often, after the waiters are woken.

        SQLite's automatic checkpoint would run inside whichever commit crosses its
        threshold, making that save milliseconds slower. Here the writer checkpoints once
        the batch it just committed has been handed back and nothing is queued, every
        ``CHECKPOINT_EVERY`` writes (or, under sustained load, every ``8 *`` that many).
        Nothing is appended while it runs, so the checkpoint completes and the WAL starts
        over instead of growing.
        """
        due = CHECKPOINT_EVERY if idle else 8 * CHECKPOINT_EVERY
        if self._unchecked_writes < due:
            return
        with self._writer.busy:  # a write may be running on a caller's thread
            self._unchecked_writes = 0
            self._wal_checkpointed = True
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                pass  # another process holds the checkpoint lock: it is doing the work

    def _open_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _inline_connection(self) -> sqlite3.Connection:
        """This thread's read-only connection, for point reads served without a thread hop.

        It never waits for a lock (``busy_timeout = 0``): a read that would have to wait
        goes to the reader thread instead, so the event loop is never held up by another
        writer.
        """
        held: _InlineConnection | None = getattr(self._inline, "held", None)
        if held is None:
            conn = self._connect(timeout=0)
            conn.execute("PRAGMA query_only = ON")
            held = _InlineConnection(conn)
            with self._inline_lock:
                if self._closed:  # closed meanwhile: the inline connections are already gone
                    held.close()
                    raise sqlite3.OperationalError("the backend is closed")
                self._inline_conns.add(held)
            self._inline.held = held
        return held.conn

    async def _read(self, fn: Callable[..., object], *args: object) -> object:
        if not self._schema_ready.is_set():
            # The writer creates or migrates the schema before the first read.
            await self._writer.call(_noop, shield=True)
        return await self._reader.call(fn, *args)

    async def _point_read(self, fn: Callable[..., object], *args: object) -> object:
        """A read of one session's row (or a bounded tail of its turns).

        In WAL mode such a read takes a few microseconds, less than the thread hop it would
        otherwise cost and less than decoding the state it returns, which happens on this
        thread anyway; so it runs here, on a connection of this thread's own. Anything that
        would wait (a lock held during recovery, a closed backend) takes the reader thread.
        """
        if self._inline_reads and self._schema_ready.is_set() and not self._closed:
            try:
                result = fn(self._inline_connection(), *args)
            except sqlite3.OperationalError:
                pass  # busy or locked: the reader thread waits for it with the busy timeout
            else:
                await checkpoint()
                return result
        return await self._read(fn, *args)

    # -- the storage engine -----------------------------------------------------------------

    async def _raw_load(self, key: str, now: float) -> RawRecord | None:
        return await self._point_read(_load, key, now)  # type: ignore[return-value]

    async def _raw_load_state(self, key: str, now: float) -> str | None:
        return await self._point_read(_load_state, key, now)  # type: ignore[return-value]

    async def _raw_commit(
        self,
        key: str,
        state: str,
        expected_version: int | None,
        turns: list[str],
        truncate: int | None,
        now: float,
        expires_at: float | None,
    ) -> int:
        return await self._writer.call(
            _commit, key, state, expected_version, turns, truncate, now, expires_at, shield=True, here=True
        )

    async def _raw_commit_many(
        self, writes: list[EncodedWrite], now: float, expires_at: float | None
    ) -> list[int]:
        return await self._writer.call(_commit_many, writes, now, expires_at, shield=True, here=True)

    async def _raw_save(self, key: str, state: str, now: float, expires_at: float | None) -> None:
        await self._writer.call(_save, key, state, now, expires_at, shield=True, here=True)

    async def _raw_load_turns(self, key: str, last: int | None, now: float) -> list[str]:
        if last is not None and last <= _INLINE_TAIL:
            return await self._point_read(_load_turns, key, last, now)  # type: ignore[return-value]
        return await self._read(_load_turns, key, last, now)  # type: ignore[return-value]

    async def _raw_delete(self, key: str, now: float, expected_version: int | None) -> bool:
        return await self._writer.call(_delete, key, now, expected_version, shield=True, here=True)

    async def _raw_list_keys(self, prefix: str, now: float) -> list[str]:
        return await self._read(_list_keys, prefix, now)  # type: ignore[return-value]

    async def _raw_prune(self, now: float, dry_run: bool) -> list[str]:
        return await self._writer.call(_prune, now, dry_run, shield=True)

    def _raw_close(self) -> None:
        stop_workers((self._reader, self._writer), self._close_inline)

    async def _raw_aclose(self) -> None:
        await astop_workers((self._reader, self._writer), self._close_inline)

    def _close_inline(self) -> None:
        with self._inline_lock:
            held = list(self._inline_conns)
            self._inline_conns.clear()
        for connection in held:
            connection.close()

    def _describe(self) -> str:
        return f"db_path={self.db_path!r}"


class _InlineConnection:
    """A thread's read-only connection for point reads, closed when the thread ends or the
    backend closes, whichever comes first.

    Only the thread's own ``threading.local`` holds it: once the thread is gone, nothing
    does, and its connection (two file descriptors) is closed, however many short-lived
    threads (an ``asyncio.run`` per request, say) have used the backend.
    """

    __slots__ = ("__weakref__", "close", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.close = weakref.finalize(self, conn.close)


# Everything below runs in a worker thread, on the connection it owns.


def _check_schema(conn: sqlite3.Connection, db_path: str) -> int:
    """The file's schema version; a newer one than this release knows is refused."""
    found: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise StorageError(
            f"{db_path} has cognitia schema version {found}, newer than this release "
            f"understands ({SCHEMA_VERSION}); upgrade cognitia-sessions"
        )
    return found


def _migrate(conn: sqlite3.Connection, db_path: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _check_schema(conn, db_path)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
        if found != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _noop(conn: sqlite3.Connection) -> None:
    return None


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` unless the connection is already in a transaction.

    Lets a job run on its own (its own transaction) or inside a batch (the batch's).
    """

    __slots__ = ("conn", "own")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.own = False

    def __enter__(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.own = True

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if not self.own:
            return
        if exc_type is not None:
            self.conn.execute("ROLLBACK")
            return
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            # A COMMIT that failed may leave the transaction open (SQLite rolls back on its
            # own only after some errors): the next write must not find itself inside it.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise


def _save(conn: sqlite3.Connection, key: str, state: str, now: float, expires_at: float | None) -> None:
    """A plain ``save``: ``_commit`` without a version check, turns or a result."""
    _commit(conn, key, state, None, [], None, now, expires_at)


# Queued plain saves are written by one multi-row statement per chunk: SQLite does the whole
# chunk in one call, without the GIL, while the event loop goes on encoding the next states.
# The statement writes exactly what _save would for a new or live key; a row it leaves
# alone (an expired session, which _save resets) shows up in the change count, and then the
# batch is run again one job at a time.
_SAVE_ROWS = (64, 16, 4, 1)
_SAVE_MANY = {
    n: "INSERT INTO cognitia_sessions (key, state, version, turn_count, created_at, updated_at, expires_at) "
    "VALUES " + ", ".join([f"(?, ?, {_FIRST_VERSION}, 0, ?, ?, ?)"] * n) + " ON CONFLICT (key) DO UPDATE SET "
    "state = excluded.state, version = version + 1, updated_at = excluded.updated_at, "
    "expires_at = excluded.expires_at WHERE expires_at IS NULL OR expires_at > excluded.updated_at"
    for n in _SAVE_ROWS
}


def _save_many(conn: sqlite3.Connection, jobs: list[Job]) -> bool:
    """Write ``_save`` jobs in the open transaction; ``False`` if any row was not written."""
    done = 0
    while done < len(jobs):
        left = len(jobs) - done
        n = next(n for n in _SAVE_ROWS if n <= left)
        params: list[object] = []
        for job in jobs[done : done + n]:
            key, state, now, expires_at = job.args
            params += (key, state, now, now, expires_at)
        before = conn.total_changes
        try:
            conn.execute(_SAVE_MANY[n], params)
        except sqlite3.Error:
            return False  # each job, run alone, gets its own outcome
        if conn.total_changes - before != n:
            return False
        done += n
    return True


def _run_batch(conn: sqlite3.Connection, jobs: list[Job]) -> None:
    """Run queued writes: one alone as is, several in one shared transaction.

    Inside a batch a job either completes or raises VersionConflictError having written
    nothing (versions are checked before any write). Any other failure rolls the batch back
    and each job is re-run on its own, so one bad write never fails its neighbours.
    """
    if len(jobs) == 1:
        jobs[0].run(conn)
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _run_together(conn, jobs):
            conn.execute("COMMIT")
            return
        conn.execute("ROLLBACK")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    for job in jobs:
        job.result = job.error = None
        job.run(conn)


def _run_together(conn: sqlite3.Connection, jobs: list[Job]) -> bool:
    """Run ``jobs`` in order in the open transaction; ``False`` if it must be rolled back."""
    i = 0
    while i < len(jobs):
        if _FAST_COMMITS and jobs[i].fn is _save:
            j = i + 1
            while j < len(jobs) and jobs[j].fn is _save:
                j += 1
            if j - i > 1:
                if not _save_many(conn, jobs[i:j]):
                    return False
                i = j
                continue
        job = jobs[i]
        job.run(conn)
        if job.error is not None and not isinstance(job.error, VersionConflictError):
            return False
        i += 1
    return True


def _load(conn: sqlite3.Connection, key: str, now: float) -> RawRecord | None:
    return conn.execute(_SELECT_RECORD, (key, now)).fetchone()  # type: ignore[no-any-return]


def _load_state(conn: sqlite3.Connection, key: str, now: float) -> str | None:
    row = conn.execute(_SELECT_STATE, (key, now)).fetchone()
    return None if row is None else row[0]


def _commit(
    conn: sqlite3.Connection,
    key: str,
    state: str,
    expected_version: int | None,
    turns: list[str],
    truncate: int | None,
    now: float,
    expires_at: float | None,
) -> int:
    if _FAST_COMMITS and truncate is None:
        if not turns:
            # One statement: atomic on its own, no explicit transaction needed.
            fast = _commit_fast(conn, key, state, expected_version, 0, now, expires_at)
            if fast is not None:
                return fast[0]
        else:
            with _Transaction(conn):
                fast = _commit_fast(conn, key, state, expected_version, len(turns), now, expires_at)
                if fast is not None:
                    version, turn_count = fast
                    first = turn_count - len(turns)
                    _append_turns(conn, key, first, turns)
                    return version
    with _Transaction(conn):
        return _commit_general(conn, key, state, expected_version, turns, truncate, now, expires_at)


def _commit_many(
    conn: sqlite3.Connection, writes: list[EncodedWrite], now: float, expires_at: float | None
) -> list[int]:
    """Every write in one transaction; a conflict or failure undoes the ones before it.

    The savepoint makes that hold inside a batch too, whose shared transaction goes on
    after a write that conflicted (having written nothing).
    """
    with _Transaction(conn):
        conn.execute("SAVEPOINT cognitia_many")
        try:
            versions = [
                _commit(conn, w.key, w.state, w.expected_version, list(w.turns), w.truncate, now, expires_at)
                for w in writes
            ]
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO cognitia_many")
                conn.execute("RELEASE cognitia_many")
            raise
        conn.execute("RELEASE cognitia_many")
        return versions


def _append_turns(conn: sqlite3.Connection, key: str, first: int, turns: list[str]) -> None:
    if len(turns) == 1:  # the usual turn: execute is cheaper than executemany for one row
        conn.execute(_INSERT_TURN, (key, first, turns[0]))
    else:
        conn.executemany(_INSERT_TURN, [(key, first + i, turn) for i, turn in enumerate(turns)])


def _commit_fast(
    conn: sqlite3.Connection,
    key: str,
    state: str,
    expected_version: int | None,
    added: int,
    now: float,
    expires_at: float | None,
) -> tuple[int, int] | None:
    """Write the session row in one statement when the key is new or live (at the expected
    version); return (version, turn_count), or ``None`` having written nothing."""
    if expected_version is None:
        rows = conn.execute(_UPSERT_ALIVE, (key, state, added, now, now, expires_at)).fetchall()
    elif expected_version == 0:
        rows = conn.execute(_INSERT_NEW, (key, state, added, now, now, expires_at)).fetchall()
    else:
        rows = conn.execute(
            _UPDATE_AT_VERSION, (state, added, now, expires_at, key, now, expected_version)
        ).fetchall()
    return (int(rows[0][0]), int(rows[0][1])) if rows else None


def _commit_general(
    conn: sqlite3.Connection,
    key: str,
    state: str,
    expected_version: int | None,
    turns: list[str],
    truncate: int | None,
    now: float,
    expires_at: float | None,
) -> int:
    """Every case, in a transaction: read the row, check the version, then write."""
    row = conn.execute(
        "SELECT version, turn_count, expires_at FROM cognitia_sessions WHERE key = ?", (key,)
    ).fetchone()
    alive = row is not None and (row[2] is None or row[2] > now)
    check_version(key, expected_version, row[0] if alive else None)
    if alive:
        version = int(row[0]) + 1
    else:
        # A new life of the key: above its expired row's versions and every removed one.
        removed = conn.execute(f"SELECT {_REMOVED_VERSION}").fetchone()[0]
        version = max(int(removed), 0 if row is None else int(row[0])) + 1
    if row is None:
        first_seq = 0
        conn.execute(
            "INSERT INTO cognitia_sessions (key, state, version, turn_count, created_at, "
            "updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, state, version, len(turns), now, now, expires_at),
        )
    else:
        first_seq = row[1] if alive else 0
        if truncate is not None and truncate < first_seq:
            first_seq = truncate
        if first_seq < row[1]:
            conn.execute("DELETE FROM cognitia_turns WHERE key = ? AND seq >= ?", (key, first_seq))
        conn.execute(
            "UPDATE cognitia_sessions "
            "SET state = ?, version = ?, turn_count = ?, updated_at = ?, expires_at = ?"
            + (", created_at = ?" if not alive else "")
            + " WHERE key = ?",
            (state, version, first_seq + len(turns), now, expires_at, *((now,) if not alive else ()), key),
        )
    if turns:
        _append_turns(conn, key, first_seq, turns)
    return version


def _load_turns(conn: sqlite3.Connection, key: str, last: int | None, now: float) -> list[str]:
    if last is None:
        rows = conn.execute(_SELECT_TURNS_ALL, (key, now)).fetchall()
    else:
        rows = conn.execute(_SELECT_TURNS_TAIL, (key, now, last)).fetchall()
    return [row[0] for row in rows]


def _delete(conn: sqlite3.Connection, key: str, now: float, expected_version: int | None) -> bool:
    # The version is checked inside the write transaction (BEGIN IMMEDIATE holds the write
    # lock), so no other connection or process can commit between the check and the delete.
    with _Transaction(conn):
        row = conn.execute(
            "SELECT version, expires_at FROM cognitia_sessions WHERE key = ?", (key,)
        ).fetchone()
        alive = row is not None and (row[1] is None or row[1] > now)
        if expected_version is not None:
            check_version(key, expected_version, row[0] if alive else None)
        if row is None:
            return False
        conn.execute("DELETE FROM cognitia_turns WHERE key = ?", (key,))
        conn.execute("DELETE FROM cognitia_sessions WHERE key = ?", (key,))
        conn.execute(_RECORD_REMOVED, (row[0],))
        return alive


def _list_keys(conn: sqlite3.Connection, prefix: str, now: float) -> list[str]:
    low, high = prefix_bounds(prefix)
    if high is None:
        rows = conn.execute(
            f"SELECT key FROM cognitia_sessions WHERE key >= ? AND {_ALIVE} ORDER BY key", (low, now)
        ).fetchall()
        return [row[0] for row in rows if row[0].startswith(prefix)]
    rows = conn.execute(
        f"SELECT key FROM cognitia_sessions WHERE key >= ? AND key < ? AND {_ALIVE} ORDER BY key",
        (low, high, now),
    ).fetchall()
    return [row[0] for row in rows]


def _prune(conn: sqlite3.Connection, now: float, dry_run: bool) -> list[str]:
    with _Transaction(conn):
        rows = conn.execute(
            "SELECT key, version FROM cognitia_sessions "
            "WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY key",
            (now,),
        ).fetchall()
        if not dry_run and rows:
            for key, _ in rows:
                conn.execute("DELETE FROM cognitia_turns WHERE key = ?", (key,))
                conn.execute("DELETE FROM cognitia_sessions WHERE key = ?", (key,))
            conn.execute(_RECORD_REMOVED, (max(version for _, version in rows),))
        return [key for key, _ in rows]
