"""The call log's journal on real files: segments, their size, orphans of dead processes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.call_rows import make_record

from headspace_inference.calllog.journal import Journal
from headspace_inference.calllog.record import CallRecord


def a_record(i: int, answer: str = "an answer") -> CallRecord:
    return make_record(i, purpose="journal test", result_text=answer)


def line_bytes(record: CallRecord) -> int:
    return len((record.to_json() + "\n").encode("utf-8"))


def journal_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("calls-*.jsonl"))


def bytes_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in journal_files(directory))


def test_written_records_are_not_kept_beyond_one_segment(tmp_path: Path) -> None:
    # 500 answers of 200 KB kept 100 MB in the spool after every row was written: the open
    # segment held up to 2,000 records however large, and was kept until shutdown.
    segment_bytes = 1_000_000
    journal = Journal(tmp_path, segment_bytes=segment_bytes)
    assert journal.open() == []
    records = [a_record(i, "x" * 200_000) for i in range(60)]
    sizes = {journal.append(r): line_bytes(r) for r in records}
    largest = max(sizes.values())
    for through in range(1, 61):
        journal.release(through)
        unwritten = sum(size for seq, size in sizes.items() if seq > through)
        # Besides the unwritten records: the written part of one segment at most.
        assert bytes_on_disk(tmp_path) == journal.size()
        assert journal.size() - unwritten < segment_bytes + largest
    assert journal.size() == 0
    assert bytes_on_disk(tmp_path) == 0
    journal.close()
    assert journal_files(tmp_path) == []


def test_the_open_segment_is_emptied_once_all_its_records_are_written(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    first = journal.append(a_record(1, "y" * 50_000))
    journal.release(first)
    assert bytes_on_disk(tmp_path) == 0
    # ... and keeps working: a record after that is in it, and survives a close unwritten.
    record = a_record(2)
    journal.append(record)
    assert bytes_on_disk(tmp_path) == line_bytes(record)
    journal.close()
    (left,) = journal_files(tmp_path)
    assert [CallRecord.from_json(line) for line in left.read_text().splitlines()] == [record]


def test_records_rotated_by_size_are_all_replayed_by_the_next_process(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=300_000)
    journal.open()
    records = [a_record(i, "z" * 100_000) for i in range(20)]
    for record in records:
        journal.append(record)
    journal.release(3)  # the first three are written; the rest wait
    journal.close()
    assert len(journal_files(tmp_path)) >= 5  # rotated by size, not at 2,000 records
    for path in journal_files(tmp_path):
        assert path.stat().st_size < 300_000 + line_bytes(records[0])
    replay = Journal(tmp_path).open()
    assert [r for _, r in replay][-17:] == records[3:]
    assert [seq for seq, _ in replay] == list(range(1, len(replay) + 1))


# ------------------------------------------------------------ processes sharing a spool


def test_a_file_that_vanishes_during_the_scan_is_passed_over(tmp_path: Path) -> None:
    # The scan listed the directory, then stat()ed each name to sort them: a segment its
    # owner deleted in between raised FileNotFoundError out of start(). A dangling symlink
    # is a name that lists but does not stat, every time.
    (tmp_path / "calls-1-000000000-vanished.jsonl").symlink_to(tmp_path / "gone")
    leftover = a_record(1)
    (tmp_path / "calls-2-000000000-dead.jsonl").write_text(leftover.to_json() + "\n")
    journal = Journal(tmp_path)
    assert [r for _, r in journal.open()] == [leftover]
    journal.close()


def test_a_scanner_never_claims_a_segment_being_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A segment was created under its final name and locked after: a scanner of another
    # process running in between took the brand-new live segment for an orphan, and its
    # creator's lock then failed. Here the scanner runs exactly in that gap: right after
    # the creator's os.open makes the file.
    real_open = os.open
    scanners: list[Journal] = []
    claimed: list[CallRecord] = []

    def open_then_scan(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        fd = real_open(path, flags, mode, **kw)
        if flags & os.O_CREAT and Path(path).parent == tmp_path and not scanners:
            scanners.append(Journal(tmp_path))
            claimed.extend(r for _, r in scanners[0].open())
        return fd

    monkeypatch.setattr(os, "open", open_then_scan)
    journal = Journal(tmp_path)
    journal.open()
    monkeypatch.undo()
    record = a_record(1)
    journal.append(record)
    (scanner,) = scanners
    scanner.close()  # deletes what it claimed: it must not have been our segment
    journal.close()  # leaves the unwritten record for the next start
    assert claimed == []
    assert [r for _, r in Journal(tmp_path).open()] == [record]


def test_a_segment_deleted_between_open_and_lock_is_not_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scanner opens a live segment; its owner, done with it, deletes it and lets go of the
    # lock; the scanner's lock then succeeds on a file no longer in the directory, whose
    # records are all written: it must not hand them back.
    owner = Journal(tmp_path, segment_records=1)
    owner.open()
    first = owner.append(a_record(1))  # a full segment (rotated after one record)
    real_open = os.open
    deleted: list[int] = []

    def open_then_release(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        fd = real_open(path, flags, mode, **kw)
        if not flags & os.O_CREAT and Path(path).parent == tmp_path and not deleted:
            deleted.append(first)
            owner.release(first)  # written: the owner deletes the segment
        return fd

    scanner = Journal(tmp_path)
    monkeypatch.setattr(os, "open", open_then_release)
    replay = scanner.open()
    monkeypatch.undo()
    assert deleted == [first]
    assert replay == []
    scanner.close()
    owner.close()


HAMMER = r"""
import random, sys
from datetime import UTC, datetime
from pathlib import Path
from headspace_inference.calllog.journal import Journal
from headspace_inference.calllog.record import CallRecord
from headspace_inference.inference.request import new_request_id

spool, out, seed, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
with open(out, "a") as fh:
    for _ in range(rounds):
        journal = Journal(spool, segment_records=rng.randint(1, 3))
        for seq, record in journal.open():  # a dead process's records: write them
            fh.write(f"replayed {record.request_id}\n")
            journal.release(seq)
        n = rng.randint(1, 6)
        dies = rng.random() < 0.4  # leaves its last records unwritten
        for i in range(n):
            record = CallRecord(request_id=new_request_id(), timestamp=datetime.now(UTC),
                                level="turn", purpose="hammer", model="m", status="ok",
                                input_hash="0" * 64)
            fh.write(f"made {record.request_id}\n")
            seq = journal.append(record)
            if not dies or i < n // 2:
                fh.write(f"written {record.request_id}\n")
                journal.release(seq)
        fh.flush()
        journal.close()
"""


def test_processes_starting_rotating_and_exiting_on_one_spool_lose_and_double_nothing(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    script = tmp_path / "hammer.py"
    script.write_text(HAMMER)
    outs = [tmp_path / f"out-{n}.txt" for n in range(6)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(spool), str(out), str(n), "150"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, out in enumerate(outs)
    ]
    failures = []
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        if proc.returncode != 0:
            failures.append(err[-3000:])
    assert failures == []
    # Whatever the last ones left, a final start writes.
    last = Journal(spool)
    replay = last.open()
    leftovers = [r.request_id for _, r in replay]
    if replay:
        last.release(replay[-1][0])  # written
    last.close()
    made: list[str] = []
    done: list[str] = list(leftovers)
    for out in outs:
        for line in out.read_text().splitlines():
            kind, request_id = line.split()
            (made if kind == "made" else done).append(request_id)
    print(f"\nFAULT spool shared by 6 processes: made={len(made)} written={len(done)}")
    assert len(made) > 1000
    duplicates = {i for i, n in Counter(done).items() if n > 1}
    assert duplicates == set()  # no live segment (or written record) was claimed
    assert sorted(done) == sorted(made)  # every record written exactly once
    assert [p.name for p in spool.iterdir()] == []


def test_a_half_created_segment_of_a_dead_process_is_swept_away(tmp_path: Path) -> None:
    # A process killed between creating a segment and naming it leaves an empty ".new" file.
    dead = tmp_path / "calls-1-000000000-dead.jsonl.new"
    dead.touch()
    os.utime(dead, (1, 1))
    being_made = tmp_path / "calls-2-000000000-fresh.jsonl.new"  # its creator is at work
    being_made.touch()
    locked = tmp_path / "calls-3-000000000-locked.jsonl.new"
    locked.touch()
    os.utime(locked, (1, 1))
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        journal = Journal(tmp_path)
        assert journal.open() == []
        journal.close()
    finally:
        os.close(fd)
    assert not dead.exists()
    assert being_made.exists() and locked.exists()


OUT_OF_DESCRIPTORS = r"""
import os, resource, sys
from datetime import UTC, datetime
from pathlib import Path
from headspace_inference.calllog.journal import Journal
from headspace_inference.calllog.record import CallRecord

spool = Path(sys.argv[1])
journal = Journal(spool, segment_records=1)
journal.open()
def record(i):
    return CallRecord(request_id=f"r{i}", timestamp=datetime.now(UTC), level="turn",
                      purpose="p", model="m", status="ok", input_hash="0" * 64)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
fillers = []
try:
    while True:
        fillers.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
seqs = [journal.append(record(i)) for i in range(3)]  # each wants a new segment, and cannot
for fd in fillers:
    os.close(fd)
seqs.append(journal.append(record(3)))
journal.close()
replay = Journal(spool).open()
print(seqs, [r.request_id for _, r in replay])
"""


def test_a_segment_that_cannot_be_started_does_not_fail_the_append(tmp_path: Path) -> None:
    # Rotation happens after the record is written: a failure to create the next segment
    # (no descriptors left, say) raised out of append() for a record already journalled, and
    # left the full segment both open and closed.
    script = tmp_path / "descriptors.py"
    script.write_text(OUT_OF_DESCRIPTORS)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "spool")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "[1, 2, 3, 4] ['r0', 'r1', 'r2', 'r3']"
