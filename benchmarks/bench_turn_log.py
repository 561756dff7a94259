"""A long conversation: 1,000 turns appended to one session on SqliteSessionBackend.

    python benchmarks/bench_turn_log.py [--turns 1000] [--repeat 3]

- cognitia: a ``@persisted_session`` handler called once per turn (asyncio and trio); each
  call appends one turn row and updates the state in one transaction. Reported: turns/s,
  and the time of the last 100 turns against the first 100 (an append must not get slower
  as the log grows).
- cognitia (FULL): the same with ``synchronous="FULL"``, a sync to disk at every commit,
  the durability ``SQLiteSession`` runs with (cognitia's default is WAL with
  ``synchronous=NORMAL``: every committed turn survives a process crash, a power loss may
  lose the last moments);
- OpenAI Agents' ``SQLiteSession`` (asyncio only; file-based, its defaults: WAL, SQLite's
  default ``synchronous=FULL``): ``add_items`` per turn with the same user message and reply.
- whole-state rewrite: the state holds the whole history list and is written with
  ``backend.save`` every turn (what a plain key-value store forces), on the same backend.

Each subject gets a fresh database file. The durability each one ran with is printed:
cognitia's as configured, ``SQLiteSession``'s read back from its connection.
"""

from __future__ import annotations

import argparse
import functools
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from _common import header, positive, quiet_structlog

from cognitia import Session, persisted_session
from cognitia.session.backends import SqliteSessionBackend

REPLY = "Sure - here is what I found about that topic, in a few sentences of ordinary length."


def message(i: int) -> str:
    return f"user message number {i}: tell me more about the previous answer, please"


async def cognitia_run(path: Path, turns: int, synchronous: str = "NORMAL") -> list[float]:
    """Seconds per turn."""
    backend = SqliteSessionBackend(db_path=path, synchronous=synchronous)

    @persisted_session(backend, key="session_id")
    async def chat(text: str, *, session_id: str, session: Session) -> str:
        session.state["turns"] = session.state.get("turns", 0) + 1
        return REPLY

    await backend.save("warm-up", {})  # opens the file and creates the schema outside the timing
    times = []
    for i in range(turns):
        t0 = time.perf_counter()
        await chat(message(i), session_id="conversation")
        times.append(time.perf_counter() - t0)
    assert len(await backend.load_turns("conversation")) == turns
    await backend.aclose()
    return times


async def rewrite_run(path: Path, turns: int) -> list[float]:
    backend = SqliteSessionBackend(db_path=path)
    state: dict[str, Any] = {"history": []}
    await backend.save("warm-up", {})
    times = []
    for i in range(turns):
        t0 = time.perf_counter()
        state["history"].append({"role": "user", "content": message(i)})
        state["history"].append({"role": "assistant", "content": REPLY})
        await backend.save("conversation", state)
        times.append(time.perf_counter() - t0)
    await backend.aclose()
    return times


async def agents_run(path: Path, turns: int) -> list[float]:
    from agents.memory import SQLiteSession

    session = SQLiteSession("conversation", db_path=path)
    durability["openai-agents SQLiteSession.add_items"] = _durability(session._get_connection())
    times = []
    for i in range(turns):
        t0 = time.perf_counter()
        await session.add_items(
            [{"role": "user", "content": message(i)}, {"role": "assistant", "content": REPLY}]
        )
        times.append(time.perf_counter() - t0)
    session.close()
    return times


durability: dict[str, str] = {
    "cognitia @persisted_session": "journal_mode=WAL synchronous=NORMAL (cognitia's default, as configured)",
    "cognitia @persisted_session (FULL)": "journal_mode=WAL synchronous=FULL (as configured)",
}


def _durability(conn: sqlite3.Connection) -> str:
    """The journal mode and synchronous setting of a connection, read back from SQLite."""
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    level = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[conn.execute("PRAGMA synchronous").fetchone()[0]]
    return f"journal_mode={mode.upper()} synchronous={level}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=positive, default=1000)
    parser.add_argument("--repeat", type=positive, default=3, help="best of this many runs per figure")
    args = parser.parse_args()
    if args.turns < 2:
        parser.error("--turns must be at least 2: the first turns are compared with the last")
    quiet_structlog()
    header("bench_turn_log: appending turns to one session")
    try:
        import agents.memory  # noqa: F401

        have_agents = True
    except ImportError:
        have_agents = False
        print("openai-agents is not installed: its row is skipped (pip install openai-agents)\n")
    n = args.turns
    tail = min(100, n // 2)
    print(f"{n} turns to one session, best of {args.repeat} runs (runs interleaved), a fresh file per run\n")

    subjects: dict[str, tuple[Any, str]] = {
        "cognitia @persisted_session": (cognitia_run, "asyncio"),
        "cognitia @persisted_session ": (cognitia_run, "trio"),
        "cognitia @persisted_session (FULL)": (
            functools.partial(cognitia_run, synchronous="FULL"),
            "asyncio",
        ),
        "whole-state rewrite (backend.save)": (rewrite_run, "asyncio"),
    }
    if have_agents:
        subjects["openai-agents SQLiteSession.add_items"] = (agents_run, "asyncio")
    runs: dict[str, list[list[float]]] = {name: [] for name in subjects}
    with tempfile.TemporaryDirectory(prefix="cognitia-bench-") as tmp:
        for r in range(args.repeat):
            for s, (name, (fn, runtime)) in enumerate(subjects.items()):
                runs[name].append(anyio.run(fn, Path(tmp) / f"run-{r}-{s}.db", n, backend=runtime))

    def best(name: str) -> list[float]:
        return min(runs[name], key=sum)

    # The peers run on asyncio only, so each is compared with cognitia on the same runtime;
    # cognitia's trio figure is printed too, and held to the same flat-cost target. Against
    # SQLiteSession the FULL row is compared too: the same durability.
    cognitia_rate = {runtime: n / sum(best(name)) for name, (_, runtime) in list(subjects.items())[:2]}
    full_rate = n / sum(best("cognitia @persisted_session (FULL)"))
    lines = [
        (
            "subject",
            "runtime",
            "turns/s",
            f"first {tail} (s)",
            f"last {tail} (s)",
            "last/first",
            "cognitia vs this",
            "target",
            "",
        )
    ]
    all_met = True
    for name, (_, runtime) in subjects.items():
        times = best(name)
        first, last = sum(times[:tail]), sum(times[-tail:])
        growth = last / first
        rate = n / sum(times)
        is_cognitia = name.startswith("cognitia")
        if is_cognitia:
            target, met, versus = "last/first <= 1.30", growth <= 1.3, ""
        else:
            ratio = cognitia_rate[runtime] / rate
            target, met, versus = ">= 2.00x", ratio >= 2.0, f"{ratio:.2f}x"
            if name.startswith("openai-agents"):
                versus += f" (FULL: {full_rate / rate:.2f}x)"
        all_met &= met
        lines.append(
            (
                name.strip(),
                runtime,
                f"{rate:,.0f}",
                f"{first:.4f}",
                f"{last:.4f}",
                f"{growth:.2f}",
                versus,
                target,
                "ok" if met else "MISSED",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * width for width in widths))
    print()
    for name, setting in durability.items():
        print(f"durability  {name:<40} {setting}")
    print()
    print("'cognitia vs this' = cognitia's turns/s (default durability) on the same runtime divided by")
    print("this subject's; in brackets, cognitia (FULL)'s, at the durability SQLiteSession runs with")
    print("all targets met" if all_met else "SOME TARGETS MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
