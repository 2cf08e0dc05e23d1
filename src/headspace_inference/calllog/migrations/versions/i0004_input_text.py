"""the prompt, where the host keeps it

Revision ID: i0004
Revises: i0003
Create Date: 2026-12-04 23:56:00

inference_calls gains a nullable ``input_text``: written only when the host sets
``inference.store_input_text`` (bounded, redacted like the answer), and carried over from a
host's own call log when the service adopts it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i0004"
down_revision = "i0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inference_calls") as batch:
        batch.add_column(sa.Column("input_text", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inference_calls") as batch:
        batch.drop_column("input_text")
