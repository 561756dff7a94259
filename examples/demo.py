"""cognitia in one minute: an agent handler persists its turns in SQLite, survives a restart.

    python3 scripts/dev.py demo          (or: python examples/demo.py [--db PATH] [--runtime trio])

The first process talks to the agent for three turns. Then a brand-new process opens the
same file, finds the session where it was left, and carries on. The lifecycle events
(session.loaded, session.saved, ...) are printed by structlog as they happen.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio

from cognitia import InMemorySessionManager, Session, persisted_session
from cognitia.session.backends import MemoryScope, SqliteSessionBackend


def build_agent(manager: InMemorySessionManager):  # type: ignore[no-untyped-def]
    @persisted_session(manager, key="user_id", scope=MemoryScope.AGENT, initial={"role": "coach"})
    async def coach(message: str, *, user_id: str, session: Session) -> str:
        """A stand-in for an LLM agent: it remembers what it was told."""
        goals: list[str] = session.state.setdefault("goals", [])
        if message.startswith("my goal:"):
            goals.append(message.removeprefix("my goal:").strip())
            return f"Noted. You have {len(goals)} goal(s)."
        return f"As your {session.state['role']}: your goals are {', '.join(goals) or 'not set yet'}."

    return coach


async def first_process(db: Path) -> None:
    print(f"\n== process 1 (pid {os.getpid()}), database {db}\n")
    async with SqliteSessionBackend(db_path=db) as backend:
        manager = InMemorySessionManager(backend=backend)
        manager.on(
            "saved", lambda event: print(f"   hook: saved {event.key} v{event.version} ({event.bytes} bytes)")
        )
        coach = build_agent(manager)
        for message in ["my goal: run 5k", "my goal: sleep 8h", "what are my goals?"]:
            print(f"user  > {message}")
            print(f"coach < {await coach(message, user_id='user:42')}")
        await manager.aclose()


async def second_process(db: Path) -> None:
    print(f"\n== process 2 (pid {os.getpid()}, after a restart), same database {db}\n")
    async with SqliteSessionBackend(db_path=db) as backend:
        manager = InMemorySessionManager(backend=backend)
        coach = build_agent(manager)
        print(f"coach < {await coach('what are my goals?', user_id='user:42')}")
        session = await manager.get("agent:user:42")
        print(f"\nsession {session.key}: version {session.version}, {len(session.turns)} turns stored")
        for turn in await session.turns.last(4):
            print(f"  turn: {turn['input']['message']!r} -> {turn['output']!r}")
        print("stored keys:", await backend.list_keys(MemoryScope.AGENT))
        await manager.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="SQLite file (default: a fresh temporary one)")
    parser.add_argument("--runtime", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resume:
        anyio.run(second_process, args.db, backend=args.runtime)
        return
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "sessions.db"
        anyio.run(first_process, db, backend=args.runtime)
        # A real restart: a new interpreter process opens the same file.
        subprocess.run(
            [sys.executable, __file__, "--resume", "--db", str(db), "--runtime", args.runtime], check=True
        )


if __name__ == "__main__":
    main()
