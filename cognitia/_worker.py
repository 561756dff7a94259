"""A thread that owns a blocking resource (a database connection) and runs jobs on it.

Async code submits a job and waits on an event; the thread runs the job and wakes the
waiting task through the event loop's thread-safe scheduler (``call_soon_threadsafe`` on
asyncio, the trio token on trio, both reached through anyio). One thread hop per
operation, on either runtime, and no event-loop-specific code here.

A worker given a ``batch`` function receives every job that queued up while it was busy
and may run them together, e.g. in one database transaction: under concurrency the cost
of a commit is shared by all the writes waiting for it.

An ``idle`` function runs after each batch's waiters have been woken (housekeeping such as
a database checkpoint), so it never delays an operation that already finished.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from .errors import BackendClosedError

__all__ = ["Job", "ThreadWorker"]

R = TypeVar("R")
T = TypeVar("T")

_STOP = object()


class Job:
    """One call to run on the worker's resource, and its outcome."""

    __slots__ = ("abandoned", "args", "error", "event", "fn", "result", "token")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.token = token = anyio.lowlevel.current_token()
        # The token already knows the running backend: asking it for the event saves a
        # second runtime lookup on every operation.
        self.event: anyio.Event = token.backend_class.create_event()
        self.abandoned = False

    def run(self, resource: Any) -> None:
        try:
            self.result = self.fn(resource, *self.args)
        except BaseException as exc:  # handed to the waiting task, which re-raises it
            self.error = exc


def _wake(jobs: list[Job]) -> None:
    for job in jobs:
        job.event.set()


def _notify(jobs: list[Job]) -> None:
    """Wake the tasks waiting on ``jobs``: one scheduler call per event loop, not per job."""
    native = jobs[0].token.native_token
    if all(job.token.native_token is native for job in jobs):
        groups: Any = (jobs,)  # the usual case: one event loop uses the backend
    else:
        by_loop: dict[int, list[Job]] = {}
        for job in jobs:
            by_loop.setdefault(id(job.token.native_token), []).append(job)
        groups = by_loop.values()
    for group in groups:
        token = group[0].token
        try:
            token.backend_class.run_sync_soon(_wake, (group,), token.native_token)
        except Exception:  # the loop is gone: nobody is waiting any more
            pass


class ThreadWorker(Generic[R]):
    """Owns ``open()``'s resource in one thread.

    ``await worker.call(fn, *args)`` runs ``fn(resource, *args)`` in that thread.
    """

    def __init__(
        self,
        name: str,
        open: Callable[[], R],
        close: Callable[[R], None],
        *,
        batch: Callable[[R, list[Job]], None] | None = None,
        idle: Callable[[R, bool], None] | None = None,
        max_batch: int = 512,
    ) -> None:
        self.name = name
        self._open = open
        self._close = close
        self._batch = batch
        self._idle = idle
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False

    async def call(self, fn: Callable[..., T], *args: Any, shield: bool = False) -> T:
        """Run ``fn(resource, *args)`` in the worker thread and return its result.

        With ``shield=True`` the caller waits for the job even if it is cancelled (the job
        has been handed over and will run; cancellation is delivered afterwards), so a
        write is either done completely or not submitted at all.
        """
        if shield:
            # A write that is already cancelled is not submitted at all.
            await anyio.lowlevel.checkpoint_if_cancelled()
        job = Job(fn, args)
        with self._lock:
            if self._stopping:
                raise BackendClosedError(f"{self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self._thread.start()
            self._queue.put(job)
        try:
            await job.event.wait()
        except BaseException:
            if not shield:
                job.abandoned = True  # a read nobody waits for is skipped if not started
                raise
            # A submitted write finishes before the cancellation goes on; the shield is only
            # paid for on this path, not on every call.
            with anyio.CancelScope(shield=True):
                await job.event.wait()
            raise
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def stop(self) -> None:
        """Let queued jobs finish, then close the resource and end the thread (blocking)."""
        thread = self._begin_stop()
        if thread is not None:
            thread.join()

    async def astop(self) -> None:
        """Like :meth:`stop`, without blocking the event loop."""
        thread = self._begin_stop()
        if thread is not None:
            await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=True)

    def _begin_stop(self) -> threading.Thread | None:
        with self._lock:
            if self._stopping:
                return None
            self._stopping = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        return thread

    def _main(self) -> None:
        resource: R | None = None
        stop = False
        while not stop:
            jobs: list[Job] = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stop = True
                    break
                if not item.abandoned:
                    jobs.append(item)
                # Only this thread takes from the queue, so a non-empty queue cannot empty
                # before get_nowait(); checking first avoids raising queue.Empty per batch.
                if len(jobs) >= self._max_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if not jobs:
                continue
            if resource is None:
                # Opened here, not in __init__, so a failure (bad path, server down) reaches
                # the caller as an error of its operation, and the next operation retries.
                try:
                    resource = self._open()
                except BaseException as exc:
                    for job in jobs:
                        job.error = exc
                    _notify(jobs)
                    continue
            if self._batch is not None:
                try:
                    self._batch(resource, jobs)
                except BaseException as exc:
                    for job in jobs:
                        if job.error is None:
                            job.error = exc
            else:
                for job in jobs:
                    job.run(resource)
            _notify(jobs)
            if self._idle is not None:
                # Housekeeping after the waiters are woken, never on their path; told
                # whether more work is already queued.
                try:
                    self._idle(resource, self._queue.empty())
                except Exception:
                    pass
        if resource is not None:
            try:
                self._close(resource)
            except Exception:
                pass
