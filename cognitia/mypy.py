"""A mypy plugin that types ``@persisted_session`` handlers exactly.

Python's type system cannot say "the handler's parameters minus ``session``", so without
help a checker accepts any arguments to a decorated handler. With this plugin mypy sees
what callers must pass::

    # pyproject.toml
    [tool.mypy]
    plugins = ["cognitia.mypy"]

    @persisted_session(backend, key="session_id")
    async def chat(message: str, *, session_id: str, session: Session) -> str: ...

    await chat("hi", session_id="user:42")   # ok
    await chat("hi")                          # error: missing "session_id"
    await chat("hi", session_id="u", session=s)  # error: unexpected "session"

The parameters dropped are those annotated with :class:`~cognitia.Session`.
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.plugin import MethodContext, Plugin
from mypy.types import CallableType, Instance, Parameters, Type, get_proper_type

__all__ = ["CognitiaPlugin", "plugin"]

_DECORATE = "cognitia.decorator.PersistedDecorator.__call__"
_SESSION = "cognitia.session._session.Session"


class CognitiaPlugin(Plugin):
    """Narrows ``PersistedHandler[..., R]`` to ``PersistedHandler[<handler params - session>, R]``."""

    def get_method_hook(self, fullname: str) -> Callable[[MethodContext], Type] | None:
        return _without_session if fullname == _DECORATE else None


def _without_session(ctx: MethodContext) -> Type:
    decorated = get_proper_type(ctx.default_return_type)
    if not (isinstance(decorated, Instance) and ctx.arg_types and ctx.arg_types[0]):
        return ctx.default_return_type
    handler = get_proper_type(ctx.arg_types[0][0])
    if not isinstance(handler, CallableType):
        return ctx.default_return_type
    kept = [
        i
        for i, arg in enumerate(handler.arg_types)
        if not (isinstance(p := get_proper_type(arg), Instance) and p.type.fullname == _SESSION)
    ]
    if len(kept) == len(handler.arg_types):
        return ctx.default_return_type
    parameters = Parameters(
        [handler.arg_types[i] for i in kept],
        [handler.arg_kinds[i] for i in kept],
        [handler.arg_names[i] for i in kept],
    )
    return decorated.copy_modified(args=[parameters, *decorated.args[1:]])


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point."""
    return CognitiaPlugin
