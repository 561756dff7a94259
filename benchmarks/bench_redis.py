"""RedisSessionBackend against async Redis drivers used directly, in one run, on one server.

Three operations, each as the backend does it and as a hand-written driver program would
(one request, i.e. one round trip, per operation; JSON encoding and decoding included):

- save:   backend ``save`` (one Lua script: version, state, index)  vs  ``SET``
- load:   backend ``load`` (``HMGET``)                              vs  ``GET``
- append: backend ``commit(turns=[turn])`` (one Lua script)         vs  ``SET`` + ``RPUSH`` pipelined

Each runs with 1 task (sequential: latency) and with 200 concurrent tasks (throughput), on
asyncio and on trio. The direct drivers are coredis (both runtimes) and redis.asyncio
(asyncio only). The ratio is the backend's throughput over coredis' in the same runtime
(higher is better). Rounds are interleaved and the best round of each subject is kept.

    COGNITIA_TEST_REDIS_URL=redis://127.0.0.1:6379/0 python benchmarks/bench_redis.py

Every key lives under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import coredis
import redis
import redis.asyncio
from _common import TURN, Row, header, key, make_state, positive, print_table, quiet_structlog

from cognitia.session.backends import RedisSessionBackend

Op = Callable[[int, int], Awaitable[object]]
"""One operation: ``op(task, i)``."""
Subject = Callable[[str], Any]
"""Given a key prefix, an async context manager yielding ``{"save": op, "load": op, "append": op}``."""

OPERATIONS = ("save", "load", "append")
TARGETS = {1: 0.7, 200: 1.0}


@asynccontextmanager
async def cognitia_subject(url: str, prefix: str) -> AsyncIterator[dict[str, Op]]:
    async with RedisSessionBackend(url, key_prefix=prefix) as backend:

        async def save(task: int, i: int) -> None:
            await backend.save(key(task, i), make_state(i))

        async def load(task: int, i: int) -> None:
            assert await backend.load(key(task, i)) is not None

        async def append(task: int, i: int) -> None:
            await backend.commit(key(task, i), make_state(i), turns=[TURN])

        yield {"save": save, "load": load, "append": append}


@asynccontextmanager
async def coredis_subject(url: str, prefix: str) -> AsyncIterator[dict[str, Op]]:
    client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
    async with client:

        async def save(task: int, i: int) -> None:
            await client.set(prefix + key(task, i), json.dumps(make_state(i)))

        async def load(task: int, i: int) -> None:
            raw = await client.get(prefix + key(task, i))
            assert raw is not None and json.loads(raw)

        async def append(task: int, i: int) -> None:
            k = prefix + key(task, i)
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(k, json.dumps(make_state(i)))
                pipe.rpush(k + ":turns", [json.dumps(TURN)])

        yield {"save": save, "load": load, "append": append}


@asynccontextmanager
async def redis_asyncio_subject(url: str, prefix: str) -> AsyncIterator[dict[str, Op]]:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, decode_responses=True, max_connections=64)
    client = redis.asyncio.Redis(connection_pool=pool)
    try:

        async def save(task: int, i: int) -> None:
            await client.set(prefix + key(task, i), json.dumps(make_state(i)))

        async def load(task: int, i: int) -> None:
            raw = await client.get(prefix + key(task, i))
            assert raw is not None and json.loads(raw)

        async def append(task: int, i: int) -> None:
            k = prefix + key(task, i)
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(k, json.dumps(make_state(i)))
                pipe.rpush(k + ":turns", json.dumps(TURN))
                await pipe.execute()

        yield {"save": save, "load": load, "append": append}
    finally:
        await client.aclose()
        await pool.aclose()


async def timed(op: Op, tasks: int, per_task: int) -> float:
    async def worker(task: int) -> None:
        for i in range(per_task):
            await op(task, i)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for task in range(tasks):
            tg.start_soon(worker, task)
    return time.perf_counter() - started


async def measure(
    runtime: str, url: str, prefix: str, args: argparse.Namespace
) -> dict[tuple[str, str, int], float]:
    subjects: dict[str, Callable[[str, str], Any]] = {
        "cognitia": cognitia_subject,
        "coredis": coredis_subject,
    }
    if runtime == "asyncio":
        subjects["redis.asyncio"] = redis_asyncio_subject  # runs on asyncio only
    best: dict[tuple[str, str, int], float] = {}
    plans = [(1, args.ops), (args.tasks, args.cycles)]
    for _ in range(args.repeat):
        for name, subject in subjects.items():
            async with subject(url, f"{prefix}{runtime}:{name}:") as ops:
                for tasks, per_task in plans:
                    for operation in OPERATIONS:
                        seconds = await timed(ops[operation], tasks, per_task)
                        slot = (name, operation, tasks)
                        best[slot] = min(best.get(slot, seconds), seconds)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=os.environ.get("COGNITIA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--ops", type=positive, default=2000, help="sequential operations per round (default 2000)"
    )
    parser.add_argument("--tasks", type=positive, default=200, help="concurrent tasks (default 200)")
    parser.add_argument(
        "--cycles", type=positive, default=10, help="operations per concurrent task (default 10)"
    )
    parser.add_argument(
        "--repeat", type=positive, default=3, help="interleaved rounds; the best is kept (default 3)"
    )
    args = parser.parse_args()
    if args.tasks < 2:
        parser.error("--tasks must be at least 2: one task is the sequential scenario")
    quiet_structlog()
    header("RedisSessionBackend vs coredis and redis.asyncio used directly")
    print(f"redis-py {redis.__version__}, coredis {coredis.__version__}, server {args.url}")
    print()
    prefix = f"cognitia-bench:{uuid.uuid4().hex}:"
    rows: list[Row] = []
    try:
        for runtime in ("asyncio", "trio"):
            best = anyio.run(measure, runtime, args.url, prefix, args, backend=runtime)
            for (name, operation, tasks), seconds in best.items():
                ops = args.ops if tasks == 1 else tasks * args.cycles
                scenario = f"{operation}, {tasks} task{'s' if tasks > 1 else ''}"
                is_subject = name == "cognitia"
                rows.append(
                    Row(
                        scenario,
                        name,
                        runtime,
                        ops,
                        seconds,
                        reference="|coredis|" if is_subject else None,
                        target=TARGETS[1 if tasks == 1 else 200] if is_subject else None,
                    )
                )
    finally:
        client = redis.Redis.from_url(args.url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    rows.sort(key=lambda r: (r.runtime, r.scenario, r.subject))
    print_table(rows)  # a report: a missed target is printed, not an error
    return 0


if __name__ == "__main__":
    sys.exit(main())
