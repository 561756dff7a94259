"""examples/openai_agents_chat.py runs offline and prints the history it resumed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).parents[3] / "examples" / "openai_agents_chat.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cognitia_example_openai_agents_chat", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.anyio
async def test_example_resumes_the_conversation_after_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example's main() stores two runs, restarts, prints the full history and continues."""
    await load_example().main(tmp_path / "example.db")
    out = capsys.readouterr().out
    resumed = out.split("resumed history after restart:")[1]
    assert [line.split(None, 1)[0] for line in resumed.strip().splitlines()[:6]] == [
        "user",
        "tool",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert "It is sunny in Paris." in resumed
    assert "agent: You have written to me 3 times." in out
