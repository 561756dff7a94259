"""PostgresSessionBackend against psycopg used directly, in one run, on one server.

Three operations, each as the backend does it and as a hand-written psycopg program
would (the same statements on the same tables, one connection, autocommit, one commit
per operation):

- save:   an upsert of the state (``INSERT ... ON CONFLICT DO UPDATE``)
- load:   a ``SELECT`` of the state, decoded to a dict
- append: the upsert plus the insert of one turn row, in one transaction

Each runs with 1 task (sequential: latency) and with 200 concurrent tasks (throughput).
The backend runs on asyncio and on trio; psycopg's AsyncConnection runs on asyncio only.
The ratio is the backend's throughput over the direct driver's (higher is better).

    COGNITIA_TEST_POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test \\
        python benchmarks/bench_postgres.py

It works in a schema of its own (``--schema``), dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
from _common import TURN, key, make_state, positive, quiet_structlog
from psycopg import sql

from cognitia.session.backends import PostgresSessionBackend

Op = Callable[[int, int], Awaitable[object]]
"""One operation: ``op(task, i)``."""


async def run(op: Op, tasks: int, ops_per_task: int) -> float:
    """Operations per second of ``tasks`` tasks each running ``op`` ``ops_per_task`` times."""

    async def worker(task: int) -> None:
        for i in range(ops_per_task):
            await op(task, i)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for task in range(tasks):
            tg.start_soon(worker, task)
    return tasks * ops_per_task / (time.perf_counter() - started)


class Direct:
    """The same statements through one psycopg AsyncConnection (asyncio only)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], schema: str) -> None:
        self.conn = conn
        # psycopg serializes single statements on a shared connection, but not transactions:
        # tasks sharing one connection must take turns for the two-statement append.
        self.lock = anyio.Lock()
        sessions = sql.Identifier(schema, "cognitia_sessions")
        turns = sql.Identifier(schema, "cognitia_turns")
        self.upsert = sql.SQL(
            "INSERT INTO {} AS s (key, state, version, turn_count, created_at, updated_at, expires_at) "
            "VALUES (%s, %s::jsonb, 1, %s, %s, %s, NULL) "
            "ON CONFLICT (key) DO UPDATE SET state = excluded.state, version = s.version + 1, "
            "turn_count = s.turn_count + excluded.turn_count, updated_at = excluded.updated_at "
            "RETURNING version, turn_count"
        ).format(sessions)
        self.insert_turn = sql.SQL("INSERT INTO {} (key, seq, turn) VALUES (%s, %s, %s::jsonb)").format(turns)
        self.select = sql.SQL(
            "SELECT state FROM {} WHERE key = %s AND (expires_at IS NULL OR expires_at > %s)"
        ).format(sessions)

    async def save(self, task: int, i: int) -> object:
        now = time.time()
        await self.conn.execute(self.upsert, (key(task, i), json.dumps(make_state(i)), 0, now, now))
        return None

    async def load(self, task: int, i: int) -> object:
        cur = await self.conn.execute(self.select, (key(task, i), time.time()))
        row = await cur.fetchone()
        assert row is not None and isinstance(row[0], dict)
        return row[0]

    async def append(self, task: int, i: int) -> object:
        now = time.time()
        async with self.lock, self.conn.transaction():
            cur = await self.conn.execute(self.upsert, (key(task, i), json.dumps(make_state(i)), 1, now, now))
            row = await cur.fetchone()
            assert row is not None
            await self.conn.execute(self.insert_turn, (key(task, i), row[1] - 1, json.dumps(TURN)))
        return None


class ViaBackend:
    def __init__(self, backend: PostgresSessionBackend) -> None:
        self.backend = backend

    async def save(self, task: int, i: int) -> object:
        await self.backend.save(key(task, i), make_state(i))
        return None

    async def load(self, task: int, i: int) -> object:
        state = await self.backend.load(key(task, i))
        assert state is not None
        return state

    async def append(self, task: int, i: int) -> object:
        return await self.backend.commit(key(task, i), make_state(i), turns=[TURN])


OPS = ("save", "load", "append")


async def measure(subject: Any, tasks: int, total: int) -> dict[str, float]:
    """Ops/s of each operation; saves first, so loads find their keys."""
    # Warm up: open the connections and let psycopg prepare its statements.
    for name in OPS:
        await run(getattr(subject, name), min(tasks, 20), 10)
    return {name: await run(getattr(subject, name), tasks, max(1, total // tasks)) for name in OPS}


async def direct_main(dsn: str, schema: str, tasks: int, total: int, readers: int) -> dict[str, float]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await measure(Direct(conn, schema), tasks, total)


async def backend_main(dsn: str, schema: str, tasks: int, total: int, readers: int) -> dict[str, float]:
    async with PostgresSessionBackend(dsn, schema=schema, readers=readers) as backend:
        return await measure(ViaBackend(backend), tasks, total)


SUBJECTS = (
    # (label, main, runtime)
    ("psycopg direct (asyncio)", direct_main, "asyncio"),
    ("backend (asyncio)", backend_main, "asyncio"),
    ("backend (trio)", backend_main, "trio"),
)


async def prepare(dsn: str, schema: str) -> None:
    # The backend creates the tables the direct program uses too.
    async with PostgresSessionBackend(dsn, schema=schema) as backend:
        await backend.save("agent:bench:warmup", {})


def reset(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("cognitia_turns", "cognitia_sessions"):
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(schema, table)))


def drop(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("COGNITIA_TEST_POSTGRES_DSN"))
    parser.add_argument("--schema", default="cognitia_bench")
    parser.add_argument("--sequential-ops", type=positive, default=1000)
    parser.add_argument("--concurrent-ops", type=positive, default=4000)
    parser.add_argument("--tasks", type=positive, default=200)
    parser.add_argument("--rounds", type=positive, default=5)
    parser.add_argument("--readers", type=positive, default=1)
    args = parser.parse_args()
    quiet_structlog()
    if not args.dsn:
        print("set COGNITIA_TEST_POSTGRES_DSN (or pass --dsn) to a PostgreSQL server to benchmark against")
        return 2

    drop(args.dsn, args.schema)
    anyio.run(prepare, args.dsn, args.schema)
    all_met = True
    print(
        f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), server {server_version(args.dsn)}, "
        f"readers={args.readers}, rounds={args.rounds} (median)"
    )
    try:
        for label, tasks, total in (
            ("1 task", 1, args.sequential_ops),
            (f"{args.tasks} tasks", args.tasks, args.concurrent_ops),
        ):
            # Rounds interleave the subjects, so a slow spell of the machine (fsync latency
            # varies a lot on shared disks) hits them alike; each figure is a median.
            samples: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in SUBJECTS}
            for _ in range(args.rounds):
                for name, subject_main, runtime in SUBJECTS:
                    reset(args.dsn, args.schema)
                    samples[name].append(
                        anyio.run(
                            subject_main, args.dsn, args.schema, tasks, total, args.readers, backend=runtime
                        )
                    )
            results = {
                name: {op: statistics.median(r[op] for r in runs) for op in OPS}
                for name, runs in samples.items()
            }
            direct = results[SUBJECTS[0][0]]
            target = 0.7 if tasks == 1 else 1.0
            print(f"\n{label}, {total} operations each (ops/s; ratio = backend / direct; target {target}x)")
            print(f"  {'':28}{'save':>16}{'load':>16}{'append':>16}")
            for name, result in results.items():
                base = None if result is direct else direct
                cells = "".join(
                    f"{result[op]:>9.0f}" + (f" {result[op] / base[op]:>5.2f}x" if base else " " * 7)
                    for op in OPS
                )
                print(f"  {name:28}{cells}")
                if base is not None:
                    missed = [op for op in OPS if result[op] / base[op] < target]
                    all_met &= not missed
                    verdict = f"MISSED for {', '.join(missed)}" if missed else "met"
                    print(f"  {'':28}target >= {target}x: {verdict}")
    finally:
        drop(args.dsn, args.schema)
    print("\nall targets met" if all_met else "\nSOME TARGETS MISSED")
    return 0


def server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
