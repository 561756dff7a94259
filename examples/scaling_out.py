"""Several worker processes share sessions in PostgreSQL; versions keep their updates whole.

    COGNITIA_POSTGRES_DSN=postgresql://app@localhost/app python examples/scaling_out.py [--runtime trio]

Four worker processes each add 25 points to one shared session through
``manager.update()`` at the same time. Their saves collide; each collision is refused
with a version conflict (printed as a ``conflict`` event) and the update is re-applied
on the fresh state, so the total comes out exact: 100. Then a store with a short TTL shows
expiry and ``prune(dry_run=True)``.

Needs the ``postgres`` extra (``pip install 'cognitia-sessions[postgres]'``). Without
``COGNITIA_POSTGRES_DSN`` it says so and exits (status 0). It works in the schema
``cognitia_example`` and deletes its sessions when done.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import anyio
import structlog

from cognitia import InMemorySessionManager, Session
from cognitia.session.backends import PostgresSessionBackend
from cognitia.session.manager import SessionEvent

SCHEMA = "cognitia_example"
KEY = "shared:scoreboard"
WORKERS = 4
POINTS = 25


async def worker(dsn: str, number: int) -> None:
    """One worker process: add POINTS points, one update at a time."""
    async with PostgresSessionBackend(dsn, schema=SCHEMA) as backend:
        manager = InMemorySessionManager(backend, retries=50)
        conflicts = 0

        def count_conflict(event: SessionEvent) -> None:
            nonlocal conflicts
            conflicts += 1

        manager.on("conflict", count_conflict)

        def add_point(session: Session) -> None:
            state = session.state
            state["points"] = state.get("points", 0) + 1
            state.setdefault("by_worker", {}).setdefault(str(number), 0)
            state["by_worker"][str(number)] += 1

        for _ in range(POINTS):
            await manager.update(KEY, add_point)
        print(f"  worker {number} (pid {os.getpid()}): {POINTS} updates, {conflicts} conflicts retried")


async def main(dsn: str, runtime: str) -> None:
    async with PostgresSessionBackend(dsn, schema=SCHEMA) as backend:
        await backend.delete(KEY)

        print(f"{WORKERS} worker processes update {KEY!r} at once ({runtime}):")
        async with anyio.create_task_group() as tg:
            for number in range(WORKERS):
                command = [sys.executable, __file__, "--worker", str(number), "--runtime", runtime]
                tg.start_soon(_run, command)

        record = await backend.load_record(KEY)
        assert record is not None
        state = record.state
        print(f"stored: points={state['points']} version={record.version} by_worker={state['by_worker']}")
        assert record.state["points"] == WORKERS * POINTS, "an update was lost"
        await backend.delete(KEY)

    print("\nretention: a store whose sessions expire 1 second after their last save")
    async with PostgresSessionBackend(dsn, schema=SCHEMA, table_prefix="short_lived_", ttl=1) as backend:
        await backend.save("agent:draft", {"note": "expires soon"})
        print(f"  just saved: load() -> {await backend.load('agent:draft')}")
        await anyio.sleep(1.2)
        print(
            f"  1.2 s later: load() -> {await backend.load('agent:draft')} (expired sessions are invisible)"
        )
        print(f"  prune(dry_run=True) -> {await backend.prune(dry_run=True)} (reported, still stored)")
        print(f"  prune() -> {await backend.prune()} (deleted)")


async def _run(command: list[str]) -> None:
    result = await anyio.run_process(command, stdout=None, stderr=None, check=True)
    assert result.returncode == 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runtime", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dsn = os.environ.get("COGNITIA_POSTGRES_DSN")
    if not dsn:
        print(
            "This example needs PostgreSQL: set COGNITIA_POSTGRES_DSN, e.g.\n"
            "  COGNITIA_POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test \\\n"
            "      python examples/scaling_out.py\n"
            "(and pip install 'cognitia-sessions[postgres]'). Skipping."
        )
        sys.exit(0)
    # Only the counts matter here: hide the per-save lifecycle events (an application's choice).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()
    if args.worker is not None:
        anyio.run(worker, dsn, args.worker, backend=args.runtime)
    else:
        anyio.run(main, dsn, args.runtime, backend=args.runtime)
        print(f"\ndone in {time.perf_counter() - started:.1f} s")
