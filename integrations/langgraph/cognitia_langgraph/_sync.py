"""Running the saver's async methods for LangGraph's sync API (``graph.invoke``).

Three situations, told apart without guessing:

* The sync call comes from a worker thread of a running event loop (``await
  anyio.to_thread.run_sync(graph.invoke, ...)``, on asyncio or trio), or from a thread that
  LangGraph's executor started from there (it copies the context, so the loop found first is
  remembered in a context variable): the call is sent back to that loop, where the session
  manager lives.
* No event loop is running anywhere near (a plain script calling ``graph.invoke``): the call
  runs in a short-lived event loop of its own. Such calls are serialized per saver, so the
  manager is never driven by two loops at once.
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
                return anyio.run(_call, fn, *args)
        raise RuntimeError(
            f"CognitiaSaver.{name}() was called on the event loop's thread, where it would block the loop. "
            f"Use the async API (graph.ainvoke, saver.a{name}), or run the sync graph in a worker thread: "
            "await anyio.to_thread.run_sync(graph.invoke, ...)"
        )


async def _call(fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
    return await fn(*args)
