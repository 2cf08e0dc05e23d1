"""The service's own tables: the call log, its usage rollup and the spend guard's counts.
The tables a call links to (projects, agents, commands, turns) belong to the host, or to the
standalone app."""

from ...row_bounds import MAX_INTEGER
from .base import Base
from .budget_use import BudgetUse
from .inference_call import (
    HOST_ARCHIVE_CONSTRAINTS,
    HOST_ARCHIVE_TABLE,
    LINK_TABLES,
    InferenceCall,
    UsageRollup,
)

# Every table the service's migrations create or keep, and nothing else: a host excludes
# these from its own autogenerate (see headspace_inference.include_name), which so never
# proposes to drop them. Read once every model above is in the metadata.
SERVICE_TABLES: frozenset[str] = frozenset(Base.metadata.tables) | {
    HOST_ARCHIVE_TABLE,
    HOST_ARCHIVE_CONSTRAINTS,
}

__all__ = [
    "HOST_ARCHIVE_CONSTRAINTS",
    "HOST_ARCHIVE_TABLE",
    "LINK_TABLES",
    "MAX_INTEGER",
    "SERVICE_TABLES",
    "Base",
    "BudgetUse",
    "InferenceCall",
    "UsageRollup",
]
