"""cognitia sessions for the Anthropic SDK: tool-runner conversations that survive a restart.

One backend (or manager) serves every conversation of the process; close it when done:

>>> from cognitia_anthropic import PersistedConversation
>>> from cognitia.session.backends import SqliteSessionBackend
>>> backend = SqliteSessionBackend(db_path="sessions.db")
>>> conversation = PersistedConversation(backend, "user-42")
>>> # ... and at shutdown: await backend.aclose()
"""

from ._conversation import ConversationChangedError, PersistedConversation

__all__ = ["ConversationChangedError", "PersistedConversation"]
