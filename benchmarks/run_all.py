"""Run every benchmark one after another, each with its default settings.

    python benchmarks/run_all.py            (or: python3 scripts/dev.py bench)

The PostgreSQL and Redis benchmarks run when COGNITIA_TEST_POSTGRES_DSN and
COGNITIA_TEST_REDIS_URL name a server, and are skipped otherwise. The project's dev
environment has every peer the comparisons need (aiosqlite, openai-agents, langgraph, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [
    "bench_sqlite.py",
    "bench_turn_log.py",
    "bench_decorator.py",
    "bench_openai_agents.py",
    "bench_pydantic_ai.py",
    "bench_langgraph.py",
    "bench_adk.py",
]
SERVER_SCRIPTS = {
    "bench_postgres.py": "COGNITIA_TEST_POSTGRES_DSN",
    "bench_redis.py": "COGNITIA_TEST_REDIS_URL",
}


def main() -> int:
    status = 0
    scripts = list(SCRIPTS)
    for script, variable in SERVER_SCRIPTS.items():
        if os.environ.get(variable):
            scripts.append(script)
        else:
            print(f"skipping {script}: set {variable} to run it", flush=True)
    for script in scripts:
        print(f"$ python benchmarks/{script}", flush=True)
        status |= subprocess.call([sys.executable, str(HERE / script)])
        print(flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
