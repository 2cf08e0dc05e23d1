"""Call-log faults injected for real, with their figures (RELIABILITY.md collects them).

Each test prints one line `FAULT <name>: ...`. Run them with
`SLOW=1 TEST_DATABASE_URL=... .venv/bin/pytest -s tests/faults/test_call_log_faults.py`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from headspace_inference.calllog.record import CallRecord
from headspace_inference.calllog.recorder import CallRecorder
from headspace_inference.calllog.rollup import apply_rollup
from headspace_inference.settings import normalise_url
from tests.call_rows import make_record
from tests.tcp_proxy import TcpProxy


def report(name: str, **figures: Any) -> None:
    print(f"\nFAULT {name}: " + json.dumps(figures), flush=True)


def a_record(i: int, answer: str = "an answer") -> CallRecord:
    return make_record(i, purpose="call-log fault", result_text=answer)


def count_rows(url: str) -> int:
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    with engine.connect() as conn:
        value = conn.execute(text("SELECT count(*) FROM inference_calls")).scalar()
    engine.dispose()
    return int(value or 0)


def thread_cpu_seconds(thread: threading.Thread) -> float:
    """User + system CPU time a thread of this process has used (Linux)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def writer_thread() -> threading.Thread:
    (thread,) = [t for t in threading.enumerate() if t.name == "call-log-writer"]
    return thread


@pytest.mark.slow
def test_database_outage_with_calls_arriving_for_ten_seconds(
    migrated_postgres_url: str, tmp_path: Path
) -> None:
    url = make_url(normalise_url(migrated_postgres_url))
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port)
    engine = create_engine(proxied, poolclass=NullPool)
    recorder = CallRecorder(
        sessionmaker(engine, expire_on_commit=False), tmp_path / "spool", rollup=apply_rollup
    ).start()
    try:
        writer = writer_thread()
        proxy.cut()
        refused_before = proxy.refused
        cpu_before = thread_cpu_seconds(writer)
        process_before = time.process_time()
        started = time.monotonic()
        for i in range(10):  # one call a second for ten seconds
            recorder.record(a_record(i))
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        during = recorder.stats()
        writer_cpu = thread_cpu_seconds(writer) - cpu_before
        process_cpu = time.process_time() - process_before
        connections = proxy.refused - refused_before
        proxy.restore()
        assert recorder.flush(timeout=30), recorder.stats()
    finally:
        recorder.close(timeout=5)
        proxy.close()
        engine.dispose()
    rows = count_rows(migrated_postgres_url)
    report("database outage, calls arriving", seconds=round(elapsed, 1), calls=10,
           write_attempts=during["write_failures"], connection_attempts=connections,
           writer_cpu_seconds=round(writer_cpu, 3), process_cpu_seconds=round(process_cpu, 3),
           rows_after_restore=rows, lost=10 - rows)  # fmt: skip
    # Backoff from 0.2 s doubling to 5 s: about seven tries in ten seconds.
    assert during["write_failures"] <= 2 * elapsed + 5
    assert writer_cpu <= 0.1 * elapsed
    assert rows == 10


@pytest.mark.slow
def test_spool_after_500_calls_with_200_kb_answers(
    migrated_postgres_url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    engine = create_engine(normalise_url(migrated_postgres_url), poolclass=NullPool)
    recorder = CallRecorder(
        sessionmaker(engine, expire_on_commit=False), spool, rollup=apply_rollup
    ).start()
    answer = "x" * 200_000
    try:
        for i in range(500):
            recorder.record(a_record(i, answer))
        assert recorder.flush(timeout=120)
        stats = recorder.stats()
        on_disk = sum(p.stat().st_size for p in spool.iterdir())
    finally:
        recorder.close(timeout=30)
        engine.dispose()
    rows = count_rows(migrated_postgres_url)
    report("spool after 500 x 200 KB", pending=stats["pending"], spool_bytes=stats["spool_bytes"],
           bytes_on_disk=on_disk, rows=rows)  # fmt: skip
    assert rows == 500
    assert on_disk <= 200_000  # nothing written is kept
