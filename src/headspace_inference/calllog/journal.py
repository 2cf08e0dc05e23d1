"""The durable half of the call log: a journal of call records in a spool directory.

A record is appended to this process's open segment (one ``write``, so it survives the
process being killed) and numbered; the numbers rise in append order. Segments are files
``calls-<pid>-<n>-<id>.jsonl`` (mode 0600), each locked (``flock``) by the process writing it
for as long as it lives, so a lock that can be taken marks a segment whose writer is gone:
an orphan. At start the journal claims the orphans of dead processes and hands back their
records, to be written again.

Any number of processes may share the directory, starting, rotating and exiting at will. A
segment is created under a name scanners pass over (``.new``), locked, and only then renamed,
so no scanner can take a live segment for an orphan; a scanner tolerates files vanishing at
any step, and claims a file only if it still holds that name once locked (else it was
deleted by a process done with it, and its records are written).

Its owner reports, through ``release``, the number up to which every record is in the
database; segments holding only such records are deleted, and the open segment is emptied
(truncated) once all of its records are. The journal knows nothing of the database.

The spool's size is bounded: a segment is closed once it holds ``segment_bytes`` (4 MiB) or
``segment_records`` (2,000 records), so besides the records still waiting for the database
the journal keeps at most the written part of one segment: less than ``segment_bytes`` plus
one record (a record is at most a few MB: the answer is cut at a million characters). Once
every record is written the spool holds no records at all. (Records the database refused
stay in ``rejected.jsonl`` by design, outside this bound.)
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..settings import ConfigError
from .record import CallRecord

log = logging.getLogger(__name__)

SEGMENT_RECORDS = 2000  # records per segment before a new one is started
SEGMENT_BYTES = 4 * 1024 * 1024  # ... or bytes: what a segment can keep after it is written
_PATTERN = "calls-*.jsonl"


@dataclass
class _Segment:
    """One journal file and the descriptor that holds its lock."""

    path: Path
    fd: int
    records: int = 0
    size: int = 0
    last_seq: int = 0  # the number of its newest record


# Numbers this process's segments in the order it creates them: a dead process's segments
# often share an mtime (size rotation makes many), and are replayed in name order then.
_created = itertools.count()
_NEW = ".new"  # suffix of a segment being created: scanners pass it over
_DEBRIS_SECONDS = 60.0  # a new segment older than this was left by a process that died
_CREATE_TRIES = 100


def _create(directory: Path) -> _Segment:
    """A new segment, locked before it takes a name that scanners look at.

    Created under a temporary name, locked, then renamed: a segment that was created under
    its final name and locked after could be claimed as an orphan in between.
    """
    for _ in range(_CREATE_TRIES):
        name = f"calls-{os.getpid()}-{next(_created):09d}-{uuid.uuid4().hex[:10]}.jsonl"
        path = directory / name
        new = directory / (name + _NEW)
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(new, path)
        except (BlockingIOError, FileNotFoundError):
            # A scanner took it for a dead process's debris (it removes those, see
            # _sweep): try again under another name.
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        return _Segment(path, fd)
    raise RuntimeError(f"call log: could not create a journal segment in {directory}")


def _listed(directory: Path, pattern: str) -> list[tuple[float, str, Path]]:
    """(mtime, name, path) of the files matching ``pattern``, oldest first; files removed by
    another process while we look are passed over."""
    found = []
    for path in directory.glob(pattern):
        try:
            found.append((path.stat().st_mtime, path.name, path))
        except FileNotFoundError:
            continue
    return sorted(found)


def _lock(path: Path, flags: int) -> int | None:
    """A descriptor of ``path`` holding its lock, or None if it is locked or gone.

    None too if the file left its name between our open and our lock (its owner or another
    scanner deleted it when done with it): the descriptor would hold a deleted file.
    """
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        named = os.stat(path)
        held = os.fstat(fd)
        if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            return fd
    except (BlockingIOError, FileNotFoundError):  # a live process owns it, or it is gone
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _claim(directory: Path) -> list[_Segment]:
    """Segments whose writer is gone (their lock is free), locked now by us, oldest first."""
    claimed: list[_Segment] = []
    for _, _, path in _listed(directory, _PATTERN):
        fd = _lock(path, os.O_RDONLY)
        if fd is not None:
            claimed.append(_Segment(path, fd, size=os.fstat(fd).st_size))
    _sweep(directory)
    return claimed


def _sweep(directory: Path) -> None:
    """Remove segments a dead process left half-created (empty: records are written only
    after the rename)."""
    stale = time.time() - _DEBRIS_SECONDS
    for mtime, _, path in _listed(directory, _PATTERN + _NEW):
        if mtime < stale:
            fd = _lock(path, os.O_RDONLY)
            if fd is not None:
                path.unlink(missing_ok=True)
                os.close(fd)


def _read(segment: _Segment) -> list[CallRecord]:
    records = []
    # Read through our descriptor: it is the file we locked.
    with os.fdopen(os.dup(segment.fd), "rb") as fh:
        fh.seek(0)
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
                if line:
                    records.append(CallRecord.from_json(line))
            except (ValueError, TypeError, KeyError) as exc:
                # A torn last line from a crash mid-write (even mid-character): report it,
                # keep the rest.
                log.error(
                    "call log: unreadable journal line %s:%d skipped: %s", segment.path, number, exc
                )
    return records


class Journal:
    """Numbered call records in segment files of one spool directory, shared safely with
    other processes."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_records: int = SEGMENT_RECORDS,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.directory = directory
        self._segment_records = segment_records
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._seq = 0
        self._released = 0  # every record numbered up to here is in the database
        self._open: _Segment | None = None
        self._closed: list[_Segment] = []  # full segments of ours, oldest first
        self._orphans: list[_Segment] = []  # claimed from dead processes
        self._shut = False

    def open(self) -> list[tuple[int, CallRecord]]:
        """Claim what dead processes left and start our own segment; their records, numbered,
        oldest first."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        replay: list[tuple[int, CallRecord]] = []
        claimed = _claim(self.directory)
        with self._lock:
            for segment in claimed:
                records = _read(segment)
                for record in records:
                    self._seq += 1
                    replay.append((self._seq, record))
                segment.records = len(records)
                segment.last_seq = self._seq
                self._orphans.append(segment)
                if records:
                    log.info(
                        "call log: replaying %d records left in %s", len(records), segment.path
                    )
            self._open = _create(self.directory)
        return replay

    def append(self, record: CallRecord) -> int:
        """Write the record to the open segment and return its number."""
        line = (record.to_json() + "\n").encode("utf-8")
        with self._lock:
            segment = self._open
            if segment is None:
                raise RuntimeError("the journal is not open")
            os.write(segment.fd, line)
            self._seq += 1
            segment.records += 1
            segment.size += len(line)
            segment.last_seq = self._seq
            if segment.records >= self._segment_records or segment.size >= self._segment_bytes:
                self._rotate(segment)
            return self._seq

    def _rotate(self, full: _Segment) -> None:
        # The record is journalled already: failing to start the next segment (no
        # descriptors left, say) must not fail its append. The full one stays open and
        # rotation is tried again at the next record.
        try:
            fresh = _create(self.directory)
        except OSError as exc:
            log.warning("call log: could not start a new journal segment: %s", exc)
            return
        self._closed.append(full)
        self._open = fresh

    def keep(self, record: CallRecord) -> Path:
        """Write the record to a segment of its own, left for the next start to replay."""
        line = (record.to_json() + "\n").encode("utf-8")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        segment = _create(self.directory)
        try:
            os.write(segment.fd, line)
        finally:
            os.close(segment.fd)
        return segment.path

    def sync(self) -> None:
        """Make every appended record durable (``fsync``)."""
        with self._lock:
            fds = [s.fd for s in self._closed]
            if self._open is not None:
                fds.append(self._open.fd)
        for fd in fds:
            os.fsync(fd)

    def release(self, through: int) -> None:
        """Every record numbered up to ``through`` is in the database: drop the segments that
        hold nothing else."""
        with self._lock:
            if self._shut or through <= self._released:
                return
            self._released = through
            done = [s for s in self._closed + self._orphans if s.last_seq <= through]
            self._closed = [s for s in self._closed if s.last_seq > through]
            self._orphans = [s for s in self._orphans if s.last_seq > through]
            current = self._open
            if current is not None and current.records and current.last_seq <= through:
                # All written: empty it rather than keep up to a segment of written answers.
                # Appends take this lock, so none can land between the check and the cut.
                os.ftruncate(current.fd, 0)
                current.records = current.size = 0
        for segment in done:
            _delete(segment)

    def size(self) -> int:
        """Bytes in the segments this journal holds."""
        with self._lock:
            segments = [*self._orphans, *self._closed]
            if self._open is not None:
                segments.append(self._open)
            return sum(s.size for s in segments)

    def close(self) -> None:
        """Release every segment: delete those whose records are all released, and leave the
        others for the next start to replay."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
            segments = [*self._orphans, *self._closed]
            if self._open is not None:
                segments.append(self._open)
            self._orphans, self._closed, self._open = [], [], None
            released = self._released
        for segment in segments:
            if segment.last_seq <= released:
                _delete(segment)
            else:
                os.close(segment.fd)


def _delete(segment: _Segment) -> None:
    # Unlinked while still locked, so no scanner claims a file that is being deleted.
    segment.path.unlink(missing_ok=True)
    os.close(segment.fd)


def check_spool_dir(path: str | os.PathLike[str]) -> Path:
    """Create the call-log spool directory and prove it writable, or raise ConfigError.

    Every call is journalled there, so a directory that cannot be written is a configuration
    error, named as such, before the service takes a call.
    """
    spool = Path(path)
    try:
        # Private, as the journal makes it: this check may be the first to make it.
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=spool, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"inference.spool_path: cannot write to {spool} ({reason})") from None
    return spool
