"""Shared pieces of the benchmarks: an out-of-process emulator, sampling and summaries."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
BENCH_KEY = "sk-or-bench"
HAIKU = "anthropic/claude-haiku-4.5"


@dataclass
class Summary:
    """Median and p99 of one measured operation, in microseconds."""

    name: str
    samples: int
    median_us: float
    p99_us: float
    mean_us: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "samples": self.samples,
            "median_us": round(self.median_us, 1),
            "p99_us": round(self.p99_us, 1),
            "mean_us": round(self.mean_us, 1),
        }


def summarise(name: str, seconds: list[float]) -> Summary:
    """Median, p99 and mean of the samples."""
    us = sorted(s * 1e6 for s in seconds)
    p99 = us[min(len(us) - 1, round(0.99 * (len(us) - 1)))]
    return Summary(name, len(us), statistics.median(us), p99, statistics.fmean(us))


def sample(fn: Callable[[int], Any], *, warmup: int, samples: int) -> list[float]:
    """Time ``fn(i)`` ``samples`` times after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(-1 - i)
    out = []
    clock = time.perf_counter
    for i in range(samples):
        start = clock()
        fn(i)
        out.append(clock() - start)
    return out


@contextlib.contextmanager
def emulator_process(latency_ms: int = 0) -> Iterator[str]:
    """An emulator in its own process (so it does not share our GIL); yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "headspace_inference.testing.emulator", "--port", "0",
         "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        url = line.split()[-1]
        if not url.startswith("http"):
            raise RuntimeError(f"emulator did not start: {line!r}")
        if not url.rstrip("/").endswith("/api/v1"):
            url = url.rstrip("/") + "/api/v1"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def chat_body(text: str, model: str = HAIKU) -> dict[str, Any]:
    """A chat-completion request body for ``text``."""
    return {"model": model, "messages": [{"role": "user", "content": text}]}


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from headspace_inference.settings import DatabaseSettings, normalise_url
    from headspace_inference.standalone.database import standalone_database

    base = make_url(normalise_url(PG_URL))
    name = f"hs_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        db = standalone_database(DatabaseSettings(url=url))
        db.upgrade()
        db.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
