"""The service's own tables: the call log and its usage rollup. The tables a call links to
(projects, agents, commands, turns) belong to the host, or to the standalone app."""

from ...row_bounds import MAX_INTEGER
from .base import Base
from .inference_call import (
    HOST_ARCHIVE_CONSTRAINTS,
    HOST_ARCHIVE_TABLE,
    LINK_TABLES,
    SERVICE_TABLES,
    InferenceCall,
    UsageRollup,
)

__all__ = [
    "HOST_ARCHIVE_CONSTRAINTS",
    "HOST_ARCHIVE_TABLE",
    "LINK_TABLES",
    "MAX_INTEGER",
    "SERVICE_TABLES",
    "Base",
    "InferenceCall",
    "UsageRollup",
]
