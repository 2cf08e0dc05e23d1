"""The call recorder: rows reach the database exactly once, through outages and crashes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool
from tests.call_rows import make_record
from tests.drivers import BOTH_DRIVERS, EVERY_DATABASE
from tests.tcp_proxy import TcpProxy

from headspace_inference.calllog.database import _sqlite_pragmas
from headspace_inference.calllog.models import InferenceCall, UsageRollup
from headspace_inference.calllog.record import CallRecord
from headspace_inference.calllog.recorder import CallRecorder, CallWriter
from headspace_inference.calllog.rollup import apply_rollup
from headspace_inference.clock import FakeClock
from headspace_inference.settings import DatabaseSettings, normalise_url
from headspace_inference.standalone.database import standalone_database


def sessions_for(url: str) -> sessionmaker:  # type: ignore[type-arg]
    # No pool, so a database moved away is really gone; SQLite gets the app's pragmas
    # (foreign keys on) as in production.
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return sessionmaker(engine, expire_on_commit=False)


def count_rows(url: str) -> int:
    with sessions_for(url)() as session:
        return int(session.scalar(select(func.count()).select_from(InferenceCall)) or 0)


def rollup_calls(url: str) -> int:
    with sessions_for(url)() as session:
        total = func.coalesce(func.sum(UsageRollup.calls), 0)
        return int(session.scalar(select(total).where(UsageRollup.span == "hour")) or 0)


def recorder_for(url: str, spool: Path) -> CallRecorder:
    return CallRecorder(sessions_for(url), spool, rollup=apply_rollup, batch_size=50).start()


def write_all(url: str, spool: Path, records: Sequence[CallRecord]) -> None:
    """``records`` written through a recorder of their own, flushed, none rejected."""
    recorder = recorder_for(url, spool)
    try:
        for record in records:
            recorder.record(record)
        assert recorder.flush(timeout=30)
        assert recorder.stats()["rejected"] == 0
    finally:
        recorder.close()


@EVERY_DATABASE
def test_records_reach_the_table_with_every_field(database_url: str, tmp_path: Path) -> None:
    recorder = recorder_for(database_url, tmp_path / "spool")
    records = [make_record(i) for i in range(120)]
    for record in records:
        recorder.record(record)
    assert recorder.flush(timeout=30)
    with sessions_for(database_url)() as session:
        rows = {r.request_id: r for r in session.scalars(select(InferenceCall))}
    assert len(rows) == 120
    first = rows[records[0].request_id]
    assert first.result_text == "answer 0 — ünïcode"
    assert first.cost_usd == Decimal("0.000035")
    assert first.timestamp == records[0].timestamp
    assert rollup_calls(database_url) == 120
    assert recorder.stats()["written"] == 120
    assert recorder.close(timeout=5)
    assert list((tmp_path / "spool").glob("calls-*.jsonl")) == []


@EVERY_DATABASE
def test_every_value_comes_back_as_written(database_url: str, tmp_path: Path) -> None:
    # Text COPY (psycopg2) escapes by hand what psycopg 3 and executemany bind: tabs,
    # newlines, backslashes, COPY's own \N, NULLs, booleans, money, non-ASCII.
    odd = "tab\there\nnew line\r\\N \\ back\\slash \\. 𝄞 ü"
    records = [
        make_record(1, result_text=odd, error_message="\\N", cached=True, provider=None),
        make_record(2, result_text="", purpose="p\t\\", upstream_cost_usd=Decimal("1e-12")),
        make_record(3, result_text=None, cached=False, saved_cost_usd=Decimal("1234.5")),
    ]
    recorder = recorder_for(database_url, tmp_path / "spool")
    for record in records:
        recorder.record(record)
    assert recorder.flush(timeout=30)
    assert recorder.stats()["rejected"] == 0
    with sessions_for(database_url)() as session:
        rows = {r.request_id: r for r in session.scalars(select(InferenceCall))}
    for record in records:
        row = rows[record.request_id]
        assert {name: getattr(row, name) for name in record.values()} == record.values()
    recorder.close()


@EVERY_DATABASE
def test_an_error_that_is_not_the_database_s_is_reported_as_such_not_spooled_forever(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The writer's COPY on a psycopg2 connection raised AttributeError, which was taken for
    # an outage: every call was spooled, and retried, forever, logged as a database failure.
    def broken_rollup(session: Any, records: Any) -> None:
        raise AttributeError("'cursor' object has no attribute 'copy'")

    rejected = tmp_path / "rejected.jsonl"
    writer = CallWriter(sessions_for(database_url), rollup=broken_rollup, rejected_path=rejected)
    writer.start()
    with caplog.at_level(logging.ERROR, logger="headspace_inference.calllog.recorder"):
        for seq in range(1, 4):
            writer.submit(seq, make_record(seq))
        assert writer.flush(timeout=30)
    assert writer.stop(timeout=30)
    stats = writer.stats()
    assert stats["state"] == "ok" and stats["pending"] == 0 and stats["rejected"] == 3
    assert stats["last_error"] == "AttributeError: 'cursor' object has no attribute 'copy'"
    assert len(rejected.read_text().splitlines()) == 3  # kept, not lost
    assert count_rows(database_url) == 0
    messages = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(messages) == 3
    assert all("not a database error" in r.getMessage() for r in messages)
    assert all(r.exc_info and r.exc_info[0] is AttributeError for r in messages)
    assert not any("database write failed" in r.getMessage() for r in caplog.records)


def test_a_failure_around_the_insert_that_is_not_the_database_s_says_so(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Outside a row's insert (here the journal's sync) the batch waits and is tried again,
    # but the log names the error as what it is, with its traceback, once.
    database = standalone_database(DatabaseSettings(url=sqlite_url))
    database.upgrade()
    database.dispose()
    failures = [RuntimeError("journal sync broke"), RuntimeError("journal sync broke")]

    def before_write() -> None:
        if failures:
            raise failures.pop()

    writer = CallWriter(
        sessions_for(sqlite_url),
        rollup=apply_rollup,
        rejected_path=tmp_path / "rejected.jsonl",
        before_write=before_write,
        backoff_seconds=(0.01, 0.01),
    )
    writer.start()
    with caplog.at_level(logging.ERROR, logger="headspace_inference.calllog.recorder"):
        writer.submit(1, make_record(1))
        assert writer.flush(timeout=30)
    assert writer.stop(timeout=30)
    assert count_rows(sqlite_url) == 1
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "RuntimeError: journal sync broke, not a database error" in logged.getMessage()
    assert logged.exc_info and logged.exc_info[0] is RuntimeError
    assert writer.stats()["write_failures"] == 2


def test_outage_spools_then_catches_up_in_order(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from headspace_inference.settings import DatabaseSettings

    database = standalone_database(DatabaseSettings(url=sqlite_url))
    database.upgrade()
    database.dispose()  # checkpoints the WAL into the file we are about to move
    db_file = Path(sqlite_url.removeprefix("sqlite:///"))
    recorder = recorder_for(sqlite_url, tmp_path / "spool")
    # The database goes away: the path now holds an empty database without our tables.
    moved = tmp_path / "moved.db"
    shutil.move(db_file, moved)
    with caplog.at_level(logging.INFO, logger="headspace_inference.calllog.recorder"):
        records = [make_record(i) for i in range(30)]
        for record in records:
            recorder.record(record)
        assert not recorder.flush(timeout=1.0)
        stats = recorder.stats()
        assert stats["state"] == "spooling"
        assert stats["pending"] == 30
        assert stats["write_failures"] >= 1
        assert stats["oldest_pending"] == records[0].timestamp.isoformat()
        assert stats["spool_bytes"] > 0
        assert "no such table" in stats["last_error"]
        # Back again.
        for leftover in ("", "-wal", "-shm"):
            Path(f"{db_file}{leftover}").unlink(missing_ok=True)
        shutil.move(moved, db_file)
        assert recorder.flush(timeout=30)
    assert recorder.stats()["state"] == "ok"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    infos = [r for r in caplog.records if "every spooled call is written" in r.getMessage()]
    assert len(errors) == 1 and "spooling" in errors[0].getMessage()
    assert len(infos) == 1
    with sessions_for(sqlite_url)() as session:
        ids = list(session.scalars(select(InferenceCall.request_id).order_by(InferenceCall.id)))
    assert ids == [r.request_id for r in records]
    recorder.close()


@EVERY_DATABASE
def test_journal_of_a_dead_process_is_replayed_once(database_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    recorder = recorder_for(database_url, spool)
    written = [make_record(i) for i in range(10)]
    for record in written:
        recorder.record(record)
    assert recorder.flush(timeout=30)
    # A crash leaves a journal behind whose records are partly written already (killed
    # between a commit and emptying the journal).
    (journal,) = spool.glob("calls-*.jsonl")
    assert journal.stat().st_size == 0  # all written: nothing kept
    crashed = spool / "calls-99999-crashed.jsonl"
    crashed.write_text("".join(record.to_json() + "\n" for record in written))
    unwritten = [make_record(100 + i) for i in range(5)]
    with crashed.open("a") as fh:
        for record in unwritten:
            fh.write(record.to_json() + "\n")
        fh.write('{"request_id": "torn')  # the crash cut the last line short
    recorder.close()

    again = recorder_for(database_url, spool)
    assert again.flush(timeout=30)
    assert count_rows(database_url) == 15
    assert rollup_calls(database_url) == 15
    assert again.stats()["replayed"] == 15
    assert not crashed.exists()
    again.close()


def test_a_journal_locked_by_a_live_recorder_is_not_replayed(
    database_url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    sick = recorder_for("sqlite:////nonexistent-dir/x.db", spool)
    sick.record(make_record(1))
    healthy = recorder_for(database_url, spool)
    assert healthy.flush(timeout=10)
    assert count_rows(database_url) == 0
    healthy.close()
    sick.close(timeout=0.5)


@EVERY_DATABASE
def test_a_link_deleted_after_validation_is_recorded_without_it(
    database_url: str, tmp_path: Path
) -> None:
    with sessions_for(database_url)() as session:
        session.execute(
            text("INSERT INTO projects (id, name, created_at) VALUES (7, 'p', :t)"),
            {"t": datetime(2026, 1, 1)},
        )
        session.commit()
    recorder = recorder_for(database_url, tmp_path / "spool")
    recorder.record(make_record(1, project_id=7))
    recorder.record(make_record(2, project_id=8))  # deleted (never existed) by write time
    assert recorder.flush(timeout=30)
    with sessions_for(database_url)() as session:
        links = sorted(
            (r.input_tokens, r.project_id) for r in session.scalars(select(InferenceCall))
        )
    assert links == [(11, 7), (12, None)]
    recorder.close()


def test_a_record_after_close_is_journalled_for_the_next_start(
    database_url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    recorder = recorder_for(database_url, spool)
    recorder.close()
    recorder.record(make_record(1))
    assert count_rows(database_url) == 0
    again = recorder_for(database_url, spool)
    assert again.flush(timeout=30)
    assert count_rows(database_url) == 1
    again.close()


def test_record_roundtrips_through_json() -> None:
    record = make_record(3, upstream_cost_usd=Decimal("0.1"), project_id=2, cached=True)
    assert CallRecord.from_json(record.to_json()) == record


def reap(pid: int, seconds: float = 30.0) -> int:
    """The exit status of a forked child; kills it and fails if it does not end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child never exited")


def test_a_forked_child_closing_its_copy_leaves_the_parents_journal(
    database_url: str, tmp_path: Path
) -> None:
    # gunicorn workers, and any fork of a process running the service, inherit the
    # recorder and the app's exit hook. The child's close must not delete the journal the
    # parent is still writing to, or the parent's next records survive no crash.
    spool = tmp_path / "spool"
    recorder = recorder_for(database_url, spool)
    recorder.record(make_record(0))
    assert recorder.flush(timeout=30)
    journals = sorted(spool.glob("calls-*.jsonl"))
    assert journals
    pid = os.fork()
    if pid == 0:  # the child: close its copy, as an exit hook would, and leave
        try:
            recorder.close(timeout=0.1)
        finally:
            os._exit(0)
    assert reap(pid) == 0
    assert [p for p in journals if not p.exists()] == []
    recorder.record(make_record(1))
    assert recorder.close(timeout=30)
    assert count_rows(database_url) == 2


@EVERY_DATABASE
def test_a_row_the_driver_cannot_bind_is_rejected_not_retried_forever(
    database_url: str, tmp_path: Path
) -> None:
    # A cost past NUMERIC(20, 12) on PostgreSQL, past SQLite's 64-bit picodollars in the
    # rollup: the first is a DataError, the second an OverflowError from the driver's
    # binding, which the writer took for an outage and retried, blocking every row behind.
    spool = tmp_path / "spool"
    recorder = recorder_for(database_url, spool)
    good = [make_record(i) for i in range(3)]
    recorder.record(good[0])
    recorder.record(make_record(9, cost_usd=Decimal("1e30")))
    recorder.record(good[1])
    recorder.record(good[2])
    assert recorder.flush(timeout=30)
    assert count_rows(database_url) == 3
    assert recorder.stats()["state"] == "ok"
    rejected = (spool / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1 and "1E+30" in rejected[0].upper()
    recorder.close()


# --------------------------------------------------------------------------- outages


def started_writer(url: str, tmp_path: Path, *, backoff: tuple[float, float]) -> CallWriter:
    """A running writer on ``url`` with its backoff between tries bounded by ``backoff``."""
    rejected = tmp_path / "rejected.jsonl"
    writer = CallWriter(
        sessions_for(url), rollup=apply_rollup, rejected_path=rejected, backoff_seconds=backoff
    )
    writer.start()
    return writer


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a deadline, not a speed test)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_records_arriving_during_an_outage_do_not_cut_the_backoff_short(
    postgres_proxy: tuple[TcpProxy, str], migrated_postgres_url: str, tmp_path: Path
) -> None:
    # A record used to wake the writer out of its backoff, so a steady trickle of calls
    # during an outage made it retry without pause: 16,486 connection attempts and 7.7 s of
    # CPU in ten seconds. With a backoff far longer than the test, the writer tries once.
    proxy, url = postgres_proxy
    writer = started_writer(url, tmp_path, backoff=(600.0, 600.0))
    try:
        proxy.cut()
        writer.submit(1, make_record(0))
        assert wait_for(lambda: writer.stats()["write_failures"] >= 1)
        for seq in range(2, 302):
            writer.submit(seq, make_record(seq))
            if seq % 50 == 0:
                time.sleep(0.05)  # arrivals spread out, each wakes the writer
        writer.submit(302, make_record(302))
        failures = writer.stats()["write_failures"]
        connections = proxy.refused
        proxy.restore()
        # flush() does cut a backoff short: the database is back and everything lands.
        assert writer.flush(timeout=30), writer.stats()
    finally:
        assert writer.stop(timeout=30)
    assert failures == 1
    assert connections == 1
    assert count_rows(migrated_postgres_url) == 302
    assert writer.stats()["state"] == "ok"


@BOTH_DRIVERS
def test_the_writer_retries_on_its_own_and_stop_cuts_its_backoff_short(
    postgres_proxy: tuple[TcpProxy, str], migrated_postgres_url: str, tmp_path: Path
) -> None:
    proxy, url = postgres_proxy
    writer = started_writer(url, tmp_path, backoff=(0.01, 0.05))
    proxy.cut()
    writer.submit(1, make_record(1))
    assert wait_for(lambda: writer.stats()["write_failures"] >= 3)
    proxy.restore()
    # No flush: the backoff ends by itself and the writer catches up.
    assert wait_for(lambda: writer.stats()["written"] == 1)
    assert writer.stop(timeout=30)

    # During a long backoff, stop() wakes the writer, which makes its last try and ends.
    patient = started_writer(url, tmp_path, backoff=(600.0, 600.0))
    proxy.cut()
    patient.submit(2, make_record(2))
    assert wait_for(lambda: patient.stats()["write_failures"] >= 1)
    assert patient.stop(timeout=30)
    assert patient.stats()["pending"] == 1
    assert count_rows(migrated_postgres_url) == 1


def test_a_recorder_backs_off_during_an_outage_while_calls_keep_arriving(
    postgres_proxy: tuple[TcpProxy, str], migrated_postgres_url: str, tmp_path: Path
) -> None:
    # The default backoff (0.2 s doubling to 5 s), through the public API: the attempts
    # stay a handful however many calls arrive, and everything lands after the outage.
    proxy, url = postgres_proxy
    recorder = recorder_for(url, tmp_path / "spool")
    try:
        proxy.cut()
        started = time.monotonic()
        for i in range(60):
            recorder.record(make_record(i))
            time.sleep(0.025)
        elapsed = time.monotonic() - started
        failures = recorder.stats()["write_failures"]
        proxy.restore()
        assert recorder.flush(timeout=30)
    finally:
        recorder.close(timeout=5)
    assert 1 <= failures <= 5 + 2 * elapsed  # about five tries in 1.5 s; thousands before
    assert count_rows(migrated_postgres_url) == 60


def test_the_spool_keeps_nothing_once_every_row_is_written(
    database_url: str, tmp_path: Path
) -> None:
    # 500 calls with 200 KB answers: pending 0, yet 100 MB stayed in the spool.
    spool = tmp_path / "spool"
    recorder = recorder_for(database_url, spool)
    for i in range(100):
        recorder.record(make_record(i, result_text="r" * 200_000))
    assert recorder.flush(timeout=60)
    on_disk = sum(p.stat().st_size for p in spool.glob("calls-*.jsonl"))
    assert recorder.stats()["spool_bytes"] == 0
    assert on_disk == 0
    assert count_rows(database_url) == 100
    recorder.close()


def test_every_file_that_can_hold_call_data_is_private(database_url: str, tmp_path: Path) -> None:
    # rejected.jsonl was created 0644 (0666 less the umask) while the journals were 0600.
    spool = tmp_path / "spool"
    old_umask = os.umask(0)  # so that only the code's own modes count
    try:
        recorder = recorder_for(database_url, spool)
        recorder.record(make_record(1, cost_usd=Decimal("1e30")))  # refused: rejected.jsonl
        assert recorder.flush(timeout=30)
        recorder.record(make_record(2))
        modes = {p.name: p.stat().st_mode & 0o777 for p in spool.iterdir()}
        recorder.close()
        recorder.record(make_record(3))  # after close: a journal of its own
        modes.update({p.name: p.stat().st_mode & 0o777 for p in spool.iterdir()})
        # A rejected.jsonl left readable by an older version is made private when written.
        (spool / "rejected.jsonl").chmod(0o644)
        again = recorder_for(database_url, spool)
        again.record(make_record(4, cost_usd=Decimal("1e30")))
        assert again.flush(timeout=30)
        again.close()
    finally:
        os.umask(old_umask)
    assert "rejected.jsonl" in modes
    assert len([name for name in modes if name.startswith("calls-")]) >= 2
    assert set(modes.values()) == {0o600}
    assert (spool / "rejected.jsonl").stat().st_mode & 0o777 == 0o600
    assert len((spool / "rejected.jsonl").read_text().splitlines()) == 2


# --------------------------------------------------------------------------- health


def proxied_recorder(url: str, spool: Path, clock: FakeClock, **kw: Any) -> CallRecorder:
    return CallRecorder(
        sessions_for(url), spool, rollup=apply_rollup, batch_size=50, clock=clock, **kw
    ).start()


def test_health_reports_an_unreachable_database_before_any_write(
    postgres_proxy: tuple[TcpProxy, str], tmp_path: Path, fake_clock: FakeClock
) -> None:
    # /status said "healthy" with the database unreachable until a write failed.
    proxy, url = postgres_proxy
    recorder = proxied_recorder(url, tmp_path / "spool", fake_clock)
    try:
        assert recorder.health() is None
        proxy.cut()
        assert recorder.health() is None  # the answer is cached for a few seconds
        fake_clock.advance(5.0)
        reason = recorder.health()
        assert reason is not None and reason.startswith("database unreachable: OperationalError")
        assert "\n" not in reason
        stats = recorder.stats()
        assert (stats["written"], stats["write_failures"], stats["state"]) == (0, 0, "ok")
        proxy.restore()
        assert recorder.health() == reason  # still cached
        fake_clock.advance(5.0)
        assert recorder.health() is None
    finally:
        recorder.close(timeout=5)
    assert recorder.health() == "call log stopped"


def test_health_says_spooling_with_the_last_write_error(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    recorder = proxied_recorder("sqlite:////nonexistent-dir/x.db", tmp_path / "spool", fake_clock)
    reason = recorder.health()
    assert reason is not None and "unable to open database file" in reason
    recorder.record(make_record(1))
    assert not recorder.flush(timeout=0.5)
    assert recorder.health() == f"call log spooling: {recorder.stats()['last_error']}"
    recorder.close(timeout=0.5)


def test_health_runs_one_probe_for_many_concurrent_callers(
    postgres_proxy: tuple[TcpProxy, str], tmp_path: Path, fake_clock: FakeClock
) -> None:
    proxy, url = postgres_proxy
    # A generous wait for the probe, so a loaded machine cannot turn it into "no answer".
    recorder = proxied_recorder(url, tmp_path / "spool", fake_clock, probe_timeout=30.0)
    try:
        before = proxy.accepted  # each probe opens one connection (no pool here)
        barrier = threading.Barrier(16)
        answers: list[str | None] = []

        def ask() -> None:
            barrier.wait()
            answers.append(recorder.health())

        threads = [threading.Thread(target=ask) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [None] * 16
        assert proxy.accepted - before == 1
    finally:
        recorder.close(timeout=5)


def test_health_never_holds_a_caller_on_a_database_that_does_not_answer(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    # A server that accepts connections and never says a word: the driver would wait its
    # whole connect timeout (130 s by default). The caller gets an answer after 0.2 s.
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = silent.getsockname()[1]
    recorder = proxied_recorder(
        f"postgresql://postgres@127.0.0.1:{port}/x", tmp_path / "spool", fake_clock,
        probe_timeout=0.2,
    )  # fmt: skip
    try:
        assert recorder.health() == "database unreachable: no answer within 0.2 s"
        fake_clock.advance(60.0)
        # The probe is still hanging: callers get that answer, and no second probe starts.
        assert recorder.health() == "database unreachable: no answer within 0.2 s"
        assert wait_for(lambda: len(held) >= 1)
        assert len(held) == 1
    finally:
        silent.close()
        for conn in held:
            conn.close()  # the hanging probe fails now and ends
        recorder.close(timeout=0.5)


def test_an_error_without_a_message_does_not_end_the_writer(
    database_url: str, tmp_path: Path
) -> None:
    # Describing the error indexed the first line of its message: an exception with none
    # (TimeoutError()) raised IndexError in the writer's error handling and ended the
    # writer thread, so nothing was written again until a restart.
    failures = [TimeoutError()]

    def rollup_failing_once(session: Any, records: Any) -> None:
        if failures:
            raise failures.pop()
        apply_rollup(session, records)

    writer = CallWriter(
        sessions_for(database_url),
        rollup=rollup_failing_once,
        rejected_path=tmp_path / "rejected.jsonl",
        backoff_seconds=(0.01, 0.01),
    )
    writer.start()
    writer.submit(1, make_record(1))
    assert writer.flush(timeout=30)
    assert writer.stop(timeout=30)
    assert writer.stats()["last_error"] == "TimeoutError"
    assert count_rows(database_url) == 1
