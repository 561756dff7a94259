"""Every benchmark script runs to its report on a tiny workload.

The figures of a tiny run mean nothing and nothing here looks at them (no test asserts on
time): this only keeps the scripts working as the frameworks and cognitia move. Each one
runs as a user runs it, in a subprocess of this interpreter, and must print the line that
carries its ratios. A script that compares against targets may exit with status 1 when it
printed that some were missed, which a tiny run often does.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# script: (arguments for a tiny run, a line of its report)
RUNS: dict[str, tuple[list[str], str]] = {
    "bench_sqlite.py": (
        ["--states", "20", "--tasks", "4", "--cycles", "2", "--repeat", "1", "--cycle-runs", "1"],
        "raw sqlite3",
    ),
    "bench_decorator.py": (["--calls", "50", "--rounds", "1"], "x the bare call's time"),
    "bench_turn_log.py": (["--turns", "20", "--repeat", "1"], "SQLiteSession.add_items"),
    "bench_openai_agents.py": (
        ["--turns", "100", "--repeat", "1"],
        "ratio cognitia (NORMAL) / SDK SQLiteSession",
    ),
    "bench_langgraph.py": (["--steps", "4", "--rounds", "1"], "cognitia / base"),
    "bench_adk.py": (["--turns", "3"], "cognitia sqlite / adk sqlite: service"),
    "bench_pydantic_ai.py": (["--turns", "5"], "cognitia sqlite / pydantic-ai memory"),
}


def run(script: str, arguments: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = done.stdout + done.stderr
    assert "Traceback" not in report, report
    assert done.returncode == 0 or (done.returncode == 1 and "SOME TARGETS MISSED" in done.stdout), report
    assert expected in done.stdout, report


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs(script: str) -> None:
    arguments, expected = RUNS[script]
    run(script, arguments, expected)


def test_postgres_benchmark_runs(postgres_dsn: str) -> None:
    schema = f"cognitia_bench_{uuid.uuid4().hex[:8]}"
    arguments = ["--dsn", postgres_dsn, "--schema", schema, "--rounds", "1", "--tasks", "4"]
    run(
        "bench_postgres.py",
        [*arguments, "--sequential-ops", "20", "--concurrent-ops", "20"],
        "backend (trio)",
    )


def test_redis_benchmark_runs(redis_url: str) -> None:
    arguments = ["--url", redis_url, "--ops", "20", "--cycles", "2", "--tasks", "4", "--repeat", "1"]
    run("bench_redis.py", arguments, "coredis")
