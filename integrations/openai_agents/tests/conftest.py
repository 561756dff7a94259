"""Fixtures for the OpenAI Agents integration: a rule-based model, backends, no network."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents import (
    Agent,
    Model,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    Tool,
    Usage,
    function_tool,
    set_tracing_disabled,
)
from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import TResponseInputItem, TResponseOutputItem, TResponseStreamEvent
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText
from openai.types.responses.response_prompt_param import ResponsePromptParam


@pytest.fixture
def anyio_backend() -> str:
    """The OpenAI Agents SDK runs only on asyncio (it uses asyncio.to_thread, asyncio tasks and
    asyncio.wait internally), so its tests are pinned to asyncio; the core tests cover trio."""
    return "asyncio"


@pytest.fixture(autouse=True)
def _offline(offline: None) -> None:
    """No test reaches the network but the test servers': the SDK's tracing is off and every
    other connection fails."""
    set_tracing_disabled(True)


class RuleModel(Model):
    """A model written against the SDK's own ``Model`` interface that answers by rule.

    "weather in <city>" asks for the ``get_weather`` tool; a tool result is turned into
    a sentence; anything else is echoed. Replies depend only on the input, so concurrent
    conversations can share one model. ``inputs`` records what each call received.
    """

    def __init__(self) -> None:
        self.inputs: list[list[TResponseInputItem]] = []
        self._ids = itertools.count(1)

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        items: list[TResponseInputItem] = (
            [{"role": "user", "content": input}] if isinstance(input, str) else list(input)
        )
        self.inputs.append(items)
        return ModelResponse(output=self.answer(items), usage=Usage(), response_id=None)

    def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        raise NotImplementedError("these tests use Runner.run")

    def answer(self, items: list[TResponseInputItem]) -> list[TResponseOutputItem]:
        n = next(self._ids)
        last: Any = items[-1]
        if last.get("type") == "function_call_output":
            return [message(f"msg_{n}", f"It is {last['output']}.")]
        text = str(last.get("content", ""))
        match = re.search(r"weather in (\w+)", text)
        if match:
            arguments = json.dumps({"city": match.group(1)})
            return [
                ResponseFunctionToolCall(
                    type="function_call",
                    id=f"fc_{n}",
                    call_id=f"call_{n}",
                    name="get_weather",
                    arguments=arguments,
                )
            ]
        return [message(f"msg_{n}", f"echo: {text}")]


def message(id: str, text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=id,
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
def model() -> RuleModel:
    return RuleModel()


@pytest.fixture
def agent(model: RuleModel) -> Agent[Any]:
    return Agent(name="assistant", instructions="Be brief.", model=model, tools=[get_weather])
