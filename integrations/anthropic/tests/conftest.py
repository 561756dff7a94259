"""Fixtures for the Anthropic integration: an offline Messages API, backends, both runtimes."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import httpx2
import pytest
from anthropic import AsyncAnthropic


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The Anthropic SDK runs on asyncio and trio: every test runs on both (explicit params, so a
    missing trio fails instead of being skipped)."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _offline(offline: None) -> None:
    """No test reaches the network but the test servers' (the SDK talks to the fake API through
    its HTTP client's MockTransport, which opens no socket)."""


class FakeMessagesAPI:
    """The Messages API answering by rule, served through ``httpx2.MockTransport``.

    A user message "weather in <city>" gets a reply calling ``get_weather``; a tool result
    gets a sentence made of it; "cut" gets a reply stopped by max_tokens in the middle of
    a tool call; "refuse" gets a refusal; a request with ``compaction`` gets a compaction
    block summarizing how many messages it was sent, and a history starting with one is
    answered from it; anything else is echoed. System messages (the runner's tool changes)
    are skipped when reading the last message. ``requests`` holds every request body. With
    ``"stream": true`` the reply is sent as server-sent events, as the real API does.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def client(self) -> AsyncAnthropic:
        transport = httpx2.MockTransport(self.handle)
        return AsyncAnthropic(
            api_key="test-key", http_client=httpx2.AsyncClient(transport=transport), max_retries=0
        )

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/messages", request.url
        body = json.loads(request.content)
        self.requests.append(body)
        if body.get("compaction"):
            summary = f"summary of {len(body['messages'])} messages"
            reply = _message(next(self._ids), [{"type": "compaction", "content": summary}], "end_turn")
        else:
            reply = self.reply([m for m in body["messages"] if m["role"] != "system"][-1])
        if body.get("stream"):
            return httpx2.Response(
                200, headers={"content-type": "text/event-stream"}, content=_server_sent_events(reply)
            )
        return httpx2.Response(200, json=reply)

    def reply(self, last: dict[str, Any]) -> dict[str, Any]:
        n = next(self._ids)
        content = last["content"]
        if isinstance(content, list) and content and content[0].get("type") == "tool_result":
            return _message(n, [{"type": "text", "text": f"It is {content[0]['content']}."}], "end_turn")
        if isinstance(content, list) and content and content[0].get("type") == "compaction":
            return _message(n, [{"type": "text", "text": f"from the {content[0]['content']}"}], "end_turn")
        text = content if isinstance(content, str) else content[-1]["text"]
        if text == "refuse":
            return _message(n, [{"type": "text", "text": "I can't help with that."}], "refusal")
        match = re.search(r"weather in (\w+)", text)
        if match or text == "cut":
            call = {"type": "tool_use", "id": f"toolu_{n}", "name": "get_weather", "input": {}}
            if match:
                call["input"] = {"city": match.group(1)}
            return _message(
                n, [{"type": "text", "text": "Let me look."}, call], "tool_use" if match else "max_tokens"
            )
        return _message(n, [{"type": "text", "text": f"echo: {text}"}], "end_turn")


def _message(n: int, content: list[dict[str, Any]], stop_reason: str) -> dict[str, Any]:
    return {
        "id": f"msg_{n}",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }


def _server_sent_events(message: dict[str, Any]) -> bytes:
    """``message`` as the stream of events the API sends for it."""
    start = {**message, "content": [], "stop_reason": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start})
    ]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            empty: dict[str, Any] = {"type": "text", "text": ""}
            delta: dict[str, Any] = {"type": "text_delta", "text": block["text"]}
        else:
            empty = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events += [
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": empty}),
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
            ("content_block_stop", {"type": "content_block_stop", "index": index}),
        ]
    events += [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": 5},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


@pytest.fixture
def api() -> FakeMessagesAPI:
    return FakeMessagesAPI()
