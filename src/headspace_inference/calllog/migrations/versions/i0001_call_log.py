"""the call log and its usage rollup, in the service's own history

Revision ID: i0001
Revises: (none)
Create Date: 2026-12-04 13:00:00

The service's tables only: the tables a call links to are the host's (or the standalone
app's), so the link columns carry no constraint here; the upgrade adds each one wherever
its table exists (calllog/link_keys.py). Kept in the version table
alembic_version_inference. The same tables as revision 0002 of the combined history this
service had before (standalone databases made by it are adopted without change, see
standalone/database.py); on SQLite the rollup's money columns hold integer picodollars.

A host's own ``inference_calls`` (one without the service's columns) is moved out of the way
first, without its foreign keys and checks (kept aside by name and definition), and given
back after the downgrade with them: calllog/adopt.py.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from headspace_inference.calllog import adopt

revision = "i0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not context.is_offline_mode():
        adopt.archive(op.get_bind())
    op.create_table(
        "inference_usage_rollup",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("span", sa.String(length=8), nullable=False),
        sa.Column("bucket_start", sa.DateTime(), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("project_key", sa.Integer(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("cached_calls", sa.BigInteger(), nullable=False),
        sa.Column("error_calls", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=20, scale=12), nullable=False),
        sa.Column("saved_cost_usd", sa.Numeric(precision=20, scale=12), nullable=False),
        sa.Column("upstream_cost_usd", sa.Numeric(precision=20, scale=12), nullable=False),
        sa.Column("latency_ms_sum", sa.BigInteger(), nullable=False),
        sa.Column("lat_00", sa.BigInteger(), nullable=False),
        sa.Column("lat_01", sa.BigInteger(), nullable=False),
        sa.Column("lat_02", sa.BigInteger(), nullable=False),
        sa.Column("lat_03", sa.BigInteger(), nullable=False),
        sa.Column("lat_04", sa.BigInteger(), nullable=False),
        sa.Column("lat_05", sa.BigInteger(), nullable=False),
        sa.Column("lat_06", sa.BigInteger(), nullable=False),
        sa.Column("lat_07", sa.BigInteger(), nullable=False),
        sa.Column("lat_08", sa.BigInteger(), nullable=False),
        sa.Column("lat_09", sa.BigInteger(), nullable=False),
        sa.Column("lat_10", sa.BigInteger(), nullable=False),
        sa.Column("lat_11", sa.BigInteger(), nullable=False),
        sa.Column("lat_12", sa.BigInteger(), nullable=False),
        sa.Column("lat_13", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inference_usage_rollup")),
        # Also the index of every usage query: span, then a range of bucket_start.
        sa.UniqueConstraint(
            "span",
            "bucket_start",
            "level",
            "model",
            "project_key",
            name="uq_inference_usage_rollup_bucket",
        ),
    )

    op.create_table(
        "inference_calls",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("timestamp", sa.DateTime(), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("purpose", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("input_hash", sa.String(length=64), nullable=False),
        sa.Column("result_text", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=20, scale=12), nullable=True),
        sa.Column("upstream_cost_usd", sa.Numeric(precision=20, scale=12), nullable=True),
        sa.Column("saved_cost_usd", sa.Numeric(precision=20, scale=12), nullable=True),
        sa.Column("error_type", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("generation_id", sa.String(length=100), nullable=True),
        sa.Column("provider", sa.String(length=100), nullable=True),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("agent_id", sa.Integer(), nullable=True),
        sa.Column("command_id", sa.Integer(), nullable=True),
        sa.Column("turn_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inference_calls")),
        sa.UniqueConstraint("request_id", name=op.f("uq_inference_calls_request_id")),
    )
    with op.batch_alter_table("inference_calls", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_inference_calls_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_inference_calls_command_id"), ["command_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_inference_calls_input_hash"), ["input_hash"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_inference_calls_level"), ["level"], unique=False)
        batch_op.create_index(
            "ix_inference_calls_level_timestamp", ["level", "timestamp"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_inference_calls_project_id"), ["project_id"], unique=False
        )
        batch_op.create_index(
            "ix_inference_calls_project_id_timestamp", ["project_id", "timestamp"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_inference_calls_timestamp"), ["timestamp"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_inference_calls_turn_id"), ["turn_id"], unique=False)


def downgrade() -> None:
    op.drop_table("inference_calls")
    op.drop_table("inference_usage_rollup")
    if not context.is_offline_mode():
        adopt.restore(op.get_bind())
