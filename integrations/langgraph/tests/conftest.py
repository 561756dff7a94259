from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.tools import tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, tools_condition


@pytest.fixture
def anyio_backend() -> str:
    """asyncio only, by default: LangGraph's async graph loop is built on asyncio tasks and futures.

    Tests that drive the saver itself (the conformance suite, the sync bridge) run on trio
    too and say so with a fixture of their own.
    """
    return "asyncio"


@pytest.fixture(autouse=True)
def no_network(offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything here runs offline: a test that tries to reach the network (but the test
    servers) fails, and LangSmith tracing is off."""
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGSMITH_API_KEY", "LANGCHAIN_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@tool
def get_weather(city: str) -> str:
    """Current weather in ``city``."""
    return f"sunny, 24 degrees in {city}"


def tool_call(city: str, call_id: str) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[{"name": "get_weather", "args": {"city": city}, "id": call_id, "type": "tool_call"}],
    )


AgentFactory = Callable[[BaseCheckpointSaver[Any], list[AIMessage]], CompiledStateGraph[Any, Any, Any, Any]]


def _build_agent(
    saver: BaseCheckpointSaver[Any], script: list[AIMessage]
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """A tool-calling agent loop whose model is langchain-core's fake model, answering from ``script``."""
    model = GenericFakeChatModel(messages=iter(script))

    def agent(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([get_weather]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, ["tools", END])
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=saver)


@pytest.fixture
def build_agent() -> Iterator[AgentFactory]:
    yield _build_agent


@pytest.fixture
def tool_call_message() -> Callable[[str, str], AIMessage]:
    return tool_call
