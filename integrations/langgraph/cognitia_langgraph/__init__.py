"""cognitia-langgraph: a LangGraph checkpointer that stores graph threads as cognitia sessions.

>>> from cognitia.session.backends import SqliteSessionBackend
>>> from cognitia_langgraph import CognitiaSaver
>>> saver = CognitiaSaver(SqliteSessionBackend(db_path="graph.db"))
>>> # graph = builder.compile(checkpointer=saver)
"""

from importlib import metadata as _metadata

from ._codec import PickleRefusedError
from ._saver import DEFAULT_KEY_PREFIX, CognitiaSaver

try:
    __version__ = _metadata.version("cognitia-langgraph")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["DEFAULT_KEY_PREFIX", "CognitiaSaver", "PickleRefusedError", "__version__"]
