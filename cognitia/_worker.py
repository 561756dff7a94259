"""A thread that owns a blocking resource (a database connection) and runs jobs on it.

Async code submits a job and sleeps; the thread runs the job and wakes the sleeping task
through the event loop's thread-safe scheduler: ``call_soon_threadsafe`` resolving a future
on asyncio, ``TrioToken.run_sync_soon`` rescheduling the task on trio. These are the two
primitives anyio's own events are built from, used directly because this is the path every
database operation takes: one thread hop per operation, one scheduler call per batch.

A worker given a ``batch`` function receives every job that queued up while it was busy
and may run them together, e.g. in one database transaction: under concurrency the cost
of a commit is shared by all the writes waiting for it.

An ``idle`` function runs after each batch's waiters have been woken (housekeeping such as
a database checkpoint), so it never delays an operation that already finished.

A worker given a ``here`` function may run a job on the calling thread instead, when the
job arrives alone: the caller first yields to the event loop once, so that other tasks
ready to submit jobs do so; if none did and the worker has nothing queued or running, the
job runs at once through ``here`` (which may decline by raising :class:`RunOnThread`), and
costs no thread hop. Jobs that arrive together go to the thread, queued as they arrive,
and the thread runs whatever queued up as one batch.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from .errors import BackendClosedError

__all__ = ["STOP_GRACE", "Job", "RunOnThread", "ThreadWorker", "astop_workers", "checkpoint", "stop_workers"]

R = TypeVar("R")
T = TypeVar("T")

_STOP = object()
STOP_GRACE = 5.0
"""Seconds a cancelled :func:`astop_workers` still waits for the threads, shielded, before the
cancellation goes on (the threads stop either way)."""
_trio: ModuleType | None = None
# The running asyncio loop or None, without raising when there is none (on trio): the same
# function asyncio.get_running_loop() is built on.
_asyncio_loop = asyncio._get_running_loop


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or ``None`` in a trio task.

    Also ``None`` for trio run as a guest of an asyncio loop (``trio.lowlevel.start_guest_run``):
    that thread has a running asyncio loop, but the task is trio's.
    """
    loop = _asyncio_loop()
    if loop is not None and "trio" in sys.modules and _trio_lowlevel().in_trio_task():
        return None
    return loop


def current_task() -> object:
    """The running task (an asyncio ``Task`` or a trio ``Task``), found without anyio's
    task-info objects: cheap enough for every lock taken."""
    loop = _running_loop()
    if loop is not None:
        return asyncio.current_task(loop)
    return _trio_lowlevel().current_task()


def _trio_lowlevel() -> ModuleType:
    """``trio.lowlevel``, imported on first use: trio is optional."""
    global _trio
    if _trio is None:
        try:
            import trio.lowlevel
        except ImportError:
            raise RuntimeError(
                "cognitia's async methods must be called from an asyncio or trio task"
            ) from None
        _trio = trio.lowlevel
    return _trio


async def checkpoint() -> None:
    """Yield to the event loop (and let a pending cancellation in): ``anyio.lowlevel.checkpoint``
    without its runtime lookup, for operations that finished without waiting."""
    if _running_loop() is None:
        await _trio_lowlevel().checkpoint()
    else:
        await asyncio.sleep(0)


class RunOnThread(Exception):
    """Raised by a worker's ``here`` function to send the job to the worker's thread after all,
    having done nothing."""


class Job:
    """One call to run on the worker's resource, its outcome, and the task waiting for it.

    ``loop`` is the waiting task's event loop (asyncio) or trio token; ``waiter`` is the
    future it awaits (asyncio) or the task itself while it waits (trio), else ``None``.
    ``done``, ``waiter`` and ``abandoned`` are only touched on the event loop's thread.
    """

    __slots__ = ("abandoned", "args", "done", "error", "fn", "loop", "result", "trio", "waiter")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.done = False
        self.loop: Any
        self.waiter: Any
        loop = _running_loop()
        if loop is None:
            trio = _trio_lowlevel()
            self.loop = trio.current_trio_token()  # RuntimeError outside a trio task
            # The task, set once it waits: a job may be queued before its task waits, and
            # rescheduling a task that is not waiting would resume it wherever it is.
            self.waiter = None
            self.trio = True
        else:
            self.loop = loop
            self.waiter = loop.create_future()
            self.trio = False

    def run(self, resource: Any) -> None:
        try:
            self.result = self.fn(resource, *self.args)
        except BaseException as exc:  # handed to the waiting task, which re-raises it
            self.error = exc

    async def wait(self, shield: bool) -> None:
        """Sleep until the worker has run this job.

        Cancelled while waiting: without ``shield`` the job is marked abandoned (skipped
        if the worker has not started it) and the cancellation propagates at once; with
        ``shield`` the job runs to completion first, then the cancellation propagates.
        """
        if not self.trio:
            try:
                await self.waiter
            except BaseException:
                if not shield:
                    self.abandoned = True
                    raise
                # The shield keeps anyio's cancel scopes out; a task.cancel() still gets
                # through (a second timeout, a failing TaskGroup sibling), so keep waiting
                # until the job is done, then deliver the first cancellation once.
                with anyio.CancelScope(shield=True):
                    while not self.done:
                        self.waiter = self.loop.create_future()
                        try:
                            await self.waiter
                        except asyncio.CancelledError:
                            pass
                raise
        else:
            trio = _trio_lowlevel()
            cancelled = False

            def abort(raise_cancel: Any) -> Any:
                nonlocal cancelled
                if shield:
                    cancelled = True
                    return trio.Abort.FAILED  # stays asleep until the job is done
                self.abandoned = True
                self.waiter = None
                return trio.Abort.SUCCEEDED

            if self.done:
                return
            self.waiter = trio.current_task()
            await trio.wait_task_rescheduled(abort)
            if cancelled:
                await trio.checkpoint_if_cancelled()


class _Group:
    """Jobs arriving together while the first of them yields: run here if it stays alone."""

    __slots__ = ("first", "spilled")

    def __init__(self, first: Job) -> None:
        self.first = first
        self.spilled = False  # another job joined: every job of the group goes to the thread


def _wake_asyncio(jobs: list[Job]) -> None:
    for job in jobs:
        job.done = True
        if not job.waiter.done():
            job.waiter.set_result(None)


def _wake_trio(jobs: list[Job]) -> None:
    reschedule = _trio_lowlevel().reschedule
    for job in jobs:
        job.done = True
        if job.waiter is not None:
            task, job.waiter = job.waiter, None
            reschedule(task)


def _notify(jobs: list[Job]) -> None:
    """Wake the tasks waiting on ``jobs``: one scheduler call per event loop, not per job."""
    loop = jobs[0].loop
    if all(job.loop is loop for job in jobs):
        groups: Any = (jobs,)  # the usual case: one event loop uses the backend
    else:
        by_loop: dict[int, list[Job]] = {}
        for job in jobs:
            by_loop.setdefault(id(job.loop), []).append(job)
        groups = by_loop.values()
    for group in groups:
        loop = group[0].loop
        try:
            if group[0].trio:
                loop.run_sync_soon(_wake_trio, group)
            else:
                loop.call_soon_threadsafe(_wake_asyncio, group)
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
        here: Callable[[R, Callable[..., Any], tuple[Any, ...]], Any] | None = None,
        max_batch: int = 512,
    ) -> None:
        self.name = name
        self._open = open
        self._close = close
        self._batch = batch
        self._idle = idle
        self._here = here
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        # Held while the resource is in use, by the thread or by a caller running a job here.
        self.busy = threading.Lock()
        self._resource: R | None = None  # set once the thread has opened it
        self._pending = 0  # jobs submitted to the thread and not yet run; under _lock
        self._group: _Group | None = None  # the open group of jobs arriving together

    async def call(self, fn: Callable[..., T], *args: Any, shield: bool = False, here: bool = False) -> T:
        """Run ``fn(resource, *args)`` in the worker thread and return its result.

        With ``shield=True`` the caller waits for the job even if it is cancelled (the job
        has been handed over and will run; cancellation is delivered afterwards), so a
        write is either done completely or not submitted at all. With ``here=True`` the
        job may run on the calling thread (see the module's description).
        """
        job = Job(fn, args)
        if shield:
            # A write that is already cancelled is not submitted at all.
            if job.trio:
                await _trio_lowlevel().checkpoint_if_cancelled()
            else:
                await anyio.lowlevel.checkpoint_if_cancelled()
        if here and self._resource is not None and self._here is not None:
            if not await self._stage(job, shield):
                await job.wait(shield)
        else:
            self._submit([job])
            await job.wait(shield)
        error, job.error = job.error, None
        if error is not None:
            # Raised from a variable deleted on the way out: a job or a frame still holding
            # the error would make a cycle through its traceback (freed only by the gc).
            try:
                raise error
            finally:
                del error
        return job.result  # type: ignore[no-any-return]

    def _submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` for the thread (started on first use); refused once stopping."""
        if not jobs:
            return
        error: BaseException
        with self._lock:
            if self._stopping:
                error = BackendClosedError(f"{self.name} is closed")
            else:
                try:
                    if self._thread is None:
                        thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                        thread.start()
                        self._thread = thread
                except RuntimeError as exc:
                    # No thread to be had (the process is out of them): these jobs fail,
                    # and the next one tries again.
                    error = exc
                else:
                    self._pending += len(jobs)
                    for job in jobs:
                        self._queue.put(job)
                    return
        for job in jobs:
            job.error = error
        _notify(jobs)

    async def _stage(self, job: Job, shield: bool) -> bool:
        """Run ``job`` here if it arrives alone; ``True`` if it ran, ``False`` if it was queued.

        The first job of a group yields once. A job submitted meanwhile from the same event
        loop makes the group one for the thread: it is queued at once, with the first job,
        and so is every later job of the group, so the thread starts on them while the
        event loop is still producing the rest.
        """
        with self._lock:
            group = self._group
            if group is None:
                group = self._group = _Group(job)
                queued: list[Job] = []
            elif group.first.loop is not job.loop:
                queued = [job]  # another event loop's group: this job goes to the thread alone
            elif group.spilled:
                queued = [job]
            else:
                group.spilled = True
                queued = [group.first, job]
        if queued:
            self._submit(queued)
            return False
        try:
            await checkpoint()
        except BaseException:
            if self._end_group(group):
                # Already queued by a job that joined: a write waits for its outcome.
                if shield:
                    with anyio.CancelScope(shield=True):
                        await job.wait(shield=True)
                else:
                    job.abandoned = True
            raise
        if self._end_group(group):
            return False
        if self._run_here(job):
            return True
        self._submit([job])
        return False

    def _end_group(self, group: _Group) -> bool:
        """End ``group``: no job joins it any more. Whether its jobs went to the thread."""
        with self._lock:
            if self._group is group:
                self._group = None
            return group.spilled

    def _run_here(self, job: Job) -> bool:
        """Run ``job`` on this thread if the resource is idle; ``False`` if it was not run."""
        if not self.busy.acquire(blocking=False):
            return False
        try:
            with self._lock:
                resource = None if self._stopping or self._pending else self._resource
            if resource is None or self._here is None:
                return False
            try:
                job.result = self._here(resource, job.fn, job.args)
            except RunOnThread:
                return False
            except BaseException as exc:  # raised to the caller like a job's own error
                job.error = exc
            job.done = True
            return True
        finally:
            self.busy.release()

    def stop(self) -> None:
        """Let queued jobs finish, then close the resource and end the thread (blocking)."""
        stop_workers([self])

    async def astop(self) -> None:
        """Like :meth:`stop`, without blocking the event loop (see :func:`astop_workers`)."""
        await astop_workers([self])

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
            taken = 0
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stop = True
                    break
                taken += 1
                if not item.abandoned:
                    jobs.append(item)
                # Only this thread takes from the queue, so a non-empty queue cannot empty
                # before get_nowait(); checking first avoids raising queue.Empty per batch.
                if len(jobs) >= self._max_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if jobs:
                with self.busy:
                    resource = self._run(resource, jobs)
            if taken:
                with self._lock:
                    self._pending -= taken
            if jobs and resource is not None:
                _notify(jobs)
                if self._idle is not None:
                    # Housekeeping after the waiters are woken, never on their path; told
                    # whether more work is already queued. It takes `busy` itself if it uses
                    # the resource, so a caller is not sent to the thread for nothing.
                    try:
                        self._idle(resource, self._queue.empty())
                    except Exception:
                        pass
        with self.busy:
            self._resource = None
        if resource is not None:
            try:
                self._close(resource)
            except Exception:
                pass

    def _run(self, resource: R | None, jobs: list[Job]) -> R | None:
        """Run a batch of jobs, opening the resource first if needed; returns the resource."""
        if resource is None:
            # Opened here, not in __init__, so a failure (bad path, server down) reaches
            # the caller as an error of its operation, and the next operation retries.
            try:
                resource = self._open()
            except BaseException as exc:
                for job in jobs:
                    job.error = exc
                _notify(jobs)
                return None
            self._resource = resource
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
        return resource


def _begin_stop(workers: Iterable[ThreadWorker[Any]]) -> list[threading.Thread]:
    """Tell every worker to stop (none is left running if the caller is interrupted later)."""
    threads = []
    for worker in dict.fromkeys(workers):  # a worker may serve twice (one reading and writing)
        thread = worker._begin_stop()
        if thread is not None:
            threads.append(thread)
    return threads


def _release_after(threads: list[threading.Thread], release: Callable[[], None] | None) -> None:
    """Call ``release`` now if every thread has ended, else on a thread of its own once they have."""
    if release is None:
        return
    if not any(thread.is_alive() for thread in threads):
        release()
        return

    def finish() -> None:
        for thread in threads:
            thread.join()
        release()

    threading.Thread(target=finish, name="cognitia-release", daemon=True).start()


def stop_workers(workers: Iterable[ThreadWorker[Any]], release: Callable[[], None] | None = None) -> None:
    """Stop ``workers`` together, wait for their threads, then call ``release`` (blocking).

    Each worker lets its queued jobs finish, then closes its resource. ``release`` frees what
    the workers share (a connection pool), once the last thread has ended.
    """
    threads = _begin_stop(workers)
    try:
        for thread in threads:
            thread.join()
    finally:
        _release_after(threads, release)


async def astop_workers(
    workers: Iterable[ThreadWorker[Any]], release: Callable[[], None] | None = None
) -> None:
    """Like :func:`stop_workers`, without blocking the event loop.

    Every worker is told to stop before anything is awaited, so a cancelled call still
    stops them all. Cancelled while the threads finish their queued jobs, it keeps waiting,
    shielded, for up to :data:`STOP_GRACE` seconds, then lets the cancellation go on; the
    threads end on their own and ``release`` runs after the last one.
    """
    threads = _begin_stop(workers)
    try:
        try:
            await _join(threads)
        except BaseException:
            with anyio.move_on_after(STOP_GRACE, shield=True):
                await _join(threads)
            raise
    finally:
        _release_after(threads, release)


async def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        if thread.is_alive():
            await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
