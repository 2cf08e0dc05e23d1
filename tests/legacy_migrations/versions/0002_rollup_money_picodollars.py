"""usage rollup money as integer picodollars on SQLite

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 21:00:00

SQLite has no decimal type: its NUMERIC columns hold floats, so a rollup sum kept in
dollars drifts from the exact sum once it passes about a thousand dollars. From this
revision the rollup's money columns hold integer picodollars on SQLite (see
``RollupMoney``); the DDL is unchanged, only the stored values are converted. PostgreSQL
keeps NUMERIC dollars and is not touched.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # Converted in place rather than rebuilt from inference_calls, so that a rollup whose
    # raw rows were archived keeps its history; sums under ~$1000 a bucket convert exactly.
    op.execute(
        "UPDATE inference_usage_rollup SET"
        " cost_usd = CAST(ROUND(cost_usd * 1e12) AS INTEGER),"
        " saved_cost_usd = CAST(ROUND(saved_cost_usd * 1e12) AS INTEGER),"
        " upstream_cost_usd = CAST(ROUND(upstream_cost_usd * 1e12) AS INTEGER)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute(
        "UPDATE inference_usage_rollup SET cost_usd = cost_usd / 1e12,"
        " saved_cost_usd = saved_cost_usd / 1e12, upstream_cost_usd = upstream_cost_usd / 1e12"
    )
