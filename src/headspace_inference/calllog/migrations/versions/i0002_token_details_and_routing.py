"""token details, the model asked for, prompt-cache discount

Revision ID: i0002
Revises: i0001
Create Date: 2026-12-02 10:00:00

inference_calls gains ``requested_model`` (the primary asked for; ``model`` is the one that
answered), the token kinds of OpenRouter's usage details (``cached_input_tokens``,
``cache_write_tokens``, ``reasoning_tokens``) and ``cache_discount_usd``. The rollup gains
their sums and the like-for-like cost sums behind /usage's ``cost_disagreements``. Existing
rows get 0 for every count (NULL for the nullable columns), which is what they were.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i0002"
down_revision = "i0001"
branch_labels = None
depends_on = None

_CALL_COUNTS = ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens")
_ROLLUP_MONEY = ("cache_discount_usd", "compared_cost_usd", "compared_upstream_cost_usd")


def _money() -> sa.Numeric:  # type: ignore[type-arg]
    return sa.Numeric(precision=20, scale=12)


def upgrade() -> None:
    # batch_alter_table: SQLite cannot add a NOT NULL column in place (it copies the table).
    with op.batch_alter_table("inference_calls") as batch:
        batch.add_column(sa.Column("requested_model", sa.String(length=200), nullable=True))
        for name in _CALL_COUNTS:
            batch.add_column(
                sa.Column(name, sa.Integer(), nullable=False, server_default=sa.text("0"))
            )
        batch.add_column(sa.Column("cache_discount_usd", _money(), nullable=True))
    with op.batch_alter_table("inference_usage_rollup") as batch:
        for name in _CALL_COUNTS:
            batch.add_column(
                sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0"))
            )
        for name in _ROLLUP_MONEY:
            batch.add_column(sa.Column(name, _money(), nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("inference_usage_rollup") as batch:
        for name in (*_ROLLUP_MONEY, *reversed(_CALL_COUNTS)):
            batch.drop_column(name)
    with op.batch_alter_table("inference_calls") as batch:
        batch.drop_column("cache_discount_usd")
        for name in reversed(_CALL_COUNTS):
            batch.drop_column(name)
        batch.drop_column("requested_model")
