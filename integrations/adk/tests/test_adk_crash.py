"""A process killed while appending events never leaves an event stored without its ``app:``/``user:`` values.

The writer is a real process over a SQLite file, killed with SIGKILL at an arbitrary moment
of its append loop; a fresh service then reads what the file holds. ADK runs on asyncio
only, so the writer and the test do too.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import anyio
import pytest
from google.adk.sessions import State

from cognitia.session.backends import SqliteSessionBackend
from cognitia_adk import CognitiaSessionService

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

WRITER = """
import asyncio, logging, sys
import structlog
from google.adk.events import Event, EventActions
from cognitia.session.backends import SqliteSessionBackend
from cognitia_adk import CognitiaSessionService

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

async def main():
    service = CognitiaSessionService(SqliteSessionBackend(sys.argv[1]))
    session = await service.get_session(app_name="dice", user_id="ann", session_id="s1")
    if session is None:
        session = await service.create_session(app_name="dice", user_id="ann", session_id="s1")
    i = first = len(session.events)
    while True:
        delta = {"n": i, "app:n": i, "user:n": i}
        await service.append_event(session, Event(author="user", actions=EventActions(state_delta=delta)))
        i += 1
        if i == first + 5:
            print("going", flush=True)

asyncio.run(main())
"""


async def test_a_killed_writer_leaves_events_and_shared_values_in_step(tmp_path: Path) -> None:
    db = tmp_path / "adk.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    counts = []
    for _ in range(3):
        proc = await anyio.open_process([sys.executable, str(script), str(db)])
        try:
            assert proc.stdout is not None
            started = b""
            with anyio.fail_after(60):
                while not started.endswith(b"going\n"):
                    started += await proc.stdout.receive()
            await anyio.sleep(0.2)  # five appends done and more under way: killed wherever it is
        finally:
            proc.kill()
            await proc.wait()
            await proc.aclose()

        async with SqliteSessionBackend(db) as backend:
            service = CognitiaSessionService(backend)
            session = await service.get_session(app_name="dice", user_id="ann", session_id="s1")
            assert session is not None
            last = len(session.events) - 1
            shared = (session.state[State.APP_PREFIX + "n"], session.state[State.USER_PREFIX + "n"])
            assert (session.state["n"], *shared) == (last, last, last)
            counts.append(last)
    # Each run appended at least five events on top of the last.
    assert counts[0] >= 4 and all(b >= a + 5 for a, b in itertools.pairwise(counts))
