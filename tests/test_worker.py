"""The worker thread behind the SQLite, PostgreSQL and Redis backends.

A task submits a job and sleeps until the thread has run it. These tests pin down what
happens when the sleeping task is cancelled (a write still completes, a read is dropped),
that one worker serves several event loops, asyncio and trio, at the same time, and when a
job runs on the caller's thread instead (it arrived alone and the thread is idle).
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
from cognitia._worker import RunOnThread, ThreadWorker, astop_workers

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


class Here:
    """A worker that may run jobs on the caller's thread; ``run`` notes each job's thread in
    ``ran_on``, and each batch the thread runs has its size noted in ``batches``."""

    def __init__(self) -> None:
        self.log = Log()
        self.ran_on: dict[str, int] = {}
        self.batches: list[int] = []
        self.worker = _here_worker(self.log, self.ran_on, self.batches)

    def run(self, resource: Log, name: str) -> str:
        self.ran_on[name] = threading.get_ident()
        return record(resource, name)


def _here_worker(log: Log, ran_on: dict[str, int], batches: list[int]) -> ThreadWorker[Log]:

    def here(resource: Log, fn: Any, args: tuple[Any, ...]) -> Any:
        if args[0].startswith("decline"):
            raise RunOnThread
        return fn(resource, *args)

    def batch(resource: Log, jobs: list[Any]) -> None:
        batches.append(len(jobs))
        for job in jobs:
            job.run(resource)

    worker: ThreadWorker[Log] = ThreadWorker(
        "test-worker", lambda: log, lambda _: None, batch=batch, here=here
    )
    return worker


async def test_a_job_arriving_alone_runs_here_and_jobs_arriving_together_go_to_the_thread(
    anyio_backend: str,
) -> None:
    h = Here()
    worker, run, log, ran_on, batches = h.worker, h.run, h.log, h.ran_on, h.batches
    me = threading.get_ident()
    # The thread opens the resource: the first job always runs there.
    assert await worker.call(run, "open", here=True) == "open"
    assert ran_on["open"] != me
    assert await worker.call(run, "alone", here=True) == "alone"
    assert ran_on["alone"] == me
    # here=False, or a `here` that declines: the thread.
    assert await worker.call(run, "not-asked") == "not-asked"
    assert await worker.call(run, "decline", here=True) == "decline"
    assert ran_on["not-asked"] != me and ran_on["decline"] != me
    del batches[:]

    async def one(i: int) -> None:
        assert await worker.call(run, f"together-{i}", shield=i % 2 == 0, here=True) == f"together-{i}"

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)
    together = [name for name in ran_on if name.startswith("together")]
    assert len(together) == 50 and all(ran_on[name] != me for name in together)
    assert sum(batches) == 50 and max(batches) > 1
    assert sorted(log.ran[-50:]) == sorted(together)
    worker.stop()


async def test_a_job_does_not_run_here_while_the_thread_is_busy(anyio_backend: str) -> None:
    h = Here()
    worker, run, log, ran_on = h.worker, h.run, h.log, h.ran_on
    await worker.call(run, "open", here=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.call, hold)
        await anyio.to_thread.run_sync(log.holding.wait)
        with anyio.move_on_after(0.1) as scope:
            await worker.call(run, "after-hold", here=True)
        assert scope.cancelled_caught  # it waits for the held thread
        log.gate.set()
    # The thread drops the abandoned job just after waking the holder; until it has, the
    # worker still counts it as queued work and would rightly send "next" to the thread.
    for _ in range(10_000):
        if not worker._pending:
            break
        await anyio.sleep(0.001)
    assert await worker.call(run, "next", here=True) == "next"
    assert log.ran == ["open", "next"]  # the abandoned job never ran; the next one did, here
    assert ran_on["next"] == threading.get_ident()
    worker.stop()


@pytest.mark.parametrize("joined", [False, True], ids=["alone", "joined"])
async def test_the_first_job_of_a_group_cancelled_in_its_yield(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, joined: bool
) -> None:
    """The first job of a group yields once before deciding. Cancelled there while still
    alone, it was never submitted and never runs. If another job joined meanwhile, both were
    queued for the thread at that moment: the first (a write) runs to completion, then its
    cancellation is delivered."""
    h = Here()
    worker, run, log, ran_on = h.worker, h.run, h.log, h.ran_on
    await worker.call(run, "open", here=True)
    joiner_may_start, joiner_queued = anyio.Event(), anyio.Event()
    results: list[str] = []
    real_checkpoint = _worker.checkpoint

    async def first_jobs_yield() -> None:
        # The first job's yield: it is cancelled, and another job may join its group.
        monkeypatch.setattr(_worker, "checkpoint", real_checkpoint)
        first.cancel()
        if joined:
            joiner_may_start.set()
            with anyio.CancelScope(shield=True):
                await joiner_queued.wait()
        await real_checkpoint()

    async def joiner() -> None:
        await joiner_may_start.wait()
        joiner_queued.set()  # the first job resumes only once this one has joined, below
        results.append(await worker.call(run, "joined", shield=True, here=True))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(joiner)
            monkeypatch.setattr(_worker, "checkpoint", first_jobs_yield)
            with anyio.CancelScope() as first:
                await worker.call(run, "first", shield=True, here=True)
                results.append("first returned")  # never: it was cancelled
            assert first.cancelled_caught
            if not joined:
                joiner_may_start.set()
    if joined:
        assert log.ran[:2] == ["open", "first"]  # done before the cancellation reached the caller
        assert ran_on["first"] != threading.get_ident()
    else:
        assert log.ran[:2] == ["open", "joined"]  # "first" was never submitted
    assert results == ["joined"] and len(log.ran) == 2 + joined
    assert ran_on["joined"] != threading.get_ident() or not joined
    worker.stop()


async def test_a_stopped_worker_refuses_jobs_asked_to_run_here(anyio_backend: str) -> None:
    h = Here()
    worker, run, log = h.worker, h.run, h.log
    await worker.call(run, "open", here=True)
    await worker.astop()
    with pytest.raises(BackendClosedError, match="test-worker is closed"):
        await worker.call(run, "late", here=True)
    assert log.ran == ["open"]


async def test_a_thread_that_cannot_be_started_fails_its_jobs_and_the_next_job_starts_one(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    worker: ThreadWorker[Log] = ThreadWorker("test-worker", lambda: log, lambda _: None)
    start = threading.Thread.start

    def out_of_threads(thread: threading.Thread) -> None:
        monkeypatch.setattr(threading.Thread, "start", start)  # once
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", out_of_threads)
    with anyio.fail_after(10):  # a job queued for a thread that never started would wait forever
        with pytest.raises(RuntimeError, match="can't start new thread"):
            await worker.call(record, "lost")
        assert await worker.call(record, "next") == "next"
    assert log.ran == ["next"]
    await worker.astop()
