"""cognitia sessions for the OpenAI Agents SDK.

One backend (or manager) serves every session of the process; close it when done:

>>> from cognitia_openai_agents import CognitiaSession
>>> from cognitia.session.backends import SqliteSessionBackend
>>> backend = SqliteSessionBackend(db_path="sessions.db")
>>> session = CognitiaSession("user-42", backend)
>>> # result = await Runner.run(agent, "Hello", session=session)
>>> # ... and at shutdown: await backend.aclose()
"""

from ._session import CognitiaSession

__all__ = ["CognitiaSession"]
