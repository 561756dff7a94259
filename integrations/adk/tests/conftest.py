from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest
from google.adk.agents import Agent
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.tools.tool_context import ToolContext
from google.genai import types


@pytest.fixture
def anyio_backend() -> str:
    # ADK runs only on asyncio (its Runner, flows and tools call asyncio directly), so
    # its tests pin asyncio. The one trio test overrides this with parametrize and drives
    # ADK through the sync Runner.run, which runs its own asyncio loop in a thread.
    return "asyncio"


@pytest.fixture(autouse=True)
def no_network(offline: None) -> None:
    """Only the scripted model runs: any connection but to the test servers fails the test."""


class ScriptedLlm(BaseLlm):
    """A model through ADK's own extension point: calls roll_die, then answers.

    The answer lists every user prompt in the request, so a test can see the history
    the model was given.
    """

    model: str = "scripted-dice"

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        contents = llm_request.contents
        returned = [part.function_response for part in contents[-1].parts or [] if part.function_response]
        if returned and returned[0].response is not None:
            prompts = [
                part.text
                for content in contents
                if content.role == "user"
                for part in content.parts or []
                if part.text
            ]
            text = f"rolled {returned[0].response['result']}; prompts seen: {' | '.join(prompts)}"
            parts = [types.Part(text=text)]
        else:
            parts = [types.Part(function_call=types.FunctionCall(name="roll_die", args={"sides": 6}))]
        usage = types.GenerateContentResponseUsageMetadata(
            prompt_token_count=len(contents), candidates_token_count=1
        )
        yield LlmResponse(content=types.Content(role="model", parts=parts), usage_metadata=usage)


def roll_die(sides: int, tool_context: ToolContext) -> dict[str, int]:
    """Roll a die with ``sides`` sides; counts rolls per user and per app."""
    state = tool_context.state
    state["last_roll"] = min(4, sides)
    state["user:rolls"] = state.get("user:rolls", 0) + 1
    state["app:rolls"] = state.get("app:rolls", 0) + 1
    state["temp:scratch"] = "never stored"
    return {"result": min(4, sides)}


@pytest.fixture
def agent() -> Agent:
    """An ADK agent with a function tool, on the scripted model (offline)."""
    return Agent(name="dice", model=ScriptedLlm(), instruction="Roll dice for the user.", tools=[roll_die])
