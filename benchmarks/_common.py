"""Helpers shared by the benchmark scripts: logging setup, timing, the results table."""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog

LOGGING_NOTE = (
    "structlog: configured by this script to drop events below WARNING "
    "(an application's choice; cognitia itself never configures structlog)"
)


def positive(text: str) -> int:
    """An argparse type: a count of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count, got {text}")
    return value


def quiet_structlog() -> None:
    """Drop info events, as a production application logging at WARNING would."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def machine() -> str:
    return (
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"SQLite {__import__('sqlite3').sqlite_version}"
    )


def header(title: str) -> None:
    print(title)
    print("=" * len(title))
    print(machine())
    print(LOGGING_NOTE)
    print()


@contextmanager
def timer(out: list[float]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    out.append(time.perf_counter() - t0)


def best_of(repeat: int, run: Callable[[], float]) -> float:
    """The fastest of ``repeat`` runs: the least disturbed by the rest of the machine."""
    return min(run() for _ in range(repeat))


@dataclass
class Row:
    scenario: str
    subject: str
    runtime: str
    ops: int
    seconds: float
    reference: str | None = None
    """Subject name (same scenario) this row's throughput is divided by."""
    target: float | None = None
    """Minimum ratio against the reference."""
    also: str | None = None
    """A second reference, whose ratio is printed too (no target)."""

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


def _versus(row: Row, reference: str, by_name: dict[tuple[str, str, str], Row]) -> tuple[float, str]:
    """The ratio of ``row``'s throughput to the reference's, and how it is printed."""
    scenario, subject, runtime = reference.split("|")
    ref = by_name[(scenario or row.scenario, subject, runtime or row.runtime)]
    value = row.rate / ref.rate
    # Truncated, not rounded: a ratio printed as the target has met it.
    return value, f"{math.floor(value * 100) / 100:.2f}x {subject}" + (f"/{runtime}" if runtime else "")


def print_table(rows: list[Row]) -> bool:
    """Print the rows with ratios against their references; return whether every target was met."""
    by_name = {(r.scenario, r.subject, r.runtime): r for r in rows}
    lines = [("scenario", "subject", "runtime", "ops", "seconds", "ops/s", "us/op", "ratio", "target", "")]
    all_met = True
    for row in rows:
        ratio = target = status = ""
        if row.reference is not None:
            value, ratio = _versus(row, row.reference, by_name)
            if row.also is not None:
                ratio += f"; {_versus(row, row.also, by_name)[1]}"
            if row.target is not None:
                target = f">= {row.target:.2f}x"
                met = value >= row.target
                all_met &= met
                status = "ok" if met else "MISSED"
        lines.append(
            (
                row.scenario,
                row.subject,
                row.runtime,
                str(row.ops),
                f"{row.seconds:.3f}",
                f"{row.rate:,.0f}",
                f"{1e6 / row.rate:.1f}",
                ratio,
                target,
                status,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))
    print()
    print("all targets met" if all_met else "SOME TARGETS MISSED")
    sys.stdout.flush()
    return all_met


# The workload of the server benchmarks (PostgreSQL, Redis): one definition for both.

SESSIONS_PER_TASK = 5


def make_state(n: int) -> dict[str, Any]:
    """A small agent session: a role, a counter and a short conversation (about 1 KB of JSON)."""
    return {
        "role": "coach",
        "turn": n,
        "user": {"id": 42, "locale": "en-GB", "plan": "pro"},
        "history": [
            {
                "role": "user" if j % 2 == 0 else "assistant",
                "content": f"message {j} of the conversation " * 3,
            }
            for j in range(8)
        ],
    }


TURN = {"role": "user", "content": "and another question about the plan", "ts": 1_700_000_000.5}


def key(task: int, i: int) -> str:
    return f"agent:bench:{task}:{i % SESSIONS_PER_TASK}"
