"""LangGraph's own checkpointer conformance suite, run against cognitia's backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import Capability

from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The suite calls only the saver's async methods, which run on both runtimes."""
    return str(request.param)


@pytest.mark.parametrize("capability", [c.value for c in Capability])
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_conformance(backend: str, capability: str, tmp_path: Path) -> None:
    """Every capability of the suite, base and extended, is implemented and passes."""

    async def memory_saver() -> AsyncIterator[CognitiaSaver]:
        yield CognitiaSaver(InMemorySessionBackend())

    async def sqlite_saver() -> AsyncIterator[CognitiaSaver]:
        async with SqliteSessionBackend(db_path=tmp_path / "conformance.db") as sqlite:
            yield CognitiaSaver(sqlite)

    factory = memory_saver if backend == "memory" else sqlite_saver
    registered = checkpointer_test(name=f"CognitiaSaver[{backend}]")(factory)
    report = await validate(registered, capabilities={capability})
    result = report.results[capability]
    assert result.detected, f"{capability} is not implemented"
    assert result.passed is True, "\n".join(result.failures)
    assert result.tests_passed > 0
