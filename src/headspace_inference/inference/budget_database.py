"""The spend guard's counts in the database the call log lives in: the store every process
sharing that database shares when there is no Redis (inference/budget_store.py has the
contract; tests/budget_contract.py holds this store to it).

One row per bucket (``inference_budget_use``, models/budget_use.py), and every operation is
one transaction that takes the rows it changes first, in one order (by key, then part), so
that callers queue on a bucket instead of overtaking each other, and two callers never wait
for each other in a circle:

- PostgreSQL: the rows of live windows are made if missing (``INSERT ... ON CONFLICT DO
  NOTHING``, in that order), then locked in that order (a reservation's ``SELECT ... FOR
  UPDATE``, a correction's UPDATEs). A lock waited for past ``LOCK_WAIT_MS`` fails the
  operation, and a session sitting in one of these transactions that long is ended by the
  server (a caller cut off mid-way, e.g. by a partition, gives its rows back), each an error
  of DATABASE_AWAY, as the database being gone is.
- SQLite: the database has one writer at a time. The transaction's first statement is a
  write (that INSERT; or the UPDATE, for a correction to ended windows alone), so it waits
  for the writer's lock at its start (the busy timeout) and holds it to the end; one that
  read first and then wrote could find another writer in between and fail instead of
  waiting.

The rows' values are then read, decided on exactly as MemoryBudgetStore decides, and written
back before the commit. The storm breaker is not kept here: it counts each call in this
process only (a MemoryBudgetStore of the store's own), before the database is asked.

Errors of DATABASE_AWAY reach the caller (the guard falls back to a per-process store). No
connection is held between operations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Executable,
    Table,
    bindparam,
    case,
    delete,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from ..calllog.database import DATABASE_AWAY, Database
from ..calllog.models import BudgetUse
from .budget_store import (
    AlertKind,
    Bucket,
    Count,
    MemoryBudgetStore,
    Reserved,
    Storm,
    Use,
    crossings,
    decide,
)

_TABLE = cast(Table, BudgetUse.__table__)
_C = _TABLE.c

# A row is deleted this long after its window ended (a correction arriving later adds to
# nothing, as in MemoryBudgetStore once a window is forgotten), by a reservation at most
# once a minute in each process: one probe of the index on ends_at, which finds nothing
# most times.
KEPT_AFTER_WINDOW = 86_400  # seconds
SWEEP_EVERY = 60  # seconds
# PostgreSQL: the longest a caller waits for a bucket's row, and the longest a session may
# sit in one of these transactions between statements (each takes milliseconds).
LOCK_WAIT_MS = 5_000


@dataclass
class _Row:
    """One bucket's row as read under its lock; ``dirty`` once it must be written back."""

    key: str
    part: str
    usd: int
    tokens: int
    warned: bool
    capped: bool
    dirty: bool = False

    def given(self, kind: AlertKind) -> bool:
        return self.warned if kind == "warning" else self.capped

    def give(self, kind: AlertKind) -> None:
        if kind == "warning":
            self.warned = True
        else:
            self.capped = True
        self.dirty = True


class DatabaseBudgetStore:
    """The spend guard's counts in ``database``'s ``inference_budget_use``; the storm
    breaker per process."""

    name = "database"
    shares_breaker = False  # each process keeps its own

    def __init__(self, database: Database, *, lock_wait_ms: int = LOCK_WAIT_MS) -> None:
        self._database = database
        self._bounds = _bounds(lock_wait_ms)
        self._breaker = MemoryBudgetStore()
        self._swept_at = -math.inf

    def reserve(
        self,
        buckets: Sequence[Bucket],
        usd: int,
        tokens: int,
        storm: Storm | None,
        now: float,
    ) -> Reserved:
        if storm is not None:
            # The breaker alone (no bucket): a refusal counts nothing in the database.
            refusal = self._breaker.reserve((), 0, 0, storm, now)
            if not refusal.granted:
                return refusal
        if not buckets:
            return Reserved(True)
        with self._transaction() as conn:
            wanted = _wanted(buckets)
            conn.execute(_insert(conn.dialect.name), [_new_row(*w) for w in wanted])
            rows = _locked(conn, [(k, p) for k, p, _ in wanted])
            parts = [rows[(b.key, b.part)] for b in buckets]
            result = decide(buckets, parts, usd, tokens)
            if result.granted:
                for part in parts:
                    part.dirty = True
            _write(conn, rows.values())
            if now - self._swept_at >= SWEEP_EVERY:
                self._swept_at = now
                conn.execute(_CLEAN, {"before": now - KEPT_AFTER_WINDOW})
        return result

    def adjust(
        self, buckets: Sequence[Bucket], usd: int, tokens: int, now: float
    ) -> tuple[tuple[int, AlertKind], ...]:
        if not buckets:
            return ()
        with self._transaction() as conn:
            # A bucket of a live window is counted from nothing when it has no row yet (what
            # a process counted while the store was away); one whose window ended, left alone.
            live = [w for w in _wanted(buckets) if w[2] > now]
            if live:
                conn.execute(_insert(conn.dialect.name), [_new_row(*w) for w in live])
            conn.execute(
                _ADD,
                [
                    {"k": b.key, "p": b.part, "usd": usd, "tokens": tokens}
                    for b in sorted(buckets, key=lambda b: (b.key, b.part))
                ],
            )
            rows = _locked(conn, sorted({(b.key, b.part) for b in buckets}))
            counted: list[tuple[int, tuple[Bucket, Count]]] = [
                (i, (b, rows[(b.key, b.part)]))
                for i, b in enumerate(buckets)
                if (b.key, b.part) in rows
            ]
            alerts = crossings(counted)
            _write(conn, rows.values())
        return alerts

    def read(self, key: str) -> dict[str, Use]:
        # Bounded like every read a request makes (/status, service.budget()).
        def work(session: Session) -> dict[str, Use]:
            found = session.execute(_READ, {"key": key})
            return {r.part: Use(r.used_usd, r.used_tokens) for r in found}

        return self._database.read(work)

    def close(self) -> None:
        pass  # the connections are the database's pool's

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self._database.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(self._bounds)
                yield conn
        except DBAPIError as exc:
            if exc.connection_invalidated and not isinstance(exc, DATABASE_AWAY):
                # The server ended the session (one idle in its transaction past the bound,
                # say): psycopg 3 says so with an InternalError, psycopg2 with an
                # OperationalError. Either way the connection is gone: the database is away.
                orig = exc.orig if exc.orig is not None else exc
                raise OperationalError(
                    exc.statement, exc.params, orig, connection_invalidated=True
                ) from exc
            raise


# --------------------------------------------------------------------------- SQL


def _wanted(buckets: Sequence[Bucket]) -> list[tuple[str, str, float]]:
    """Each bucket's row once, in the one order every caller takes rows in."""
    ends = {(b.key, b.part): b.ends_at for b in buckets}
    return sorted((key, part, ends_at) for (key, part), ends_at in ends.items())


def _new_row(key: str, part: str, ends_at: float) -> dict[str, Any]:
    return {"key": key, "part": part, "used_usd": 0, "used_tokens": 0, "ends_at": ends_at,
            "warned": False, "capped": False}  # fmt: skip


@functools.cache
def _insert(dialect: str) -> Any:
    # Built once per dialect, and given its rows as parameters: a statement built with its
    # rows is compiled again on every call, which cost more than running it.
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(_TABLE).on_conflict_do_nothing(index_elements=["key", "part"])


def _locked(conn: Connection, where: Sequence[tuple[str, str]]) -> dict[tuple[str, str], _Row]:
    """The rows at ``where`` (sorted), locked on PostgreSQL in that order."""
    found = conn.execute(_LOCK, {"where": list(where)})
    return {
        (r.key, r.part): _Row(r.key, r.part, r.used_usd, r.used_tokens, r.warned, r.capped)
        for r in found
    }


def _write(conn: Connection, rows: Iterable[_Row]) -> None:
    changed = [
        {"k": r.key, "p": r.part, "usd": r.usd, "tokens": r.tokens, "w": r.warned, "c": r.capped}
        for r in rows
        if r.dirty
    ]
    if changed:
        conn.execute(_SET, changed)


_HERE = (_C.key == bindparam("k")) & (_C.part == bindparam("p"))


def _floored(total: Any) -> Any:
    # No use below zero (a correction gives back at most what was counted).
    return case((total < 0, 0), else_=total)


# A correction: the amounts added to the row, whatever the caps.
_ADD = (
    update(_TABLE)
    .where(_HERE)
    .values(
        used_usd=_floored(_C.used_usd + bindparam("usd")),
        used_tokens=_floored(_C.used_tokens + bindparam("tokens")),
    )
)
# A row's values as decided under its lock.
_SET = (
    update(_TABLE)
    .where(_HERE)
    .values(
        used_usd=bindparam("usd"),
        used_tokens=bindparam("tokens"),
        warned=bindparam("w"),
        capped=bindparam("c"),
    )
)
_LOCK = (
    select(_C.key, _C.part, _C.used_usd, _C.used_tokens, _C.warned, _C.capped)
    .where(tuple_(_C.key, _C.part).in_(bindparam("where", expanding=True)))
    .order_by(_C.key, _C.part)
    .with_for_update()
)
_READ = select(_C.part, _C.used_usd, _C.used_tokens).where(_C.key == bindparam("key"))
# Rows ended long ago; one another caller holds (an old window's late correction) is left
# for the next time, so that the clean-up never waits.
_CLEAN = delete(_TABLE).where(
    tuple_(_C.key, _C.part).in_(
        select(_C.key, _C.part)
        .where(_C.ends_at < bindparam("before"))
        .with_for_update(skip_locked=True)
    )
)


def _bounds(ms: int) -> Executable:
    # For this transaction only (set_config's ``true``: SET LOCAL), on a host's engine too.
    return select(
        func.set_config("lock_timeout", str(ms), True),
        func.set_config("idle_in_transaction_session_timeout", str(ms), True),
    )
