"""Writes every call's InferenceCall row without putting a database commit on the caller's path,
and without losing a row when the database or the process fails.

A record is first appended to a journal file (one ``write`` to the kernel: it survives the
process being killed) and queued in memory; a writer thread commits queued records in batches,
each batch's rows and their usage rollup in one transaction. While the database is down the
journal is the spool: records wait there and in memory, and are written in order when it comes
back. A journal left by a dead process is replayed at the next start; replay skips request ids
already in the table, so no row is ever written twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..models import LINK_TABLES, InferenceCall
from .record import FIELD_NAMES, CallRecord

log = logging.getLogger(__name__)

RollupFn = Callable[[Session, Sequence[Any]], None]

_SEGMENT_RECORDS = 2000  # journal records per file before a new file is started
_BACKOFF_START = 0.2
_BACKOFF_MAX = 5.0


_COPY_SQL = f"COPY inference_calls ({', '.join(FIELD_NAMES)}) FROM STDIN"
# A value the driver cannot even bind (an integer past SQLite's 64 bits, say) raises these
# rather than a database error: that row is refused, not retried as if the database were down.
_REFUSED: tuple[type[Exception], ...] = (DataError, OverflowError, ValueError, TypeError)
_ONE_BY_ONE: tuple[type[Exception], ...] = (IntegrityError, *_REFUSED)
_INSERT = insert(cast(Table, InferenceCall.__table__))


class _Segment:
    """One journal file, locked by this process so no other process replays it while we live."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.records = 0
        self.last_seq = 0

    @classmethod
    def create(cls, directory: Path) -> _Segment:
        path = directory / f"calls-{os.getpid()}-{uuid.uuid4().hex[:10]}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, fd)

    def close(self, *, delete: bool) -> None:
        if delete:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)


@dataclass
class _Pending:
    seq: int
    record: CallRecord
    replayed: bool = False


def _claim_orphans(directory: Path) -> list[tuple[Path, int]]:
    """Journal files whose writer is gone (their lock is free), locked now by us, oldest first."""
    claimed: list[tuple[Path, int]] = []
    for path in sorted(directory.glob("calls-*.jsonl"), key=lambda p: p.stat().st_mtime):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process owns it
            os.close(fd)
            continue
        claimed.append((path, fd))
    return claimed


def _read_journal(path: Path) -> list[CallRecord]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(CallRecord.from_json(line))
            except (ValueError, TypeError, KeyError) as exc:
                # A torn last line from a crash mid-write: report it, keep the rest.
                log.error("call log: unreadable journal line %s:%d skipped: %s", path, number, exc)
    return records


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
    ) -> None:
        self._sessions = sessions
        self._dir = spool_dir
        self._rollup = rollup
        self._batch_size = batch_size
        self._linger = linger_seconds
        # Set when waiting to fill a batch is pointless: a flush, a close, a full batch.
        self._hurry = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._pending: deque[_Pending] = deque()
        self._seq = 0
        self._closed_segments: list[_Segment] = []
        self._orphans: list[tuple[Path, int, int]] = []  # path, fd, last seq
        self._segment: _Segment | None = None
        self._thread: threading.Thread | None = None
        self._owner = os.getpid()
        self._stopping = False
        self._busy = False
        self.written = 0
        self.write_failures = 0
        self.rejected = 0
        self.replayed = 0
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        self.spooling = False

    # ------------------------------------------------------------------ life cycle

    def start(self) -> CallRecorder:
        """Open this process's journal, queue what dead processes left, start the writer."""
        self._owner = os.getpid()
        self._dir.mkdir(parents=True, exist_ok=True)
        orphans = _claim_orphans(self._dir)
        with self._lock:
            for path, fd in orphans:
                records = _read_journal(path)
                for record in records:
                    self._seq += 1
                    self._pending.append(_Pending(self._seq, record, replayed=True))
                self._orphans.append((path, fd, self._seq))
                if records:
                    log.info("call log: replaying %d records left in %s", len(records), path)
            self._segment = _Segment.create(self._dir)
        self._thread = threading.Thread(target=self._run, name="call-log-writer", daemon=True)
        self._thread.start()
        if self._pending:
            self._wake.set()
        return self

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is queued (up to ``timeout``), stop the writer; True if nothing is left.

        Records the database did not take stay in the journal and are replayed at next start.
        In a process forked from the one that started it, this does nothing: the journal and
        the writer belong to that process, which is still using them.
        """
        if self._owner != os.getpid():
            return False
        drained = self.flush(timeout)
        with self._lock:
            self._stopping = True
        self._hurry.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(timeout, 1.0))
        with self._lock:
            everything_written = not self._pending
            for segment in self._closed_segments:
                segment.close(delete=everything_written)
            self._closed_segments.clear()
            if self._segment is not None:
                self._segment.close(delete=everything_written)
                self._segment = None
            for path, fd, _ in self._orphans:
                if everything_written:
                    path.unlink(missing_ok=True)
                os.close(fd)
            self._orphans.clear()
        return drained and everything_written

    # ------------------------------------------------------------------ the caller's side

    def record(self, record: CallRecord) -> None:
        """Journal the record and queue it for the database; returns in microseconds."""
        line = (record.to_json() + "\n").encode("utf-8")
        with self._lock:
            segment = self._segment
            if segment is None:
                # Closed (a call outlived shutdown): keep it in a journal of its own for the
                # next start to replay, rather than lose it.
                self._dir.mkdir(parents=True, exist_ok=True)
                late = _Segment.create(self._dir)
                os.write(late.fd, line)
                late.close(delete=False)
                log.warning(
                    "call log: call %s finished after shutdown; journalled", record.request_id
                )
                return
            os.write(segment.fd, line)
            self._seq += 1
            segment.records += 1
            segment.last_seq = self._seq
            self._pending.append(_Pending(self._seq, record))
            if len(self._pending) >= self._batch_size:
                self._hurry.set()
            if segment.records >= _SEGMENT_RECORDS:
                self._closed_segments.append(segment)
                self._segment = _Segment.create(self._dir)
        self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is in the database; False on timeout."""
        self._hurry.set()
        self._wake.set()
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending and not self._busy, timeout)

    def stats(self) -> dict[str, Any]:
        """Call-log health for /api/inference/status."""
        with self._lock:
            pending = len(self._pending)
            oldest = self._pending[0].record.timestamp if pending else None
            files = [s.path for s in self._closed_segments] + [p for p, _, _ in self._orphans]
            if self._segment is not None:
                files.append(self._segment.path)
        spool_bytes = 0
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                spool_bytes += path.stat().st_size
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
            "spool_dir": str(self._dir),
            "spool_bytes": spool_bytes,
        }

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        backoff = _BACKOFF_START
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
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
                    self._fsync()
                    self._write(batch)
                except Exception as exc:  # the writer must outlive any failure; it retries
                    self._busy = False
                    self._failed(exc)
                    if stopping:
                        return
                    # Wait before the next try, but wake at once for close().
                    self._wake.wait(timeout=backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                backoff = _BACKOFF_START
                self._committed(batch)
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

    def _fsync(self) -> None:
        with self._lock:
            fds = [s.fd for s in self._closed_segments]
            if self._segment is not None:
                fds.append(self._segment.fd)
        for fd in fds:
            os.fsync(fd)

    def _write(self, batch: list[_Pending]) -> None:
        records = [p.record for p in batch]
        if any(p.replayed for p in batch):
            records = self._skip_existing(records)
        if not records:
            return
        try:
            self._insert(records)
        except _ONE_BY_ONE:
            # One bad row (a duplicate, a link deleted since validation, a value the
            # database refuses) must not block the batch: one by one, repairing what can be.
            for record in records:
                self._insert_one(record)

    def _insert(self, records: Sequence[CallRecord]) -> None:
        with self._sessions() as session:
            connection = session.connection()
            if connection.dialect.name == "postgresql":
                # COPY: the cheapest way to hand PostgreSQL many rows, and cheap in CPU,
                # which this thread shares with the callers.
                driver = connection.connection.driver_connection
                try:
                    with driver.cursor() as cursor, cursor.copy(_COPY_SQL) as copy:  # type: ignore[union-attr]
                        for record in records:
                            copy.write_row(record.copy_row())
                except driver.Error as exc:  # type: ignore[union-attr]
                    # Translated where it enters: callers handle SQLAlchemy's error classes.
                    raise DBAPIError.instance(_COPY_SQL, None, exc, type(driver).Error) from exc  # type: ignore[union-attr]
            else:
                # Core executemany: the ORM's bulk path costs several times more per row.
                connection.execute(_INSERT, [r.values() for r in records])
            self._rollup(session, records)
            session.commit()

    def _insert_one(self, record: CallRecord) -> None:
        if not self._skip_existing([record]):
            return
        try:
            self._insert([record])
            return
        except IntegrityError:
            pass
        except _REFUSED as exc:
            self.rejected += 1
            self._reject(record, exc)
            return
        repaired = self._drop_missing_links(record)
        try:
            self._insert([repaired])
        except _ONE_BY_ONE as exc:
            self.rejected += 1
            self._reject(record, exc)

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
            for name, model in LINK_TABLES.items():
                value = getattr(record, name)
                if value is not None and session.get(model, value) is None:
                    changes[name] = None
        if changes:
            log.warning(
                "call log: %s of call %s no longer exist; recorded without them",
                ", ".join(sorted(changes)),
                record.request_id,
            )
        return replace(record, **changes)

    def _reject(self, record: CallRecord, exc: Exception) -> None:
        path = self._dir / "rejected.jsonl"
        with path.open("a", encoding="utf-8") as fh:
            fh.write(record.to_json() + "\n")
        log.error(
            "call log: the database refused call %s (%s); kept in %s",
            record.request_id,
            type(exc).__name__,
            path,
        )

    def _failed(self, exc: Exception) -> None:
        self.write_failures += 1
        detail = getattr(exc, "orig", None) or exc
        self.last_error = f"{type(exc).__name__}: {str(detail).strip().splitlines()[0][:300]}"
        self.last_error_at = datetime.now(UTC)
        if not self.spooling:
            self.spooling = True
            log.error(
                "call log: database write failed (%s); spooling calls to %s until it is back",
                self.last_error,
                self._dir,
            )

    def _committed(self, batch: Iterable[_Pending]) -> None:
        count = 0
        last = 0
        replayed = 0
        for item in batch:
            count += 1
            last = item.seq
            replayed += item.replayed
        with self._lock:
            for _ in range(count):
                self._pending.popleft()
            self.written += count
            self.replayed += replayed
            done = [s for s in self._closed_segments if s.last_seq <= last]
            self._closed_segments = [s for s in self._closed_segments if s.last_seq > last]
            orphans_done = [o for o in self._orphans if o[2] <= last]
            self._orphans = [o for o in self._orphans if o[2] > last]
            caught_up = not self._pending
        for segment in done:
            segment.close(delete=True)
        for path, fd, _ in orphans_done:
            path.unlink(missing_ok=True)
            os.close(fd)
        if self.spooling and caught_up:
            self.spooling = False
            log.info("call log: database is back; every spooled call is written")
