"""cognitia sessions for the Anthropic SDK: tool-runner conversations that survive a restart.

>>> from cognitia_anthropic import PersistedConversation
>>> from cognitia.session.backends import SqliteSessionBackend
>>> conversation = PersistedConversation(SqliteSessionBackend(db_path="sessions.db"), "user-42")
"""

from ._conversation import ConversationChangedError, PersistedConversation

__all__ = ["ConversationChangedError", "PersistedConversation"]
