"""Database tables: the domain the call log points at, and the call log itself."""

from .base import MAX_INTEGER, Base
from .domain import LINK_TABLES, Agent, Command, Objective, Project, Turn
from .inference_call import InferenceCall, UsageRollup

__all__ = [
    "LINK_TABLES",
    "MAX_INTEGER",
    "Agent",
    "Base",
    "Command",
    "InferenceCall",
    "Objective",
    "Project",
    "Turn",
    "UsageRollup",
]
