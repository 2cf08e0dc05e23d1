"""The call log's journal on real files: segments, their size, orphans of dead processes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from claude_headspace.inference.journal import Journal
from claude_headspace.inference.record import CallRecord
from claude_headspace.inference.types import new_request_id


def a_record(i: int, answer: str = "an answer") -> CallRecord:
    return CallRecord(
        request_id=new_request_id(),
        timestamp=datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=i),
        level="turn",
        purpose="journal test",
        model="anthropic/claude-haiku-4.5",
        status="ok",
        input_hash=f"{i:064x}",
        result_text=answer,
    )


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
