"""With the cognitia.mypy plugin, mypy checks what callers pass to a decorated handler."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api", reason="the mypy plugin is tested where mypy is installed")

PROGRAM = textwrap.dedent(
    """
    from collections.abc import AsyncIterator

    from cognitia import Session, persisted_session
    from cognitia.session.backends import InMemorySessionBackend

    backend = InMemorySessionBackend()

    @persisted_session(backend, key="session_id")
    async def chat(message: str, *, session_id: str, session: Session) -> str:
        return message

    @persisted_session(backend, key="session_id")
    def count(*, session_id: str, session: Session) -> int:
        return 1

    @persisted_session(backend, key="session_id")
    async def stream(message: str, *, session_id: str, session: Session) -> AsyncIterator[str]:
        yield message

    async def callers(s: Session) -> None:
        reply: str = await chat("hi", session_id="user:42")
        total: int = await count(session_id="user:42")
        chunks = [chunk async for chunk in stream("hi", session_id="user:42")]
        reveal_type(chat.manager)
        await chat("hi")  # error: session_id is missing
        await chat("hi", session_id="user:42", session=s)  # error: session is not the caller's
        await chat(42, session_id="user:42")  # error: wrong type
        wrong: int = await chat("hi", session_id="user:42")  # error: returns str
    """
)


def test_mypy_sees_the_parameters_without_session(tmp_path: Path) -> None:
    source = tmp_path / "program.py"
    source.write_text(PROGRAM, encoding="utf-8")
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nplugins = cognitia.mypy\nstrict = True\n", encoding="utf-8")
    out, _, status = api.run(
        [
            str(source),
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-incremental",
        ]
    )
    errors = {int(line.split(":")[1]) for line in out.splitlines() if ": error:" in line}
    expected = {n for n, line in enumerate(PROGRAM.splitlines(), start=1) if "# error:" in line}
    assert len(expected) == 4
    assert errors == expected, out
    assert 'Revealed type is "cognitia.session.manager.InMemorySessionManager"' in out
    assert status == 1
