"""A LangGraph tool-calling agent whose conversations live in cognitia, and survive a restart.

Runs offline: the chat model is langchain-core's ``GenericFakeChatModel`` answering from a
script. A real application uses a real model in ``build_agent`` instead, for example
``ChatOpenAI(model="gpt-4o-mini").bind_tools([get_weather])``; nothing else changes.

    python examples/langgraph_agent.py            # in a temporary directory
    python examples/langgraph_agent.py agent.db   # keep the database file

Needs: pip install cognitia-langgraph langgraph
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import anyio
import structlog
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from cognitia import SessionEvent
from cognitia.session.backends import SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver

CONFIG: RunnableConfig = {"configurable": {"thread_id": "user-42"}}


@tool
def get_weather(city: str) -> str:
    """The current weather in ``city``."""
    return f"sunny, 24 degrees in {city}"


def ask_weather(city: str, call_id: str) -> AIMessage:
    """What a model says when it decides to call the weather tool."""
    return AIMessage(
        content="",
        tool_calls=[{"name": "get_weather", "args": {"city": city}, "id": call_id, "type": "tool_call"}],
    )


def build_agent(
    saver: CognitiaSaver, script: list[AIMessage]
) -> CompiledStateGraph[MessagesState, None, MessagesState, MessagesState]:
    """The agent loop: the model answers or calls a tool; tool results go back to the model."""
    # Offline stand-in for a real model: it replies with the scripted messages, in order.
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


async def run(db_path: Path) -> list[str]:
    """Two conversation turns, with a "restart" (a new backend on the same file) in between."""
    saves: list[SessionEvent] = []

    # First process: the user asks, the agent calls the tool and answers.
    async with SqliteSessionBackend(db_path=db_path) as backend:
        saver = CognitiaSaver(backend)
        saver.manager.on("saved", saves.append)  # lifecycle hooks fire for every graph step
        script = [ask_weather("Paris", "call-1"), AIMessage(content="It's sunny in Paris.")]
        agent = build_agent(saver, script)
        question = HumanMessage(content="What's the weather in Paris?")
        state = await agent.ainvoke({"messages": [question]}, CONFIG)
        print(f"first run:  {state['messages'][-1].content}  ({len(saves)} saves)")

    # Second process: a fresh backend object on the same file resumes the thread.
    async with SqliteSessionBackend(db_path=db_path) as backend:
        saver = CognitiaSaver(backend)
        agent = build_agent(saver, [ask_weather("Oslo", "call-2"), AIMessage(content="Oslo is sunny too.")])
        resumed = await agent.aget_state(CONFIG)
        print(f"restarted:  {len(resumed.values['messages'])} messages in the thread")
        state = await agent.ainvoke({"messages": [HumanMessage(content="And in Oslo?")]}, CONFIG)
        history = [snapshot async for snapshot in agent.aget_state_history(CONFIG)]
        print(f"second run: {state['messages'][-1].content}  ({len(history)} checkpoints kept)")

    transcript = [f"{m.type}: {m.content or m.tool_calls[0]['name']}" for m in state["messages"]]
    for line in transcript:
        print("   ", line)
    return transcript


def main() -> None:
    # cognitia logs every save as a structlog event (session.saved, with sizes and timings,
    # never the conversation); this script shows only warnings and errors.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if len(sys.argv) > 1:
        db_path = Path(sys.argv[1])
        # LangGraph's async API is asyncio-only, so the example runs on asyncio.
        anyio.run(run, db_path, backend="asyncio")
        return
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(run, Path(tmp) / "agent.db", backend="asyncio")


if __name__ == "__main__":
    main()
