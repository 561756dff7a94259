"""Turns per second of an OpenAI Agents conversation: cognitia's adapter vs the SDK's SQLiteSession.

Both store a conversation in a SQLite file, one ``add_items`` call per turn, in the same run:

- ``cognitia``: ``CognitiaSession`` over ``SqliteSessionBackend`` (its default ``synchronous=NORMAL``,
  which keeps every committed turn across a process crash), and again with
  ``synchronous=FULL`` (also across power loss; what the SDK's file-based ``SQLiteSession``
  gets from SQLite's default);
- ``cognitia (cold)``: like ``cognitia (NORMAL)``, with a new session manager every turn,
  as a stateless request handler has: ``get_items()`` reads the history from the file
  instead of the live session's memory (the rows above serve it from memory once the
  session is live, which is most of their lead in ``runner``);
- ``SQLiteSession``: the SDK's built-in file-based session, which reads the file at every
  ``get_items()``.

Two workloads: ``append`` (``add_items`` only) and ``runner`` (what ``Runner.run`` does per
turn: ``get_items()`` of the whole history, then ``add_items``). Growth is the time of the
last 50 turns over the first 50 (1.0: a flat cost per turn), and the same for the median
turn of each window, which periodic spikes (SQLite's WAL checkpoints) do not sway; both are
the median over the repeats. turns/s is the best repeat. The repeats are interleaved: each
round runs every contender once, on a fresh file, so a machine that slows down mid-run slows
them all alike.

    python benchmarks/bench_openai_agents.py [--turns 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from _common import positive
from agents import SQLiteSession
from agents.memory import Session

from cognitia import InMemorySessionManager
from cognitia.session.backends import SqliteSessionBackend
from cognitia_openai_agents import CognitiaSession

WINDOW = 50
WARM_UP = 50


def item(turn: int) -> Any:
    """A typical item: an assistant message of about 300 bytes."""
    text = f"Turn {turn}: " + "the forecast for Paris is sunny with a light breeze. " * 4
    return {
        "id": f"msg_{turn:06d}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


async def conversation(session: Session, turns: int, *, read_history: bool) -> list[float]:
    """Seconds per turn for ``turns`` turns of one conversation."""
    durations = []
    for turn in range(turns):
        started = time.perf_counter()
        if read_history:
            await session.get_items()
        await session.add_items([item(turn)])
        durations.append(time.perf_counter() - started)
    return durations


Contender = Callable[[Path], Awaitable[tuple[Session, Callable[[], Awaitable[None]]]]]


async def cognitia_session(path: Path, synchronous: str) -> tuple[Session, Callable[[], Awaitable[None]]]:
    backend = SqliteSessionBackend(db_path=path, synchronous=synchronous)
    manager = InMemorySessionManager(backend)
    # Warm up outside the measurement: open the file, start the backend's threads, grow the WAL.
    await conversation(CognitiaSession("warm-up", manager), WARM_UP, read_history=False)
    return CognitiaSession("bench", manager), backend.aclose


class ColdSession:
    """A ``CognitiaSession`` made anew, with a new manager, at the start of every turn."""

    def __init__(self, backend: SqliteSessionBackend) -> None:
        self.backend = backend
        self.session: CognitiaSession | None = None

    def _fresh(self) -> CognitiaSession:
        if self.session is None:
            self.session = CognitiaSession("bench", InMemorySessionManager(self.backend))
        return self.session

    async def get_items(self, limit: int | None = None) -> list[Any]:
        self.session = None  # a turn starts here: nothing carried over from the last one
        return await self._fresh().get_items(limit)

    async def add_items(self, items: list[Any]) -> None:
        await self._fresh().add_items(items)
        self.session = None  # the turn ends: its manager is dropped


async def cold_session(path: Path) -> tuple[Session, Callable[[], Awaitable[None]]]:
    backend = SqliteSessionBackend(db_path=path)
    await conversation(
        CognitiaSession("warm-up", InMemorySessionManager(backend)), WARM_UP, read_history=False
    )
    return ColdSession(backend), backend.aclose  # type: ignore[return-value]


async def sdk_session(path: Path) -> tuple[Session, Callable[[], Awaitable[None]]]:
    warm_up = SQLiteSession("warm-up", db_path=path)
    await conversation(warm_up, WARM_UP, read_history=False)
    warm_up.close()
    session = SQLiteSession("bench", db_path=path)

    async def close() -> None:
        session.close()

    return session, close


CONTENDERS: dict[str, Contender] = {
    "cognitia (NORMAL)": lambda path: cognitia_session(path, "NORMAL"),
    "cognitia (FULL)": lambda path: cognitia_session(path, "FULL"),
    "cognitia (cold)": cold_session,
    "SDK SQLiteSession": sdk_session,
}


async def run_once(name: str, turns: int, read_history: bool) -> list[float]:
    """Seconds per turn of one conversation on a fresh file."""
    with tempfile.TemporaryDirectory() as scratch:
        session, close = await CONTENDERS[name](Path(scratch) / "bench.db")
        try:
            return await conversation(session, turns, read_history=read_history)
        finally:
            await close()


def summary(runs: list[list[float]], turns: int) -> tuple[float, float, float]:
    """Best turns/s over the runs, and the growth (by sum and by median), median over runs."""
    rate = turns / min(sum(durations) for durations in runs)
    by_sum = statistics.median(sum(d[-WINDOW:]) / sum(d[:WINDOW]) for d in runs)
    by_median = statistics.median(
        statistics.median(d[-WINDOW:]) / statistics.median(d[:WINDOW]) for d in runs
    )
    return rate, by_sum, by_median


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=positive, default=500)
    parser.add_argument("--repeat", type=positive, default=3)
    parser.add_argument(
        "--log",
        action="store_true",
        help="keep structlog's default console output of every session.saved event",
    )
    args = parser.parse_args()
    if not args.log:
        # An application decides where logs go; printing each event to a terminal is not
        # what a deployment does, so INFO events are filtered out (hooks still fire).
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.turns < 2 * WINDOW:
        parser.error(f"--turns must be at least {2 * WINDOW}")

    for workload, read_history in (("append", False), ("runner", True)):
        print(
            f"\n{workload}: {args.turns} turns, one add_items per turn"
            + (" after get_items() of the whole history" if read_history else "")
        )
        print(f"{'':<20} {'turns/s':>10} {'growth':>8} {'growth (median)':>16}")
        runs: dict[str, list[list[float]]] = {name: [] for name in CONTENDERS}
        for _ in range(args.repeat):
            for name in CONTENDERS:
                runs[name].append(await run_once(name, args.turns, read_history))
        results = {name: summary(runs[name], args.turns) for name in CONTENDERS}
        for name, (rate, by_sum, by_median) in results.items():
            print(f"{name:<20} {rate:>10.0f} {by_sum:>8.2f} {by_median:>16.2f}")
        sdk_rate = results["SDK SQLiteSession"][0]
        for name in ("cognitia (NORMAL)", "cognitia (FULL)", "cognitia (cold)"):
            ratio = results[name][0] / sdk_rate
            verdict = "met" if ratio >= 2 else "not met"
            print(f"ratio {name} / SDK SQLiteSession: {ratio:.1f}x (target >= 2x: {verdict})")


if __name__ == "__main__":
    # SQLiteSession calls asyncio.to_thread, so the comparison runs on asyncio.
    asyncio.run(main())
