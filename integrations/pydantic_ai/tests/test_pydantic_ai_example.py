"""The example in examples/pydantic_ai_chat.py runs offline and resumes after a restart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "pydantic_ai_chat.py"


def test_example_resumes_the_conversation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("pydantic_ai_chat_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    module.main(tmp_path / "chats.db")

    out = capsys.readouterr().out
    assert "resumed after restart, 8 messages:" in out
    assert "request  | user: Roll a die, please." in out
    assert "response | tool call: roll_die({'sides': 6})" in out
    assert out.count("You rolled a 4.") == 3 + 2  # three replies, and two in the resumed history
