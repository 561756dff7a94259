"""Turns per second of a long ADK session: cognitia's session service vs ADK's own.

Each turn is one user message through ADK's ``Runner`` with a scripted model that calls a
tool, so 4 events per turn. The Runner reads the session with
``GetSessionConfig(num_recent_events=window)`` (what a long-lived app sets, so a turn
does not reload the whole history) and appends every event. The services compared, in
the same run and on the same kind of storage:

- ``cognitia sqlite``: CognitiaSessionService on SqliteSessionBackend (a file; WAL,
  ``synchronous=NORMAL``, its default);
- ``cognitia sqlite (FULL)``: the same with ``synchronous="FULL"``, a sync to disk at every
  commit as ADK's services do (they keep SQLite's defaults);
- ``adk database``: ADK's DatabaseSessionService on ``sqlite+aiosqlite:///file``;
- ``adk sqlite``: ADK's SqliteSessionService on a file;
- ``cognitia memory`` and ``adk memory``: the in-memory ones, for reference.

"service" time counts only the calls into the session service (with the mean time of a
``get_session`` and of an ``append_event`` call); "turn" time is the whole Runner turn.
Growth compares the per-turn cost at both ends of a session: after the 500
turns, 50 more turns alternate between the long session and a fresh one, and growth is the
median service time on the long one over the fresh one (1.0: a flat per-turn cost).
Alternating, like interleaving the services turn by turn, makes a busy machine slow both
sides alike. structlog is filtered to warnings. Each SQLite file's journal mode is read
back and printed with the synchronous setting of its service.

ADK's Runner imports ``google.adk.agents.remote_a2a_agent`` at every turn. Without the
optional ``a2a-sdk`` package that import fails each time, and Python runs the module again
up to the failing line; with bytecode writing off (``PYTHONDONTWRITEBYTECODE``) and no
cached bytecode, it also compiles the module from source each time: about 11 ms a turn on
the benchmark machine against 0.6 ms, for every service alike. Python's default writes that
bytecode once, as does ``pip install``; this script turns bytecode writing on so that its
figures are those of a default install, and says so when it had been off.

At the end, a new service on each SQLite file reads the long session once and the memory
it still holds is printed (tracemalloc): cognitia keeps the live session's turns and its
validated events, ADK's SQLite service keeps nothing.

The ratios to ADK's services come with a bound: the Runner's own work per turn (a built-in's
turn time minus its service time) is paid whatever the service, so even a service that took
no time at all would be only that much faster end to end.

    python benchmarks/bench_adk.py [--turns 500] [--window 20]   # --window 0: the Runner's default
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from _common import positive
from google.adk.agents import Agent
from google.adk.agents.run_config import RunConfig
from google.adk.events import Event
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions import BaseSessionService, DatabaseSessionService, InMemorySessionService, Session
from google.adk.sessions.base_session_service import GetSessionConfig, ListSessionsResponse
from google.adk.sessions.sqlite_session_service import SqliteSessionService
from google.adk.tools.tool_context import ToolContext
from google.genai import types

from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_adk import CognitiaSessionService

# cognitia logs every save at info level; printing thousands of lines would dominate.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
logging.getLogger("google_adk").setLevel(logging.ERROR)

T = TypeVar("T")
APP, USER, SESSION = "bench", "ann", "long"


class ScriptedLlm(BaseLlm):
    model: str = "scripted"

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        last = llm_request.contents[-1].parts or []
        if any(part.function_response for part in last):
            parts = [types.Part(text="You rolled a 4.")]
        else:
            parts = [types.Part(function_call=types.FunctionCall(name="roll_die", args={"sides": 6}))]
        usage = types.GenerateContentResponseUsageMetadata(prompt_token_count=1, candidates_token_count=1)
        yield LlmResponse(content=types.Content(role="model", parts=parts), usage_metadata=usage)


def roll_die(sides: int, tool_context: ToolContext) -> dict[str, int]:
    """Roll a die."""
    tool_context.state["last_roll"] = 4
    tool_context.state["user:rolls"] = tool_context.state.get("user:rolls", 0) + 1
    return {"result": 4}


agent = Agent(name="dice", model=ScriptedLlm(), instruction="Roll dice.", tools=[roll_die])


class Timed(BaseSessionService):
    """Forwards to a session service and adds up the time spent in it."""

    def __init__(self, inner: BaseSessionService) -> None:
        self.inner = inner
        self.elapsed = 0.0
        self.per_call: dict[str, list[float]] = {"get_session": [], "append_event": []}

    async def _timed(self, call: Awaitable[T], name: str | None = None) -> T:
        started = time.perf_counter()
        try:
            return await call
        finally:
            spent = time.perf_counter() - started
            self.elapsed += spent
            if name is not None:
                self.per_call[name].append(spent)

    async def create_session(self, **kwargs: Any) -> Session:
        return await self._timed(self.inner.create_session(**kwargs))

    async def get_session(self, **kwargs: Any) -> Session | None:
        return await self._timed(self.inner.get_session(**kwargs), "get_session")

    async def list_sessions(self, **kwargs: Any) -> ListSessionsResponse:
        return await self._timed(self.inner.list_sessions(**kwargs))

    async def delete_session(self, **kwargs: Any) -> None:
        await self._timed(self.inner.delete_session(**kwargs))

    async def append_event(self, session: Session, event: Event) -> Event:
        return await self._timed(self.inner.append_event(session, event), "append_event")


class Case:
    def __init__(self, name: str, service: BaseSessionService, window: int) -> None:
        self.name = name
        self.service = Timed(service)
        self.runner = Runner(agent=agent, app_name=APP, session_service=self.service)
        # window 0: the Runner's default, which reads the whole session every turn.
        reads = GetSessionConfig(num_recent_events=window) if window else None
        self.config = RunConfig(get_session_config=reads)
        self.service_times: list[float] = []
        self.turn_times: list[float] = []
        self.late: list[float] = []
        self.early: list[float] = []

    async def turn(self, session_id: str, n: int) -> tuple[float, float]:
        message = types.Content(role="user", parts=[types.Part(text=f"roll {n}")])
        spent, started = self.service.elapsed, time.perf_counter()
        async for _ in self.runner.run_async(
            user_id=USER, session_id=session_id, new_message=message, run_config=self.config
        ):
            pass
        return self.service.elapsed - spent, time.perf_counter() - started

    def rates(self) -> tuple[float, float, float]:
        growth = statistics.median(self.late) / statistics.median(self.early)
        return (
            len(self.service_times) / sum(self.service_times),
            len(self.turn_times) / sum(self.turn_times),
            growth,
        )


async def main(turns: int, window: int, bytecode_was_off: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SqliteSessionBackend(Path(tmp) / "cognitia.db")
        synced = SqliteSessionBackend(Path(tmp) / "cognitia-full.db", synchronous="FULL")
        database = DatabaseSessionService(f"sqlite+aiosqlite:///{tmp}/adk-database.db")
        cases = [
            Case("cognitia sqlite", CognitiaSessionService(backend), window),
            Case("cognitia sqlite (FULL)", CognitiaSessionService(synced), window),
            Case("adk database", database, window),
            Case("adk sqlite", SqliteSessionService(f"{tmp}/adk-sqlite.db"), window),
            Case("cognitia memory", CognitiaSessionService(InMemorySessionBackend()), window),
            Case("adk memory", InMemorySessionService(), window),
        ]
        for case in cases:
            for session_id in ("warm-up", SESSION, "fresh"):
                await case.service.create_session(app_name=APP, user_id=USER, session_id=session_id)
            for n in range(20):
                await case.turn("warm-up", n)
        for n in range(turns):
            for case in cases:
                service_time, turn_time = await case.turn(SESSION, n)
                case.service_times.append(service_time)
                case.turn_times.append(turn_time)
        for n in range(50):
            for case in cases:
                case.late.append((await case.turn(SESSION, turns + n))[0])
                case.early.append((await case.turn("fresh", n))[0])
        for case in cases:
            full = await case.service.get_session(app_name=APP, user_id=USER, session_id=SESSION)
            assert full is not None and len(full.events) == 4 * (turns + 50), "every event must be stored"
        del full
        fresh = [SqliteSessionBackend(backend.db_path) for _ in range(2)]
        held = {
            "cognitia sqlite": await held_by(lambda: CognitiaSessionService(fresh[0])),
            "cognitia sqlite, cached_events=0": await held_by(
                lambda: CognitiaSessionService(fresh[1], cached_events=0)
            ),
            "adk sqlite": await held_by(lambda: SqliteSessionService(f"{tmp}/adk-sqlite.db")),
        }
        for opened in fresh:
            await opened.aclose()
        await backend.aclose()
        await synced.aclose()
        await database.close()
        durability = {
            "cognitia sqlite": f"journal_mode={journal_mode(backend.db_path)} synchronous=NORMAL",
            "cognitia sqlite (FULL)": f"journal_mode={journal_mode(synced.db_path)} synchronous=FULL",
            "adk database": f"journal_mode={journal_mode(Path(tmp) / 'adk-database.db')} "
            "synchronous=FULL (SQLite's default, kept)",
            "adk sqlite": f"journal_mode={journal_mode(Path(tmp) / 'adk-sqlite.db')} "
            "synchronous=FULL (SQLite's default, kept)",
        }

    reads = f"num_recent_events={window}" if window else "its default (the whole session per turn)"
    print(f"{turns}-turn ADK session (4 events per turn), Runner with {reads}")
    if bytecode_was_off:
        print("bytecode writing turned on for this run (PYTHONDONTWRITEBYTECODE was set): see the docstring")
    for name, setting in durability.items():
        print(f"durability  {name:<22} {setting}")
    print(
        f"{'service':<22} {'service turns/s':>16} {'turns/s':>9} {f'growth at turn {turns}':>19}"
        f" {'get_session ms':>15} {'append_event ms':>16}"
    )
    rates = {case.name: case.rates() for case in cases}
    for case in cases:
        service_rate, turn_rate, growth = rates[case.name]
        get, append = (statistics.mean(times) * 1000 for times in case.service.per_call.values())
        print(
            f"{case.name:<22} {service_rate:>16.0f} {turn_rate:>9.0f} {growth:>19.2f}"
            f" {get:>15.2f} {append:>16.2f}"
        )
    print(f"memory a service holds after one whole read of the {4 * (turns + 50)}-event session:")
    for name, size in held.items():
        print(f"  {name:<33} {size / 2**20:6.1f} MiB")
    for builtin in ("adk database", "adk sqlite"):
        theirs = rates[builtin]
        # If a service took no time at all, a turn would still cost the Runner's own work:
        # the built-in's turn time minus its service time. That bounds any service's
        # end-to-end speed-up over the built-in.
        their_turn, their_service = 1 / theirs[1], 1 / theirs[0]
        ceiling = their_turn / (their_turn - their_service)
        for name in ("cognitia sqlite", "cognitia sqlite (FULL)"):
            ours = rates[name]
            end_to_end = ours[1] / theirs[1]
            verdict = "met" if end_to_end >= 2 else "not met"
            print(
                f"{name} / {builtin}: service {ours[0] / theirs[0]:.2f}x, "
                f"end to end {end_to_end:.2f}x (target >= 2x: {verdict}; "
                f"a service that took no time at all: {ceiling:.2f}x)"
            )


def journal_mode(path: Path) -> str:
    """The journal mode stored in a SQLite file (synchronous is per connection: set by each service)."""
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).upper()
    finally:
        conn.close()


async def held_by(make: Callable[[], BaseSessionService]) -> int:
    """Bytes a new service on existing storage still holds after handing out the long session once."""
    gc.collect()
    tracemalloc.start()
    try:
        service = make()
        session = await service.get_session(app_name=APP, user_id=USER, session_id=SESSION)
        assert session is not None
        del session
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--turns", type=positive, default=500)
    parser.add_argument("--window", type=int, default=20, help="events the Runner reads per turn (0: all)")
    args = parser.parse_args()
    # Python's default: compiled modules are cached, so the import ADK's Runner retries at
    # each turn (see above) is not compiled again every time.
    bytecode_was_off, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    asyncio.run(main(args.turns, args.window, bytecode_was_off))
