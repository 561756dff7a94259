"""Run every benchmark one after another, each with its default settings.

    python benchmarks/run_all.py                    (or: python3 scripts/dev.py bench)
    python benchmarks/run_all.py bench_adk.py ...   (only those; each script has --help for its options)

The PostgreSQL and Redis benchmarks run when COGNITIA_TEST_POSTGRES_DSN and
COGNITIA_TEST_REDIS_URL name a server, and are skipped otherwise. The project's dev
environment has every peer the comparisons need (aiosqlite, openai-agents, langgraph, ...).
"""

from __future__ import annotations

import argparse
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
    known = [*SCRIPTS, *SERVER_SCRIPTS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "only", nargs="*", choices=known, metavar="SCRIPT", help=f"one of: {', '.join(known)}"
    )
    args = parser.parse_args()
    status = 0
    scripts = [script for script in SCRIPTS if not args.only or script in args.only]
    for script, variable in SERVER_SCRIPTS.items():
        if args.only and script not in args.only:
            continue
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
