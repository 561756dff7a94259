"""A worker process for tests/test_multiprocess.py: one agent server among several.

Run as ``python mp_worker.py '<json spec>'``. It serves ``@persisted_session`` calls on the
backend the spec names and takes its orders from stdin, one JSON object per line:

- ``{"op": "round", "keys": [...], "seq": t}``: one call (turn ``t``) per key, concurrently;
- ``{"op": "hammer", "keys": [...], "count": n}``: per key, ``n`` calls in sequence, all keys
  concurrently (other workers hammer the same keys at the same time);
- ``{"op": "stream", "keys": [...]}``: per key, calls 1, 2, 3, ... forever, printing
  ``{"key": k, "acked": n}`` (flushed) as soon as call ``n`` has returned, i.e. is stored;
- ``{"op": "exit"}``.

After each order it prints ``{"done": op, "conflicts": c}``, ``c`` being the version
conflicts the manager reported (and the decorator retried) so far.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog

from cognitia import Session, persisted_session
from cognitia.session.backends import SessionBackend
from cognitia.session.manager import InMemorySessionManager


def open_backend(spec: dict[str, Any]) -> SessionBackend:
    kind = spec["kind"]
    if kind == "sqlite":
        from cognitia.session.backends import SqliteSessionBackend

        return SqliteSessionBackend(spec["path"], busy_timeout=30.0)
    if kind == "postgres":
        from cognitia.session.backends import PostgresSessionBackend

        return PostgresSessionBackend(spec["dsn"], schema=spec["schema"])
    if kind == "redis":
        from cognitia.session.backends import RedisSessionBackend

        return RedisSessionBackend(spec["url"], key_prefix=spec["prefix"])
    raise ValueError(f"unknown backend kind {kind!r}")


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def serve(spec: dict[str, Any]) -> None:
    worker: int = spec["worker"]
    backend = open_backend(spec)
    manager = InMemorySessionManager(backend, max_sessions=100_000)
    conflicts = 0

    def count_conflict(event: object) -> None:
        nonlocal conflicts
        conflicts += 1

    manager.on("conflict", count_conflict)

    @persisted_session(manager, key="session_id", retries=spec.get("retries", 500))
    async def handle(session_id: str, seq: int, worker: int, *, session: Session) -> int:
        count: int = session.state.get("count", 0) + 1
        session.state["count"] = count
        session.state["last"] = [worker, seq]
        await anyio.lowlevel.checkpoint()  # let other calls interleave, as a real handler would
        return count

    async def hammer(key: str, count: int) -> None:
        for seq in range(count):
            await handle(key, seq, worker)

    async def stream(key: str) -> None:
        seq = 0
        while True:
            seq += 1
            stored = await handle(key, seq, worker)
            say({"key": key, "acked": stored})

    try:
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            order = json.loads(line)
            op = order["op"]
            if op == "exit":
                say({"done": op, "conflicts": conflicts})
                return
            async with anyio.create_task_group() as tg:
                for key in order["keys"]:
                    if op == "round":
                        tg.start_soon(handle, key, order["seq"], worker)
                    elif op == "hammer":
                        tg.start_soon(hammer, key, order["count"])
                    elif op == "stream":
                        tg.start_soon(stream, key)
                    else:
                        raise ValueError(f"unknown order {op!r}")
            say({"done": op, "conflicts": conflicts})
    finally:
        await manager.aclose()
        await backend.aclose()  # type: ignore[attr-defined]


def main() -> None:
    # An application's choice: stdout carries the protocol, so warnings go to stderr.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    spec = json.loads(sys.argv[1])
    anyio.run(serve, spec, backend=spec.get("runtime", "asyncio"))


if __name__ == "__main__":
    main()
