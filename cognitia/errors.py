"""The cognitia error tree.

Every exception cognitia raises on purpose derives from :class:`CognitiaError`::

    CognitiaError
    ├── InvalidKeyError (ValueError)           empty, non-string or malformed session key
    ├── StateNotSerializableError (TypeError)  state JSON cannot represent; names key and path
    ├── SessionNotFound (LookupError)          no live or stored session under that key
    ├── VersionConflictError                   another writer saved first (optimistic concurrency)
    ├── BackendClosedError (RuntimeError)      the backend (or manager) was closed
    ├── StorageError (OSError)                 the storage engine failed; ``__cause__`` holds why
    ├── HookError                              a lifecycle hook raised (strict mode only)
    └── MissingDependencyError (ImportError)   an optional extra is not installed

Errors subclass the builtin that describes them, so ``except LookupError`` keeps working
for code that does not know cognitia.
"""

from __future__ import annotations

__all__ = [
    "BackendClosedError",
    "CognitiaError",
    "HookError",
    "InvalidKeyError",
    "MissingDependencyError",
    "SessionNotFound",
    "StateNotSerializableError",
    "StorageError",
    "VersionConflictError",
]


class CognitiaError(Exception):
    """Base class of every error cognitia raises on purpose."""


class InvalidKeyError(CognitiaError, ValueError):
    """A session key is empty, not a string, or otherwise unusable."""


class StateNotSerializableError(CognitiaError, TypeError):
    """A state (or turn) holds a value JSON cannot represent.

    ``key`` is the session key and ``path`` the location of the offending value,
    written the way you would index it: ``state["history"][3]["ts"]``.
    """

    def __init__(self, key: str, path: str, problem: str) -> None:
        self.key = key
        self.path = path
        self.problem = problem
        super().__init__(f"cannot store session {key!r}: {path} {problem}; nothing was written")


class SessionNotFound(CognitiaError, LookupError):
    """No live or stored session exists under the key."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no session under key {key!r}")


class VersionConflictError(CognitiaError):
    """A save (or a delete given ``expected_version``) expected one version but the stored
    session had another.

    Another writer (a task, a worker process) saved the session in between. Reload,
    re-apply the change and save again; :class:`~cognitia.session.manager.InMemorySessionManager`
    and ``@persisted_session`` do that for you under their retry policy. A conflicting
    delete deleted nothing: reload, and decide again whether to delete.
    """

    def __init__(self, key: str, expected: int, actual: int | None) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        found = "no stored session" if actual is None else f"version {actual}"
        super().__init__(f"session {key!r}: expected version {expected}, found {found}")


class BackendClosedError(CognitiaError, RuntimeError):
    """The backend or manager was closed; it accepts no more operations."""


class StorageError(CognitiaError, OSError):
    """The storage engine failed. The original exception is the ``__cause__``."""


class HookError(CognitiaError):
    """A lifecycle hook raised while the manager runs in strict mode."""

    def __init__(self, event: str, hook: str, key: str) -> None:
        self.event = event
        self.hook = hook
        self.key = key
        super().__init__(f"hook {hook} failed on {event!r} for session {key!r}")


class MissingDependencyError(CognitiaError, ImportError):
    """An optional dependency is not installed; the message says how to install it."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        super().__init__(
            f"{feature} needs {package!r}, which is not installed: pip install 'cognitia-sessions[{extra}]'"
        )
