from __future__ import annotations

import contextlib
import functools
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..._json import find_string, loads
from ..._worker import Job, ThreadWorker, astop_workers, stop_workers
from ...errors import MissingDependencyError, StateNotSerializableError, StorageError, VersionConflictError
from ._base import BackendBase, EncodedWrite, RawRecord, prefix_bounds

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import pq, sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("PostgresSessionBackend", "postgres", "psycopg") from exc

__all__ = ["SCHEMA_VERSION", "PostgresSessionBackend"]

SCHEMA_VERSION = 2
"""Recorded in the ``<prefix>schema_version`` table; a newer schema is refused, an older one migrated."""

_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1, in bytes; longer names are silently cut
_MAX_TIMEOUT_MS = 2**31 - 1  # PostgreSQL settings in milliseconds are 32-bit ints

# Keepalives make a connection whose server vanished without a word (a dead host, a dropped
# NAT entry) fail within about a minute instead of hanging; the DSN can override them.
_CONNECT_DEFAULTS = {
    "application_name": "cognitia",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}

Connection = psycopg.Connection[tuple[Any, ...]]
Cursor = psycopg.Cursor[tuple[Any, ...]]
Finish = Callable[[Cursor], Any]
Query = tuple[str, dict[str, Any], Finish]
"""A read: its statement, its parameters, and what turns the cursor into the result."""
Plan = Callable[..., Query]


class _Statements:
    """Every statement the backend runs, with its identifiers quoted once."""

    def __init__(self, schema: str, prefix: str) -> None:
        ident = sql.Identifier
        names = {
            "schema": ident(schema),
            "sessions": ident(schema, f"{prefix}sessions"),
            "turns": ident(schema, f"{prefix}turns"),
            "versions": ident(schema, f"{prefix}schema_version"),
            "meta": ident(schema, f"{prefix}meta"),
            "expiry_index": ident(f"{prefix}sessions_expiry"),
        }

        def render(template: str) -> str:
            return sql.SQL(template).format(**names).as_string(None)

        self.version_table = render("{versions}")  # quoted: to_regclass parses it as SQL
        self.lock_name = f"cognitia:{schema}"
        self.find_version_table = "SELECT to_regclass(%s) IS NOT NULL"
        self.read_version = render("SELECT coalesce(max(version), 0) FROM {versions}")
        self.create_schema = render("CREATE SCHEMA IF NOT EXISTS {schema}")
        self.create_version_table = render(
            "CREATE TABLE IF NOT EXISTS {versions} ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        self.record_version = render("INSERT INTO {versions} (version) VALUES (%s)")
        self.migrations: dict[int, tuple[str, ...]] = {
            1: (
                # COLLATE "C" orders keys by their UTF-8 bytes, i.e. by code point, like
                # Python's sorted(), and lets the primary key index serve prefix ranges.
                render(
                    """CREATE TABLE IF NOT EXISTS {sessions} (
                        key text COLLATE "C" PRIMARY KEY,
                        state jsonb NOT NULL,
                        version bigint NOT NULL,
                        turn_count integer NOT NULL,
                        created_at double precision NOT NULL,
                        updated_at double precision NOT NULL,
                        expires_at double precision
                    )"""
                ),
                render(
                    "CREATE INDEX IF NOT EXISTS {expiry_index} ON {sessions} (expires_at) "
                    "WHERE expires_at IS NOT NULL"
                ),
                render(
                    """CREATE TABLE IF NOT EXISTS {turns} (
                        key text COLLATE "C" NOT NULL,
                        seq integer NOT NULL,
                        turn jsonb NOT NULL,
                        PRIMARY KEY (key, seq)
                    )"""
                ),
            ),
            2: (
                # One row, 'removed_version': the highest version of any session deleted or
                # pruned, so that a session created anew under a removed key starts above it.
                render("CREATE TABLE IF NOT EXISTS {meta} (name text PRIMARY KEY, value bigint NOT NULL)"),
                render(
                    "INSERT INTO {meta} (name, value) VALUES ('removed_version', 0) "
                    "ON CONFLICT (name) DO NOTHING"
                ),
            ),
        }

        # Lock order, so that writers never wait for each other in a cycle: a transaction
        # that touches the removed version locks its row before any session row. A removal
        # locks it exclusively, a commit that may create a session shares it: such a commit
        # then reads the number only once no removal is in flight, and after waiting for
        # one it reads the number that removal recorded (a lock read sees the newest row).
        removed = "{meta} WHERE name = 'removed_version'"
        self.lock_removed_version = render(f"SELECT 1 FROM {removed} FOR NO KEY UPDATE")
        self.share_removed_version = render(f"SELECT 1 FROM {removed} FOR SHARE")
        first_version = f"coalesce((SELECT value FROM {removed} FOR SHARE), 0) + 1"
        record_removed = (
            ", recorded AS (UPDATE {meta} SET value = greatest(value, (SELECT max(version) FROM gone)) "
            "WHERE name = 'removed_version' AND EXISTS (SELECT 1 FROM gone))"
        )

        alive = "(s.expires_at IS NULL OR s.expires_at > %(now)s)"
        self.load = render(
            "SELECT state::text, version, turn_count, updated_at, expires_at FROM {sessions} AS s "
            f"WHERE key = %(key)s AND {alive}"
        )
        turns = (
            "SELECT t.turn::text FROM {turns} AS t JOIN {sessions} AS s ON s.key = t.key "
            f"WHERE t.key = %(key)s AND {alive} AND t.seq < s.turn_count"
        )
        self.turns_all = render(turns + " ORDER BY t.seq")
        self.turns_tail = render(turns + " AND t.seq >= s.turn_count - %(last)s ORDER BY t.seq")
        self.keys_from = render(
            f"SELECT key FROM {{sessions}} AS s WHERE key >= %(low)s AND {alive} ORDER BY key"
        )
        self.keys_between = render(
            "SELECT key FROM {sessions} AS s WHERE key >= %(low)s AND key < %(high)s "
            f"AND {alive} ORDER BY key"
        )
        self.current_version = render("SELECT version, expires_at FROM {sessions} WHERE key = %s")
        self.delete_session = render(
            "WITH gone AS (DELETE FROM {sessions} WHERE key = %(key)s RETURNING version, expires_at)"
            + record_removed
            + " SELECT expires_at FROM gone"
        )
        # A conditional delete is one statement: the row it matches is locked, and a row
        # another transaction changed meanwhile is checked again at its new version.
        self.delete_session_at_version = render(
            "WITH gone AS (DELETE FROM {sessions} AS s WHERE key = %(key)s AND version = %(expected)s "
            f"AND {alive} RETURNING version, expires_at)" + record_removed + " SELECT expires_at FROM gone"
        )
        self.delete_turns = render("DELETE FROM {turns} WHERE key = %s")
        self.expired = render(
            "SELECT key FROM {sessions} WHERE expires_at IS NOT NULL AND expires_at <= %s ORDER BY key"
        )
        self.delete_expired = render(
            "WITH gone AS (DELETE FROM {sessions} WHERE expires_at IS NOT NULL AND expires_at <= %(now)s "
            "RETURNING key, version)" + record_removed + " SELECT key FROM gone"
        )
        self.delete_turns_of = render("DELETE FROM {turns} WHERE key = ANY(%s)")

        # A commit is one statement, so it is atomic even outside a transaction block and
        # costs one round trip. The session row is written first; the turn rows take their
        # positions from the turn count it returns.
        upsert = (
            "INSERT INTO {sessions} AS s "
            "(key, state, version, turn_count, created_at, updated_at, expires_at) "
            f"VALUES (%(key)s, %(state)s::jsonb, {first_version}, %(n)s, %(now)s, %(now)s, %(expires_at)s) "
            "ON CONFLICT (key) DO UPDATE SET state = excluded.state, "
            # excluded.version is the new-session version: an expired session's row goes on
            # from above both its own version and every removed one.
            f"version = CASE WHEN {alive} THEN s.version + 1 "
            "ELSE greatest(s.version + 1, excluded.version) END, "
            f"turn_count = CASE WHEN {alive} "
            "THEN least(s.turn_count, coalesce(%(truncate)s::integer, s.turn_count)) ELSE 0 END + %(n)s, "
            f"created_at = CASE WHEN {alive} THEN s.created_at ELSE excluded.created_at END, "
            "updated_at = excluded.updated_at, expires_at = excluded.expires_at"
        )
        heads = {
            "overwrite": upsert,
            # expected_version=0: create, or reuse the row of an expired session.
            "create": upsert + f" WHERE NOT {alive}",
            "expect": (
                "UPDATE {sessions} AS s SET state = %(state)s::jsonb, version = s.version + 1, "
                "turn_count = least(s.turn_count, coalesce(%(truncate)s::integer, s.turn_count)) + %(n)s, "
                "updated_at = %(now)s, expires_at = %(expires_at)s "
                f"WHERE key = %(key)s AND version = %(expected)s AND {alive}"
            ),
        }
        # Turns are upserted at their positions: a row past the turn count (left by a
        # truncation that raced with another process's append) is invisible to reads and
        # is simply overwritten when the log grows back over it.
        append = (
            ", appended AS (INSERT INTO {turns} (key, seq, turn) "
            "SELECT %(key)s, up.turn_count - %(n)s + t.ord::integer - 1, t.turn::jsonb "
            "FROM up, unnest(%(turns)s::text[]) WITH ORDINALITY AS t(turn, ord) "
            "ON CONFLICT (key, seq) DO UPDATE SET turn = excluded.turn)"
        )
        trim = (
            ", trimmed AS (DELETE FROM {turns} AS d USING up "
            "WHERE d.key = %(key)s AND d.seq >= up.turn_count)"
        )
        self.commit: dict[tuple[str, bool, bool], str] = {}
        for kind, head in heads.items():
            for with_turns, with_trim in itertools.product((False, True), repeat=2):
                text = "WITH up AS (" + head + " RETURNING s.version, s.turn_count)"
                text += append if with_turns else ""
                text += trim if with_trim else ""
                self.commit[kind, with_turns, with_trim] = render(text + " SELECT version FROM up")


class _Link:
    """A connection that is replaced on first use after it broke (server restart, killed backend)."""

    def __init__(self, connect: Callable[[], Connection]) -> None:
        self._connect = connect
        self._conn = connect()

    def get(self) -> Connection:
        if self._conn.closed:
            # psycopg marks a connection closed once a round trip found it broken: that
            # operation was reported failed, this one gets a fresh connection.
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        self._conn.close()


class PostgresSessionBackend(BackendBase):
    """Sessions in PostgreSQL: many worker processes, one store.

    Runs the same on asyncio and trio: synchronous psycopg connections are each owned by a
    thread of the backend (one writer, ``readers`` readers), so no driver code touches the
    event loop. Writes that queue up while a transaction runs are committed together in
    the next one, so under load the cost of a commit is shared; a write that fails does not
    affect the others. States and turns are stored as ``jsonb``, queryable in SQL.

    The tables are created on first use in ``schema`` (created too if missing) with names
    starting with ``table_prefix``, and their schema version is recorded; several
    processes starting at once migrate safely. A connection that breaks is replaced on the
    next operation (the one that found it broken fails with
    :class:`~cognitia.errors.StorageError`).

    Args:
        dsn: a libpq connection string or URL, e.g. ``"postgresql://app@db:5432/app"``.
        schema: the PostgreSQL schema holding the tables.
        table_prefix: prefix of the table names, to keep several stores in one schema.
        ttl: seconds after the last save when a session expires (``None``: never).
        readers: connections (and threads) serving loads; ``0`` sends them to the writer.
        connect_timeout: seconds to wait for a connection (whole seconds, at least 2, as
            libpq counts them).
        statement_timeout: seconds after which the server cancels a statement (``None``:
            the server's setting).

    ``jsonb`` does not keep the key order of objects, stores numbers as exact decimals (a
    float written in exponent form, such as ``1e16``, loads back as the ``int`` it
    denotes) and holds only Unicode text: a string with the character ``U+0000`` or a lone
    surrogate is refused with :class:`~cognitia.errors.StateNotSerializableError` naming
    its path.

    >>> backend = PostgresSessionBackend("postgresql://app@localhost/app", ttl=7 * 86400)
    """

    name = "postgres"
    _driver_errors = (psycopg.Error,)

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        table_prefix: str = "cognitia_",
        ttl: float | None = None,
        readers: int = 1,
        connect_timeout: float = 5.0,
        statement_timeout: float | None = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl=ttl, clock=clock)
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, got {type(dsn).__name__}")
        if not isinstance(schema, str) or not schema:
            raise ValueError(f"schema must be a non-empty str, got {schema!r}")
        if not isinstance(table_prefix, str):
            raise TypeError(f"table_prefix must be a str, got {type(table_prefix).__name__}")
        for name in (schema, f"{table_prefix}schema_version", f"{table_prefix}sessions_expiry"):
            if len(name.encode()) > _MAX_IDENTIFIER or "\x00" in name:
                raise ValueError(
                    f"PostgreSQL identifier {name!r} is too long or contains NUL "
                    f"(limit {_MAX_IDENTIFIER} bytes); use a shorter schema or table_prefix"
                )
        if type(readers) is not int or readers < 0:
            raise ValueError(f"readers must be an int >= 0, got {readers!r}")
        if not 0 < connect_timeout < math.inf:
            raise ValueError(
                f"connect_timeout must be a positive, finite number of seconds, got {connect_timeout!r}"
            )
        if statement_timeout is not None and not 0 < statement_timeout <= _MAX_TIMEOUT_MS / 1000:
            raise ValueError(
                f"statement_timeout must be None or seconds in (0, {_MAX_TIMEOUT_MS // 1000}], "
                f"got {statement_timeout!r}"
            )
        try:
            given = conninfo_to_dict(dsn)  # a malformed DSN fails here, not on first use
        except psycopg.Error as exc:
            # Not the DSN or libpq's message in ours: they may quote a password.
            raise ValueError("dsn is not a valid libpq connection string or postgresql:// URL") from exc
        self.schema = schema
        self.table_prefix = table_prefix
        host, port = given.get("host") or "local socket", given.get("port") or 5432
        self._target = f"{host}:{port}/{given.get('dbname') or ''}"
        self._conninfo = make_conninfo(
            dsn,
            **{k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given},
            connect_timeout=str(max(1, math.ceil(connect_timeout))),
        )
        # At least 1 ms: PostgreSQL reads 0 as no timeout at all.
        self._statement_timeout_ms = (
            None if statement_timeout is None else str(max(1, math.ceil(statement_timeout * 1000)))
        )
        self._sql = _Statements(schema, table_prefix)
        self._schema_ready = threading.Event()
        self._writer: ThreadWorker[_Link] = ThreadWorker(
            f"cognitia-postgres-writer:{self._target}",
            self._open_writer,
            _Link.close,
            batch=functools.partial(_run_writes, q=self._sql),
        )
        self._readers: list[ThreadWorker[_Link]] = [
            ThreadWorker(
                f"cognitia-postgres-reader-{i}:{self._target}",
                self._open_reader,
                _Link.close,
                batch=_run_reads,
            )
            for i in range(readers)
        ] or [self._writer]
        self._next_reader = itertools.cycle(self._readers)

    # -- connections ------------------------------------------------------------------------

    def _tables_exist(self) -> bool:
        """Whether the schema holds this backend's tables, read without creating anything
        (blocking: for the command line, before any event loop runs)."""
        with contextlib.closing(self._connect()) as conn:
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self._sql.version_table,)).fetchone()
        return bool(row and row[0])

    def _connect(self) -> Connection:
        conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            if self._statement_timeout_ms is not None:
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)", (self._statement_timeout_ms,)
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_writer(self) -> _Link:
        link = _Link(self._connect)
        if not self._schema_ready.is_set():
            try:
                _migrate(link.get(), self._sql)
            except BaseException:
                link.close()
                raise
            self._schema_ready.set()
        return link

    def _open_reader(self) -> _Link:
        return _Link(self._connect)

    async def _read(self, plan: Plan, *args: Any) -> Any:
        if not self._schema_ready.is_set():
            # The writer creates or migrates the schema before the first read.
            await self._writer.call(_noop, shield=True)
        return await next(self._next_reader).call(_query, plan, self._sql, *args)

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._writer.call(fn, self._sql, *args, shield=True)

    # -- the storage engine -----------------------------------------------------------------

    async def _raw_load(self, key: str, now: float) -> RawRecord | None:
        return await self._read(_load, key, now)  # type: ignore[no-any-return]

    def check_storable(self, key: str, state: str, turns: Sequence[str] = ()) -> None:
        """jsonb holds neither U+0000 nor a lone surrogate: such a string is refused, named by path."""
        if (
            "\\u0000" in state
            or "\\ud" in state.lower()
            or any("\\u0000" in turn or "\\ud" in turn.lower() for turn in turns)
        ):
            found = _unstorable_string(state, list(turns))
            if found is not None:
                raise StateNotSerializableError(key, *found)

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
        return await self._write(  # type: ignore[no-any-return]
            _commit, key, state, expected_version, turns, truncate, now, expires_at
        )

    async def _raw_commit_many(
        self, writes: list[EncodedWrite], now: float, expires_at: float | None
    ) -> list[int]:
        return await self._write(_commit_many, writes, now, expires_at)  # type: ignore[no-any-return]

    async def _raw_load_turns(self, key: str, last: int | None, now: float) -> list[str]:
        return await self._read(_load_turns, key, last, now)  # type: ignore[no-any-return]

    async def _raw_delete(self, key: str, now: float, expected_version: int | None) -> bool:
        return await self._write(_delete, key, now, expected_version)  # type: ignore[no-any-return]

    async def _raw_list_keys(self, prefix: str, now: float) -> list[str]:
        return await self._read(_list_keys, prefix, now)  # type: ignore[no-any-return]

    async def _raw_prune(self, now: float, dry_run: bool) -> list[str]:
        return await self._write(_prune, now, dry_run)  # type: ignore[no-any-return]

    def _raw_close(self) -> None:
        stop_workers((*self._readers, self._writer))

    async def _raw_aclose(self) -> None:
        await astop_workers((*self._readers, self._writer))

    def _describe(self) -> str:
        # Never the DSN itself: it may hold a password.
        return f"{self._target} schema={self.schema!r} table_prefix={self.table_prefix!r}"


# Everything below runs in a worker thread, on the connection it owns.


def _migrate(conn: Connection, q: _Statements) -> None:
    # Fast path: an up-to-date schema needs neither DDL rights nor the lock.
    if conn.execute(q.find_version_table, (q.version_table,)).fetchone() == (True,):
        current = conn.execute(q.read_version).fetchone()
        if current is not None and current[0] == SCHEMA_VERSION:
            return
    with conn.transaction():
        # Processes starting together queue here; each re-reads the version once it holds
        # the lock, so a migration runs exactly once.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (q.lock_name,))
        conn.execute(q.create_schema)
        conn.execute(q.create_version_table)
        row = conn.execute(q.read_version).fetchone()
        found = 0 if row is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"{q.version_table} records cognitia schema version {found}, newer than this release "
                f"understands ({SCHEMA_VERSION}); upgrade cognitia-sessions"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in q.migrations[version]:
                conn.execute(statement)
            conn.execute(q.record_version, (version,))


def _noop(conn: Connection) -> None:
    return None


def _run_reads(link: _Link, jobs: list[Job]) -> None:
    """Run queued reads, pipelined: all statements are sent at once, for one round trip."""
    conn = link.get()
    if len(jobs) == 1 or any(job.fn is not _query for job in jobs):
        for job in jobs:
            job.run(conn)
        return
    sent: list[tuple[Job, Cursor, Finish]] = []
    try:
        with conn.pipeline():
            for job in jobs:
                plan, q, *args = job.args
                statement, params, finish = plan(q, *args)
                sent.append((job, conn.execute(statement, params), finish))
    except psycopg.Error:
        # A failed statement aborts the ones sent after it; reads are safe to repeat alone.
        for job in jobs:
            job.run(conn)
        return
    for job, cursor, finish in sent:
        try:
            job.result = finish(cursor)
        except Exception as exc:
            job.error = exc


def _run_writes(link: _Link, jobs: list[Job], q: _Statements) -> None:
    """Run queued writes in one transaction, so they share one commit.

    Every write is a single statement or brings its own savepoint, so alone it runs in
    autocommit mode. Together they run without savepoints (a round trip each saved): a
    version conflict writes nothing, and in the rare case a statement fails and aborts
    the transaction, everything is rolled back and each write is run again on its own.
    With ``readers=0`` the batch holds reads too: they run in it like writes.
    """
    conn = link.get()
    if len(jobs) == 1:
        jobs[0].run(conn)
        return
    several = [job for job in jobs if job.fn is _commit_many]
    if several:
        # A commit of several sessions locks its own rows in key order, so it runs in a
        # transaction of its own: inside a batch, its rows and the batch's would no longer
        # be locked in one order.
        rest = [job for job in jobs if job.fn is not _commit_many]
        if rest:
            _run_writes(link, rest, q)
        for job in several:
            job.run(conn)
        return
    # Every batch locks its rows in key order (the sort is stable, so writes to one key keep
    # their order): batches of several processes that touch the same keys can then never
    # wait for each other in a cycle, which PostgreSQL breaks after deadlock_timeout by
    # failing one of them.
    jobs = sorted(jobs, key=_job_key)
    conn.execute("BEGIN")
    try:
        # The removed version's row is locked before every session row (see _Statements).
        lock = _removed_version_lock(jobs, q)
        if lock is not None:
            conn.execute(lock)
        failed = None
        for job in jobs:
            job.run(conn)
            if conn.closed or conn.info.transaction_status == pq.TransactionStatus.INERROR:
                failed = job
                break
        else:
            conn.execute("COMMIT")
            return
        conn.execute("ROLLBACK")
    except BaseException:
        if not conn.closed and conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        raise
    if (
        failed is not None
        and not conn.closed
        and isinstance(failed.error, pg_errors.Error)
        and not _batch_made(failed.error)
    ):
        # The statement failed on its own account (a lock waited past statement_timeout,
        # a value PostgreSQL refuses): that is its result, and running it again would only
        # make everyone wait again. The others were merely rolled back: they run again,
        # together.
        rest = [job for job in jobs if job is not failed]
        for job in rest:
            job.result = job.error = None
        _run_writes(link, rest, q)
        return
    for job in jobs:
        job.result = job.error = None
        job.run(conn)


def _batch_made(error: BaseException) -> bool:
    """Whether ``error`` may come from running with the rest of a batch, not from the statement
    itself: a deadlock or serialization failure involving the rows the batch held."""
    return isinstance(error, (pg_errors.DeadlockDetected, pg_errors.SerializationFailure))


def _removed_version_lock(jobs: list[Job], q: _Statements) -> str | None:
    """The lock on the removed version to take before running ``jobs`` together, if any.

    A job that needs the lock takes it before any session row, but in a batch the jobs
    before it may already hold rows; so unless the first job takes the strongest lock the
    batch needs, the batch takes that lock first.
    """
    needs = [_removed_version_need(job) for job in jobs if job.fn is not _noop]
    if not needs or needs[0] == max(needs):
        return None
    return q.lock_removed_version if max(needs) == 2 else q.share_removed_version


def _removed_version_need(job: Job) -> int:
    """0: the job leaves the removed version alone; 1: it reads it (shared); 2: it raises it.

    A write's first argument is the statements. ``_commit``'s fourth is the expected
    version: an overwrite (``None``) or a create (``0``) may make a new session.
    ``_prune``'s third is ``dry_run``.
    """
    if job.fn is _delete or (job.fn is _prune and not job.args[2]):
        return 2
    if job.fn is _commit and job.args[3] in (None, 0):
        return 1
    return 0


def _job_key(job: Job) -> str:
    # A write's arguments are (statements, key, ...); prune's second one is not a key.
    key = job.args[1] if len(job.args) > 1 else None
    return key if isinstance(key, str) else ""


def _query(conn: Connection, plan: Plan, q: _Statements, *args: Any) -> Any:
    statement, params, finish = plan(q, *args)
    return finish(conn.execute(statement, params))


def _row(cursor: Cursor) -> Any:
    return cursor.fetchone()


def _column(cursor: Cursor) -> list[Any]:
    return [row[0] for row in cursor.fetchall()]


def _load(q: _Statements, key: str, now: float) -> Query:
    return q.load, {"key": key, "now": now}, _row


def _commit(
    conn: Connection,
    q: _Statements,
    key: str,
    state: str,
    expected_version: int | None,
    turns: list[str],
    truncate: int | None,
    now: float,
    expires_at: float | None,
) -> int:
    kind = "overwrite" if expected_version is None else "create" if expected_version == 0 else "expect"
    # Turn rows past the new end exist only after a truncation or when an expired
    # session's row is reused; only the statements that can cause that delete them.
    trim = truncate is not None or kind != "expect"
    params = {
        "key": key,
        "state": state,
        "n": len(turns),
        "turns": turns,
        "truncate": truncate,
        "now": now,
        "expires_at": expires_at,
        "expected": expected_version,
    }
    try:
        row = conn.execute(q.commit[kind, bool(turns), trim], params).fetchone()
    except (pg_errors.UntranslatableCharacter, pg_errors.InvalidTextRepresentation):
        # jsonb refused a string (the driver's message quotes the JSON: not passed on).
        found = _unstorable_string(state, turns)
        if found is None:
            raise
        raise StateNotSerializableError(key, *found) from None
    if row is not None:
        return int(row[0])
    assert expected_version is not None  # an overwrite always returns its row
    raise _conflict(conn, q, key, expected_version, now)


def _commit_many(
    conn: Connection, q: _Statements, writes: list[EncodedWrite], now: float, expires_at: float | None
) -> list[int]:
    """Every write in one transaction, rolled back whole on a conflict or a failure.

    Rows are locked as a batch locks them: the removed version's first (shared, if a write
    may create a session), then the sessions in key order.
    """
    versions = [0] * len(writes)
    with conn.transaction():
        if any(write.expected_version in (None, 0) for write in writes):
            conn.execute(q.share_removed_version)
        done: set[int] = set()
        for i in sorted(range(len(writes)), key=lambda i: writes[i].key):
            key, state, expected_version, turns, truncate = writes[i]
            try:
                versions[i] = _commit(
                    conn, q, key, state, expected_version, list(turns), truncate, now, expires_at
                )
            except VersionConflictError:
                # Everything is rolled back; the error names the first stale session in the
                # order given, as on every backend, not the first in the order locked.
                for j in range(i):
                    if j not in done and (earlier := _stale(conn, q, writes[j], now)) is not None:
                        raise earlier from None
                raise
            done.add(i)
    return versions


def _stale(conn: Connection, q: _Statements, write: EncodedWrite, now: float) -> VersionConflictError | None:
    """The conflict ``write`` would meet now, if any."""
    if write.expected_version is None:
        return None
    error = _conflict(conn, q, write.key, write.expected_version, now)
    return error if (error.actual or 0) != write.expected_version else None


def _unstorable_string(state: str, turns: list[str]) -> tuple[str, str] | None:
    """The path of the first string in the state or turns that jsonb cannot hold, and why."""
    for root, text in (("state", state), *((f"turns[{i}]", turn) for i, turn in enumerate(turns))):
        found = find_string(loads(text), root, _jsonb_problem)
        if found is not None:
            return found
    return None


def _jsonb_problem(text: str) -> str | None:
    """Why jsonb cannot store ``text``: its strings are UTF-8 text without NUL."""
    if "\x00" in text:
        return "holds the character U+0000, which PostgreSQL jsonb cannot store"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # A surrogate that is not half of a pair (decoding joins pairs): not Unicode text.
            code = ord(text[exc.start])
            return f"holds a lone surrogate (U+{code:04X}), which PostgreSQL jsonb cannot store"
    return None


def _conflict(conn: Connection, q: _Statements, key: str, expected: int, now: float) -> VersionConflictError:
    """The error for a conditional write that matched no row, naming the version stored now."""
    found = conn.execute(q.current_version, (key,)).fetchone()
    actual = None if found is None or (found[1] is not None and found[1] <= now) else int(found[0])
    return VersionConflictError(key, expected, actual)


def _load_turns(q: _Statements, key: str, last: int | None, now: float) -> Query:
    if last is None:
        return q.turns_all, {"key": key, "now": now}, _column
    return q.turns_tail, {"key": key, "now": now, "last": last}, _column


def _delete(conn: Connection, q: _Statements, key: str, now: float, expected_version: int | None) -> bool:
    with conn.transaction():
        conn.execute(q.lock_removed_version)
        # The turns are deleted by a third statement: it starts after the second one locked
        # the session row, so it also sees turns another process committed just before.
        if expected_version is None:
            row = conn.execute(q.delete_session, {"key": key}).fetchone()
        else:
            params = {"key": key, "expected": expected_version, "now": now}
            row = conn.execute(q.delete_session_at_version, params).fetchone()
        if row is not None:
            conn.execute(q.delete_turns, (key,))
    if row is None:
        if expected_version is None:
            return False
        raise _conflict(conn, q, key, expected_version, now)
    return row[0] is None or row[0] > now


def _list_keys(q: _Statements, prefix: str, now: float) -> Query:
    low, high = prefix_bounds(prefix)
    if high is None:
        return (
            q.keys_from,
            {"low": low, "now": now},
            lambda cursor: [key for key in _column(cursor) if key.startswith(prefix)],
        )
    return q.keys_between, {"low": low, "high": high, "now": now}, _column


def _prune(conn: Connection, q: _Statements, now: float, dry_run: bool) -> list[str]:
    if dry_run:
        return [row[0] for row in conn.execute(q.expired, (now,))]
    with conn.transaction():
        conn.execute(q.lock_removed_version)
        keys = sorted(row[0] for row in conn.execute(q.delete_expired, {"now": now}))
        if keys:
            conn.execute(q.delete_turns_of, (keys,))
    return keys
