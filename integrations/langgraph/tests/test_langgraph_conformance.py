"""LangGraph's own checkpointer conformance suite, run against cognitia's backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import Capability

from cognitia_langgraph import CognitiaSaver

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The suite calls only the saver's async methods, which run on both runtimes."""
    return str(request.param)


@pytest.mark.parametrize("capability", [c.value for c in Capability])
async def test_conformance(backend_factory: Any, capability: str) -> None:
    """Every capability of the suite, base and extended, is implemented and passes."""

    async def saver() -> AsyncIterator[CognitiaSaver]:
        # Every saver the suite asks for is over the same storage; the fixture closes them.
        yield CognitiaSaver(backend_factory())

    registered = checkpointer_test(name=f"CognitiaSaver[{backend_factory.kind}]")(saver)
    report = await validate(registered, capabilities={capability})
    result = report.results[capability]
    assert result.detected, f"{capability} is not implemented"
    assert result.passed is True, "\n".join(result.failures)
    assert result.tests_passed > 0
