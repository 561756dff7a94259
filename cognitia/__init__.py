"""cognitia: session persistence and lifecycle for AI agents, on asyncio and trio.

>>> from cognitia import persisted_session, Session
>>> from cognitia.session.backends import SqliteSessionBackend
"""

from importlib.metadata import PackageNotFoundError, version

from .decorator import persisted_session
from .errors import (
    BackendClosedError,
    CognitiaError,
    HookError,
    InvalidKeyError,
    MissingDependencyError,
    SessionNotFound,
    StateNotSerializableError,
    StorageError,
    VersionConflictError,
)
from .session import EVENTS, Session, SessionEvent, Subscription, Turns
from .session.backends import MemoryScope, scoped_key
from .session.manager import InMemorySessionManager

try:
    __version__ = version("cognitia-sessions")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "EVENTS",
    "BackendClosedError",
    "CognitiaError",
    "HookError",
    "InMemorySessionManager",
    "InvalidKeyError",
    "MemoryScope",
    "MissingDependencyError",
    "Session",
    "SessionEvent",
    "SessionNotFound",
    "StateNotSerializableError",
    "StorageError",
    "Subscription",
    "Turns",
    "VersionConflictError",
    "__version__",
    "persisted_session",
    "scoped_key",
]
