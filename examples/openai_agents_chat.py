"""An OpenAI Agents SDK chat whose history lives in cognitia and survives a restart.

Runs offline: the agent's model is a small rule-based stand-in written against the SDK's
own ``Model`` interface. A real application passes a real model instead (for example
``Agent(..., model="gpt-4.1")`` with ``OPENAI_API_KEY`` set); nothing else changes.

    python examples/openai_agents_chat.py
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agents import (
    Agent,
    Model,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    Runner,
    Tool,
    Usage,
    function_tool,
    set_tracing_disabled,
)
from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import TResponseInputItem, TResponseOutputItem, TResponseStreamEvent
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputRefusal,
    ResponseOutputText,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam

from cognitia import InMemorySessionManager, SessionEvent
from cognitia.session.backends import SqliteSessionBackend
from cognitia_openai_agents import CognitiaSession


class OfflineModel(Model):
    """Stands in for a real model: asks for the weather tool, then answers from its result.

    A real application does not need this class: it passes a real model to the Agent.
    """

    def __init__(self) -> None:
        self._replies = 0

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
        self._replies += 1
        n = self._replies
        items: list[Any] = [{"role": "user", "content": input}] if isinstance(input, str) else input
        last = items[-1]
        output: list[TResponseOutputItem]
        if last.get("type") == "function_call_output":
            output = [_say(f"msg_{n}", f"It is {last['output']}.")]
        elif match := re.search(r"weather in (\w+)", str(last.get("content", ""))):
            arguments = json.dumps({"city": match.group(1)})
            output = [
                ResponseFunctionToolCall(
                    type="function_call",
                    id=f"fc_{n}",
                    call_id=f"call_{n}",
                    name="get_weather",
                    arguments=arguments,
                )
            ]
        else:
            earlier = sum(1 for item in items if item.get("role") == "user")
            output = [_say(f"msg_{n}", f"You have written to me {earlier} times.")]
        return ModelResponse(output=output, usage=Usage(), response_id=None)

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
        raise NotImplementedError("this example uses Runner.run")


def _say(id: str, text: str) -> ResponseOutputMessage:
    content: list[ResponseOutputText | ResponseOutputRefusal] = [
        ResponseOutputText(type="output_text", text=text, annotations=[])
    ]
    return ResponseOutputMessage(id=id, type="message", role="assistant", status="completed", content=content)


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def describe(item: Any) -> str:
    """One line per stored item."""
    if item.get("type") == "function_call":
        return f"{'tool call':<11} {item['name']}({item['arguments']})"
    if item.get("type") == "function_call_output":
        return f"{'tool result':<11} {item['output']}"
    content = item["content"]
    text = content if isinstance(content, str) else content[0]["text"]
    return f"{item['role']:<11} {text}"


async def main(db_path: str | Path | None = None) -> None:
    set_tracing_disabled(True)  # offline: the SDK would otherwise export traces to OpenAI
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(db_path) if db_path is not None else Path(scratch) / "sessions.db"
        agent = Agent(name="assistant", instructions="Be brief.", model=OfflineModel(), tools=[get_weather])

        # First process: two runs of the conversation "user-42".
        backend = SqliteSessionBackend(db_path=path)
        manager = InMemorySessionManager(backend)

        def on_saved(event: SessionEvent) -> None:
            print(f"  [saved {event.key} v{event.version}: +{event.turns} items]")

        manager.on("saved", on_saved)
        session = CognitiaSession("user-42", manager)
        for text in ["What is the weather in Paris?", "Thanks!"]:
            result = await Runner.run(agent, text, session=session)
            print(f"user: {text}\nagent: {result.final_output}")
        await backend.aclose()

        # A restart: a new backend on the same file, and the conversation goes on.
        async with SqliteSessionBackend(db_path=path) as restarted:
            session = CognitiaSession("user-42", InMemorySessionManager(restarted))
            print("\nresumed history after restart:")
            for item in await session.get_items():
                print("  " + describe(item))
            result = await Runner.run(agent, "Still there?", session=session)
            print(f"\nuser: Still there?\nagent: {result.final_output}")


if __name__ == "__main__":
    asyncio.run(main())
