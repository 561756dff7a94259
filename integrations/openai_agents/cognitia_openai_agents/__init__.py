"""cognitia sessions for the OpenAI Agents SDK.

>>> from cognitia_openai_agents import CognitiaSession
>>> from cognitia.session.backends import SqliteSessionBackend
>>> session = CognitiaSession("user-42", SqliteSessionBackend(db_path="sessions.db"))
>>> # result = await Runner.run(agent, "Hello", session=session)
"""

from ._session import CognitiaSession

__all__ = ["CognitiaSession"]
