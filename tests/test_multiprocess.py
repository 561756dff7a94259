"""Several worker processes share one store through ``@persisted_session``; nothing is lost.

Each test starts real processes (``tests/workers/mp_worker.py`` under ``sys.executable``),
half of them on asyncio and half on trio, over one SQLite file, one PostgreSQL schema or one
Redis key prefix, and checks afterwards, through a fresh backend, what was stored.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import anyio
import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "workers" / "mp_worker.py"
WORKERS = 4
SESSIONS = 200
TURNS = 20
HAMMER_KEYS = 8
HAMMER_CALLS = 25
"""Calls per worker per hammered key: every worker hammers every one of these keys at once."""
STREAM_KEYS = 4
KILL_AFTER = 60
"""Acknowledged saves (over all streamed keys) before the streaming worker is killed."""
DEADLINE = 60.0
"""Seconds a worker may take to answer one order before the test gives up on it."""


class Worker:
    """One worker process, spoken to in JSON lines."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buffer = b""

    def send(self, **order: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(order).encode() + b"\n")
        self.proc.stdin.flush()

    def read(self, deadline: float | None = None) -> dict[str, Any] | None:
        """The next line the worker printed, or ``None`` at end of output."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + DEADLINE if deadline is None else deadline
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.fail("did not answer in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def expect_done(self, op: str) -> int:
        reply = self.read()
        if reply is None or reply.get("done") != op:
            self.fail(f"answered {reply!r} to {op!r}")
        return int(reply["conflicts"])

    def fail(self, what: str) -> NoReturn:
        self.proc.kill()
        _, err = self.proc.communicate()
        pytest.fail(f"worker {self.spec['worker']} ({self.spec['runtime']}) {what}:\n{err.decode()[-3000:]}")

    def finish(self) -> int:
        self.send(op="exit")
        conflicts = self.expect_done("exit")
        assert self.proc.wait(timeout=DEADLINE) == 0
        return conflicts


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The spec of a fresh shared store, as workers receive it; dropped after the test."""
    kind = request.param
    if kind == "sqlite":
        return {"kind": "sqlite", "path": str(tmp_path / "shared.db")}
    if kind == "postgres":
        schema = request.getfixturevalue("postgres_schemas")()
        return {"kind": "postgres", "dsn": request.getfixturevalue("postgres_dsn"), "schema": schema}
    return {
        "kind": "redis",
        "url": request.getfixturevalue("redis_url"),
        "prefix": request.getfixturevalue("redis_prefix"),
    }


def start_workers(store: dict[str, Any], count: int) -> list[Worker]:
    return [Worker({**store, "worker": w, "runtime": ("asyncio", "trio")[w % 2]}) for w in range(count)]


def inspect(store: dict[str, Any], keys: list[str]) -> dict[str, tuple[Any, list[dict[str, Any]]]]:
    """Each key's stored record and turns, read by a backend of this process."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from mp_worker import open_backend
    finally:
        sys.path.remove(str(WORKER.parent))

    async def read_all() -> dict[str, tuple[Any, list[dict[str, Any]]]]:
        backend: Any = open_backend(store)
        try:
            return {key: (await backend.load_record(key), await backend.load_turns(key)) for key in keys}
        finally:
            await backend.aclose()

    return anyio.run(read_all)


def test_workers_sharing_a_store_keep_every_turn_in_order(
    store: dict[str, Any], record_property: Any
) -> None:
    started = time.perf_counter()
    workers = start_workers(store, WORKERS)
    sessions = [f"agent:mp:{s:03d}" for s in range(SESSIONS)]
    hammered = [f"agent:hammer:{k}" for k in range(HAMMER_KEYS)]
    try:
        # Turn t of session s is served by worker (s + t) % 4: every session moves from
        # worker to worker, and each worker still holds the copy it saw 4 turns ago.
        for seq in range(TURNS):
            for w, worker in enumerate(workers):
                mine = [key for s, key in enumerate(sessions) if (s + seq) % WORKERS == w]
                worker.send(op="round", keys=mine, seq=seq)
            sequenced_conflicts = sum(worker.expect_done("round") for worker in workers)
        sequenced_at = time.perf_counter()
        for worker in workers:
            worker.send(op="hammer", keys=hammered, count=HAMMER_CALLS)
        hammer_conflicts = sum(worker.expect_done("hammer") for worker in workers) - sequenced_conflicts
        assert sum(worker.finish() for worker in workers) == sequenced_conflicts + hammer_conflicts
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
    elapsed = time.perf_counter() - started
    sequenced = sequenced_at - started

    stored = inspect(store, sessions + hammered)
    for s, key in enumerate(sessions):
        record, turns = stored[key]
        assert record is not None, key
        assert (record.version, record.turn_count, len(turns)) == (TURNS, TURNS, TURNS), key
        assert record.state == {"count": TURNS, "last": [(s + TURNS - 1) % WORKERS, TURNS - 1]}, key
        assert [t["input"]["seq"] for t in turns] == list(range(TURNS)), key
        assert [t["input"]["worker"] for t in turns] == [(s + t) % WORKERS for t in range(TURNS)], key
        assert [t["output"] for t in turns] == list(range(1, TURNS + 1)), key
    calls = WORKERS * HAMMER_CALLS
    for key in hammered:
        record, turns = stored[key]
        assert record is not None, key
        assert (record.version, record.turn_count, len(turns), record.state["count"]) == (calls,) * 4, key
        assert [t["output"] for t in turns] == list(range(1, calls + 1)), f"{key}: a count was lost"
        for w in range(WORKERS):
            seqs = [t["input"]["seq"] for t in turns if t["input"]["worker"] == w]
            assert seqs == list(range(HAMMER_CALLS)), f"{key}: worker {w}'s calls stored as {seqs}"

    # Every revisit of a session by a worker finds its cached copy stale: a real conflict.
    assert sequenced_conflicts > 0
    assert hammer_conflicts > 0
    report = (
        f"{store['kind']}: {WORKERS} workers, {SESSIONS} sessions x {TURNS} turns + "
        f"{HAMMER_KEYS} keys x {calls} hammered calls in {elapsed:.1f}s ({sequenced:.1f}s sequenced, "
        f"including process start); conflicts retried: "
        f"{sequenced_conflicts} (sequenced), {hammer_conflicts} (hammer)"
    )
    record_property("multiprocess", report)
    print(report)


def test_a_killed_worker_loses_no_acknowledged_save(store: dict[str, Any], record_property: Any) -> None:
    (worker,) = start_workers(store, 1)
    keys = [f"agent:stream:{k}" for k in range(STREAM_KEYS)]
    acked = dict.fromkeys(keys, 0)
    try:
        worker.send(op="stream", keys=keys)
        for _ in range(KILL_AFTER):
            reply = worker.read()
            if reply is None:
                worker.fail("stopped streaming")
            acked[reply["key"]] = max(acked[reply["key"]], reply["acked"])
        # Saves are in flight now (the worker starts the next one as soon as one returns).
        worker.proc.send_signal(signal.SIGKILL)
        assert worker.proc.wait(timeout=DEADLINE) == -signal.SIGKILL
        # Acknowledgements printed before the kill count too.
        while (reply := worker.read()) is not None:
            acked[reply["key"]] = max(acked[reply["key"]], reply["acked"])
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()

    stored = inspect(store, keys)
    beyond = 0
    for key in keys:
        record, turns = stored[key]
        assert record is not None, key
        assert record.version >= acked[key], (
            f"{key}: acknowledged version {acked[key]}, stored {record.version}"
        )
        # One turn per save: anything half-written would break one of these equalities.
        assert record.turn_count == len(turns) == record.version == record.state["count"], key
        assert [t["input"]["seq"] for t in turns] == list(range(1, record.version + 1)), key
        beyond += record.version - acked[key]
    report = (
        f"{store['kind']}: killed after {sum(acked.values())} acknowledged saves, all stored; "
        f"{beyond} more were stored but not yet acknowledged"
    )
    record_property("sigkill", report)
    print(report)
