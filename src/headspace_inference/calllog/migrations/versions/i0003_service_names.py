"""the service's names for its indexes, constraints and sequences

Revision ID: i0003
Revises: i0002
Create Date: 2026-12-04 23:55:00

Every index, constraint and sequence of the service's tables takes the prefix ``hinf_``
(models/base.py NAME_PREFIX). The names it had (``ix_inference_calls_level``,
``pk_inference_calls``, ``inference_calls_id_seq``...) are the ones a host's own
``inference_calls`` gets by default, and PostgreSQL keeps index and sequence names per
schema (SQLite index names per database): one could not be made beside the other.
On SQLite, whose constraint names live in the table's definition, the table is rebuilt once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from headspace_inference.calllog import names
from headspace_inference.calllog.models.base import NAME_PREFIX

revision = "i0003"
down_revision = "i0002"
branch_labels = None
depends_on = None

TABLES = ("inference_usage_rollup", "inference_calls")


def _prefixed(name: str) -> str | None:
    return None if name.startswith(NAME_PREFIX) else NAME_PREFIX + name


def _unprefixed(name: str) -> str | None:
    return name[len(NAME_PREFIX) :] if name.startswith(NAME_PREFIX) else None


def _rename(rename: names.Renamer) -> None:
    bind = op.get_bind()
    for table in TABLES:
        if bind.dialect.name != "sqlite":
            names.apply(bind, table, names.planned(bind, table, rename))
            continue
        copy = sa.Table(table, sa.MetaData(), autoload_with=bind)
        items: list[sa.Constraint | sa.Index] = [*copy.constraints, *copy.indexes]
        for item in items:
            new = rename(item.name) if isinstance(item.name, str) else None
            if new is not None:
                item.name = new
        with op.batch_alter_table(table, copy_from=copy, recreate="always"):
            pass


def upgrade() -> None:
    _rename(_prefixed)


def downgrade() -> None:
    _rename(_unprefixed)
