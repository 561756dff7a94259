"""PersistedConversation driving the real Anthropic tool runner against an offline API, on each
backend and on asyncio and trio."""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Callable
from typing import Any

import anthropic
import anyio
import anyio.lowlevel
import httpx2
import pytest
import structlog
from anthropic import AsyncAnthropic, beta_async_tool
from anthropic.lib.threads._thread_state import as_sent
from anthropic.lib.tools import BetaAsyncFunctionTool

from cognitia import InMemorySessionManager, MemoryScope, SessionEvent
from cognitia_anthropic import ConversationChangedError, PersistedConversation

pytestmark = pytest.mark.anyio

MODEL = "claude-test"

PARIS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny in Paris"}],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "It is sunny in Paris."}]},
]


def digest(messages: list[Any]) -> list[str]:
    """A readable form of messages: role and the text, call or result of each block."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append(f"{message['role']}: {content}")
            continue
        for block in content:
            if block["type"] == "text":
                out.append(f"{message['role']}: {block['text']}")
            elif block["type"] == "tool_use":
                out.append(f"call {block['name']}({json.dumps(block['input'])})")
            elif block["type"] == "compaction":
                out.append(f"{message['role']}: [{block['content']}]")
            elif block["type"] == "tool_addition":
                out.append(f"{message['role']}: add tool {block['tool']['definition']['name']}")
            elif block["type"] == "image":
                out.append(f"{message['role']}: image {block['source']['data']}")
            else:
                out.append(f"result {block['content']}")
    return out


@pytest.fixture
def tool_calls() -> list[str]:
    return []


@pytest.fixture
def get_weather(tool_calls: list[str]) -> BetaAsyncFunctionTool[Any]:
    @beta_async_tool
    async def get_weather(city: str) -> str:
        """The weather in a city."""
        tool_calls.append(city)
        await anyio.lowlevel.checkpoint()
        return f"sunny in {city}"

    return get_weather


def record_saves(manager: InMemorySessionManager) -> list[int]:
    """The number of turns each save of ``manager`` writes, as they happen."""
    saves: list[int] = []
    manager.on("saved", lambda event: saves.append(event.turns))
    return saves


async def resume(
    conversation: PersistedConversation, client: AsyncAnthropic, *tools: Any, **options: Any
) -> Any:
    """A tool runner over the whole stored conversation, as an application resumes one."""
    return client.beta.messages.tool_runner(
        model=MODEL, max_tokens=256, tools=list(tools), messages=await conversation.messages(), **options
    )


async def ask(
    conversation: PersistedConversation, client: AsyncAnthropic, tool: BetaAsyncFunctionTool[Any], text: str
) -> str:
    """One user turn: store the question, run the tool loop over the whole history, return the answer."""
    await conversation.append({"role": "user", "content": text})
    runner = await resume(conversation, client, tool)
    final = await conversation.run(runner)
    block = final.content[0]
    assert block.type == "text"
    return block.text


async def test_multi_turn_tool_run_stores_every_message(
    backend_factory: Any, api: Any, get_weather: Any, tool_calls: list[str]
) -> None:
    """User messages, replies and tool results are stored in order; each tool runs once."""
    manager = InMemorySessionManager(backend_factory())
    conversation = PersistedConversation(manager, "user-1")
    client = api.client()

    assert (
        await ask(conversation, client, get_weather, "What is the weather in Paris?")
        == "It is sunny in Paris."
    )
    assert tool_calls == ["Paris"]
    assert await conversation.messages() == PARIS

    # The second turn iterates the runner by hand: each reply is stored once it is handled.
    await conversation.append({"role": "user", "content": "thanks"})
    runner = await resume(conversation, client, get_weather)
    seen = []
    async for message in conversation.record(runner):
        seen.append(message.id)
        assert len(await manager.turns("user-1")) == 5  # not stored while it is being handled
    assert seen == ["msg_3"]
    stored = await manager.turns("user-1")
    assert digest(stored[4:]) == ["user: thanks", "assistant: echo: thanks"]
    # The second runner sent the whole first turn as history.
    assert api.requests[-1]["messages"] == stored[:5]


async def test_prompt_caching_marks_are_the_callers_for_one_request(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """The usual prompt-caching pattern: mark the newest block of messages() with
    cache_control, then run. A request carries that one mark at most; messages() hands out
    copies and storage keeps no mark, so marks never pile up past the API's limit of
    four, in a live conversation as after a restart."""
    backend = backend_factory()
    conversation = PersistedConversation(backend, "user-1")
    client = api.client()

    def marks(messages: list[Any]) -> int:
        return sum(
            1
            for message in messages
            if isinstance(message["content"], list)
            for block in message["content"]
            if "cache_control" in block
        )

    for text in ("What is the weather in Paris?", "thanks", "and tomorrow?", "bye", "really"):
        await conversation.append({"role": "user", "content": [{"type": "text", "text": text}]})
        messages = await conversation.messages()
        messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}  # type: ignore[index]
        sent = len(api.requests)
        runner = client.beta.messages.tool_runner(
            model="claude-test", max_tokens=256, tools=[get_weather], messages=messages
        )
        await conversation.run(runner)
        assert max(marks(request["messages"]) for request in api.requests[sent:]) == 1
        assert marks(await conversation.messages()) == 0
    assert marks(await PersistedConversation(InMemorySessionManager(backend), "user-1").messages()) == 0


async def test_a_tool_input_with_a_cache_control_key_is_stored_as_it_is(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """Marks are left out of content blocks only: a tool argument named cache_control is the
    model's data, kept, and the conversation goes on from messages() after it."""
    backend = backend_factory()
    conversation = PersistedConversation(backend, "user-1")
    call = {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}
    call["input"]["cache_control"] = "max-age=60"  # type: ignore[index]
    reply = {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, call]}
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "sunny"}],
    }
    await conversation.append({"role": "user", "content": "weather?"}, reply, result)  # type: ignore[arg-type]
    stored = await conversation.messages()
    assert stored[1]["content"][1]["input"] == {"city": "Paris", "cache_control": "max-age=60"}  # type: ignore[index]
    assert await ask(conversation, api.client(), get_weather, "thanks") == "echo: thanks"
    again = await PersistedConversation(InMemorySessionManager(backend), "user-1").messages()
    assert again[:3] == stored and len(again) == 5


async def test_conversation_resumes_after_a_restart_with_its_full_history(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """A new backend object (and manager) on the same storage continues the conversation."""
    backend = backend_factory()
    await ask(
        PersistedConversation(backend, "user-1"), api.client(), get_weather, "What is the weather in Paris?"
    )
    if backend_factory.persistent:  # in memory, the store is the object: it stays open
        await backend.aclose()

    # The restart: a new backend, manager, conversation and client; only the storage remains.
    resumed = PersistedConversation(backend_factory(), "user-1")
    assert await resumed.messages() == PARIS
    assert await ask(resumed, api.client(), get_weather, "thanks") == "echo: thanks"

    first_request_after_restart = api.requests[-1]
    assert first_request_after_restart["messages"] == [*PARIS, {"role": "user", "content": "thanks"}]
    assert digest(await PersistedConversation(backend_factory(), "user-1").messages()) == [
        "user: What is the weather in Paris?",
        "assistant: Let me look.",
        'call get_weather({"city": "Paris"})',
        "result sunny in Paris",
        "assistant: It is sunny in Paris.",
        "user: thanks",
        "assistant: echo: thanks",
    ]


async def test_concurrent_conversations_stay_separate(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """Conversations run concurrently on one manager and one client never mix their messages."""
    manager = InMemorySessionManager(backend_factory())
    client = api.client()
    cities = ["Paris", "Oslo", "Lima", "Tokyo", "Cairo", "Quito"]

    async def converse(city: str) -> None:
        conversation = PersistedConversation(manager, f"user-{city}")
        await ask(conversation, client, get_weather, f"What is the weather in {city}?")
        await ask(conversation, client, get_weather, f"thanks from {city}")

    async with anyio.create_task_group() as tg:
        for city in cities:
            tg.start_soon(converse, city)

    for city in cities:
        stored = await PersistedConversation(backend_factory(), f"user-{city}").messages()
        assert digest(stored) == [
            f"user: What is the weather in {city}?",
            "assistant: Let me look.",
            f'call get_weather({{"city": "{city}"}})',
            f"result sunny in {city}",
            f"assistant: It is sunny in {city}.",
            f"user: thanks from {city}",
            f"assistant: echo: thanks from {city}",
        ]


async def test_hooks_and_log_events_fire_for_each_stored_step(
    backend_factory: Any, api: Any, get_weather: Any, anyio_backend: str
) -> None:
    """The user message, the tool-calling reply with its results, and the answer are three saves."""
    manager = InMemorySessionManager(backend_factory(), strict_hooks=True)
    saved: list[SessionEvent] = []
    manager.on("saved", saved.append)
    conversation = PersistedConversation(manager, "chat", scope=MemoryScope.AGENT)

    with structlog.testing.capture_logs() as logs:
        await ask(conversation, api.client(), get_weather, "What is the weather in Paris?")

    assert [(e.key, e.scope, e.turns, e.version, e.runtime) for e in saved] == [
        ("agent:chat", "agent", 1, 1, anyio_backend),
        ("agent:chat", "agent", 2, 2, anyio_backend),
        ("agent:chat", "agent", 1, 3, anyio_backend),
    ]
    saved_logs = [entry for entry in logs if entry["event"] == "session.saved"]
    assert [entry["turns"] for entry in saved_logs] == [1, 2, 1]
    # The conversation itself never reaches the logs.
    assert "Paris" not in repr(logs)


async def test_stored_messages_are_plain_json_rows(
    persistent_backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """The storage holds each message as a JSON turn, readable without cognitia."""
    async with persistent_backend_factory() as backend:
        await ask(
            PersistedConversation(backend, "user-1"),
            api.client(),
            get_weather,
            "What is the weather in Paris?",
        )

    state, turns = persistent_backend_factory.stored("user-1")
    assert state is not None and isinstance(json.loads(state), dict)
    assert [json.loads(turn) for turn in turns] == PARIS


async def test_streaming_runner_is_recorded_too(
    backend_factory: Any, api: Any, get_weather: Any, tool_calls: list[str]
) -> None:
    """With stream=True the streams are handed over unread and their final messages stored."""
    conversation = PersistedConversation(backend_factory(), "user-1")
    await conversation.append({"role": "user", "content": "What is the weather in Paris?"})
    runner = await resume(conversation, api.client(), get_weather, stream=True)
    texts = []
    async for stream in conversation.record(runner):
        async for event in stream:
            if event.type == "text":
                texts.append(event.text)
    assert texts == ["Let me look.", "It is sunny in Paris."]
    assert tool_calls == ["Paris"]
    assert await conversation.messages() == PARIS
    assert all(request["stream"] for request in api.requests)


async def test_a_reply_cut_off_in_a_tool_call_is_stored_without_running_it(
    backend_factory: Any, api: Any, get_weather: Any, tool_calls: list[str]
) -> None:
    """A tool_use block in a reply that stopped for max_tokens is stored, and the tool is not run."""
    conversation = PersistedConversation(backend_factory(), "user-1")
    await conversation.append({"role": "user", "content": "cut"})
    runner = await resume(conversation, api.client(), get_weather)
    final = await conversation.run(runner)
    assert final.stop_reason == "max_tokens"
    assert tool_calls == []
    assert digest(await conversation.messages()) == [
        "user: cut",
        "assistant: Let me look.",
        "call get_weather({})",
    ]


async def test_a_cut_off_tool_call_can_be_answered_before_the_conversation_goes_on(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """The stored history ends with the call the runner left unanswered, as the runner's own
    does, and the Messages API refuses a history with an unanswered call: storing a tool
    result for it (an error) makes the conversation valid to continue."""
    conversation = PersistedConversation(backend_factory(), "user-1")
    await conversation.append({"role": "user", "content": "cut"})
    await conversation.run(await resume(conversation, api.client(), get_weather))
    cut: Any = (await conversation.messages())[-1]
    call = next(block for block in cut["content"] if block["type"] == "tool_use")
    answer: Any = {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": call["id"], "content": "cut off", "is_error": True},
            {"type": "text", "text": "hello"},
        ],
    }
    await conversation.append(answer)
    await conversation.run(await resume(conversation, api.client(), get_weather))
    assert digest(await conversation.messages()) == [
        "user: cut",
        "assistant: Let me look.",
        "call get_weather({})",
        "result cut off",
        "user: hello",
        "assistant: It is cut off.",
    ]


async def test_unstorable_message_is_refused_with_its_path(backend_factory: Any) -> None:
    """A message JSON cannot hold is refused before anything is written, naming where it is."""
    from cognitia import StateNotSerializableError

    conversation = PersistedConversation(backend_factory(), "user-1")
    with pytest.raises(StateNotSerializableError, match=r"content.*bytes"):
        unstorable: Any = {"role": "user", "content": [{"type": "text", "text": b"raw"}]}
        await conversation.append(unstorable)
    assert await conversation.messages() == []


# -- what the runner does to its own history is stored as it does it ------------------------


async def test_a_refused_reply_is_left_out_like_the_runner_leaves_it_out(
    backend_factory: Any, api: Any
) -> None:
    """The runner does not keep a refused reply (the next turn starts a new thread without it),
    so the stored conversation does not either, and a resumed runner sends what it would."""
    conversation = PersistedConversation(backend_factory(), "user-1")
    await conversation.append({"role": "user", "content": "refuse"})
    runner = await resume(conversation, api.client())
    final = await conversation.run(runner)
    assert final.stop_reason == "refusal"
    assert digest(await conversation.messages()) == ["user: refuse"]
    assert list(runner._thread.messages) == await conversation.messages()


async def test_compaction_replaces_the_stored_history_with_its_summary(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """After ``compact_before_next_turn()`` the runner's history is the summary and what
    followed it; the stored conversation becomes the same, so a resumed runner sends the
    summary, not the history it replaced."""
    backend = backend_factory()
    conversation = PersistedConversation(backend, "user-1")
    await ask(conversation, api.client(), get_weather, "What is the weather in Paris?")
    await conversation.append({"role": "user", "content": "and now?"})
    runner = await resume(conversation, api.client(), get_weather)
    runner.compact_before_next_turn()
    final = await conversation.run(runner)

    assert final.content[0].type == "text" and final.content[0].text == "from the summary of 5 messages"
    stored = await conversation.messages()
    assert digest(stored) == [
        "assistant: [summary of 5 messages]",
        "assistant: from the summary of 5 messages",
    ]
    assert await PersistedConversation(backend_factory(), "user-1").messages() == stored
    # The next runner starts from the summary.
    await ask(conversation, api.client(), get_weather, "thanks")
    assert digest(api.requests[-1]["messages"]) == [*digest(stored), "user: thanks"]


async def test_messages_stored_by_another_writer_are_never_interleaved_or_overwritten(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """Storing the runner's history over a conversation that changed in storage meanwhile
    raises and writes nothing, whether it would append after or replace (a compaction)
    the other writer's messages."""
    manager = InMemorySessionManager(backend_factory())
    conversation = PersistedConversation(manager, "user-1")
    elsewhere = PersistedConversation(manager, "user-1")
    await conversation.append({"role": "user", "content": "hello"})
    client = api.client()
    runner = await resume(conversation, client, get_weather)
    with pytest.raises(
        ConversationChangedError,
        match=r"'user-1'.*expected 1 stored messages at version 1, found 2 at version 2",
    ):
        async for _ in conversation.record(runner):
            await elsewhere.append({"role": "user", "content": "from elsewhere"})
    assert digest(await conversation.messages()) == ["user: hello", "user: from elsewhere"]

    runner = await resume(conversation, client, get_weather)
    runner.compact_before_next_turn()
    with pytest.raises(ConversationChangedError, match=r"expected 2 stored messages at version 2, found 3"):
        async for message in conversation.record(runner):
            if message.content[0].type == "compaction":
                await elsewhere.append({"role": "user", "content": "again"})
    assert digest(await conversation.messages()) == ["user: hello", "user: from elsewhere", "user: again"]


async def test_a_change_that_keeps_the_message_count_is_noticed(backend_factory: Any, api: Any) -> None:
    """Another writer compacts while a runner is recording: the conversation holds as many
    messages as before (two), but not the ones the runner continues. Its step is refused and
    the compaction stays as it was stored."""
    manager = InMemorySessionManager(backend_factory())
    conversation = PersistedConversation(manager, "user-1")
    elsewhere = PersistedConversation(manager, "user-1")
    client = api.client()
    await conversation.append({"role": "user", "content": "hello"})
    await conversation.run(await resume(conversation, client))
    assert digest(await conversation.messages()) == ["user: hello", "assistant: echo: hello"]

    runner = await resume(conversation, client)
    runner.append_messages({"role": "user", "content": "question"})
    with pytest.raises(ConversationChangedError, match=r"expected 2 stored messages at version 2, found 2"):
        async for _ in conversation.record(runner):
            other = await resume(elsewhere, client)
            other.compact_before_next_turn()
            await elsewhere.run(other)
    compacted = ["assistant: [summary of 2 messages]", "assistant: from the summary of 2 messages"]
    assert digest(await conversation.messages()) == compacted
    assert digest(await PersistedConversation(backend_factory(), "user-1").messages()) == compacted


async def test_a_runner_built_from_a_read_another_writer_has_added_to_is_refused(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """A runner's history read before another writer appended does not continue the stored
    conversation: recording it would store the history a second time."""
    manager = InMemorySessionManager(backend_factory())
    conversation = PersistedConversation(manager, "user-1")
    await conversation.append({"role": "user", "content": "hello"})
    stale = await resume(conversation, api.client(), get_weather)
    await PersistedConversation(manager, "user-1").append({"role": "user", "content": "from elsewhere"})
    with pytest.raises(
        ConversationChangedError, match=r"do not continue conversation 'user-1'.*Nothing was written"
    ):
        await conversation.run(stale)
    assert digest(await conversation.messages()) == ["user: hello", "user: from elsewhere"]

    # Two requests at once, each adding its message to what it read: the second is refused.
    read = await conversation.messages()
    first, second = (
        api.client().beta.messages.tool_runner(
            model=MODEL,
            max_tokens=256,
            tools=[get_weather],
            messages=[*read, {"role": "user", "content": text}],
        )
        for text in ("A", "B")
    )
    await conversation.run(first)
    with pytest.raises(ConversationChangedError):
        await conversation.run(second)
    assert digest(await conversation.messages())[2:] == ["user: A", "assistant: echo: A"]


async def test_a_history_trimmed_to_its_newest_messages_keeps_the_older_ones_stored(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """Trimming the runner's history mid-run to a window is what giving it a window at the
    start does: the messages left out are not sent, and stay stored."""
    conversation = PersistedConversation(backend_factory(), "user-1")
    await ask(conversation, api.client(), get_weather, "What is the weather in Paris?")
    await conversation.append({"role": "user", "content": "What is the weather in Oslo?"})
    runner = await resume(conversation, api.client(), get_weather)
    async for reply in conversation.record(runner):
        if reply.stop_reason == "tool_use":  # before the runner adds the reply and its results
            runner.set_messages_params(lambda params: {**params, "messages": list(params["messages"])[-2:]})
    # The window is what was sent next: the last two messages, then the reply and results.
    assert digest(api.requests[-1]["messages"])[:2] == [
        "assistant: It is sunny in Paris.",
        "user: What is the weather in Oslo?",
    ]
    assert len(api.requests[-1]["messages"]) == 4
    assert digest(await conversation.messages()) == [
        *digest(PARIS),
        "user: What is the weather in Oslo?",
        "assistant: Let me look.",
        'call get_weather({"city": "Oslo"})',
        "result sunny in Oslo",
        "assistant: It is sunny in Oslo.",
    ]


RAW_WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


class FailsAfterFirstReply:
    """The offline API answering the first request, then overloaded (HTTP 529)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def client(self) -> AsyncAnthropic:
        handle: Callable[[httpx2.Request], httpx2.Response] = self.api.handle

        def overloaded_after_one(request: httpx2.Request) -> httpx2.Response:
            if self.api.requests:
                error = {"type": "overloaded_error", "message": "Overloaded"}
                return httpx2.Response(529, json={"type": "error", "error": error})
            return handle(request)

        transport = httpx2.MockTransport(overloaded_after_one)
        return AsyncAnthropic(
            api_key="test-key", http_client=httpx2.AsyncClient(transport=transport), max_retries=0
        )


@pytest.mark.filterwarnings("ignore:Tool 'get_weather' not found in tool runner")
@pytest.mark.parametrize("next_request_fails", [False, True])
async def test_a_tool_result_the_caller_appends_is_stored_not_one_the_runner_would_make(
    backend_factory: Any, api: Any, next_request_fails: bool
) -> None:
    """A raw tool the caller answers itself with ``append_messages()``: the runner then sends
    the caller's history, not its own "tool not found" result, and that is what is stored,
    as soon as the caller is done with the reply (before the next request, which may fail)."""
    conversation = PersistedConversation(backend_factory(), "user-1")
    await conversation.append({"role": "user", "content": "What is the weather in Paris?"})
    client = (FailsAfterFirstReply(api) if next_request_fails else api).client()
    runner = client.beta.messages.tool_runner(
        model=MODEL, max_tokens=256, tools=[RAW_WEATHER], messages=await conversation.messages()
    )
    answered = [
        "user: What is the weather in Paris?",
        "assistant: Let me look.",
        'call get_weather({"city": "Paris"})',
        "result rainy (my own result)",
    ]
    with pytest.raises(anthropic.APIStatusError) if next_request_fails else contextlib.nullcontext():
        async for reply in conversation.record(runner):
            if reply.stop_reason == "tool_use":
                call = next(block for block in reply.content if block.type == "tool_use")
                result: Any = {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": "rainy (my own result)",
                }
                runner.append_messages(reply, {"role": "user", "content": [result]})
    stored = await PersistedConversation(backend_factory(), "user-1").messages()
    if next_request_fails:
        assert digest(stored) == answered
    else:
        assert digest(stored) == [*answered, "assistant: It is rainy (my own result)."]
        # The runner continues its thread on the server: the request carries the new messages.
        assert digest(api.requests[-1]["messages"]) == answered[-1:]
    # What the runner holds, as a request would send it.
    assert stored == [as_sent(message) for message in runner._thread.messages]


async def test_a_run_cancelled_while_a_tool_runs_ends_its_runner(backend_factory: Any, api: Any) -> None:
    """Cancelling a recorded run while a tool runs stores nothing of the step and closes the
    runner, as a cancelled runner ends on its own (no generator left for the garbage collector
    to close, which would report an error)."""
    started = anyio.Event()

    @beta_async_tool
    async def get_weather(city: str) -> str:
        """The weather in a city."""
        started.set()
        await anyio.sleep_forever()
        return city

    conversation = PersistedConversation(backend_factory(), "user-1")
    await conversation.append({"role": "user", "content": "What is the weather in Paris?"})
    runner = await resume(conversation, api.client(), get_weather)
    async with anyio.create_task_group() as tg:
        tg.start_soon(conversation.run, runner)
        await started.wait()
        tg.cancel_scope.cancel()
    del tg
    gc.collect()
    with anyio.fail_after(10):
        assert [item async for item in runner] == []  # closed: iterating yields nothing
    assert digest(await conversation.messages()) == ["user: What is the weather in Paris?"]


async def test_the_tool_change_message_of_add_tools_is_stored(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """``add_tools()`` makes the runner send a system message announcing the tool; it is part
    of the history from then on, so it is stored where the runner put it."""

    @beta_async_tool
    async def get_time(city: str) -> str:
        """The time in a city."""
        return "noon"

    conversation = PersistedConversation(backend_factory(), "user-1")
    await conversation.append({"role": "user", "content": "What is the weather in Paris?"})
    runner = await resume(conversation, api.client(), get_weather)
    async for _ in conversation.record(runner):
        if not api.requests[1:]:
            runner.add_tools(get_time)
    stored = await conversation.messages()
    assert digest(stored) == [
        "user: What is the weather in Paris?",
        "assistant: Let me look.",
        'call get_weather({"city": "Paris"})',
        "result sunny in Paris",
        "system: add tool get_time",
        "assistant: It is sunny in Paris.",
    ]
    # A resumed conversation sends it again: the model keeps knowing the tool.
    await ask(conversation, api.client(), get_weather, "thanks")
    assert api.requests[-1]["messages"] == [*stored, {"role": "user", "content": "thanks"}]


async def test_a_reply_broken_on_is_stored_when_the_runner_is_run_again(
    backend_factory: Any, api: Any, get_weather: Any, tool_calls: list[str]
) -> None:
    conversation = PersistedConversation(backend_factory(), "user-1")
    await conversation.append({"role": "user", "content": "What is the weather in Paris?"})
    runner = await resume(conversation, api.client(), get_weather)
    async for _ in conversation.record(runner):
        break
    assert digest(await conversation.messages()) == ["user: What is the weather in Paris?"]

    await conversation.run(runner)
    assert await conversation.messages() == PARIS
    assert tool_calls == ["Paris"]


async def test_messages_given_only_to_the_runner_are_stored_with_its_first_reply(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """The runner may be given the newest stored messages (a window) plus new ones: the new
    ones are stored after the whole stored conversation, in the same save as the first reply."""
    manager = InMemorySessionManager(backend_factory())
    conversation = PersistedConversation(manager, "user-1")
    await ask(conversation, api.client(), get_weather, "What is the weather in Paris?")
    saves = record_saves(manager)
    window = (await conversation.messages())[-1:]
    runner = api.client().beta.messages.tool_runner(
        model=MODEL,
        max_tokens=256,
        tools=[get_weather],
        messages=[*window, {"role": "user", "content": "ok"}],
    )
    async for _ in conversation.record(runner):
        assert len(await conversation.messages()) == 4  # nothing of this run yet
    assert digest(await conversation.messages()) == [*digest(PARIS), "user: ok", "assistant: echo: ok"]
    assert saves == [2]  # one save: the new message and the reply


async def test_a_run_that_loses_a_race_at_its_first_step_stores_nothing(
    backend_factory: Any, api: Any, get_weather: Any
) -> None:
    """Another writer appends while the first request is under way: nothing of the run is
    stored, so running it again (from a fresh read) stores its prompt once."""
    manager = InMemorySessionManager(backend_factory())
    conversation = PersistedConversation(manager, "user-1")
    await conversation.append({"role": "user", "content": "hello"})
    prompt = {"role": "user", "content": "What is the weather in Paris?"}
    runner = api.client().beta.messages.tool_runner(
        model=MODEL, max_tokens=256, tools=[get_weather], messages=[*await conversation.messages(), prompt]
    )
    with pytest.raises(ConversationChangedError, match="nothing of this run was stored"):
        async for _ in conversation.record(runner):
            await PersistedConversation(manager, "user-1").append({"role": "user", "content": "elsewhere"})
    assert digest(await conversation.messages()) == ["user: hello", "user: elsewhere"]

    again = api.client().beta.messages.tool_runner(
        model=MODEL, max_tokens=256, tools=[get_weather], messages=[*await conversation.messages(), prompt]
    )
    await conversation.run(again)
    assert digest(await conversation.messages()).count("user: What is the weather in Paris?") == 1

    # Lost at a later step, the error says the earlier steps stay stored.
    runner = api.client().beta.messages.tool_runner(
        model=MODEL,
        max_tokens=256,
        tools=[get_weather],
        messages=[
            *await conversation.messages(),
            {"role": "user", "content": "What is the weather in Oslo?"},
        ],
    )
    with pytest.raises(
        ConversationChangedError, match="this step was not stored, the run's earlier steps are"
    ):
        steps = 0
        async for _ in conversation.record(runner):
            steps += 1
            if steps == 2:
                await PersistedConversation(manager, "user-1").append({"role": "user", "content": "late"})
    assert digest(await conversation.messages())[-5:] == [
        "user: What is the weather in Oslo?",
        "assistant: Let me look.",
        'call get_weather({"city": "Oslo"})',
        "result sunny in Oslo",
        "user: late",
    ]


async def test_files_in_image_sources_are_stored_base64_encoded(
    backend_factory: Any, api: Any, tmp_path: Any
) -> None:
    """An image source may give its data as a path or a file object, as the SDK allows; it is
    stored as the base64 text the SDK sends, and a file object keeps its position."""
    import base64
    import io
    import pathlib

    png = b"\x89PNG fake image"
    path = pathlib.Path(tmp_path) / "chart.png"
    path.write_bytes(png)
    file = io.BytesIO(b"skip" + png)
    file.seek(4)

    def image(data: Any) -> dict[str, Any]:
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}

    conversation = PersistedConversation(backend_factory(), "user-1")
    message: Any = {
        "role": "user",
        "content": [image(path), image(file), {"type": "text", "text": "describe"}],
    }
    await conversation.append(message)
    assert file.tell() == 4
    encoded = base64.b64encode(png).decode()
    assert digest(await conversation.messages()) == [
        f"user: image {encoded}",
        f"user: image {encoded}",
        "user: describe",
    ]

    runner = await resume(conversation, api.client())
    await conversation.run(runner)
    assert api.requests[-1]["messages"][0] == (await conversation.messages())[0]
