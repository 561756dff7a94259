"""Running the saver's async methods for LangGraph's sync API (``graph.invoke``).

Three situations, told apart without guessing:

* The sync call comes from a worker thread of a running event loop (``await
  anyio.to_thread.run_sync(graph.invoke, ...)``, on asyncio or trio), or from a thread that
  LangGraph's executor started from there (it copies the context, so the loop found first is
  remembered in a context variable): the call is sent back to that loop, where the session
  manager lives.
* The call comes from another thread (LangGraph saves the writes of parallel branches from
  its pool threads outside that context; ``asyncio.to_thread``; a thread of the
  application's own): it is sent to the loop the saver was last used on (its async API, a
  call sent there, or the loop it was created on), while that loop runs.
* No event loop is running anywhere near (a plain script calling ``graph.invoke``): the call
  runs in a short-lived event loop of its own. Such calls are serialized per saver, and an
  async call that starts on an application's loop meanwhile waits for the running one to
  return (that loop is the saver's from then on), so the manager is never driven by two loops
  at once.
* The call comes from the event loop's own thread: blocking there would stall the loop (and
  deadlock with the saver's own work), so it raises and says what to do instead.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TypeVar, TypeVarTuple

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio import NoEventLoopError
from anyio.lowlevel import EventLoopToken

__all__ = ["SyncBridge"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_host_loop: ContextVar[EventLoopToken | None] = ContextVar("cognitia_langgraph_host_loop", default=None)


class SyncBridge:
    """Runs a coroutine function to completion from synchronous code (see the module docstring)."""

    def __init__(self) -> None:
        self._own_loop_lock = threading.Lock()
        self._own_loop_thread: threading.Thread | None = None
        self._home: EventLoopToken | None = None
        """The event loop the saver was last used on, if any (never one of its own)."""
        self.remember()

    def remember(self) -> None:
        """Note the running event loop as the saver's (a no-op outside one, or in a loop of its own)."""
        if threading.current_thread() is self._own_loop_thread:
            return  # a loop of the saver's own closes when its call returns
        try:
            self._home = anyio.lowlevel.current_token()
        except NoEventLoopError:
            pass

    async def enter(self) -> None:
        """Called first by every async method: note the running loop as the saver's, then wait
        while a call runs on a loop of the saver's own in another thread.

        The order matters: a sync call reads the saver's loop under ``_own_loop_lock``, so once
        this loop is noted, no new call starts a loop of its own; the one that may have started
        before is waited for here, in a worker thread, without blocking this loop.
        """
        if threading.current_thread() is self._own_loop_thread:
            return
        self.remember()
        if self._own_loop_lock.locked():
            await anyio.to_thread.run_sync(self._wait_for_own_loop)

    def _wait_for_own_loop(self) -> None:
        with self._own_loop_lock:
            pass

    def run(self, name: str, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        token = _host_loop.get()
        if token is None:
            try:
                token = anyio.from_thread.run_sync(anyio.lowlevel.current_token)
            except NoEventLoopError:
                token = None
            else:
                _host_loop.set(token)
        if token is not None:
            return anyio.from_thread.run(_call, fn, *args, token=token)
        try:
            anyio.lowlevel.current_token()
        except NoEventLoopError:
            with self._own_loop_lock:
                home = self._home
                if home is None or not _running(home):
                    self._home = None
                    self._own_loop_thread = threading.current_thread()
                    try:
                        return anyio.run(_call, fn, *args)
                    finally:
                        self._own_loop_thread = None
            # Sent outside the lock: the call's own enter() would wait for it.
            return anyio.from_thread.run(_call, fn, *args, token=home)
        raise RuntimeError(
            f"CognitiaSaver.{name}() was called on the event loop's thread, where it would block the loop. "
            f"Use the async API (graph.ainvoke, saver.a{name}), or run the sync graph in a worker thread: "
            "await anyio.to_thread.run_sync(graph.invoke, ...)"
        )


async def _call(fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
    return await fn(*args)


def _running(token: EventLoopToken) -> bool:
    """Whether the loop behind ``token`` still runs (and so can take a call)."""
    try:
        anyio.from_thread.run_sync(_nothing, token=token)
    except RuntimeError:  # asyncio: "Event loop is closed"; trio: RunFinishedError
        return False
    return True


def _nothing() -> None:
    return None
