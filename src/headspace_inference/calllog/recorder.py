"""The call log: every call's InferenceCall row written without putting a database commit on
the caller's path, and without losing a row when the database or the process fails.

Two parts, composed by ``CallRecorder``:

- ``Journal`` (``journal.py``), the durable half: each record is appended to a segment file
  in the spool directory before anything else happens to it, and numbered. Segments of dead
  processes are claimed and read back at start; segments whose records are all in the
  database are deleted.
- ``CallWriter`` (here), the database half: a thread that commits queued records in batches,
  each batch's rows and their usage rollup in one transaction; a batch the database refuses
  is retried one row at a time (dropping links that no longer exist, moving rows that still
  cannot be written to ``rejected.jsonl``); while the database is down it backs off and
  retries, and the journal is the spool. It tells the journal, through a callback, the
  number up to which every record is written.

On PostgreSQL the rows go in by COPY (psycopg 3's ``copy``, psycopg2's ``copy_expert``),
elsewhere by one executemany INSERT. What is an outage and what is a refusal is decided in
one place (``_retry_later``): the database's own errors (and I/O errors) are waited out; a
row the database refuses, or any other error (a value the driver cannot bind, a bug), is not
retried as if the database were away: the batch is tried one row at a time and a row that
still fails is kept in ``rejected.jsonl``, with an ERROR log naming the error.

Replayed records skip request ids already in the table, so no row is ever written twice.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..clock import SYSTEM_CLOCK, Clock
from .journal import SEGMENT_BYTES, Journal
from .models import LINK_TABLES, InferenceCall
from .models.links import link_exists
from .record import FIELD_NAMES, CallRecord

log = logging.getLogger(__name__)

RollupFn = Callable[[Session, Sequence[Any]], None]

_BACKOFF_START = 0.2
_BACKOFF_MAX = 5.0


_COPY_SQL = f"COPY inference_calls ({', '.join(FIELD_NAMES)}) FROM STDIN"
_INSERT = insert(cast(Table, InferenceCall.__table__))


@dataclass
class _Pending:
    seq: int
    record: CallRecord
    replayed: bool = False


def _retry_later(exc: BaseException) -> bool:
    """Whether writing may succeed if tried again later: the database's errors (it is away,
    a table is missing during a migration) and I/O errors, but not a row it refuses
    (IntegrityError, DataError) nor an error that is not the database's (a value the driver
    cannot bind: OverflowError, ValueError; a bug: AttributeError...). Those fail the same
    way on every try: retried, they would hold every row behind them in the spool forever."""
    if isinstance(exc, IntegrityError | DataError):
        return False
    return isinstance(exc, SQLAlchemyError | OSError)


def _copy_psycopg(driver: Any, records: Sequence[CallRecord]) -> None:
    with driver.cursor() as cursor, cursor.copy(_COPY_SQL) as copy:
        for record in records:
            copy.write_row(record.copy_row())


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _copy_field(value: object) -> str:
    """One value in COPY's text format."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value).translate(_COPY_ESCAPES)


def _copy_psycopg2(driver: Any, records: Sequence[CallRecord]) -> None:
    # Text made here and encoded by the driver in the connection's encoding.
    lines = ("\t".join(map(_copy_field, record.copy_row())) + "\n" for record in records)
    with driver.cursor() as cursor:
        cursor.copy_expert(_COPY_SQL, io.StringIO("".join(lines)))


# COPY by driver: the cheapest way to hand PostgreSQL many rows, and cheap in CPU, which the
# writer shares with the callers (psycopg2, batches of 200: 3 to 4 times the rows a second of
# its multi-row INSERT, a quarter of the CPU). Other drivers: SQLAlchemy's executemany.
_COPY: dict[str, Callable[[Any, Sequence[CallRecord]], None]] = {
    "psycopg": _copy_psycopg,
    "psycopg2": _copy_psycopg2,
}


def describe(exc: BaseException) -> str:
    """An error in one line: its class and the first line of the driver's message."""
    detail = getattr(exc, "orig", None) or exc
    lines = str(detail).strip().splitlines()
    # An exception without a message (TimeoutError()) is named alone: indexing its empty
    # message raised inside the writer's error handling and ended the writer thread.
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _nothing() -> None:
    pass


def _ignore(_seq: int) -> None:
    pass


class CallWriter:
    """A thread that writes queued records into inference_calls in batches, in order."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        rollup: RollupFn,
        rejected_path: Path,
        batch_size: int = 200,
        linger_seconds: float = 0.05,
        before_write: Callable[[], None] = _nothing,
        on_written: Callable[[int], None] = _ignore,
        backoff_seconds: tuple[float, float] = (_BACKOFF_START, _BACKOFF_MAX),
    ) -> None:
        self._sessions = sessions
        self._rollup = rollup
        self._rejected_path = rejected_path
        self._batch_size = batch_size
        self._linger = linger_seconds
        # Called before each batch (the journal's fsync) and after it with the number of
        # its last record (the journal drops what is written).
        self._before_write = before_write
        self._on_written = on_written
        # Called on this thread with the records of each committed batch (rows that are in
        # the database now): the event feed and the metrics. Each must return at once.
        self.committed: list[Callable[[Sequence[CallRecord]], None]] = []
        self._backoff_start, self._backoff_max = backoff_seconds
        # Set when waiting to fill a batch is pointless: a flush, a close, a full batch.
        self._hurry = threading.Event()
        self._lock = threading.Lock()
        # Set by a new record too; ``_urgent`` only by flush() and stop(), so that a stream
        # of records during an outage cannot cut the backoff short (it made the writer spin).
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._pending: deque[_Pending] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False
        self.written = 0
        self.write_failures = 0
        self.rejected = 0
        self.replayed = 0
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        self.spooling = False

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="call-log-writer", daemon=True)
        self._thread.start()
        if self._pending:
            self._wake.set()

    def submit(self, seq: int, record: CallRecord, *, replayed: bool = False) -> None:
        """Queue a record (numbers must rise in the order records are submitted)."""
        with self._lock:
            self._pending.append(_Pending(seq, record, replayed))
            if len(self._pending) >= self._batch_size:
                self._hurry.set()
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued record is written (retrying at once if backing off);
        False on timeout."""
        self._hurry.set()
        self._urgent.set()
        self._wake.set()
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending and not self._busy, timeout)

    def stop(self, timeout: float) -> bool:
        """Make one last pass over the queue and end the thread, waiting up to ``timeout``;
        True if it has ended."""
        with self._lock:
            self._stopping = True
        self._hurry.set()
        self._urgent.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def pending(self) -> int:
        """How many queued records are not written yet."""
        with self._lock:
            return len(self._pending)

    def stats(self) -> dict[str, Any]:
        """The writer's state and counters (the ``stats()`` keys of ``CallRecorder``)."""
        with self._lock:
            pending = len(self._pending)
            oldest = self._pending[0].record.timestamp if pending else None
        return {
            "state": "spooling" if self.spooling else "ok",
            "pending": pending,
            "oldest_pending": oldest.isoformat() if oldest else None,
            "written": self.written,
            "replayed": self.replayed,
            "write_failures": self.write_failures,
            "rejected": self.rejected,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
        }

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        backoff = self._backoff_start
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            # A flush() that found nothing to hurry must not cut the next outage's backoff.
            self._urgent.clear()
            # Let a batch gather: one transaction for many rows costs the callers' threads
            # (which share the GIL with this one) far less than one per row.
            if self._pending and self._hurry.wait(timeout=self._linger):
                self._hurry.clear()
            while True:
                with self._lock:
                    batch = [
                        self._pending[i] for i in range(min(self._batch_size, len(self._pending)))
                    ]
                    stopping = self._stopping
                if not batch:
                    break
                self._busy = True
                try:
                    self._before_write()
                    written = self._write(batch)
                except Exception as exc:  # the writer must outlive any failure; it retries
                    self._busy = False
                    self._failed(exc)
                    if stopping:
                        return
                    # Wait before the next try; only flush() and close() cut it short.
                    if self._urgent.wait(timeout=backoff):
                        self._urgent.clear()
                    backoff = min(backoff * 2, self._backoff_max)
                    continue
                backoff = self._backoff_start
                self._committed(batch)
                self._tell(written)
                with self._lock:
                    more_than_a_batch = len(self._pending) >= self._batch_size
                if not (more_than_a_batch or self._hurry.is_set() or stopping):
                    break  # gather the next batch during the linger
            with self._idle:
                self._busy = False
                self._idle.notify_all()
            with self._lock:
                if self._stopping:
                    return

    def _write(self, batch: list[_Pending]) -> list[CallRecord]:
        """Write the batch; the records that are now rows (as written)."""
        records = [p.record for p in batch]
        if any(p.replayed for p in batch):
            records = self._skip_existing(records)
        if not records:
            return []
        try:
            self._insert(records)
        except Exception as exc:
            if _retry_later(exc):
                raise
            # One bad row (a duplicate, a link deleted since validation, a value the
            # database refuses) must not block the batch: one by one, repairing what can be.
            written = (self._insert_one(record) for record in records)
            return [record for record in written if record is not None]
        return records

    def _insert(self, records: Sequence[CallRecord]) -> None:
        with self._sessions() as session:
            connection = session.connection()
            copy = _COPY.get(connection.dialect.driver)
            if connection.dialect.name == "postgresql" and copy is not None:
                dbapi = connection.dialect.loaded_dbapi
                try:
                    copy(connection.connection.driver_connection, records)
                except dbapi.Error as exc:
                    # Translated where it enters: callers handle SQLAlchemy's error classes.
                    raise DBAPIError.instance(_COPY_SQL, None, exc, dbapi.Error) from exc
            else:
                # Core executemany: the ORM's bulk path costs several times more per row.
                connection.execute(_INSERT, [r.values() for r in records])
            self._rollup(session, records)
            session.commit()

    def _insert_one(self, record: CallRecord) -> CallRecord | None:
        if not self._skip_existing([record]):
            return None
        try:
            self._insert([record])
            return record
        except IntegrityError:
            pass
        except Exception as exc:
            if _retry_later(exc):
                raise
            self._reject(record, exc)
            return None
        repaired = self._drop_missing_links(record)
        try:
            self._insert([repaired])
        except Exception as exc:
            if _retry_later(exc):
                raise
            self._reject(record, exc)
            return None
        return repaired

    def _tell(self, records: list[CallRecord]) -> None:
        if not records:
            return
        for listener in list(self.committed):
            try:
                listener(records)
            except Exception:  # a listener's failure is its own; the writer goes on
                log.exception("call log: a committed-rows listener failed")

    def _skip_existing(self, records: list[CallRecord]) -> list[CallRecord]:
        ids = [r.request_id for r in records]
        with self._sessions() as session:
            existing = set(
                session.scalars(
                    select(InferenceCall.request_id).where(InferenceCall.request_id.in_(ids))
                )
            )
        return [r for r in records if r.request_id not in existing]

    def _drop_missing_links(self, record: CallRecord) -> CallRecord:
        changes: dict[str, Any] = {}
        with self._sessions() as session:
            for name in LINK_TABLES:
                value = getattr(record, name)
                if value is not None and not link_exists(session, name, value):
                    changes[name] = None
        if changes:
            log.warning(
                "call log: %s of call %s no longer exist; recorded without them",
                ", ".join(sorted(changes)),
                record.request_id,
            )
        return replace(record, **changes)

    def _reject(self, record: CallRecord, exc: Exception) -> None:
        path = self._rejected_path
        # Call data, so private (0600) like the journal; one write per line,
        # so processes sharing the spool append whole lines.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a file left readable by an older version, too
            os.write(fd, (record.to_json() + "\n").encode("utf-8"))
        finally:
            os.close(fd)
        self.rejected += 1
        self.last_error = describe(exc)
        self.last_error_at = datetime.now(UTC)
        if isinstance(exc, DBAPIError):
            log.error(
                "call log: the database refused call %s (%s); kept in %s",
                record.request_id,
                self.last_error,
                path,
            )
        else:
            # Not the database's error: a value the driver cannot take, or a bug, whose
            # traceback is what mends it.
            log.error(
                "call log: call %s could not be written (%s, not a database error); kept in %s",
                record.request_id,
                self.last_error,
                path,
                exc_info=exc,
            )

    def _failed(self, exc: Exception) -> None:
        described = describe(exc)
        new_error = described != self.last_error
        self.write_failures += 1
        self.last_error = described
        self.last_error_at = datetime.now(UTC)
        if not _retry_later(exc):
            # Outside a row's insert (the journal's sync, the queries around the insert): not
            # an outage, so said as what it is, with its traceback, once per distinct error.
            if new_error:
                log.error(
                    "call log: writing failed (%s, not a database error); the calls wait in "
                    "%s and are tried again",
                    described,
                    self._rejected_path.parent,
                    exc_info=exc,
                )
            self.spooling = True
            return
        if not self.spooling:
            self.spooling = True
            log.error(
                "call log: database write failed (%s); spooling calls to %s until it is back",
                described,
                self._rejected_path.parent,
            )

    def _committed(self, batch: list[_Pending]) -> None:
        replayed = sum(1 for item in batch if item.replayed)
        with self._lock:
            for _ in batch:
                self._pending.popleft()
            self.written += len(batch)
            self.replayed += replayed
            caught_up = not self._pending
        self._on_written(batch[-1].seq)
        if self.spooling and caught_up:
            self.spooling = False
            log.info("call log: database is back; every spooled call is written")


class DatabaseProbe:
    """A cached answer to "can the call log reach its table?", cheap to ask from any thread.

    At most one probe (a ``SELECT`` of no rows from inference_calls, so an SQLite file
    without the table fails too) runs at a time, and only when the last answer is older
    than ``interval`` seconds; callers meanwhile get the last answer. The caller that starts
    a probe waits for it at most ``timeout`` seconds: the probe runs on a thread of its own,
    so a database that accepts connections and never answers cannot hold a request thread
    past that (the driver's own timeouts are seconds long, or none).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        interval: float = 5.0,
        timeout: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._sessions = sessions
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: str | None = None
        self._checked_at: float | None = None
        self._running: threading.Event | None = None  # set when the running probe ends

    def check(self) -> str | None:
        """None if the database answered the last probe, else why not in one line."""
        with self._lock:
            fresh = (
                self._checked_at is not None
                and self._clock.monotonic() - self._checked_at < self._interval
            )
            if fresh or self._running is not None:
                return self._answer
            done = self._running = threading.Event()
        threading.Thread(
            target=self._probe, args=(done,), name="call-log-probe", daemon=True
        ).start()
        finished = done.wait(self._timeout)
        with self._lock:
            if not finished and self._running is done:
                # Still waiting on the database: that is the answer until the probe ends.
                self._answer = f"database unreachable: no answer within {self._timeout:g} s"
            return self._answer

    def _probe(self, done: threading.Event) -> None:
        answer: str | None = None
        try:
            with self._sessions() as session:
                session.execute(select(InferenceCall.id).limit(0))
        except Exception as exc:  # any failure is the answer, not the caller's problem
            answer = f"database unreachable: {describe(exc)}"
        with self._lock:
            self._answer = answer
            self._checked_at = self._clock.monotonic()
            self._running = None
        done.set()


class CallRecorder:
    """Takes call records on any thread and gets each into inference_calls exactly once."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spool_dir: Path,
        *,
        rollup: RollupFn,
        batch_size: int = 200,
        linger_seconds: float = 0.05,
        segment_bytes: int = SEGMENT_BYTES,
        clock: Clock = SYSTEM_CLOCK,
        probe_interval: float = 5.0,
        probe_timeout: float = 1.0,
    ) -> None:
        self._dir = spool_dir
        self._probe = DatabaseProbe(
            sessions, interval=probe_interval, timeout=probe_timeout, clock=clock
        )
        self._journal = Journal(spool_dir, segment_bytes=segment_bytes)
        self._writer = CallWriter(
            sessions,
            rollup=rollup,
            rejected_path=spool_dir / "rejected.jsonl",
            batch_size=batch_size,
            linger_seconds=linger_seconds,
            before_write=self._journal.sync,
            on_written=self._journal.release,
        )
        # Held across journal append and queueing, so the queue is in journal order.
        self._lock = threading.Lock()
        self._open = False
        self._owner = os.getpid()
        self._on_close: list[Callable[[], None]] = []

    def start(self) -> CallRecorder:
        """Open this process's journal, queue what dead processes left, start the writer."""
        self._owner = os.getpid()
        with self._lock:
            for seq, record in self._journal.open():
                self._writer.submit(seq, record, replayed=True)
            self._open = True
        self._writer.start()
        return self

    @property
    def spool_dir(self) -> Path:
        """Where this recorder journals its calls."""
        return self._dir

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is queued (up to ``timeout``), stop the writer; True if nothing is left.

        Records the database did not take stay in the journal and are replayed at next start.
        In a process forked from the one that started it, this does nothing: the journal and
        the writer belong to that process, which is still using them.
        """
        if self._owner != os.getpid():
            return False
        drained = self._writer.flush(timeout)
        for listener in self._on_close:
            try:
                listener()
            except Exception:  # a listener's failure is its own; closing goes on
                log.exception("call log: a close listener failed")
        self._writer.stop(timeout=max(timeout, 1.0))
        with self._lock:
            self._open = False
            everything_written = self._writer.pending() == 0
        self._journal.close()
        return drained and everything_written

    def record(self, record: CallRecord) -> None:
        """Journal the record and queue it for the database; returns in microseconds."""
        with self._lock:
            if self._open:
                self._writer.submit(self._journal.append(record), record)
                return
        # Closed (a call outlived shutdown): keep it in a journal of its own for the next
        # start to replay, rather than lose it.
        self._journal.keep(record)
        log.warning("call log: call %s finished after shutdown; journalled", record.request_id)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is in the database; False on timeout."""
        return self._writer.flush(timeout)

    def on_committed(self, listener: Callable[[Sequence[CallRecord]], None]) -> None:
        """Call ``listener`` with the records of every batch once its rows are committed.

        It runs on the writer's thread, so it must hand the records on and return at once.
        """
        self._writer.committed.append(listener)

    def on_close(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the recorder closes, once what was queued is written (the
        console ends its threads with the service)."""
        self._on_close.append(listener)

    def health(self) -> str | None:
        """None when the call log is fine, else why not in one line (for /status's reason).

        Spooling says so with the last write error; otherwise the database is probed (cached
        for a few seconds, never holding the caller much over a second), so an unreachable
        database shows before a write fails.
        """
        with self._lock:
            running = self._open
        if not running:
            return "call log stopped"
        writer = self._writer.stats()
        if writer["state"] == "spooling":
            return f"call log spooling: {writer['last_error']}"
        return self._probe.check()

    def stats(self) -> dict[str, Any]:
        """Call-log health for /api/inference/status."""
        return {
            **self._writer.stats(),
            "spool_dir": str(self._dir),
            "spool_bytes": self._journal.size(),
        }
