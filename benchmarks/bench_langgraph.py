"""LangGraph checkpointing: cognitia's saver on SQLite against LangGraph's own AsyncSqliteSaver.

Three measurements, every saver in the same run, each run on a fresh SQLite file in WAL mode in
the same temporary directory, in interleaved rounds (each round runs every saver once per
scenario, in a rotated order, so drift of a shared machine hits them alike):

* graph: a conversation of ``--steps`` turns, one ``graph.ainvoke`` per turn, each appending a
  user message and a reply to the thread's messages (LangGraph reads the latest checkpoint,
  then saves the input and loop checkpoints and the node's writes).
* graph, DeltaChannel messages: the same conversation with its messages in LangGraph's
  (beta) ``DeltaChannel``, whose checkpoints store the writes and a snapshot every 100
  updates; reading a thread rebuilds the list from the writes since the last snapshot, in
  one ``add_messages`` call.
* direct: the saver alone, per step ``aput`` + ``aput_writes`` + ``aget_tuple`` (latest), once
  with a growing message list (what the graph stores) and once with a constant-size value
  (the storage cost alone, without the growing payload).

The graph scenario also runs LangGraph with a saver that stores nothing (it keeps the latest
checkpoint's objects in a dict): the framework's own cost per turn, hence the best ratio any
saver can reach end to end, and the growth that is LangGraph's rather than the saver's.

For each: turns per second, the median turn, the growth of the per-turn cost (median of
the last 50 turns over the median of the first 50; 1.0 is flat), the same growth in
absolute terms (how much longer a turn takes per 1,000 messages of history: a ratio
rewards a slow first turn, this does not), each the median over the rounds, and the size
of the SQLite file (with its WAL) the run leaves. Ratios are cognitia
over AsyncSqliteSaver. The durability of every saver is printed: the journal mode read back
from each file, synchronous read back from AsyncSqliteSaver's connection and, for cognitia,
the setting its backend was given; cognitia's info-level structlog events are filtered out (an
application's logging choice, printed too).

    python benchmarks/bench_langgraph.py [--steps 500] [--rounds 3]

Needs: cognitia-langgraph, langgraph, langgraph-checkpoint-sqlite (and aiosqlite).
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict, cast

import anyio
import structlog
from _common import positive
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.channels import DeltaChannel
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    empty_checkpoint,
)
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.graph.message import add_messages

from cognitia.session.backends import SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver

WINDOW = 50
GRAPH = "graph (ainvoke per turn)"


SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
Durability = dict[str, str]
"""What each saver's SQLite connection reports, filled in by the first run of each."""
DURABILITY: Durability = {}


def sqlite_settings(path: Path) -> str:
    """journal_mode as stored in the file; synchronous is per connection, read by the saver's own."""
    with sqlite3.connect(path) as conn:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    return str(mode).upper()


@asynccontextmanager
async def cognitia_saver(path: Path, synchronous: str = "NORMAL") -> AsyncIterator[BaseCheckpointSaver[Any]]:
    async with SqliteSessionBackend(db_path=path, synchronous=synchronous) as backend:
        # Opens the file and creates the schema outside the timing, as setup() does for
        # AsyncSqliteSaver below.
        await backend.save("warm-up", {})
        yield CognitiaSaver(backend)
    # The backend sets synchronous on each of its connections when it opens them.
    DURABILITY.setdefault(
        "cognitia" if synchronous == "NORMAL" else f"cognitia ({synchronous})",
        f"journal_mode={sqlite_settings(path)} synchronous={synchronous}",
    )


@asynccontextmanager
async def cognitia_saver_full(path: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    async with cognitia_saver(path, "FULL") as saver:
        yield saver


@asynccontextmanager
async def langgraph_saver(path: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        await saver.setup()
        async with saver.conn.execute("PRAGMA synchronous") as cursor:
            row = await cursor.fetchone()
        yield saver
    level = SYNCHRONOUS.get(int(row[0]), str(row[0])) if row else "?"
    DURABILITY.setdefault(BASELINE, f"journal_mode={sqlite_settings(path)} synchronous={level} (its default)")


class FloorSaver(BaseCheckpointSaver[str]):
    """Keeps the latest checkpoint's objects in a dict: no encoding, no storage, no history.

    Not a usable checkpointer; it measures what LangGraph itself costs per turn, which is
    the best any saver can do end to end (and how much of the growth is the framework's).
    """

    def __init__(self) -> None:
        super().__init__()
        self.latest: dict[tuple[str, str], CheckpointTuple] = {}
        self.version = 0

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        conf = config["configurable"]
        return self.latest.get((conf["thread_id"], conf.get("checkpoint_ns", "")))

    async def aput(
        self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata, new_versions: Any
    ) -> RunnableConfig:
        conf = config["configurable"]
        ns = conf.get("checkpoint_ns", "")
        saved: RunnableConfig = {
            "configurable": {
                "thread_id": conf["thread_id"],
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint["id"],
            }
        }
        self.latest[(conf["thread_id"], ns)] = CheckpointTuple(saved, checkpoint, metadata, config, [])
        return saved

    async def aput_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        return None

    def get_next_version(self, current: str | None, channel: None) -> str:
        self.version += 1
        return f"{self.version:032}"


@asynccontextmanager
async def floor_saver(path: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    yield FloorSaver()
    DURABILITY.setdefault(FLOOR, "nothing stored")


BASELINE = "AsyncSqliteSaver"
FLOOR = "no saver (floor)"
SAVERS: dict[str, Callable[[Path], Any]] = {
    "cognitia": cognitia_saver,
    "cognitia (FULL)": cognitia_saver_full,
    BASELINE: langgraph_saver,
    FLOOR: floor_saver,
}


def _fold(state: list[Any], batches: Sequence[list[Any] | Any]) -> list[Any]:
    """All the writes since the snapshot in one ``add_messages`` call, as DeltaChannel asks of reducers."""
    flat: list[Any] = []
    for batch in batches:
        flat.extend(batch if isinstance(batch, list) else [batch])
    return cast(list[Any], add_messages(state, flat))


class DeltaChat(TypedDict):
    """Messages in LangGraph's DeltaChannel: checkpoints store writes, with a snapshot every 100."""

    messages: Annotated[list[AnyMessage], DeltaChannel(_fold)]


def conversation_graph(saver: BaseCheckpointSaver[Any], *, delta: bool = False) -> Any:
    """One node that answers the newest message: each invocation adds two messages.

    With ``delta``, the messages live in a DeltaChannel instead of MessagesState's channel.
    """

    def reply(state: Any) -> dict[str, list[BaseMessage]]:
        return {"messages": [AIMessage(content=f"reply to {state['messages'][-1].content}")]}

    builder: StateGraph[Any] = StateGraph(DeltaChat if delta else MessagesState)
    builder.add_node("reply", reply)
    builder.add_edge(START, "reply")
    return builder.compile(checkpointer=saver)


async def timed(steps: int, step: Callable[[int], Awaitable[None]]) -> list[float]:
    durations = []
    for i in range(steps):
        started = time.perf_counter()
        await step(i)
        durations.append(time.perf_counter() - started)
    return durations


async def run_graph(saver: BaseCheckpointSaver[Any], steps: int, *, delta: bool = False) -> list[float]:
    graph = conversation_graph(saver, delta=delta)
    config: RunnableConfig = {"configurable": {"thread_id": "bench-graph"}}

    async def step(i: int) -> None:
        await graph.ainvoke({"messages": [HumanMessage(content=f"message {i}")]}, config)

    return await timed(steps, step)


async def run_direct(saver: BaseCheckpointSaver[Any], steps: int, *, growing: bool) -> list[float]:
    config: RunnableConfig = {"configurable": {"thread_id": f"bench-direct-{growing}", "checkpoint_ns": ""}}
    messages: list[BaseMessage] = []
    version: Any = None

    async def step(i: int) -> None:
        nonlocal config, version
        messages.extend([HumanMessage(content=f"message {i}"), AIMessage(content=f"reply to message {i}")])
        checkpoint = empty_checkpoint()
        version = saver.get_next_version(version, None)
        value = list(messages) if growing else messages[-2:]
        checkpoint["channel_values"] = {"messages": value}
        checkpoint["channel_versions"] = {"messages": version}
        config = await saver.aput(
            config, checkpoint, {"source": "loop", "step": i, "parents": {}}, {"messages": version}
        )
        await saver.aput_writes(config, [("messages", messages[-1:])], f"task-{i}", "~__pregel_pull, reply")
        latest = await saver.aget_tuple({"configurable": {"thread_id": config["configurable"]["thread_id"]}})
        assert latest is not None and latest.checkpoint["id"] == checkpoint["id"]

    return await timed(steps, step)


def stored_mb(path: Path) -> float:
    """The size of a SQLite database and its write-ahead log, in MB (0 when nothing was stored)."""
    files = [path, path.with_name(path.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


MESSAGES_PER_TURN = 2
"""Every scenario adds a user message and a reply per turn."""


def summarize(durations: list[float]) -> tuple[float, float, float, float]:
    """Turns per second, the median turn in ms, the growth of the per-turn cost, and its slope.

    Growth compares medians (last WINDOW turns over first WINDOW) so that a single slow
    fsync on a shared disk does not decide it. The slope is the same difference in µs per
    1,000 messages the thread held between the two windows.
    """
    window = min(WINDOW, len(durations) // 2) or 1
    first = statistics.median(durations[:window])
    last = statistics.median(durations[-window:])
    grown = (len(durations) - window) * MESSAGES_PER_TURN / 1000
    slope = (last - first) * 1e6 / grown if grown else 0.0
    return len(durations) / sum(durations), statistics.median(durations) * 1000, last / first, slope


async def bench(steps: int, rounds: int) -> None:
    scenarios: dict[str, Callable[[BaseCheckpointSaver[Any]], Awaitable[list[float]]]] = {
        GRAPH: lambda saver: run_graph(saver, steps),
        "graph, DeltaChannel messages": lambda saver: run_graph(saver, steps, delta=True),
        "direct, growing messages": lambda saver: run_direct(saver, steps, growing=True),
        "direct, constant payload": lambda saver: run_direct(saver, steps, growing=False),
    }
    names = list(SAVERS)
    runs: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for label, scenario in scenarios.items():
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    if name == FLOOR and label != GRAPH:
                        continue
                    path = Path(tmp) / f"{len(runs)}-{round_}-{time.monotonic_ns()}.db"
                    async with SAVERS[name](path) as saver:
                        durations = await scenario(saver)
                    runs.setdefault((label, name), []).append((*summarize(durations), stored_mb(path)))
    print(f"{steps} turns per scenario, {rounds} interleaved rounds, median over rounds;")
    window = min(WINDOW, steps // 2) or 1
    print(f"growth = median of the last {window} turns / median of the first {window} (1.0 is flat)")
    print("µs/1k = how much longer the last turns take than the first, per 1,000 messages of history")
    print("cognitia's info-level structlog events are filtered out (structlog level WARNING)")
    for name in names:
        print(f"durability  {name:18} {DURABILITY.get(name, '?')}")
    print()
    print("ratio rows: turns/s over the baseline's, then the baseline's median turn over this saver's")
    print(
        f"{'scenario':28} {'saver':18} {'turns/s':>9} {'p50 ms':>8} {'growth':>7} {'µs/1k':>7} {'file MB':>8}"
    )
    for label in scenarios:
        results = {
            name: tuple(statistics.median(r[i] for r in runs[(label, name)]) for i in range(5))
            for name in names
            if (label, name) in runs
        }
        for name, (rate, p50, growth, slope, size) in results.items():
            print(f"{label:28} {name:18} {rate:9.1f} {p50:8.2f} {growth:7.2f} {slope:7.0f} {size:8.2f}")
        base = results[BASELINE]
        for name, (rate, p50, growth, slope, _) in results.items():
            if name not in (BASELINE, FLOOR):
                verdict = "met" if rate / base[0] >= 2 else "not met"
                print(
                    f"{'':28} {name + ' / base':<22} {rate / base[0]:5.2f}x {base[1] / p50:7.2f}x p50"
                    f" {growth:.2f} vs {base[2]:.2f}, {slope:.0f} vs {base[3]:.0f} µs/1k"
                    f" (target >= 2x turns/s: {verdict})"
                )
        if FLOOR in results:
            floor = results[FLOOR]
            print(f"{'':28} the best any saver could reach end to end: {floor[0] / base[0]:.2f}x {BASELINE}")
            print(
                f"{'':28} LangGraph's own growth (no saver): {floor[2]:.2f}, {floor[3]:.0f} µs/1k;"
                " a saver's own: its µs/1k minus this"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=positive, default=500, help="turns per scenario (default 500)")
    parser.add_argument("--rounds", type=positive, default=3, help="interleaved rounds (default 3)")
    args = parser.parse_args()
    # cognitia logs each save at info level; this measures storage, not console output.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    # AsyncSqliteSaver (aiosqlite) and LangGraph's async loop are asyncio-only.
    anyio.run(bench, args.steps, args.rounds, backend="asyncio")


if __name__ == "__main__":
    main()
