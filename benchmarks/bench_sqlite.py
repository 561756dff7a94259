"""SqliteSessionBackend against raw sqlite3 and aiosqlite, on the same kind of file, in one run.

    python benchmarks/bench_sqlite.py [--states 5000] [--tasks 200] [--cycles 10]
                                       [--repeat 3] [--cycle-runs 3]

Every subject writes the same table shape (cognitia's ``cognitia_sessions``), in WAL mode with
``synchronous=NORMAL``, and encodes/decodes the state as JSON, so the figures compare the
storage path and not the serializer. The raw loop and aiosqlite commit once per save;
cognitia commits once per save when saves arrive one at a time (the sequential scenario),
and puts the saves queued while it commits into one transaction (the concurrent one):

- raw sqlite3: a plain synchronous loop, ``execute`` + ``commit`` per save, ``execute`` +
  ``fetchone`` per load. The per-operation floor of a single connection.
- aiosqlite (asyncio only; it does not run on trio): idiomatic use, one connection,
  ``await db.execute(...)`` + ``await db.commit()`` per save, ``execute`` + ``fetchone`` per load.
- cognitia: ``await backend.save(key, state)`` / ``await backend.load(key)``.

Scenarios: sequential saves then loads of ``--states`` 1 KB states; then ``--tasks``
concurrent tasks each doing ``--cycles`` save+load cycles on its own key (the raw loop runs
the same number of cycles one after another, which is the per-operation baseline).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from _common import Row, header, positive, print_table, quiet_structlog

from cognitia.session.backends import SqliteSessionBackend
from cognitia.session.backends._sqlite import _MIGRATIONS

# The same table cognitia creates, so the figures compare the access path, not the schema.
TABLE = _MIGRATIONS[1][0]
UPSERT = (
    "INSERT INTO cognitia_sessions (key, state, version, turn_count, created_at, updated_at, expires_at) "
    "VALUES (?, ?, 1, 0, ?, ?, NULL) ON CONFLICT (key) DO UPDATE SET "
    "state = excluded.state, version = version + 1, updated_at = excluded.updated_at"
)
SELECT = "SELECT state FROM cognitia_sessions WHERE key = ?"


def make_state(i: int) -> dict[str, Any]:
    """A state whose JSON encoding is about 1 KB."""
    state: dict[str, Any] = {"user": f"user-{i}", "step": i, "notes": []}
    while len(json.dumps(state)) < 1000:
        state["notes"].append({"role": "assistant", "text": "lorem ipsum dolor sit amet " * 2})
    return state


STATES = [make_state(i) for i in range(16)]


def state_for(i: int) -> dict[str, Any]:
    return STATES[i % len(STATES)]


# -- raw sqlite3 ------------------------------------------------------------------------------


def raw_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(TABLE)
    conn.commit()
    return conn


def raw_save(conn: sqlite3.Connection, key: str, state: dict[str, Any]) -> None:
    now = time.time()
    conn.execute(UPSERT, (key, json.dumps(state), now, now))
    conn.commit()


def raw_load(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute(SELECT, (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def raw_sequential(path: Path, n: int) -> tuple[float, float]:
    conn = raw_connect(path)
    t0 = time.perf_counter()
    for i in range(n):
        raw_save(conn, f"key-{i}", state_for(i))
    t1 = time.perf_counter()
    for i in range(n):
        assert raw_load(conn, f"key-{i}") is not None
    t2 = time.perf_counter()
    conn.close()
    return t1 - t0, t2 - t1


def raw_cycles(path: Path, tasks: int, cycles: int) -> float:
    conn = raw_connect(path)
    t0 = time.perf_counter()
    for t in range(tasks):
        key = f"task-{t}"
        for c in range(cycles):
            raw_save(conn, key, state_for(c))
            assert raw_load(conn, key) is not None
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


# -- aiosqlite --------------------------------------------------------------------------------


async def aiosqlite_connect(path: Path) -> Any:
    import aiosqlite

    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute("PRAGMA synchronous = NORMAL")
    await db.execute(TABLE)
    await db.commit()
    return db


async def aiosqlite_save(db: Any, key: str, state: dict[str, Any]) -> None:
    now = time.time()
    await db.execute(UPSERT, (key, json.dumps(state), now, now))
    await db.commit()


async def aiosqlite_load(db: Any, key: str) -> dict[str, Any] | None:
    async with db.execute(SELECT, (key,)) as cursor:
        row = await cursor.fetchone()
    return None if row is None else json.loads(row[0])


async def aiosqlite_sequential(path: Path, n: int) -> tuple[float, float]:
    db = await aiosqlite_connect(path)
    t0 = time.perf_counter()
    for i in range(n):
        await aiosqlite_save(db, f"key-{i}", state_for(i))
    t1 = time.perf_counter()
    for i in range(n):
        assert await aiosqlite_load(db, f"key-{i}") is not None
    t2 = time.perf_counter()
    await db.close()
    return t1 - t0, t2 - t1


async def aiosqlite_cycles(path: Path, tasks: int, cycles: int) -> float:
    db = await aiosqlite_connect(path)

    async def task(t: int) -> None:
        key = f"task-{t}"
        for c in range(cycles):
            await aiosqlite_save(db, key, state_for(c))
            assert await aiosqlite_load(db, key) is not None

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for t in range(tasks):
            tg.start_soon(task, t)
    elapsed = time.perf_counter() - t0
    await db.close()
    return elapsed


# -- cognitia ---------------------------------------------------------------------------------


async def cognitia_sequential(path: Path, n: int) -> tuple[float, float]:
    backend = SqliteSessionBackend(db_path=path)
    await backend.save("warm-up", {})  # opens the file and creates the schema
    t0 = time.perf_counter()
    for i in range(n):
        await backend.save(f"key-{i}", state_for(i))
    t1 = time.perf_counter()
    for i in range(n):
        assert await backend.load(f"key-{i}") is not None
    t2 = time.perf_counter()
    await backend.aclose()
    return t1 - t0, t2 - t1


async def cognitia_cycles(path: Path, tasks: int, cycles: int) -> float:
    backend = SqliteSessionBackend(db_path=path)
    await backend.save("warm-up", {})
    await backend.load("warm-up")

    async def task(t: int) -> None:
        key = f"task-{t}"
        for c in range(cycles):
            await backend.save(key, state_for(c))
            assert await backend.load(key) is not None

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for t in range(tasks):
            tg.start_soon(task, t)
    elapsed = time.perf_counter() - t0
    await backend.aclose()
    return elapsed


# -- the run ----------------------------------------------------------------------------------


class Files:
    """A fresh database file for every measurement."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0

    def __call__(self) -> Path:
        self.n += 1
        return self.root / f"bench-{self.n}.db"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=positive, default=5000)
    parser.add_argument("--tasks", type=positive, default=200)
    parser.add_argument("--cycles", type=positive, default=10)
    parser.add_argument("--repeat", type=positive, default=3, help="best of this many rounds per figure")
    parser.add_argument(
        "--cycle-runs", type=positive, default=3, help="runs of the concurrent scenario per round (best kept)"
    )
    args = parser.parse_args()
    quiet_structlog()
    header("bench_sqlite: SqliteSessionBackend vs raw sqlite3 vs aiosqlite")
    size = len(json.dumps(STATES[0]))
    print(
        f"{args.states} sequential saves then loads of ~{size} B states; {args.tasks} concurrent tasks x "
        f"{args.cycles} save+load cycles on their own keys (best of {args.cycle_runs} runs per round); "
        f"best of {args.repeat} interleaved rounds; "
        "WAL, synchronous=NORMAL; raw sqlite3 and aiosqlite commit once per save, cognitia once per\n"
        "save when saves come one at a time and once per batch of queued saves under concurrency.\n"
    )
    try:
        import aiosqlite  # noqa: F401

        have_aiosqlite = True
    except ImportError:
        have_aiosqlite = False
        print("aiosqlite is not installed: its rows are skipped (pip install aiosqlite)\n")

    n, tasks, cycles = args.states, args.tasks, args.cycles
    ops = tasks * cycles * 2

    def best_of(runs: int, run: Any) -> Any:
        # The concurrent scenario takes some 60 ms: a single scheduler hiccup on a shared VM
        # is a large share of it, so each round keeps the best of a few runs (for every subject).
        return lambda p: min(run(p.with_name(f"{p.stem}-{i}.db")) for i in range(runs))

    # Every subject runs once per round and the rounds are interleaved, so a burst of load
    # from elsewhere on the machine hits all subjects alike; each figure is its best round.
    subjects: dict[str, Any] = {
        "seq raw": lambda p: raw_sequential(p, n),
        "seq cognitia asyncio": lambda p: anyio.run(cognitia_sequential, p, n, backend="asyncio"),
        "seq cognitia trio": lambda p: anyio.run(cognitia_sequential, p, n, backend="trio"),
        "cyc raw": best_of(args.cycle_runs, lambda p: raw_cycles(p, tasks, cycles)),
        "cyc cognitia asyncio": best_of(
            args.cycle_runs, lambda p: anyio.run(cognitia_cycles, p, tasks, cycles, backend="asyncio")
        ),
        "cyc cognitia trio": best_of(
            args.cycle_runs, lambda p: anyio.run(cognitia_cycles, p, tasks, cycles, backend="trio")
        ),
    }
    if have_aiosqlite:
        subjects["seq aiosqlite"] = lambda p: anyio.run(aiosqlite_sequential, p, n, backend="asyncio")
        subjects["cyc aiosqlite"] = best_of(
            args.cycle_runs, lambda p: anyio.run(aiosqlite_cycles, p, tasks, cycles, backend="asyncio")
        )
    results: dict[str, list[Any]] = {name: [] for name in subjects}
    with tempfile.TemporaryDirectory(prefix="cognitia-bench-") as tmp:
        fresh = Files(Path(tmp))
        for _ in range(args.repeat):
            for name, run in subjects.items():
                results[name].append(run(fresh()))

    def seq(name: str) -> tuple[float, float]:
        return min(r[0] for r in results[name]), min(r[1] for r in results[name])

    def cyc(name: str) -> float:
        return min(results[name])

    ref_seq = "|aiosqlite|asyncio" if have_aiosqlite else "|raw sqlite3|-"
    seq_target = 1.0 if have_aiosqlite else None
    rows: list[Row] = []
    for column, scenario in ((0, "sequential save"), (1, "sequential load")):
        rows.append(Row(scenario, "raw sqlite3", "-", n, seq("seq raw")[column]))
        if have_aiosqlite:
            rows.append(
                Row(
                    scenario,
                    "aiosqlite",
                    "asyncio",
                    n,
                    seq("seq aiosqlite")[column],
                    reference="|raw sqlite3|-",
                )
            )
        rows.append(
            Row(
                scenario,
                "cognitia",
                "asyncio",
                n,
                seq("seq cognitia asyncio")[column],
                reference=ref_seq,
                target=seq_target,
                also="|raw sqlite3|-" if have_aiosqlite else None,
            )
        )
        rows.append(
            Row(
                scenario,
                "cognitia",
                "trio",
                n,
                seq("seq cognitia trio")[column],
                reference="|cognitia|asyncio",
                target=0.85,
            )
        )
    scenario = f"{tasks} tasks x {cycles} cycles"
    rows.append(Row(scenario, "raw sqlite3 loop", "-", ops, cyc("cyc raw")))
    if have_aiosqlite:
        rows.append(
            Row(scenario, "aiosqlite", "asyncio", ops, cyc("cyc aiosqlite"), reference="|raw sqlite3 loop|-")
        )
    for rt in ("asyncio", "trio"):
        rows.append(
            Row(
                scenario,
                "cognitia",
                rt,
                ops,
                cyc(f"cyc cognitia {rt}"),
                reference="|raw sqlite3 loop|-",
                target=1.0,
            )
        )
    rows.append(
        Row(
            scenario,
            "cognitia",
            "trio",
            ops,
            cyc("cyc cognitia trio"),
            reference="|cognitia|asyncio",
            target=0.85,
        )
    )

    print("ops = saves or loads (a cycle is one of each); ratio = ops/s divided by the reference's ops/s\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
