"""Turns per second of a long pydantic-ai conversation: cognitia's store vs pydantic-ai's own.

Each turn is one request of a stateless server: load the conversation's recent window,
run the agent (a FunctionModel that calls a tool, so 4 messages per turn), save what the
run added. The stores compared, in the same run:

- ``cognitia sqlite``: CognitiaConversationStore on SqliteSessionBackend (a file);
- ``cognitia memory``: CognitiaConversationStore on InMemorySessionBackend;
- ``pydantic-ai memory``: pydantic-ai's InMemoryConversationStore (its only built-in
  store; pydantic-ai ships no SQL one).

"store" time counts load + save only; "turn" time adds the agent run. Growth compares the
per-turn cost at both ends of a conversation: after the 500 turns, 50 more turns alternate
between the long conversation and a fresh one, and growth is the median store time on the
long one over the fresh one (1.0: a flat per-turn cost). Alternating, like interleaving the
stores turn by turn, makes a busy machine slow both sides alike. structlog is filtered to
warnings (cognitia still emits its events, and hooks would run).

    python benchmarks/bench_pydantic_ai.py [--turns 500] [--window 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

import pydantic_ai.models
import structlog
from _common import positive
from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationStore, InMemoryConversationStore
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import UsageLimits

from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_pydantic_ai import CognitiaConversationStore

pydantic_ai.models.ALLOW_MODEL_REQUESTS = False
# cognitia logs every save at info level; printing 500 lines to a terminal would dominate.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if isinstance(messages[-1].parts[-1], ToolReturnPart):
        return ModelResponse(parts=[TextPart("You rolled a 4.")])
    return ModelResponse(parts=[ToolCallPart("roll_die", {"sides": 6})])


agent: Agent[None, str] = Agent(FunctionModel(scripted))


@agent.tool_plain
def roll_die(sides: int) -> int:
    """Roll a die."""
    return 4


class Case:
    """One store under test and the time each of its turns took."""

    def __init__(self, name: str, store: ConversationStore) -> None:
        self.name = name
        self.store = store
        self.store_times: list[float] = []
        self.turn_times: list[float] = []
        self.late: list[float] = []
        self.early: list[float] = []

    async def turn(self, cid: str, n: int, window: int) -> tuple[float, float]:
        """One request of a stateless server: load the recent window, run, save."""
        started = time.perf_counter()
        conversation = await self.store.load(cid, limit=window) or Conversation(conversation_id=cid)
        loaded = time.perf_counter()
        # A conversation carries its usage: the default 50-request limit would cover the whole chat.
        unlimited = UsageLimits(request_limit=None)
        result = await agent.run(f"roll {n}", conversation=conversation, usage_limits=unlimited)
        ran = time.perf_counter()
        await self.store.save(result)
        done = time.perf_counter()
        return (loaded - started) + (done - ran), done - started

    def rates(self) -> tuple[float, float, float]:
        """Store turns/s, end-to-end turns/s, and the growth of the store's per-turn cost."""
        growth = statistics.median(self.late) / statistics.median(self.early)
        return (
            len(self.store_times) / sum(self.store_times),
            len(self.turn_times) / sum(self.turn_times),
            growth,
        )


async def main(turns: int, window: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteSessionBackend(Path(tmp) / "c.db")
        cases = [
            Case("cognitia sqlite", CognitiaConversationStore(sqlite)),
            Case("cognitia memory", CognitiaConversationStore(InMemorySessionBackend())),
            Case("pydantic-ai memory", InMemoryConversationStore()),
        ]
        for case in cases:  # warm up each store on a conversation of its own
            for n in range(20):
                await case.turn("warm-up", n, window)
        # Turns are interleaved across the stores, so a busy machine slows them all alike.
        for n in range(turns):
            for case in cases:
                store_time, turn_time = await case.turn("bench", n, window)
                case.store_times.append(store_time)
                case.turn_times.append(turn_time)
        for n in range(50):
            for case in cases:
                case.late.append((await case.turn("bench", turns + n, window))[0])
                case.early.append((await case.turn("fresh", n, window))[0])
        for case in cases:
            full = await case.store.load("bench")
            assert full is not None and len(full.messages) == 4 * (turns + 50), "every message must be stored"
        await sqlite.aclose()

    print(f"{turns}-turn conversation (4 messages per turn), load(limit={window}) + run + save per turn")
    print(f"{'store':<20} {'store turns/s':>14} {'turns/s':>9} {f'growth at turn {turns}':>19}")
    rates = {case.name: case.rates() for case in cases}
    for name, (store_rate, turn_rate, growth) in rates.items():
        print(f"{name:<20} {store_rate:>14.0f} {turn_rate:>9.0f} {growth:>19.2f}")
    ours, builtin = rates["cognitia sqlite"], rates["pydantic-ai memory"]
    print(
        f"cognitia sqlite / pydantic-ai memory: store {ours[0] / builtin[0]:.2f}x, "
        f"end to end {ours[1] / builtin[1]:.2f}x (no target: pydantic-ai has no durable store to compare)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--turns", type=positive, default=500)
    parser.add_argument("--window", type=positive, default=20, help="messages loaded per turn")
    args = parser.parse_args()
    asyncio.run(main(args.turns, args.window))
