"""The cost of ``@persisted_session`` itself, on the in-memory backend, on asyncio and trio.

    python benchmarks/bench_decorator.py [--calls 2000] [--rounds 20]

A trivial async handler is called on one session, bare and decorated, in interleaved rounds; the
difference per call is what the decorator adds: resolving the key, the per-key lock, loading
the live session, recording the turn (inputs, output, timing), encoding state and turn as
JSON, the versioned commit into the in-memory backend and the ``saved`` lifecycle event
(dropped by the filtering logger, no hooks registered).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import anyio
from _common import header, positive, quiet_structlog

from cognitia import Session, persisted_session
from cognitia.session.backends import InMemorySessionBackend

TARGET_US = 50.0


async def bare(message: str, *, session_id: str, session: Any = None) -> str:
    return message


def decorated_handler() -> Any:
    @persisted_session(InMemorySessionBackend(), key="session_id")
    async def handler(message: str, *, session_id: str, session: Session) -> str:
        return message

    return handler


async def measure(calls: int, rounds: int) -> tuple[float, float]:
    """Seconds per call, bare and decorated: the fastest of ``rounds`` interleaved rounds.

    Short interleaved rounds and the minimum keep the figure stable on a shared machine:
    a round disturbed by another process is simply not the fastest.
    """
    handler = decorated_handler()
    await handler("warm-up", session_id="s")
    await bare("warm-up", session_id="s")
    bare_best = decorated_best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            await bare("hello", session_id="s")
        t1 = time.perf_counter()
        for _ in range(calls):
            await handler("hello", session_id="s")
        t2 = time.perf_counter()
        bare_best = min(bare_best, (t1 - t0) / calls)
        decorated_best = min(decorated_best, (t2 - t1) / calls)
    return bare_best, decorated_best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=positive, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=positive, default=20, help="the fastest round counts")
    args = parser.parse_args()
    quiet_structlog()
    header("bench_decorator: @persisted_session overhead on InMemorySessionBackend")
    print(
        f"a trivial async handler on one session: {args.rounds} interleaved rounds of {args.calls} bare and "
        f"{args.calls} decorated calls per runtime; the fastest round of each is reported\n"
    )
    lines = [("runtime", "bare us/call", "decorated us/call", "overhead us/call", "time ratio", "target", "")]
    all_met = True
    for runtime in ("asyncio", "trio"):
        bare_s, decorated_s = anyio.run(measure, args.calls, args.rounds, backend=runtime)
        overhead_us = (decorated_s - bare_s) * 1e6
        met = overhead_us <= TARGET_US
        all_met &= met
        lines.append(
            (
                runtime,
                f"{bare_s * 1e6:.2f}",
                f"{decorated_s * 1e6:.2f}",
                f"{overhead_us:.1f}",
                f"{decorated_s / bare_s:.0f}x the bare call's time",
                f"<= {TARGET_US:.0f} us",
                "ok" if met else "MISSED",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))
    print()
    print("all targets met" if all_met else "SOME TARGETS MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
