from __future__ import annotations

from enum import StrEnum

from ..._json import check_key

__all__ = ["MemoryScope", "scoped_key"]


class MemoryScope(StrEnum):
    """Namespaces for session keys, so agents can reuse key names without colliding.

    >>> scoped_key(MemoryScope.AGENT, "session:123")
    'agent:session:123'
    """

    GLOBAL = "global"
    """Shared across all agents."""
    AGENT = "agent"
    """Private to one agent."""
    SHARED = "shared"
    """Shared between a group of agents."""

    @property
    def prefix(self) -> str:
        """The key prefix of this scope, e.g. ``"agent:"``."""
        return f"{self.value}:"

    @classmethod
    def of(cls, key: str) -> MemoryScope | None:
        """The scope a key was made in, or ``None`` for an unscoped key."""
        head, sep, _ = key.partition(":")
        if sep:
            try:
                return cls(head)
            except ValueError:
                return None
        return None


def scoped_key(scope: MemoryScope | str, key: str) -> str:
    """Prefix ``key`` with its scope's namespace.

    >>> scoped_key(MemoryScope.GLOBAL, "settings")
    'global:settings'
    """
    scope = MemoryScope(scope)
    check_key(key)
    return check_key(scope.prefix + key)
