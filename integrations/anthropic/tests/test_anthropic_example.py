"""examples/anthropic_tool_runner.py runs offline, on asyncio and trio, and prints the history it resumed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).parents[3] / "examples" / "anthropic_tool_runner.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cognitia_example_anthropic_tool_runner", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.anyio
async def test_example_resumes_the_conversation_after_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], anyio_backend: str
) -> None:
    """The example's main() stores two questions, restarts, prints the full history and continues."""
    await load_example().main(tmp_path / "example.db")
    out = capsys.readouterr().out
    resumed = out.split("resumed history after restart:")[1]
    assert [line.split(None, 1)[0] for line in resumed.strip().splitlines()[:7]] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert "tool result sunny in Paris" in resumed
    # The first request after the restart carried the whole stored history plus the new question.
    assert "claude: I can see 7 messages of our conversation." in out
    assert f"+2 messages, {anyio_backend}]" in out


def test_the_script_runs_on_the_runtime_it_is_given(tmp_path: Path) -> None:
    """Run as a script, ``--runtime trio`` runs it on trio (each save line names the runtime)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--runtime", "trio"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "trio]" in done.stdout and "asyncio]" not in done.stdout
