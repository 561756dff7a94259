"""Lifecycle events: one code path emits the structlog event and runs the user's hooks."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, get_args

import anyio.lowlevel
import structlog

from ..errors import HookError
from .backends._scope import MemoryScope

__all__ = ["EVENTS", "EventName", "Hook", "HookRegistry", "SessionEvent", "Subscription", "current_runtime"]

EventName = Literal[
    "registered", "loaded", "saved", "closed", "deleted", "expired", "evicted", "conflict", "pruned"
]
EVENTS: tuple[str, ...] = get_args(EventName)

log = structlog.get_logger("cognitia")


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """What a lifecycle hook receives. Never holds the session's state, only its measurements."""

    name: str
    """The lifecycle step: ``"saved"``, ``"loaded"``, ... (see :data:`EVENTS`)."""
    key: str
    scope: str | None
    """``"global"``, ``"agent"`` or ``"shared"`` for a scoped key, else ``None``."""
    backend: str
    version: int
    bytes: int
    """Size of the state's JSON encoding (0 where nothing was encoded)."""
    duration: float
    """Seconds the step took, storage round trip included."""
    runtime: str
    """``"asyncio"`` or ``"trio"``."""
    turns: int = 0
    """Turns appended by this step (``saved``) or loaded (``loaded``)."""
    reason: str | None = None
    """Why it happened, where there is a choice: ``"idle"``, ``"capacity"``, ``"stale"``, ..."""


Hook = Callable[[SessionEvent], Awaitable[None] | None]


def current_runtime() -> str:
    """The running async library, ``"asyncio"`` or ``"trio"``."""
    module = anyio.lowlevel.current_token().backend_class.__module__
    return module.rsplit("_", 1)[-1]


def _info_enabled(logger: object) -> bool:
    """Whether ``logger`` keeps info events; ``True`` unless it says otherwise.

    structlog's filtering loggers (``make_filtering_bound_logger``) answer through
    ``is_enabled_for``; any other logger is assumed to keep everything.
    """
    is_enabled_for = getattr(logger, "is_enabled_for", None)
    if is_enabled_for is None:
        return True
    try:
        return bool(is_enabled_for(_INFO))
    except Exception:
        return True


_INFO = 20  # logging.INFO, without importing logging here


class Subscription:
    """Returned by ``manager.on(...)``; call it (or ``.cancel()``) to unregister the hook."""

    __slots__ = ("_registry", "event", "hook")

    def __init__(self, registry: HookRegistry, event: str, hook: Hook) -> None:
        self._registry = registry
        self.event = event
        self.hook = hook

    def cancel(self) -> bool:
        """Unregister; ``True`` if the hook was still registered."""
        hooks = self._registry._hooks[self.event]
        for i, registered in enumerate(hooks):
            if registered is self.hook:
                del hooks[i]
                return True
        return False

    __call__ = cancel

    def __repr__(self) -> str:
        return f"<Subscription {self.event!r} {_hook_name(self.hook)}>"


def _hook_name(hook: Hook) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


class HookRegistry:
    """Hooks per event, in registration order, and the one place events are emitted."""

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self._hooks: dict[str, list[Hook]] = {name: [] for name in EVENTS}

    def add(self, event: str, hook: Hook) -> Subscription:
        if event not in self._hooks:
            raise ValueError(f"unknown lifecycle event {event!r}; expected one of {', '.join(EVENTS)}")
        if not callable(hook):
            raise TypeError(f"hook for {event!r} must be callable, got {type(hook).__name__}")
        self._hooks[event].append(hook)
        return Subscription(self, event, hook)

    def has_hooks(self, event: str) -> bool:
        return bool(self._hooks[event])

    async def emit(
        self,
        name: str,
        key: str,
        *,
        backend: str,
        version: int,
        bytes: int = 0,
        duration: float = 0.0,
        turns: int = 0,
        reason: str | None = None,
        deadline: float = math.inf,
    ) -> None:
        """Log the event, then run its hooks; an async hook still running at ``deadline``
        (``anyio.current_time()``) is cancelled and reported as failed with a ``TimeoutError``."""
        hooks = self._hooks[name]
        logger = log.bind()  # resolves the current structlog configuration once
        logging_on = _info_enabled(logger)
        if not hooks and not logging_on:
            # Nobody would see this event: a filtering logger drops info events and no
            # hook listens. Skip measuring the scope and the runtime for nothing.
            return
        scope = MemoryScope.of(key)
        event = SessionEvent(
            name=name,
            key=key,
            scope=None if scope is None else scope.value,
            backend=backend,
            version=version,
            bytes=bytes,
            duration=duration,
            runtime=current_runtime(),
            turns=turns,
            reason=reason,
        )
        if logging_on:
            logger.info(
                "session." + name,
                key=key,
                scope=event.scope,
                backend=backend,
                runtime=event.runtime,
                version=version,
                bytes=bytes,
                duration_ms=round(duration * 1000, 3),
                turns=turns,
                **({"reason": reason} if reason else {}),
            )
        for hook in tuple(hooks):
            try:
                result = hook(event)
                if inspect.isawaitable(result):
                    with anyio.CancelScope(deadline=deadline) as limit:
                        await result
                    if limit.cancelled_caught:
                        raise TimeoutError(f"hook still running at the deadline of {name!r}")
            except Exception as exc:
                hook_name = _hook_name(hook)
                if self.strict:
                    raise HookError(name, hook_name, key) from exc
                log.error(
                    "session.hook_failed",
                    # Not ``event=``: that is the log event's own name in structlog.
                    lifecycle_event=name,
                    key=key,
                    hook=hook_name,
                    error=type(exc).__name__,
                    exc_info=True,
                )
