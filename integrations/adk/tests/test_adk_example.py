"""The example in examples/adk_agent.py runs offline and resumes after a restart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "adk_agent.py"


def test_example_resumes_the_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("adk_agent_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    module.main(tmp_path / "adk.db")

    out = capsys.readouterr().out
    assert "resumed after restart, 8 events, state {'last_roll': 4, 'user:rolls': 2}:" in out
    assert " user | text: Roll a die, please." in out
    assert " dice | tool call: roll_die({'sides': 6})" in out
    assert out.count("You rolled a 4.") == 3 + 2  # three replies, and two in the resumed history
