"""Sessions: backends that store them, and the manager that keeps them live."""

from ._events import EVENTS, SessionEvent, Subscription
from ._session import Session, Turns

__all__ = ["EVENTS", "Session", "SessionEvent", "Subscription", "Turns"]
