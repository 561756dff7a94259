"""How LangGraph checkpoints and writes become cognitia turns: plain JSON, never pickle.

Values LangGraph hands us (channel values, pending writes) are arbitrary Python objects, so
they go through LangGraph's own serializer (``saver.serde``), and the ``(type, bytes)`` pair
it returns is stored as ``[type, base64]``. Everything else (ids, versions, timestamps,
metadata) is stored as the plain JSON it already is, so the log stays readable and
``list(filter=...)`` can match metadata without decoding anything.

A checkpoint turn::

    {"kind": "checkpoint", "ns": "", "id": "1f0...", "parent": "1f0..." | null,
     "checkpoint": {"v": 4, "ts": "...", "channel_versions": {...}, "versions_seen": {...},
                    "updated_channels": [...] | null,
                    "channel_values": {"messages": ["msgpack", "<base64>"]}},
     "metadata": {"source": "loop", "step": 3, "parents": {}, ...}}

A batch of pending writes (one ``put_writes`` call)::

    {"kind": "writes", "ns": "", "checkpoint": "1f0...", "task": "<task id>", "path": "<task path>",
     "writes": [[0, "messages", "msgpack", "<base64>"], ...]}
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any, cast

from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    Checkpoint,
    CheckpointMetadata,
    PendingWrite,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from cognitia import CognitiaError, StateNotSerializableError
from cognitia._json import dumps

__all__ = [
    "CHECKPOINT",
    "WRITES",
    "PickleRefusedError",
    "checkpoint_turn",
    "load_checkpoint",
    "pending_writes",
    "refuse_pickle",
    "writes_turn",
]

CHECKPOINT = "checkpoint"
WRITES = "writes"

# Checkpoint fields that are JSON by LangGraph's own contract; any other field (such as
# the legacy ``pending_sends``) is kept too, through the serializer, under "extra".
_PLAIN_FIELDS = ("v", "ts", "channel_versions", "versions_seen", "updated_channels")


class PickleRefusedError(CognitiaError, TypeError):
    """A serializer produced (or a stored turn holds) pickled data, which cognitia never loads."""


def refuse_pickle(serde: SerializerProtocol) -> None:
    """Raise if ``serde`` (or a serializer it wraps) would fall back to pickle."""
    layer: object = serde
    for _ in range(8):  # EncryptedSerializer and friends wrap another serializer in `.serde`
        if getattr(layer, "pickle_fallback", False):
            raise PickleRefusedError(
                f"{type(layer).__name__} has pickle_fallback enabled; cognitia stores plain JSON "
                "and never pickles. Use JsonPlusSerializer() (its default has no pickle fallback)."
            )
        layer = getattr(layer, "serde", None)
        if layer is None:
            return


def _dump(serde: SerializerProtocol, value: Any, key: str, path: str) -> list[str]:
    try:
        kind, data = serde.dumps_typed(value)
    except Exception as exc:
        raise StateNotSerializableError(
            key, path, f"is a {type(value).__name__} that LangGraph's serializer rejected ({exc})"
        ) from exc
    if "pickle" in kind:
        raise PickleRefusedError(f"session {key!r}: the serializer pickled {path}; refusing to store it")
    return [kind, base64.b64encode(data).decode("ascii")]


def _load(serde: SerializerProtocol, pair: Sequence[str]) -> Any:
    kind, data = pair
    if "pickle" in kind:
        raise PickleRefusedError("a stored value is marked as pickled; cognitia never loads pickle")
    return serde.loads_typed((kind, base64.b64decode(data)))


def checkpoint_turn(
    serde: SerializerProtocol,
    key: str,
    ns: str,
    checkpoint: Checkpoint,
    parent_id: str | None,
    metadata: CheckpointMetadata,
) -> dict[str, Any]:
    """The turn that stores one checkpoint, validated as JSON before anything is written."""
    # Metadata is the one part that is not JSON by construction (it may carry user values
    # from the config); check it here so a bad value fails before the session is touched.
    dumps(key, metadata, root="metadata")
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in checkpoint.items():
        if name in _PLAIN_FIELDS:
            fields[name] = value
        elif name not in ("id", "channel_values"):
            extra[name] = value
    fields["channel_values"] = {
        channel: _dump(serde, value, key, f'checkpoint["channel_values"][{channel!r}]')
        for channel, value in checkpoint["channel_values"].items()
    }
    turn: dict[str, Any] = {
        "kind": CHECKPOINT,
        "ns": ns,
        "id": checkpoint["id"],
        "parent": parent_id,
        "checkpoint": fields,
        "metadata": metadata,
    }
    if extra:
        turn["extra"] = _dump(serde, extra, key, "checkpoint (fields beyond LangGraph's standard ones)")
    return turn


def writes_turn(
    serde: SerializerProtocol,
    key: str,
    ns: str,
    checkpoint_id: str,
    task_id: str,
    task_path: str,
    writes: Sequence[tuple[str, Any]],
) -> dict[str, Any]:
    """The turn that stores one ``put_writes`` batch; special channels get LangGraph's fixed indexes."""
    return {
        "kind": WRITES,
        "ns": ns,
        "checkpoint": checkpoint_id,
        "task": task_id,
        "path": task_path,
        "writes": [
            [
                WRITES_IDX_MAP.get(channel, idx),
                channel,
                *_dump(serde, value, key, f"writes[{idx}] ({channel})"),
            ]
            for idx, (channel, value) in enumerate(writes)
        ],
    }


def load_checkpoint(serde: SerializerProtocol, turn: dict[str, Any]) -> Checkpoint:
    """Rebuild the :class:`Checkpoint` stored by :func:`checkpoint_turn`."""
    stored = turn["checkpoint"]
    checkpoint: dict[str, Any] = {name: stored[name] for name in _PLAIN_FIELDS if name in stored}
    checkpoint["id"] = turn["id"]
    checkpoint["channel_values"] = {
        channel: _load(serde, pair) for channel, pair in stored["channel_values"].items()
    }
    if "extra" in turn:
        checkpoint.update(_load(serde, turn["extra"]))
    return cast(Checkpoint, checkpoint)


def pending_writes(serde: SerializerProtocol, turns: Iterable[dict[str, Any]]) -> list[PendingWrite]:
    """The pending writes in ``turns`` (oldest first), deduplicated and in ``writes_sort_key`` order.

    Like LangGraph's own savers, a repeated regular write (same task, same index) keeps the
    first value, and a repeated special write (error, interrupt, ...) the last one.
    """
    chosen: dict[tuple[str, int], tuple[str, str, int, str, list[str]]] = {}
    for turn in turns:
        task, path = turn["task"], turn["path"]
        for idx, channel, kind, data in turn["writes"]:
            if idx >= 0 and (task, idx) in chosen:
                continue
            chosen[(task, idx)] = (path, task, idx, channel, [kind, data])
    ordered = sorted(chosen.values(), key=lambda w: writes_sort_key(w[0], w[1], w[2]))
    return [(task, channel, _load(serde, value)) for _, task, _, channel, value in ordered]
