"""the host's own call log, carried into the service's

Revision ID: i0005
Revises: i0004
Create Date: 2026-12-04 23:58:00

Where revision i0001 kept a host's own ``inference_calls`` aside (calllog/adopt.py), its
rows are carried into the service's log (ids kept, request_id ``adopted-<id>``) and the
upgrade's end rebuilds the rollup from every row. Downgrade moves the rows the service
recorded since into the host's table, where its columns take them, and drops the adopted
ones.
Without a host's table, nothing is done either way.
"""

from __future__ import annotations

from alembic import context, op

from headspace_inference.calllog import adopt

revision = "i0005"
down_revision = "i0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not context.is_offline_mode():
        adopt.copy_rows(op.get_bind())


def downgrade() -> None:
    if not context.is_offline_mode():
        adopt.carry_back(op.get_bind())
