"""The worker thread behind the SQLite, PostgreSQL and Redis backends.

A task submits a job and sleeps until the thread has run it. These tests pin down what
happens when the sleeping task is cancelled (a write still completes, a read is dropped),
and that one worker serves several event loops, asyncio and trio, at the same time.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _cancel_twice import cancel_twice_while_waiting

from cognitia import BackendClosedError, _worker
from cognitia._worker import ThreadWorker, astop_workers

pytestmark = pytest.mark.anyio


class Log:
    """The worker's resource: a list of what the thread ran, and a gate that can hold it."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.gate = threading.Event()
        self.holding = threading.Event()


def hold(log: Log) -> None:
    log.holding.set()
    log.gate.wait(10)


def record(log: Log, name: str) -> str:
    log.ran.append(name)
    return name


async def _held_worker(log: Log, tg: anyio.abc.TaskGroup) -> ThreadWorker[Log]:
    """A worker whose thread is busy with ``hold`` until ``log.gate`` is set."""
    worker: ThreadWorker[Log] = ThreadWorker("test-worker", lambda: log, lambda _: None)
    tg.start_soon(worker.call, hold)
    await anyio.to_thread.run_sync(log.holding.wait)
    return worker


async def test_a_write_cancelled_while_queued_runs_and_then_the_cancellation_propagates(
    anyio_backend: str,
) -> None:
    log = Log()
    after: list[str] = []
    async with anyio.create_task_group() as tg:
        worker = await _held_worker(log, tg)

        async def write() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await worker.call(record, "write", shield=True)
                after.append("returned")  # never: the cancellation is delivered instead
            after.append("scope exited")

        scopes: list[anyio.CancelScope] = []
        tg.start_soon(write)
        await anyio.wait_all_tasks_blocked()
        scopes[0].cancel()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert after == [] and log.ran == []  # still waiting for its write
        log.gate.set()
    assert log.ran == ["write"]
    assert after == ["scope exited"]
    worker.stop()


async def test_a_write_cancelled_twice_runs_and_then_the_cancellation_propagates_once(
    anyio_backend: str,
) -> None:
    """On asyncio a task.cancel() gets through anyio's shield: a second one (a timeout firing
    as a failing sibling cancels the task group) must not end the wait before the write."""
    log = Log()
    events: list[str] = []

    async def write() -> None:
        try:
            await worker.call(record, "write", shield=True)
            events.append("returned")
        finally:
            events.append(f"finished after {log.ran}")

    async with anyio.create_task_group() as tg:
        worker = await _held_worker(log, tg)
        task = await cancel_twice_while_waiting(tg, anyio_backend, write)
        assert events == [] and log.ran == []  # still waiting for its write
        log.gate.set()
        if task is not None:
            with pytest.raises(asyncio.CancelledError):
                await task
    assert events == ["finished after ['write']"]
    worker.stop()


async def test_a_read_cancelled_while_queued_is_dropped_at_once(anyio_backend: str) -> None:
    log = Log()
    async with anyio.create_task_group() as tg:
        worker = await _held_worker(log, tg)
        with anyio.move_on_after(0.05) as scope:
            await worker.call(record, "read")
        assert scope.cancelled_caught  # returned while the thread was still held
        log.gate.set()
    assert await worker.call(record, "next") == "next"
    assert log.ran == ["next"]  # the abandoned read never ran
    worker.stop()


async def test_a_write_in_an_already_cancelled_scope_is_not_submitted(anyio_backend: str) -> None:
    log = Log()
    worker: ThreadWorker[Log] = ThreadWorker("test-worker", lambda: log, lambda _: None)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await worker.call(record, "write", shield=True)
    assert await worker.call(record, "next") == "next"
    assert log.ran == ["next"]
    worker.stop()


async def test_errors_reach_the_caller_and_a_stopped_worker_refuses_jobs(anyio_backend: str) -> None:
    def fail(log: Log) -> None:
        raise ValueError("from the thread")

    worker: ThreadWorker[Log] = ThreadWorker("test-worker", Log, lambda _: None)
    with pytest.raises(ValueError, match="from the thread"):
        await worker.call(fail)
    await worker.astop()
    with pytest.raises(BackendClosedError, match="test-worker is closed"):
        await worker.call(record, "late")


def test_one_worker_serves_asyncio_and_trio_loops_at_once() -> None:
    """Jobs from two event loops in two threads land in shared batches; each wakes its own tasks."""
    log = Log()
    batches: list[int] = []

    def batch(resource: Log, jobs: list[Any]) -> None:
        batches.append(len(jobs))
        for job in jobs:
            job.run(resource)

    worker: ThreadWorker[Log] = ThreadWorker("test-worker", lambda: log, lambda _: None, batch=batch)
    results: dict[str, list[str]] = {}

    async def client(name: str) -> None:
        got: list[str] = []

        async def one(i: int) -> None:
            got.append(await worker.call(record, f"{name}-{i}", shield=i % 2 == 0))

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        results[name] = got

    threads = [
        threading.Thread(target=anyio.run, args=(client, runtime), kwargs={"backend": runtime})
        for runtime in ("asyncio", "trio")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    worker.stop()
    for runtime in ("asyncio", "trio"):
        assert sorted(results[runtime]) == sorted(f"{runtime}-{i}" for i in range(200))
    assert sorted(log.ran) == sorted(results["asyncio"] + results["trio"])
    assert sum(batches) == 400 and len(batches) < 400  # queued jobs were batched


async def test_stopping_workers_through_a_cancellation_stops_them_all(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker is told to stop before the first await; what they share is released only
    once the last thread has ended, even if the cancelled caller stopped waiting before."""
    monkeypatch.setattr(_worker, "STOP_GRACE", 0.05)  # how long the cancelled call still waits
    log = Log()
    released = threading.Event()
    async with anyio.create_task_group() as tg:
        busy = await _held_worker(log, tg)
        idle: ThreadWorker[Log] = ThreadWorker("idle-worker", Log, lambda _: None)
        assert await idle.call(record, "started") == "started"
        with anyio.CancelScope() as scope:
            scope.cancel()
            await astop_workers([busy, idle], released.set)
        assert scope.cancelled_caught
        assert not released.is_set()  # the busy thread is still running its job
        for worker in (busy, idle):
            with pytest.raises(BackendClosedError):
                await worker.call(record, "late")
        log.gate.set()
    assert await anyio.to_thread.run_sync(released.wait, 30)
    threads = [busy._thread, idle._thread]
    assert all(thread is not None and not thread.is_alive() for thread in threads)
