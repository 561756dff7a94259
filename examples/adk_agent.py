"""A Google ADK agent whose session survives a restart, stored by cognitia.

Runs offline: the agent's model is a scripted ``BaseLlm`` (ADK's extension point for
models). A real app passes a real model instead, e.g. ``Agent(model="gemini-2.5-flash")``,
and keeps the rest.

    python examples/adk_agent.py
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path

from google.adk.agents import Agent
from google.adk.events import Event
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.tools.tool_context import ToolContext
from google.genai import types

from cognitia.session.backends import SqliteSessionBackend
from cognitia_adk import CognitiaSessionService

APP, USER, SESSION = "dice", "ann", "demo"


class ScriptedLlm(BaseLlm):
    """Stands in for an LLM: first calls the tool, then reports what it returned."""

    model: str = "scripted"

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        last = llm_request.contents[-1].parts or []
        returned = [part.function_response.response for part in last if part.function_response]
        if returned and returned[0] is not None:
            parts = [types.Part(text=f"You rolled a {returned[0]['result']}.")]
        else:
            parts = [types.Part(function_call=types.FunctionCall(name="roll_die", args={"sides": 6}))]
        usage = types.GenerateContentResponseUsageMetadata(prompt_token_count=1, candidates_token_count=1)
        yield LlmResponse(content=types.Content(role="model", parts=parts), usage_metadata=usage)


def roll_die(sides: int, tool_context: ToolContext) -> dict[str, int]:
    """Roll a die with ``sides`` sides (always 4 here, so the output is stable)."""
    tool_context.state["user:rolls"] = tool_context.state.get("user:rolls", 0) + 1  # kept per user
    tool_context.state["last_roll"] = 4  # kept per session
    return {"result": min(4, sides)}


agent = Agent(name="dice", model=ScriptedLlm(), instruction="Roll dice for the user.", tools=[roll_die])


async def ask(db_path: Path, text: str) -> str:
    """One request of a server: the Runner loads the session, runs, and appends each event."""
    async with SqliteSessionBackend(db_path) as backend:
        service = CognitiaSessionService(backend)
        if await service.get_session(app_name=APP, user_id=USER, session_id=SESSION) is None:
            await service.create_session(app_name=APP, user_id=USER, session_id=SESSION)
        runner = Runner(agent=agent, app_name=APP, session_service=service)
        message = types.Content(role="user", parts=[types.Part(text=text)])
        answer = ""
        async for event in runner.run_async(user_id=USER, session_id=SESSION, new_message=message):
            if event.content and event.content.parts and event.content.parts[0].text:
                answer = event.content.parts[0].text
        return answer


def describe(event: Event) -> str:
    parts = []
    for part in (event.content.parts if event.content else None) or []:
        if part.text:
            parts.append(f"text: {part.text}")
        elif part.function_call:
            parts.append(f"tool call: {part.function_call.name}({part.function_call.args})")
        elif part.function_response:
            parts.append(f"tool return: {part.function_response.response}")
    return f"{event.author:>5} | " + "; ".join(parts)


async def run(db_path: Path) -> None:
    print(await ask(db_path, "Roll a die, please."))
    print(await ask(db_path, "Once more!"))

    # A restart: a new process opens the same file with a new backend and service.
    async with SqliteSessionBackend(db_path) as backend:
        resumed = await CognitiaSessionService(backend).get_session(
            app_name=APP, user_id=USER, session_id=SESSION
        )
    assert resumed is not None
    print(f"resumed after restart, {len(resumed.events)} events, state {resumed.state}:")
    for event in resumed.events:
        print("  " + describe(event))
    print(await ask(db_path, "And a last time."))


def main(db_path: str | Path | None = None) -> None:
    """Run the demo against ``db_path`` (a fresh temporary file by default)."""
    if db_path is not None:
        asyncio.run(run(Path(db_path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp) / "adk.db"))


if __name__ == "__main__":
    main()
