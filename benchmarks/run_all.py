"""Run the core benchmarks one after another, each with its default settings.

    python benchmarks/run_all.py

aiosqlite and openai-agents are needed for their comparison rows (skipped otherwise).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["bench_sqlite.py", "bench_turn_log.py", "bench_decorator.py"]


def main() -> int:
    status = 0
    for script in SCRIPTS:
        print(f"$ python benchmarks/{script}", flush=True)
        status |= subprocess.call([sys.executable, str(HERE / script)])
        print(flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
