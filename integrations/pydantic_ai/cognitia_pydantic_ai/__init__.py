"""Persist pydantic-ai conversations through cognitia.

Two ways in, both writing one turn per message in pydantic-ai's own JSON form:

- :class:`CognitiaConversationStore`, a pydantic-ai ``ConversationStore``, for
  ``agent.run(..., conversation=...)`` and ``await store.save(result)``;
- :func:`history` and :func:`remember`, for code that passes ``message_history=``.

>>> from cognitia_pydantic_ai import CognitiaConversationStore, history, remember
"""

from ._history import history, remember
from ._store import CognitiaConversationStore

__all__ = ["CognitiaConversationStore", "history", "remember"]
