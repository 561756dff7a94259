from __future__ import annotations

from collections.abc import Callable

import pydantic_ai.models
import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel


@pytest.fixture
def anyio_backend() -> str:
    # pydantic-ai runs only on asyncio (its agent graph and model clients call asyncio
    # directly), so its tests pin asyncio. The one trio test overrides this with
    # parametrize and drives the agent through run_sync in a worker thread.
    return "asyncio"


@pytest.fixture(autouse=True)
def no_model_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the fake models run: a real model's request fails the test."""
    monkeypatch.setattr(pydantic_ai.models, "ALLOW_MODEL_REQUESTS", False)


def user_prompts(messages: list[ModelMessage]) -> list[str]:
    return [
        str(part.content)
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart)
    ]


def _dice_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Calls roll_die, then answers with every prompt it was shown: the history it saw."""
    if any(isinstance(part, ToolReturnPart) for part in messages[-1].parts):
        return ModelResponse(parts=[TextPart(f"rolled; prompts seen: {' | '.join(user_prompts(messages))}")])
    return ModelResponse(parts=[ToolCallPart("roll_die", {"sides": 6})])


@pytest.fixture
def prompts_of() -> Callable[[list[ModelMessage]], list[str]]:
    """The user prompts in a history, in order."""
    return user_prompts


@pytest.fixture
def agent() -> Agent[None, str]:
    """An agent with a function tool, on pydantic-ai's FunctionModel (offline)."""
    dice: Agent[None, str] = Agent(FunctionModel(_dice_model), name="dice")

    @dice.tool_plain
    def roll_die(sides: int) -> int:
        """Roll a die with ``sides`` sides."""
        return min(4, sides)

    return dice
