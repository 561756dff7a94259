"""An Anthropic tool-runner conversation stored in cognitia, resumed after a restart.

Runs offline, on asyncio or trio: the client talks to a small rule-based stand-in for the
Messages API through the SDK's HTTP transport (``httpx2.MockTransport``). A real
application creates ``AsyncAnthropic()`` (with ``ANTHROPIC_API_KEY`` set) instead of
calling ``offline_client()``; nothing else changes.

    python examples/anthropic_tool_runner.py [--runtime trio]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import anyio
import httpx2
from anthropic import AsyncAnthropic, beta_async_tool

from cognitia import InMemorySessionManager, SessionEvent
from cognitia.session.backends import SqliteSessionBackend
from cognitia_anthropic import PersistedConversation

MODEL = "claude-sonnet-5-5"


def offline_client() -> AsyncAnthropic:
    """A client whose requests are answered locally by rule, instead of by the API.

    A user asking for "weather in <city>" gets a reply calling ``get_weather``; a tool
    result is turned into a sentence; anything else is counted.
    """
    ids = itertools.count(1)

    def answer(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        n = next(ids)
        last = body["messages"][-1]
        content = last["content"]
        blocks: list[dict[str, Any]]
        if isinstance(content, list) and content[0]["type"] == "tool_result":
            blocks, stop = [{"type": "text", "text": f"It is {content[0]['content']}."}], "end_turn"
        elif match := re.search(r"weather in (\w+)", content if isinstance(content, str) else ""):
            call = {
                "type": "tool_use",
                "id": f"toolu_{n}",
                "name": "get_weather",
                "input": {"city": match[1]},
            }
            blocks, stop = [{"type": "text", "text": "Let me look."}, call], "tool_use"
        else:
            seen = len(body["messages"])
            blocks, stop = (
                [{"type": "text", "text": f"I can see {seen} messages of our conversation."}],
                "end_turn",
            )
        reply = {
            "id": f"msg_{n}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": blocks,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }
        return httpx2.Response(200, json=reply)

    transport = httpx2.MockTransport(answer)
    return AsyncAnthropic(api_key="offline", http_client=httpx2.AsyncClient(transport=transport))


@beta_async_tool
async def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def describe(message: Any) -> list[str]:
    """One line per block of a stored message."""
    content = message["content"]
    if isinstance(content, str):
        return [f"{message['role']:<11} {content}"]
    lines = []
    for block in content:
        if block["type"] == "text":
            lines.append(f"{message['role']:<11} {block['text']}")
        elif block["type"] == "tool_use":
            lines.append(f"{'tool call':<11} {block['name']}({json.dumps(block['input'])})")
        elif block["type"] == "tool_result":
            lines.append(f"{'tool result':<11} {block['content']}")
    return lines


async def ask(conversation: PersistedConversation, client: AsyncAnthropic, text: str) -> str:
    """One user turn: store the question, run the tool loop over the whole history, store every reply."""
    await conversation.append({"role": "user", "content": text})
    runner = client.beta.messages.tool_runner(
        model=MODEL, max_tokens=1024, tools=[get_weather], messages=await conversation.messages()
    )
    final = await conversation.run(runner)
    return "".join(block.text for block in final.content if block.type == "text")


async def main(db_path: str | Path | None = None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(db_path) if db_path is not None else Path(scratch) / "sessions.db"

        # First process: two questions in the conversation "user-42".
        backend = SqliteSessionBackend(db_path=path)
        manager = InMemorySessionManager(backend)

        def on_saved(event: SessionEvent) -> None:
            print(f"  [saved {event.key} v{event.version}: +{event.turns} messages, {event.runtime}]")

        manager.on("saved", on_saved)
        conversation = PersistedConversation(manager, "user-42")
        client = offline_client()
        for text in ["What is the weather in Paris?", "Thanks!"]:
            print(f"user: {text}\nclaude: {await ask(conversation, client, text)}")
        await client.close()
        await backend.aclose()

        # A restart: new backend, manager and client; the conversation goes on from storage.
        async with SqliteSessionBackend(db_path=path) as restarted:
            conversation = PersistedConversation(InMemorySessionManager(restarted), "user-42")
            print("\nresumed history after restart:")
            for message in await conversation.messages():
                for line in describe(message):
                    print("  " + line)
            client = offline_client()
            print(f"\nuser: Still there?\nclaude: {await ask(conversation, client, 'Still there?')}")
            await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="An Anthropic tool-runner conversation, stored and resumed.")
    parser.add_argument("--runtime", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().runtime)
