"""The declarative base, with constraint names that are stable across databases."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, MetaData
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

# Stable constraint names across databases, as the standalone app's domain tables have them
# (standalone/models.py): the names a host's own tables get by default, too.
DOMAIN_NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Every name the service gives a schema object of its own starts with this prefix.
# PostgreSQL keeps index, constraint-index and sequence names per schema, SQLite index names
# per database: a host's own ``ix_inference_calls_level`` or ``inference_calls_pkey`` can
# never take one of the service's (revision i0003 moved the older names).
NAME_PREFIX = "hinf_"
NAMING_CONVENTION = {kind: NAME_PREFIX + name for kind, name in DOMAIN_NAMING_CONVENTION.items()}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and always read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where a UTC timestamp is required")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """Now, aware, in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Base of every table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
