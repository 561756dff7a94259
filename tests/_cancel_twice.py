"""Cancelling a waiting task twice, each runtime's way: what a shield must withstand."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel


async def cancel_twice_while_waiting(
    tg: anyio.abc.TaskGroup, anyio_backend: str, run: Callable[[], Awaitable[None]]
) -> asyncio.Future[None] | None:
    """Start ``run()`` and, once it waits, cancel it twice.

    On asyncio that is two ``task.cancel()`` calls (a timeout firing as a failing sibling
    cancels the task group), which get through anyio's shield; on trio, two nested cancel
    scopes. Returns the asyncio task, for the caller to await once ``run`` may finish.
    """
    if anyio_backend == "asyncio":
        task: asyncio.Future[None] | None = asyncio.ensure_future(run())
        await anyio.wait_all_tasks_blocked()
        assert task is not None
        cancels: list[Callable[[], object]] = [task.cancel, task.cancel]
    else:
        task = None
        scopes: list[anyio.CancelScope] = []

        async def in_scopes() -> None:
            with anyio.CancelScope() as outer:
                scopes.append(outer)
                with anyio.CancelScope() as inner:
                    scopes.append(inner)
                    await run()

        tg.start_soon(in_scopes)
        await anyio.wait_all_tasks_blocked()
        cancels = [scopes[1].cancel, scopes[0].cancel]
    for cancel in cancels:
        cancel()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
    return task
