"""the spend guard's counts

Revision ID: i0006
Revises: i0005
Create Date: 2026-12-05 23:40:00

``inference_budget_use``: one row per budget rule's window (``key``) and part of it
(``part``, a project's under a rule applying to each project apart, else ""), with what it
has used (nanodollars and tokens), its window's end (epoch seconds) and whether its warning
and its cap alert have been given. Where there is no Redis, every process sharing the
database counts here (inference/budget_database.py). A new table: nothing of a host's is touched,
and the downgrade drops it with its counts (they last a window).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i0006"
down_revision = "i0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inference_budget_use",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("part", sa.String(length=20), nullable=False),
        sa.Column("used_usd", sa.BigInteger(), nullable=False),
        sa.Column("used_tokens", sa.BigInteger(), nullable=False),
        sa.Column("ends_at", sa.Double(), nullable=False),
        sa.Column("warned", sa.Boolean(), nullable=False),
        sa.Column("capped", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("key", "part", name=op.f("hinf_pk_inference_budget_use")),
    )
    op.create_index(
        op.f("hinf_ix_inference_budget_use_ends_at"), "inference_budget_use", ["ends_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("hinf_ix_inference_budget_use_ends_at"), table_name="inference_budget_use")
    op.drop_table("inference_budget_use")
