"""``@persisted_session``: an agent handler gets its session, and every turn is persisted.

>>> from cognitia import persisted_session, Session
>>> from cognitia.session.backends import InMemorySessionBackend
>>> @persisted_session(InMemorySessionBackend(), key="session_id")
... async def chat(message: str, *, session_id: str, session: Session) -> str:
...     session.state["count"] = session.state.get("count", 0) + 1
...     return f"reply #{session.state['count']} to {message}"
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, cast, overload

from ._json import check_key, dumps, loads
from .errors import StateNotSerializableError, VersionConflictError
from .session._session import Session, Turns
from .session.backends._protocol import SessionBackend
from .session.backends._scope import MemoryScope, scoped_key
from .session.manager import InMemorySessionManager, as_manager, conflict_pause

__all__ = ["PersistedDecorator", "PersistedHandler", "PersistedStream", "persisted_session"]

R = TypeVar("R")
T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)
P = ParamSpec("P")
KeySpec = str | Callable[[inspect.BoundArguments], str]


_PLAIN = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class _Call:
    """What one decorated call needs, resolved once per call."""

    __slots__ = ("bound", "key")

    def __init__(self, bound: inspect.BoundArguments, key: str) -> None:
        self.bound = bound
        self.key = key


def _name(handler: Callable[..., Any]) -> str:
    """How errors name a handler: a function's qualified name, an instance's class."""
    name = getattr(handler, "__qualname__", None)
    return name if isinstance(name, str) else f"{type(handler).__qualname__} instance"


class _Persister:
    """The machinery behind one decorated handler."""

    def __init__(
        self,
        handler: Callable[..., Any],
        manager: InMemorySessionManager,
        *,
        key: KeySpec,
        scope: MemoryScope | None,
        param: str,
        initial: Callable[[], dict[str, Any]],
        record: bool,
        encoder: Callable[[Any], Any] | None,
        on_conflict: Literal["retry", "raise"],
        retries: int,
    ) -> None:
        signature = inspect.signature(handler)
        if param not in signature.parameters:
            raise TypeError(
                f"@persisted_session: {_name(handler)} has no parameter {param!r} to receive the session"
            )
        if signature.parameters[param].kind not in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise TypeError(
                f"@persisted_session: parameter {param!r} of {_name(handler)} must accept a keyword"
            )
        names = list(signature.parameters)
        after = [
            name
            for name in names[names.index(param) + 1 :]
            if signature.parameters[name].kind
            in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        ]
        if signature.parameters[param].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and after:
            # Callers leave the session out, so their positional arguments would land on it.
            raise TypeError(
                f"@persisted_session: parameter {param!r} of {_name(handler)} comes before the "
                f"positional parameter {after[0]!r}; make it keyword-only (after *) or the last one"
            )
        if isinstance(key, str) and key not in signature.parameters:
            raise TypeError(
                f"@persisted_session: key={key!r} is not a parameter of {_name(handler)}; "
                "pass the name of the argument that holds the session key, or a callable"
            )
        if not isinstance(key, str) and not callable(key):
            raise TypeError(
                f"@persisted_session: key must be the name of a parameter of {_name(handler)} "
                f"or a callable, got {type(key).__name__}"
            )
        if scope is not None:
            try:
                scope = MemoryScope(scope)  # reported here, not at every call
            except ValueError:
                raise ValueError(
                    f"@persisted_session: scope must be a MemoryScope "
                    f"({', '.join(repr(s.value) for s in MemoryScope)}), got {scope!r}"
                ) from None
        if on_conflict not in ("retry", "raise"):
            raise ValueError(f"on_conflict must be 'retry' or 'raise', got {on_conflict!r}")
        if encoder is not None and not callable(encoder):
            raise TypeError(f"@persisted_session: encoder must be a callable, got {type(encoder).__name__}")
        if type(retries) is not int or retries < 0:
            raise ValueError(f"@persisted_session: retries must be an int >= 0, got {retries!r}")
        self.handler = handler
        self.manager = manager
        self.key = key
        self.scope = scope
        self.param = param
        self.initial = initial
        self.record = record
        self.encoder = encoder
        self.attempts = (retries if on_conflict == "retry" else 0) + 1
        self.public_signature = signature.replace(
            parameters=[p for name, p in signature.parameters.items() if name != param]
        )
        public = list(self.public_signature.parameters.values())
        # A signature of plain parameters (no *args, **kwargs, positional-only) is bound by
        # _bind's short loop, on every call; anything else goes through Signature.bind.
        self._plain = [(p.name, p.default) for p in public] if all(p.kind in _PLAIN for p in public) else None
        self._positional = sum(1 for p in public if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def resolve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        if self.param in kwargs:
            raise TypeError(
                f"{_name(self.handler)}() got {self.param!r} from its caller; "
                "@persisted_session passes the session itself"
            )
        bound = self._bind(args, kwargs)
        raw = bound.arguments[self.key] if isinstance(self.key, str) else self.key(bound)
        key = scoped_key(self.scope, raw) if self.scope is not None else check_key(raw)
        return _Call(bound, key)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        """``public_signature.bind(*args, **kwargs)`` with defaults applied: the same arguments, in order."""
        plain = self._plain
        if plain is not None and len(args) <= self._positional:
            arguments: dict[str, Any] = {}
            used = 0
            for i, (name, default) in enumerate(plain):
                if i < len(args):
                    if name in kwargs:
                        break  # given twice: Signature.bind raises the usual TypeError
                    arguments[name] = args[i]
                elif name in kwargs:
                    arguments[name] = kwargs[name]
                    used += 1
                elif default is not inspect.Parameter.empty:
                    arguments[name] = default
                else:
                    break  # missing: Signature.bind raises the usual TypeError
            else:
                if used == len(kwargs):
                    return inspect.BoundArguments(self.public_signature, arguments)
        bound = self.public_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound

    async def session_for(self, key: str) -> Session:
        manager = self.manager
        session = await manager._get_locked(key)
        if session is None:
            session = Session(key, self.initial(), turns=Turns(key, 0, manager._store.turn_loader))
            session.last_active = manager._clock()
            manager._admit(session)
        return session

    def turn(self, call: _Call, output: Any, started_at: float, duration: float) -> dict[str, Any]:
        inputs = {k: v for k, v in call.bound.arguments.items() if k != self.param}
        return {"input": inputs, "output": output, "at": started_at, "duration": round(duration, 6)}

    async def finish(self, session: Session, call: _Call, output: Any, started_at: float, t0: float) -> None:
        if self.record:
            session.turns.append(self.turn(call, output, started_at, time.perf_counter() - t0))
        await self.manager._persist(session, "saved", expected=session.version, default=self.encoder)

    def rollback(self, session: Session, point: tuple[Any, ...]) -> None:
        """Undo what a failed call did to the live session (its state and turn log)."""
        if not session._rollback(point) and self.manager._live.get(session.key) is session:
            del self.manager._live[session.key]


class PersistedHandler(Protocol[P, R_co]):
    """A handler decorated by :func:`persisted_session`: call it without ``session``.

    ``P`` is what callers pass: the handler's parameters minus ``session`` when mypy runs
    with the ``cognitia.mypy`` plugin, any arguments otherwise.
    """

    manager: InMemorySessionManager
    """The manager that loads and saves this handler's sessions."""
    __name__: str
    __qualname__: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]: ...


class PersistedStream(Protocol[P, R_co]):
    """A streaming (async generator) handler decorated by :func:`persisted_session`."""

    manager: InMemorySessionManager
    __name__: str
    __qualname__: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[R_co, None]: ...


class PersistedDecorator(Protocol):
    """What ``persisted_session(...)`` returns: turns a handler into a persisted async one.

    The decorated function keeps the handler's return type. Its parameters are the
    handler's minus ``session``: ``inspect.signature`` shows exactly that, and so does mypy
    with the plugin (``plugins = ["cognitia.mypy"]``). Python's type system cannot express
    removing a keyword parameter, so other checkers accept any arguments.
    """

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, handler: Callable[..., AsyncIterator[T]]
    ) -> PersistedStream[..., T]: ...

    @overload
    def __call__(self, handler: Callable[..., Awaitable[R]]) -> PersistedHandler[..., R]: ...

    @overload
    def __call__(self, handler: Callable[..., R]) -> PersistedHandler[..., R]: ...


def persisted_session(
    store: SessionBackend | InMemorySessionManager,
    *,
    key: KeySpec = "session_id",
    scope: MemoryScope | None = None,
    param: str = "session",
    initial: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    record_turns: bool = True,
    encoder: Callable[[Any], Any] | None = None,
    on_conflict: Literal["retry", "raise"] = "retry",
    retries: int | None = None,
) -> PersistedDecorator:
    """Decorate an agent handler so each call loads its session and persists the turn.

    The handler declares a ``session`` parameter; callers never pass it. On each call the
    session named by the ``key`` argument is loaded (or created with ``initial``) and
    handed in; after the handler returns, the turn (inputs, output, start time, duration)
    is appended to the session's turn log and the state saved, as one atomic step.

    - Calls for the same key run one after another; different keys run in parallel.
    - If the handler raises (or is cancelled), nothing of that turn is stored and the live
      session is as last saved, state and turns; the exception propagates unchanged.
    - Once the handler has returned, the save completes even if the caller is cancelled.
    - If another worker saved the session in between (a version conflict), the session is
      reloaded and the handler runs again, up to ``retries`` times
      (``on_conflict="raise"`` raises :class:`~cognitia.errors.VersionConflictError` instead).

    Args:
        store: a backend (the decorator then makes a manager keeping at most 10,000
            sessions live), or an :class:`~cognitia.session.manager.InMemorySessionManager`
            (whose hooks and logs then see these calls too).
        key: the name of the handler argument holding the session key, or a callable
            taking the call's :class:`inspect.BoundArguments` and returning the key.
        scope: prefix keys with this :class:`MemoryScope` via ``scoped_key``.
        param: the name of the handler parameter that receives the session.
        initial: the state of a new session (a dict, copied, or a factory).
        record_turns: append a turn per call (``False``: only save the state).
        encoder: converts values JSON does not know in inputs and outputs (as
            ``json.dumps(default=...)``), e.g. ``lambda m: m.model_dump(mode="json")``.
        on_conflict: ``"retry"`` (default) or ``"raise"``.
        retries: conflict retries (default: the manager's ``retries``).

    The decorated handler is always async (a sync handler runs in the event loop thread,
    so it should not block). An async generator handler streams its chunks; the turn is
    stored when the stream ends, with the chunks as output (joined if they are strings).
    """
    manager = as_manager(store, max_sessions=10_000)
    if initial is None:
        make_initial: Callable[[], dict[str, Any]] = dict
    elif callable(initial):
        make_initial = initial
    elif isinstance(initial, dict):
        # Encoded once, here: a value JSON cannot hold is reported at decoration, not at
        # every call, and each new session gets its own copy.
        try:
            encoded = dumps("initial", initial)
        except StateNotSerializableError as exc:
            where = exc.path.replace("state", "initial", 1)
            raise TypeError(
                f"initial state for @persisted_session cannot be stored: {where} {exc.problem}"
            ) from None
        make_initial = lambda: loads(encoded)  # noqa: E731
    else:
        raise TypeError(f"initial must be a dict or a callable returning one, got {type(initial).__name__}")

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        persister = _Persister(
            handler,
            manager,
            key=key,
            scope=scope,
            param=param,
            initial=make_initial,
            record=record_turns,
            encoder=encoder,
            on_conflict=on_conflict,
            retries=manager.retries if retries is None else retries,
        )
        wrapper: Callable[..., Any]
        # An instance is called through its class's __call__: that says what it returns.
        called = handler if inspect.isroutine(handler) else type(handler).__call__
        if inspect.isasyncgenfunction(handler) or inspect.isasyncgenfunction(called):
            wrapper = _stream_wrapper(persister)
        elif not (inspect.isgeneratorfunction(handler) or inspect.isgeneratorfunction(called)):
            wrapper = _call_wrapper(persister, is_async=inspect.iscoroutinefunction(handler))
        else:
            raise TypeError(
                f"@persisted_session cannot wrap the sync generator {_name(handler)}; "
                "make it an async generator (async def ... yield) to stream replies"
            )
        functools.update_wrapper(wrapper, handler)
        # inspect.signature() would follow __wrapped__ back to the handler and show `session`.
        del wrapper.__dict__["__wrapped__"]
        vars(wrapper).update(__signature__=persister.public_signature, manager=manager)
        return wrapper

    return cast(PersistedDecorator, decorate)


def _call_wrapper(p: _Persister, *, is_async: bool) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = p.resolve(args, kwargs)
        manager = p.manager
        for attempt in range(p.attempts):
            if attempt:
                await conflict_pause(attempt)
            async with manager._operation(call.key):
                try:
                    session = await p.session_for(call.key)
                except VersionConflictError:
                    # An idle live copy's unsaved changes lost to a newer save (the copy is
                    # dropped): retried like a conflict of this turn's save.
                    if attempt + 1 < p.attempts:
                        continue
                    raise
                point = session._checkpoint()
                started_at, t0 = time.time(), time.perf_counter()
                saving = False
                try:
                    kwargs[p.param] = session
                    output = p.handler(*args, **kwargs)
                    # Not only `async def` functions return awaitables: so do objects with
                    # an `async def __call__` and plain wrappers around async functions.
                    if is_async or inspect.isawaitable(output):
                        output = await output
                    saving = True
                    await p.finish(session, call, output, started_at, t0)
                except BaseException as exc:
                    # Only this session's own save conflict is retried (the manager has
                    # dropped the live copy); a conflict the handler raised is its failure.
                    if saving and isinstance(exc, VersionConflictError):
                        if attempt + 1 < p.attempts:
                            continue
                        raise
                    p.rollback(session, point)
                    raise
                return output
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def _stream_wrapper(p: _Persister) -> Callable[..., AsyncGenerator[Any, None]]:
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        call = p.resolve(args, kwargs)
        operation = p.manager._operation(call.key)
        async with operation:
            session = await p.session_for(call.key)
            point = session._checkpoint()
            started_at, t0 = time.time(), time.perf_counter()
            chunks: list[Any] = []
            kwargs[p.param] = session
            stream = p.handler(*args, **kwargs)
            try:
                async for chunk in stream:
                    chunks.append(chunk)
                    # While the chunk is out, no task runs the handler: the key's holder is
                    # whichever task resumes it next (the caller's, another, or the runtime's
                    # finalizer of a stream left by `break`).
                    operation._park()
                    try:
                        yield chunk
                    finally:
                        operation._unpark()
                output: Any = (
                    "".join(chunks) if chunks and all(isinstance(c, str) for c in chunks) else chunks
                )
                # A conflict cannot be retried here: the chunks were already handed out.
                await p.finish(session, call, output, started_at, t0)
            except BaseException:
                p.rollback(session, point)
                raise
            finally:
                await stream.aclose()

    return wrapper
