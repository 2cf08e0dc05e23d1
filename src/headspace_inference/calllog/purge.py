"""Deleting calls from the log, with the rollup kept equal to the rows.

The rollup sums the rows in the same transaction as they are written (rollup.py); a row
deleted behind its back (a host's ``DELETE FROM inference_calls``) leaves it counting calls
that are gone. ``purge`` deletes rows and takes them out of the rollup in one transaction;
``flask inference usage --check`` finds a rollup that disagrees, ``--rebuild`` repairs it.

A row carried over from a host's own table (calllog/adopt.py) is deleted from the host's
archived table too, so that a downgrade does not bring it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, column, delete, func, inspect, select, table, true
from sqlalchemy.orm import Session

from .adopt import ADOPTED_PREFIX
from .models import HOST_ARCHIVE_TABLE, InferenceCall, UsageRollup
from .rollup import _SUMMED, apply_rollup

BATCH = 5000


def purge_criteria(
    project_id: int | None = None, before: datetime | None = None, all: bool = False
) -> ColumnElement[bool]:
    """The rows a purge deletes; ValueError naming what is wrong with the criteria. No
    criteria at all is refused (``all=True`` says so), and ``all`` takes no other."""
    if all:
        if project_id is not None or before is not None:
            raise ValueError("purge: all=True deletes every call; give it no other criterion")
        return true()
    if project_id is None and before is None:
        raise ValueError(
            "purge: give project_id, before (or both), or all=True to delete every call"
        )
    clauses = []
    if project_id is not None:
        if isinstance(project_id, bool) or not isinstance(project_id, int) or project_id < 1:
            raise ValueError(f"purge: project_id must be a positive integer, got {project_id!r}")
        clauses.append(InferenceCall.project_id == project_id)
    if before is not None:
        if not isinstance(before, datetime) or before.tzinfo is None:
            raise ValueError(f"purge: before must be an aware datetime, got {before!r:.60}")
        clauses.append(InferenceCall.timestamp < before)
    return and_(*clauses)


def purge(
    session: Session,
    *,
    project_id: int | None = None,
    before: datetime | None = None,
    all: bool = False,
) -> int:
    """Delete the calls of ``project_id`` and/or older than ``before`` (or ``all``) and take
    them out of the rollup, in the session's transaction (the caller commits); how many."""
    where = purge_criteria(project_id, before, all)
    has_archive = inspect(session.connection()).has_table(HOST_ARCHIVE_TABLE)
    archive = table(HOST_ARCHIVE_TABLE, column("id"))
    if all:
        deleted = session.scalar(select(func.count()).select_from(InferenceCall))
        session.execute(delete(InferenceCall))
        session.execute(delete(UsageRollup))
        if has_archive:
            session.execute(delete(archive))
        return int(deleted or 0)
    deleted = 0
    returned = (*_SUMMED, InferenceCall.request_id)
    while True:
        batch = select(InferenceCall.id).where(where).limit(BATCH).scalar_subquery()
        rows: Sequence[Any] = session.execute(
            delete(InferenceCall).where(InferenceCall.id.in_(batch)).returning(*returned)
        ).all()
        if not rows:
            break
        deleted += len(rows)
        apply_rollup(session, rows, removed=True)
        adopted = [
            int(row.request_id[len(ADOPTED_PREFIX) :])
            for row in rows
            if row.request_id.startswith(ADOPTED_PREFIX)
        ]
        if has_archive and adopted:
            session.execute(delete(archive).where(archive.c.id.in_(adopted)))
    # Buckets that counted only deleted calls are gone with them.
    session.execute(delete(UsageRollup).where(UsageRollup.calls == 0))
    return deleted
