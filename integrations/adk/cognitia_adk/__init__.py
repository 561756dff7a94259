"""Persist Google ADK sessions through cognitia.

:class:`CognitiaSessionService` is an ADK ``BaseSessionService``: hand it to a
``Runner`` and every event is one turn of a cognitia turn log, with ``app:``, ``user:``
and ``temp:`` state handled as ADK's own services handle it.

>>> from cognitia_adk import CognitiaSessionService
"""

from ._service import CognitiaSessionService

__all__ = ["CognitiaSessionService"]
