"""A pydantic-ai chat whose conversation survives a restart, stored by cognitia.

Runs offline: the agent's model is pydantic-ai's ``FunctionModel`` with a scripted reply.
A real app passes a real model instead, e.g. ``Agent("openai:gpt-5")``, and keeps the rest.

    python examples/pydantic_ai_chat.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
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

from cognitia.session.backends import SqliteSessionBackend
from cognitia_pydantic_ai import CognitiaConversationStore


def scripted_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Stands in for an LLM: first calls the tool, then reports what it returned."""
    last = messages[-1].parts[-1]
    if isinstance(last, ToolReturnPart):
        return ModelResponse(parts=[TextPart(f"You rolled a {last.content}.")])
    return ModelResponse(parts=[ToolCallPart("roll_die", {"sides": 6})])


agent: Agent[None, str] = Agent(FunctionModel(scripted_model), instructions="You roll dice for the user.")


@agent.tool_plain
def roll_die(sides: int) -> int:
    """Roll a die with ``sides`` sides (always 4 here, so the output is stable)."""
    return min(4, sides)


async def chat(db_path: Path, conversation_id: str, prompt: str) -> str:
    """One request of a server: load the conversation, run the agent, save what it added."""
    async with SqliteSessionBackend(db_path) as backend:
        store = CognitiaConversationStore(backend)
        conversation = await store.load(conversation_id) or Conversation(conversation_id=conversation_id)
        result = await agent.run(prompt, conversation=conversation)
        await store.save(result)
        return result.output


def describe(message: ModelMessage) -> str:
    parts = []
    for part in message.parts:
        if isinstance(part, UserPromptPart):
            parts.append(f"user: {part.content}")
        elif isinstance(part, ToolCallPart):
            parts.append(f"tool call: {part.tool_name}({part.args_as_dict()})")
        elif isinstance(part, ToolReturnPart):
            parts.append(f"tool return: {part.content}")
        elif isinstance(part, TextPart):
            parts.append(f"assistant: {part.content}")
    kind = "request " if isinstance(message, ModelRequest) else "response"
    return f"{kind} | " + "; ".join(parts)


async def run(db_path: Path) -> None:
    print(await chat(db_path, "demo", "Roll a die, please."))
    print(await chat(db_path, "demo", "Once more!"))

    # A restart: a new process opens the same file with a new backend and store.
    async with SqliteSessionBackend(db_path) as backend:
        resumed = await CognitiaConversationStore(backend).load("demo")
    assert resumed is not None
    print(f"resumed after restart, {len(resumed.messages)} messages:")
    for message in resumed.messages:
        print("  " + describe(message))
    print(await chat(db_path, "demo", "And a last time."))


def main(db_path: str | Path | None = None) -> None:
    """Run the demo against ``db_path`` (a fresh temporary file by default)."""
    if db_path is not None:
        asyncio.run(run(Path(db_path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp) / "chats.db"))


if __name__ == "__main__":
    main()
