"""examples/langgraph_agent.py runs offline and resumes its thread after the restart."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import structlog

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "langgraph_agent.py"


@pytest.fixture
def example() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("langgraph_agent_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = structlog.get_config()
    yield module
    structlog.configure(**config)  # main() configures logging for its process; undo it


def test_example_runs_and_resumes(
    example: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "agent.db"
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(db_path)])
    example.main()
    out = capsys.readouterr().out
    assert "first run:  It's sunny in Paris." in out
    assert "restarted:  4 messages in the thread" in out
    assert "second run: Oslo is sunny too." in out
    assert "human: What's the weather in Paris?" in out and "tool: sunny, 24 degrees in Oslo" in out
    assert db_path.exists()


def test_example_default_uses_a_temporary_directory(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    example.main()
    assert "second run: Oslo is sunny too." in capsys.readouterr().out
