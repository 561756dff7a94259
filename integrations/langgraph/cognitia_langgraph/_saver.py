from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from random import random
from typing import Any
from weakref import WeakKeyDictionary

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    PendingWrite,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from cognitia import CognitiaError, InMemorySessionManager, Session
from cognitia.session.backends import SessionBackend

from . import _index as index
from ._codec import (
    CHECKPOINT,
    Encoding,
    Source,
    Stored,
    carried,
    checkpoint_turn,
    chosen_writes,
    copied,
    extended,
    load_checkpoint,
    load_value,
    pair_of,
    pending_writes,
    refuse_pickle,
    resolve,
    sources,
    writes_turn,
)
from ._reuse import Encoded, Encodings, fingerprint
from ._sync import SyncBridge

__all__ = ["DEFAULT_KEY_PREFIX", "CognitiaSaver"]

DEFAULT_KEY_PREFIX = "langgraph:"

Turn = dict[str, Any]
Log = list[Turn]
"""Turns of a thread's log, oldest first."""
Found = tuple[Turn, Log]
"""A checkpoint's newest turn and the turns holding its pending writes."""
Values = dict[str, tuple[str, dict[str, tuple[Any, Any]]]]
"""Per namespace: the id of the checkpoint saved last, and its channels' versions and objects."""
Memo = dict[tuple[str, str], Encoded]
"""Per (namespace, channel): the last encoding made, to extend or to check an object against."""
Listed = tuple[object, Turn, Log, dict[str, Stored]]
"""A checkpoint as ``list`` returns it: its thread id, turn, writes and stored channel values."""
WriteAt = tuple[str, str, str, int, str, str]
"""A pending write as stored: namespace, checkpoint id, task id, index, type and data."""

_WALK_SPAN = 512
"""How many of a log's newest turns a ``DeltaChannel`` history read starts with (then 4x, ...)."""
_WALK_MARGIN = 64
"""A walk reaching this close to the start of the turns read reads further back."""

KEPT_NAMESPACES = 8
"""How many checkpoint namespaces besides the root one a live thread keeps encodings and
objects of, the most recently saved. A graph with subgraphs saves under a new namespace at
every subgraph call, so keeping all of them would hold a copy of the conversation per call."""

REACH = 64
"""How far back in the log a checkpoint may carry or extend a channel value from, in turns.

A channel unchanged for longer is stored again, and a list extended for longer is stored
whole again (once per ``REACH`` turns), so resuming a thread in a fresh process never reads
more than this many turns of its log.
"""


class CognitiaSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer that stores every thread as a cognitia session.

    Each LangGraph thread is one session, keyed ``"langgraph:<thread_id>"``. Every
    checkpoint and every batch of pending writes is appended to the session's turn log (one
    append per save, whatever the length of the history), and the session state holds a
    small index of the latest checkpoint per namespace, so resuming a thread reads only the
    tail of the log. The full checkpoint history stays available to ``list`` (LangGraph's
    ``get_state_history``) and to time travel.

    Values are encoded by LangGraph's own serializer (``serde``, ``JsonPlusSerializer`` by
    default) and stored as base64 inside plain JSON; a serializer with a pickle fallback is
    refused. Storage, locking, retries on version conflicts, lifecycle hooks and structlog
    events are the session manager's: register hooks on :attr:`manager`.

    The async methods run on asyncio and trio. The sync methods (``graph.invoke``) work from
    a plain script, and from a worker thread of a running event loop (``await
    anyio.to_thread.run_sync(graph.invoke, ...)``), where they run on that loop.

    Args:
        store: an :class:`~cognitia.InMemorySessionManager`, or any session backend, which
            is then wrapped in a manager of its own.
        key_prefix: prepended to the thread id to make the session key.
        serde: the serializer for channel values and writes (default ``JsonPlusSerializer()``).

    >>> from cognitia.session.backends import SqliteSessionBackend
    >>> saver = CognitiaSaver(SqliteSessionBackend(db_path="graph.db"))
    >>> # graph = builder.compile(checkpointer=saver)
    >>> # await graph.ainvoke(inputs, {"configurable": {"thread_id": "user-42"}})
    """

    manager: InMemorySessionManager
    """The session manager the saver stores through; ``saver.manager.on("saved", hook)``."""
    key_prefix: str

    def __init__(
        self,
        store: InMemorySessionManager | SessionBackend,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        refuse_pickle(self.serde)
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a str, got {type(key_prefix).__name__}")
        if not key_prefix:
            raise ValueError(
                "key_prefix must not be empty: the saver's sessions need a key space of their own, "
                "apart from the other sessions of the manager"
            )
        self.manager = InMemorySessionManager.of(store)
        self.key_prefix = key_prefix
        self._bridge = SyncBridge()
        # The objects LangGraph saved last, per live session: a read of that checkpoint
        # serves them instead of decoding what was just encoded, once they are proven to
        # still encode to the stored bytes (the caller of ainvoke holds the same objects and
        # may have changed them) and to decode back to themselves (see _reuse). Dropped
        # with the live session (eviction, reload).
        self._saved: WeakKeyDictionary[Session, Values] = WeakKeyDictionary()
        # Per live session, the last encoding of each channel with its fingerprint (see
        # _reuse): a growing list is encoded by extending it, and a saved object is proven
        # unchanged without encoding it again.
        self._encodings = Encodings(self.serde)
        self._memos: WeakKeyDictionary[Session, Memo] = WeakKeyDictionary()
        # Per live session and DeltaChannel: the seed decoded last (with its version), served
        # again while its fingerprint still equals the one taken when it was decoded.
        self._seeds: WeakKeyDictionary[Session, dict[tuple[str, str], tuple[Any, Any, bytes]]] = (
            WeakKeyDictionary()
        )
        # Per live session, the DeltaChannel writes its last history read decoded, keyed by
        # where they are stored and their stored data, each with its fingerprint: the next
        # read serves a write again while its fingerprint is unchanged.
        self._written: WeakKeyDictionary[Session, dict[WriteAt, tuple[Any, bytes]]] = WeakKeyDictionary()
        # Per live session, the namespaces other than the root one that the caches above
        # hold, least recently saved first; at most KEPT_NAMESPACES.
        self._namespaces: WeakKeyDictionary[Session, dict[str, None]] = WeakKeyDictionary()
        # Per live session whose index has let namespaces go: every namespace its log holds,
        # with the session version it was read at. Read from the log once and kept up to date
        # by this saver's appends, so a subgraph's new namespace is known to be new without
        # reading the log at every call; read again once anyone else (another saver on the
        # same manager) has saved the session since.
        self._in_log: WeakKeyDictionary[Session, tuple[int, set[str]]] = WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<CognitiaSaver key_prefix={self.key_prefix!r} manager={self.manager!r}>"

    def key(self, thread_id: object) -> str:
        """The session key of a LangGraph thread."""
        return f"{self.key_prefix}{thread_id}"

    # -- reading ----------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names (the latest of its thread and namespace by default)."""
        thread_id, ns = _thread_and_ns(config)
        found = await self._find(self.key(thread_id), ns, get_checkpoint_id(config))
        if found is None:
            return None
        session, (turn, writes), values = found
        return self._tuple(
            thread_id, turn, writes, values, self._saved.get(session), self._memos.get(session)
        )

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first: of one thread (and namespace, if the config names one), or of all.

        ``filter`` matches metadata keys exactly; ``before`` keeps checkpoints older than the
        one it names; ``limit`` caps how many are returned.
        """
        await self._bridge.enter()
        before_id = None if before is None else get_checkpoint_id(before)
        # Each thread's checkpoints, newest first, with the stored values they need (not all
        # of the thread's values: a listing of every thread holds only what it returns).
        listings: list[list[Listed]] = []
        if config is None:
            async for key, turns in self._scan():
                found = _listing(turns, None, None, before_id, filter or {})[:limit]
                if found:
                    thread_id, stored = key[len(self.key_prefix) :], sources(turns)
                    listings.append(
                        [(thread_id, turn, writes, _resolved(turn, stored)) for turn, writes in found]
                    )
                    if limit is not None and sum(map(len, listings)) > limit:
                        listings = [list(itertools.islice(_newest_first(listings), limit))]
        else:
            thread_id, ns = _thread_and_ns(config)[0], config["configurable"].get("checkpoint_ns")
            turns = await self._history(self.key(thread_id))
            found = _listing(turns, ns, get_checkpoint_id(config), before_id, filter or {})[:limit]
            stored = sources(turns) if found else {}
            listings.append([(thread_id, turn, writes, _resolved(turn, stored)) for turn, writes in found])
        for owner, turn, writes, values in itertools.islice(_newest_first(listings), limit):
            yield self._tuple(owner, turn, writes, values, None, None)

    # -- writing ----------------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Append ``checkpoint`` to its thread's log; return the config that names it."""
        await self._bridge.enter()
        thread_id, ns = _thread_and_ns(config)
        key = self.key(thread_id)
        parent_id = config["configurable"].get("checkpoint_id")
        serializable = get_serializable_checkpoint_metadata(config, metadata)

        def change(session: Session) -> None:
            # Encoded under the thread's lock: which values the log already holds is only
            # known there.
            stored = index.values(_check_thread(session).state, ns, since=len(session.turns) + 1 - REACH)
            memo = self._memos.setdefault(session, {})
            versions = checkpoint["channel_versions"]

            def encode(channel: str, value: Any) -> Encoding:
                return self._encodings.encode(
                    memo, (ns, channel), value, version=versions.get(channel), base=stored.get(channel)
                )

            turn = checkpoint_turn(self.serde, key, ns, checkpoint, parent_id, serializable, stored, encode)
            _appender([turn])(session)

        session = await self.manager.update(key, change)
        self._logged(session, ns)
        self._keep_namespace(session, ns)
        versions = checkpoint["channel_versions"]
        self._saved.setdefault(session, {})[ns] = (
            checkpoint["id"],
            {
                channel: (versions[channel], value)
                for channel, value in checkpoint["channel_values"].items()
                if versions.get(channel) is not None
            },
        )
        return {
            "configurable": {
                "thread_id": config["configurable"]["thread_id"],
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint["id"],
            }
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Append one task's pending writes for the checkpoint ``config`` names."""
        await self._bridge.enter()
        if not writes:
            return
        thread_id, ns = _thread_and_ns(config)
        key = self.key(thread_id)
        checkpoint_id = config["configurable"]["checkpoint_id"]
        turn = writes_turn(self.serde, key, ns, checkpoint_id, task_id, task_path, writes)
        self._logged(await self.manager.update(key, _appender([turn])), ns)

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """For LangGraph's ``DeltaChannel``: each channel's writes since its nearest stored value.

        Walks the parent chain of the checkpoint ``config`` names (the latest by default), as
        LangGraph's default does, but over the thread's log in one read instead of one
        ``get_tuple`` per ancestor; only the writes to ``channels`` and the seeds are decoded.
        """
        if not channels:
            return {}
        thread_id, ns = _thread_and_ns(config)
        wanted = set(channels)
        async with self._locked(self.key(thread_id)) as session:
            if session is None:
                return {channel: {"writes": []} for channel in channels}
            _check_thread(session)
            stored = len(session.turns) - len(session.turns.pending)
            span = _WALK_SPAN
            while True:
                since = max(0, stored - span)
                turns = await _committed(session, since=since)
                walk = _delta_walk(turns, ns, get_checkpoint_id(config), wanted, complete=since == 0)
                if walk is not None:
                    break
                span *= 4
        chain, seeds, stored_values = walk
        result: dict[str, DeltaChannelHistory] = {}
        decoded = self._delta_writes(session, ns, chain)
        for channel in channels:
            entry: DeltaChannelHistory = {"writes": [w for w in decoded if w[1] == channel]}
            if channel in seeds:
                entry["seed"] = self._seed(session, seeds[channel], stored_values[seeds[channel]])
            result[channel] = entry
        return result

    def _delta_writes(
        self, session: Session, ns: str, chain: list[tuple[Log, frozenset[str]]]
    ) -> list[PendingWrite]:
        """The writes of a DeltaChannel walk, decoded, or served from the last read when unchanged.

        A DeltaChannel read decodes every write since the channel's snapshot, and the next
        read decodes them again plus one turn's. A write is served from the last read when
        it is stored at the same place (checkpoint, task, index) with the same data and its
        decoded object still fingerprints as it did when decoded (LangGraph's reducer, or
        the caller holding the rebuilt state, may have changed it in place).
        """
        last = self._written.get(session, {})
        kept: dict[WriteAt, tuple[Any, bytes]] = {}
        decoded: list[PendingWrite] = []
        for batch, open_channels in chain:
            if not batch:
                continue
            checkpoint_id = batch[0]["checkpoint"]
            for task, idx, channel, pair in chosen_writes(batch, open_channels):
                where = (ns, checkpoint_id, task, idx, pair[0], pair[1])
                hit = last.get(where)
                if hit is not None and fingerprint(hit[0]) == hit[1]:
                    value = hit[0]
                    kept[where] = hit
                else:
                    value = load_value(self.serde, pair)
                    mark = fingerprint(value)
                    if mark is not None:
                        kept[where] = (value, mark)
                decoded.append((task, channel, value))
        self._written[session] = kept
        return decoded

    def _seed(self, session: Session, source: Source, stored: Stored) -> Any:
        """Decode a DeltaChannel seed, or serve the one decoded last if it is unchanged since."""
        cache = self._seeds.setdefault(session, {})
        name, version = source[:2], source[2]
        self._keep_namespace(session, name[0])
        last = cache.get(name)
        if last is not None and last[0] == version and fingerprint(last[1]) == last[2]:
            return last[1]
        value = load_value(self.serde, stored)
        mark = fingerprint(value)
        if mark is None:
            cache.pop(name, None)
        else:
            cache[name] = (version, value, mark)
        return value

    async def _namespaces_of(self, session: Session) -> set[str]:
        """Every namespace the log of ``session`` holds (called with its key held)."""
        known = self._in_log.get(session)
        if known is None or known[0] != session.version:
            known = self._in_log[session] = (
                session.version,
                {turn["ns"] for turn in await _committed(session, since=0)},
            )
        return known[1]

    def _logged(self, session: Session, *namespaces: str) -> None:
        """Note that this saver's save of ``session`` appended turns of ``namespaces``."""
        known = self._in_log.pop(session, None)
        if known is not None and known[0] == session.version - 1:  # no other save in between
            self._in_log[session] = (session.version, known[1] | set(namespaces))

    def _keep_namespace(self, session: Session, ns: str) -> None:
        """Note ``ns`` as just used, and drop what the caches hold of namespaces used longer ago."""
        if not ns:
            return
        recent = self._namespaces.setdefault(session, {})
        recent.pop(ns, None)
        recent[ns] = None
        while len(recent) > KEPT_NAMESPACES:
            old = next(iter(recent))
            del recent[old]
            self._saved.get(session, {}).pop(old, None)
            memo, seeds = self._memos.get(session, {}), self._seeds.get(session, {})
            for name in [name for name in memo if name[0] == old]:
                del memo[name]
            for name in [name for name in seeds if name[0] == old]:
                del seeds[name]

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Sync :meth:`aget_delta_channel_history`."""
        return self._bridge.run(
            "get_delta_channel_history",
            lambda: self.aget_delta_channel_history(config=config, channels=channels),
        )

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete the thread: its session, every checkpoint and every write."""
        await self._bridge.enter()
        await self.manager.delete(self.key(thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete, in every thread, the checkpoints whose metadata ``run_id`` is listed, with their writes."""
        runs = set(run_ids)
        if not runs:
            return
        await self._bridge.enter()
        async for key, turns in self._scan():
            await self._rewrite(key, lambda turns: _without_runs(turns, runs), turns)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Append every checkpoint and write of the source thread to the target thread."""
        source, target = self.key(source_thread_id), self.key(target_thread_id)
        if source == target:
            raise ValueError(f"cannot copy thread {source_thread_id!r} onto itself")
        turns = await self._history(source)
        if turns:
            self._logged(await self.manager.update(target, _appender(turns)), *{turn["ns"] for turn in turns})

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep each namespace's latest checkpoint and its writes; ``"delete"``: all.

        ``keep_latest`` drops the ancestors that LangGraph's beta ``DeltaChannel`` rebuilds
        its value from; do not use it on threads of graphs with delta channels.
        """
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"unknown prune strategy {strategy!r}; expected 'keep_latest' or 'delete'")
        for thread_id in thread_ids:
            if strategy == "delete":
                await self.adelete_thread(thread_id)
            else:
                await self._rewrite(self.key(thread_id), _latest_only)

    def get_next_version(self, current: str | int | None, channel: None) -> str:
        """A version greater than ``current``, with a random suffix so forks never collide."""
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(current.split(".")[0])
        return f"{number + 1:032}.{random():016}"

    # -- the sync API, for graph.invoke -------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Sync :meth:`aget_tuple`."""
        return self._bridge.run("get_tuple", self.aget_tuple, config)

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Sync :meth:`alist` (the matching checkpoints are read before the first is returned)."""
        return iter(self._bridge.run("list", self._collect, config, filter, before, limit))

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Sync :meth:`aput`."""
        return self._bridge.run("put", self.aput, config, checkpoint, metadata, new_versions)

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Sync :meth:`aput_writes`."""
        self._bridge.run("put_writes", self.aput_writes, config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        """Sync :meth:`adelete_thread`."""
        self._bridge.run("delete_thread", self.adelete_thread, thread_id)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Sync :meth:`adelete_for_runs`."""
        self._bridge.run("delete_for_runs", self.adelete_for_runs, run_ids)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Sync :meth:`acopy_thread`."""
        self._bridge.run("copy_thread", self.acopy_thread, source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Sync :meth:`aprune`."""
        self._bridge.run("prune", self._prune, thread_ids, strategy)

    async def _prune(self, thread_ids: Sequence[str], strategy: str) -> None:
        await self.aprune(thread_ids, strategy=strategy)

    async def _collect(
        self,
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> Sequence[CheckpointTuple]:
        return [t async for t in self.alist(config, filter=filter, before=before, limit=limit)]

    # -- internals --------------------------------------------------------------------------

    @asynccontextmanager
    async def _locked(self, key: str) -> AsyncIterator[Session | None]:
        # Reads take the manager's per-key lock, as its writes do: loading the turn log
        # while a save of the same session commits would interleave the two.
        await self._bridge.enter()
        async with self.manager.locked(key) as session:
            yield session

    async def _find(
        self, key: str, ns: str, checkpoint_id: str | None
    ) -> tuple[Session, Found, dict[str, Stored]] | None:
        """The checkpoint, its writes and its encoded channel values, read from the log's tail if possible."""
        async with self._locked(key) as session:
            if session is None:
                return None
            _check_thread(session)
            hint = index.latest(session.state, ns)
            if hint is not None and checkpoint_id in (None, hint[0]):
                tail = await _committed(session, since=hint[1])
                found = _select(tail, ns, hint[0])
                if found is not None:
                    values = resolve(found[0], sources(tail))
                    if values is not None:
                        return session, found, values
            elif hint is None and checkpoint_id is None and "langgraph" in session.state:
                if not index.pruned(session.state):
                    return None  # the index knows every namespace this thread has
                if ns not in await self._namespaces_of(session):
                    return None  # a new namespace (a subgraph's first call)
            # An older checkpoint (time travel), or an index that does not match the log.
            turns = await _committed(session, since=0)
        if checkpoint_id is None:
            ids = [t["id"] for t in turns if t["kind"] == CHECKPOINT and t["ns"] == ns]
            if not ids:
                return None
            checkpoint_id = max(ids)
        found = _select(turns, ns, checkpoint_id)
        if found is None:
            return None
        return session, found, _resolved(found[0], sources(turns))

    async def _history(self, key: str) -> Log:
        async with self._locked(key) as session:
            return [] if session is None else await _committed(_check_thread(session), since=0)

    async def _scan(self) -> AsyncIterator[tuple[str, Log]]:
        """Every thread of this saver with its log, sessions of other kinds skipped.

        A thread that was not live is let go once read, so a scan over every thread
        leaves the live set as it found it rather than holding the whole store.
        """
        for key in await self.manager.list_keys(self.key_prefix):
            was_live = key in self.manager
            async with self._locked(key) as session:
                if session is None or not _is_thread(session):
                    continue
                turns = await _committed(session, since=0)
            if not was_live:
                await self.manager.close(key)
            yield key, turns

    async def _rewrite(self, key: str, keep: Callable[[Log], Log], turns: Log | None = None) -> None:
        """Replace the thread's log with ``keep(log)`` (and rebuild the index), if that changes it.

        ``turns``: the log as the caller just read it, to decide without reading it again.
        """
        if turns is None:
            turns = await self._history(key)
        if len(keep(turns)) == len(turns):
            return

        async def change(session: Session) -> None:
            turns = await _committed(_check_thread(session), since=0)
            kept = _self_contained(keep(turns), sources(turns))
            session.turns.clear()
            for turn in kept:
                session.turns.append(turn)
            index.rebuild(session.state, kept)

        await self.manager.update(key, change)

    def _tuple(
        self,
        thread_id: object,
        checkpoint: Turn,
        writes: Log,
        values: dict[str, Stored],
        saved: Values | None,
        memo: Memo | None,
    ) -> CheckpointTuple:
        ns = checkpoint["ns"]
        parent = checkpoint["parent"]
        # Only the checkpoint saved last may be served from its objects: an older one can
        # hold another encoding of the same channel version (stored again, see REACH).
        last = None if saved is None else saved.get(ns)
        recent = last[1] if last is not None and last[0] == checkpoint["id"] else {}
        versions = checkpoint["checkpoint"]["channel_versions"]
        decoded = {
            channel: self._value(recent, memo, (ns, channel), versions.get(channel), pair)
            for channel, pair in values.items()
        }
        return CheckpointTuple(
            config={
                "configurable": {
                    "thread_id": thread_id,
                    "checkpoint_ns": ns,
                    "checkpoint_id": checkpoint["id"],
                }
            },
            checkpoint=load_checkpoint(self.serde, checkpoint, decoded),
            metadata=copied(checkpoint["metadata"]),
            parent_config=(
                None
                if parent is None
                else {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": parent}}
            ),
            pending_writes=pending_writes(self.serde, writes),
        )

    def _value(
        self,
        recent: dict[str, tuple[Any, Any]],
        memo: Memo | None,
        name: tuple[str, str],
        version: Any,
        stored: Stored,
    ) -> Any:
        """Decode ``stored``, or serve the object last saved as it if it is what decoding gives.

        That takes the memo's proof: the object still encodes to the stored bytes, and they
        were seen to decode back to it. Encoding alike is not enough (a tuple encodes as a
        list does), so a value without a fingerprint is decoded.
        """
        channel = name[1]
        saved = recent.get(channel)
        if saved is not None and version is not None and saved[0] == version:
            if memo is not None and self._encodings.unchanged(memo, name, saved[1], version):
                return saved[1]
            del recent[channel]
        return load_value(self.serde, stored)


def _is_thread(session: Session) -> bool:
    """Whether ``session`` holds a LangGraph thread (or nothing yet)."""
    return not session.state or "langgraph" in session.state


def _check_thread(session: Session) -> Session:
    if not _is_thread(session):
        raise ValueError(
            f"session {session.key!r} is not a LangGraph thread (its state has no checkpoint index): "
            "other sessions of the manager use keys under the saver's key_prefix; give the saver "
            "a key_prefix of its own"
        )
    return session


def _thread_and_ns(config: RunnableConfig) -> tuple[str, str]:
    configurable = config.get("configurable") or {}
    if "thread_id" not in configurable:
        raise ValueError("CognitiaSaver needs a thread id: pass config={'configurable': {'thread_id': ...}}")
    return str(configurable["thread_id"]), configurable.get("checkpoint_ns", "") or ""


def _newest_first(listings: list[list[Listed]]) -> Iterator[Listed]:
    """Lists of checkpoints, each newest first, merged into one newest first."""
    return heapq.merge(*listings, key=lambda entry: entry[1]["id"], reverse=True)


def _appender(turns: Sequence[Turn]) -> Callable[[Session], None]:
    """A change for ``manager.update`` that appends ``turns`` and keeps the index in step."""

    def change(session: Session) -> None:
        _check_thread(session)
        for turn in turns:
            index.record(session.state, turn, len(session.turns))
            session.turns.append(turn)

    return change


async def _committed(session: Session, *, since: int) -> Log:
    """The stored turns from log position ``since`` on (the whole log for 0), without queued ones."""
    queued = len(session.turns.pending)
    stored = len(session.turns) - queued
    if since <= 0:
        turns = await session.turns.all()
    elif since >= stored:
        return []
    else:
        turns = await session.turns.last(stored - since + queued)
    return turns[: len(turns) - queued] if queued else turns


def _resolved(turn: Turn, stored: dict[Source, Stored]) -> dict[str, Stored]:
    values = resolve(turn, stored)
    if values is None:
        raise CognitiaError(
            f"checkpoint {turn['id']!r} carries a channel value its thread's log does not hold; "
            "the log was changed outside CognitiaSaver"
        )
    return values


def _self_contained(kept: Log, stored: dict[Source, Stored]) -> Log:
    """``kept`` with every value it refers to in a dropped turn stored whole (already encoded).

    A carried value whose turn was dropped, and an extension whose base was, are stored
    whole in the turn that refers to them.
    """
    available: set[Source] = set()
    result = []
    for turn in kept:
        if turn["kind"] == CHECKPOINT:
            ns, versions = turn["ns"], turn["checkpoint"]["channel_versions"]
            links = extended(turn)
            missing = [c for c in carried(turn) if (ns, c, versions.get(c)) not in available]
            missing += [c for c, (base, _) in links.items() if (ns, c, base) not in available]
            if missing:
                fields = dict(turn["checkpoint"])
                values = dict(fields["channel_values"])
                for channel in missing:
                    values[channel] = pair_of(stored[(ns, channel, versions.get(channel))])
                fields["channel_values"] = values
                fields["carried"] = [c for c in carried(turn) if c not in missing]
                fields["extends"] = {c: link for c, link in links.items() if c not in missing}
                for name in ("carried", "extends"):
                    if not fields[name]:
                        del fields[name]  # present only when not empty
                turn = {**turn, "checkpoint": fields}
            for channel in turn["checkpoint"]["channel_values"]:
                available.add((ns, channel, versions.get(channel)))
        result.append(turn)
    return result


Walk = tuple[list[tuple[Log, frozenset[str]]], dict[str, Source], dict[Source, Stored]]
"""Per checkpoint of a parent chain (oldest first), its writes turns and the channels whose
writes count there; where each seed is; and the encoded values found."""


def _delta_walk(
    turns: Log, ns: str, checkpoint_id: str | None, channels: set[str], *, complete: bool
) -> Walk | None:
    """The parent chain of a checkpoint, back to each channel's nearest stored value (its seed).

    Each ancestor contributes its writes to the channels still without a seed, as
    LangGraph's default walk does. ``None`` when ``turns`` is a tail of the log that does
    not reach far enough (the caller reads more).
    """
    checkpoints: dict[str, tuple[int, Turn]] = {}
    writes: dict[str, Log] = {}
    for seq, turn in enumerate(turns):
        if turn["ns"] != ns:
            continue
        if turn["kind"] == CHECKPOINT:
            checkpoints[turn["id"]] = (seq, turn)
        else:
            writes.setdefault(turn["checkpoint"], []).append(turn)
    target = checkpoints.get(checkpoint_id if checkpoint_id is not None else max(checkpoints, default=""))
    if target is None:
        return None if not complete else ([], {}, {})
    stored = sources(turns)
    chain: list[tuple[Log, frozenset[str]]] = []
    seeds: dict[str, Source] = {}
    remaining = set(channels)
    cursor = target[1]["parent"]
    while cursor is not None and remaining:
        found = checkpoints.get(cursor)
        if found is None or (not complete and found[0] < _WALK_MARGIN):
            # Not in this tail, or so close to its start that some of its writes (saved
            # before it, as LangGraph's background saves may) could be further back.
            return None if not complete else _walk_result(chain, seeds, stored)
        seq, turn = found
        chain.append((writes.get(cursor, []), frozenset(remaining)))
        versions = turn["checkpoint"]["channel_versions"]
        values = resolve(turn, stored)
        if values is None:
            if complete:
                raise CognitiaError(
                    f"checkpoint {cursor!r} carries a channel value its thread's log does not hold"
                )
            return None
        for channel in list(remaining):
            if channel in values:
                seeds[channel] = (ns, channel, versions.get(channel))
                stored.setdefault(seeds[channel], values[channel])
                remaining.discard(channel)
        cursor = turn["parent"]
    return _walk_result(chain, seeds, stored)


def _walk_result(
    chain: list[tuple[Log, frozenset[str]]], seeds: dict[str, Source], stored: dict[Source, Stored]
) -> Walk:
    return chain[::-1], seeds, stored


def _select(turns: Log, ns: str, checkpoint_id: str) -> Found | None:
    """The newest turn of checkpoint ``checkpoint_id`` in ``turns``, with its writes."""
    for turn in reversed(turns):
        if turn["kind"] == CHECKPOINT and turn["id"] == checkpoint_id and turn["ns"] == ns:
            break
    else:
        return None
    writes = [
        t for t in turns if t["kind"] != CHECKPOINT and t["checkpoint"] == checkpoint_id and t["ns"] == ns
    ]
    return turn, writes


def _listing(
    turns: Log,
    ns: str | None,
    checkpoint_id: str | None,
    before_id: str | None,
    filter: dict[str, Any],
) -> list[Found]:
    """The checkpoints of one thread's log that match, newest first."""
    checkpoints: dict[tuple[str, str], Turn] = {}
    writes: dict[tuple[str, str], Log] = {}
    for turn in turns:
        if turn["kind"] == CHECKPOINT:
            checkpoints[(turn["ns"], turn["id"])] = turn  # a re-saved checkpoint: the newest wins
        else:
            writes.setdefault((turn["ns"], turn["checkpoint"]), []).append(turn)
    matching = [
        turn
        for (turn_ns, turn_id), turn in checkpoints.items()
        if (ns is None or turn_ns == ns)
        and (checkpoint_id is None or turn_id == checkpoint_id)
        and (before_id is None or turn_id < before_id)
        and all(turn["metadata"].get(k) == v for k, v in filter.items())
    ]
    matching.sort(key=lambda t: t["id"], reverse=True)
    return [(t, writes.get((t["ns"], t["id"]), [])) for t in matching]


def _without_runs(turns: Log, runs: set[str]) -> Log:
    doomed = {
        (t["ns"], t["id"]) for t in turns if t["kind"] == CHECKPOINT and t["metadata"].get("run_id") in runs
    }
    if not doomed:
        return turns
    return [
        t for t in turns if (t["ns"], t["id"] if t["kind"] == CHECKPOINT else t["checkpoint"]) not in doomed
    ]


def _latest_only(turns: Log) -> Log:
    """Per namespace, the newest turn of the latest checkpoint, its writes, and writes of newer ones."""
    latest: dict[str, tuple[str, int]] = {}
    for seq, turn in enumerate(turns):
        if turn["kind"] == CHECKPOINT and (turn["ns"] not in latest or turn["id"] >= latest[turn["ns"]][0]):
            latest[turn["ns"]] = (turn["id"], seq)
    kept = []
    for seq, turn in enumerate(turns):
        mark = latest.get(turn["ns"])
        if turn["kind"] == CHECKPOINT:
            if mark == (turn["id"], seq):
                kept.append(turn)
        elif mark is None or turn["checkpoint"] >= mark[0]:
            kept.append(turn)
    return kept
