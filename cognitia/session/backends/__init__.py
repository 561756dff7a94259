"""Session backends: where session state lives.

>>> from cognitia.session.backends import SqliteSessionBackend, MemoryScope, scoped_key
>>> key = scoped_key(MemoryScope.AGENT, "user:42:session:abc")
>>> key
'agent:user:42:session:abc'

Every backend implements :class:`SessionBackend` (``save``, ``load``, ``delete``,
``list_keys``). cognitia's own also declare :class:`Capability` extras: listing by prefix
in the engine, versioned commits, a native turn log, expiry and atomic commits of several
sessions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import BackendBase
from ._memory import InMemorySessionBackend
from ._protocol import Capability, SessionBackend, SessionRecord, StoreBackend, Write, capabilities_of
from ._scope import MemoryScope, scoped_key
from ._sqlite import SqliteSessionBackend

if TYPE_CHECKING:
    from ._postgres import PostgresSessionBackend
    from ._redis import RedisSessionBackend

__all__ = [
    "BackendBase",
    "Capability",
    "InMemorySessionBackend",
    "MemoryScope",
    "PostgresSessionBackend",
    "RedisSessionBackend",
    "SessionBackend",
    "SessionRecord",
    "SqliteSessionBackend",
    "StoreBackend",
    "Write",
    "capabilities_of",
    "scoped_key",
]


def __getattr__(name: str) -> Any:
    # The server backends import their drivers, which are optional extras.
    if name == "PostgresSessionBackend":
        from ._postgres import PostgresSessionBackend

        return PostgresSessionBackend
    if name == "RedisSessionBackend":
        from ._redis import RedisSessionBackend

        return RedisSessionBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
