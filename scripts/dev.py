#!/usr/bin/env python3
"""Developer entry point: needs only Python 3.11+, bootstraps everything else.

    python3 scripts/dev.py demo     run the quick-start demo on the embedded SQLite backend
    python3 scripts/dev.py test     run the whole test suite (what CI runs)
    python3 scripts/dev.py check    type-check and lint the package, tests and examples
    python3 scripts/dev.py bench    run the benchmarks
    python3 scripts/dev.py docs     build the documentation site into site/

uv is used if it is on PATH; otherwise it is installed into ./.tools with pip. The
project's environment (.venv) is created from uv.lock with the running interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"


def _bin(env: Path, name: str) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin") / name


def find_uv() -> str:
    found = shutil.which("uv")
    if found:
        return found
    local = _bin(TOOLS, "uv")
    if not local.exists():
        print("bootstrap: installing uv into .tools/ ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(TOOLS)
        subprocess.run([str(_bin(TOOLS, "python")), "-m", "pip", "install", "--quiet", "uv>=0.5"], check=True)
    return str(local)


def sync(uv: str) -> None:
    """Create or update .venv from the lock file: the core, every integration, all extras."""
    cmd = [uv, "sync", "--locked", "--all-packages", "--all-extras", "--python", sys.executable]
    subprocess.run(cmd, cwd=ROOT, check=True, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    # Trust the system's certificate store, as pip does: networks that inspect TLS add
    # their authority there, and uv's built-in roots would reject it.
    env.setdefault("UV_SYSTEM_CERTS", "1")
    if "PIP_CERT" in env:
        env.setdefault("SSL_CERT_FILE", env["PIP_CERT"])
    env.pop("VIRTUAL_ENV", None)
    return env


def run(uv: str, *args: str) -> int:
    return subprocess.run([uv, "run", "--no-sync", *args], cwd=ROOT, env=_env()).returncode


def check(uv: str) -> int:
    """mypy --strict over the core, its tests and the examples, then each integration on its
    own (their test folders each have a conftest), then ruff over everything."""
    failed = run(uv, "mypy")
    failed |= run(uv, "mypy", "--strict", "conftest.py")  # apart: tests/ has a conftest too
    for integration in sorted((ROOT / "integrations").glob("*/pyproject.toml")):
        failed |= run(uv, "mypy", "--strict", str(integration.parent.relative_to(ROOT)))
    lint = ("cognitia", "tests", "examples", "integrations", "benchmarks", "scripts", "conftest.py")
    failed |= run(uv, "ruff", "check", *lint)
    return failed


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script may be started by an older python3
        print("cognitia needs Python 3.11 or newer", file=sys.stderr)
        return 2
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command not in {"demo", "test", "check", "bench", "docs"}:
        print(__doc__)
        return 0 if command in {"help", "-h", "--help"} else 2
    uv = find_uv()
    sync(uv)
    if command == "demo":
        return run(uv, "python", "examples/demo.py", *rest)
    if command == "test":
        return run(uv, "python", "-m", "pytest", *rest)
    if command == "check":
        return check(uv)
    if command == "bench":
        return run(uv, "python", "benchmarks/run_all.py", *rest)
    return run(uv, "mkdocs", "build", "--strict", *rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
