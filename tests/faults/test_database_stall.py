"""PostgreSQL stalled behind the TCP proxy (its connections held open, nothing forwarded,
nothing reset: what a hung server or a silent peer looks like): every read a request makes
(a stream's resume included) answers 503 within ``database.read_timeout_seconds``, on
psycopg 3 and psycopg2, and reads work again once the stall ends.

Prints one `FAULT ...` line, like tests/faults/test_faults.py, for RELIABILITY.md.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from headspace_inference import create_app
from tests.drivers import BOTH_DRIVERS
from tests.tcp_proxy import TcpProxy

READ_TIMEOUT = 1.0
# Generous: a thread to start, the answer to build, a loaded machine. The property is the
# bound; without it a read waits for the whole stall.
SLACK = 4.0
# The proxy resumes by itself after this, so that an unbounded read ends (and fails the
# test) rather than hanging it.
STALL_LIMIT = 20.0
PATHS = (
    "/api/inference/usage",
    "/api/inference/usage?project_id=1",
    "/api/inference/calls",
    "/api/inference/calls/1",
    "/api/inference/usage/daily",
)
# A stream resuming after a row id replays the rows after it before going live.
RESUME = {"Last-Event-ID": "0"}
EVENTS = "/api/inference/events"


@pytest.mark.slow
@BOTH_DRIVERS
def test_a_stalled_database_is_a_503_within_the_read_timeout(
    postgres_proxy: tuple[TcpProxy, str], emulator: Any, tmp_path: Path, pg_driver: str
) -> None:
    proxy, url = postgres_proxy
    app = create_app(
        overrides={
            "database": {"url": url, "read_timeout_seconds": READ_TIMEOUT},
            "openrouter": {"base_url": emulator.base_url, "api_key": "sk-or-stall"},
            "inference": {"spool_path": str(tmp_path / "spool")},
        }
    )
    client = app.test_client()
    timer = threading.Timer(STALL_LIMIT, proxy.resume)
    try:
        for path in PATHS:  # started, and the pool holds connections that worked
            assert client.get(path).status_code in (200, 404)
        resumed = client.get(EVENTS, headers=RESUME)
        assert resumed.status_code == 200
        resumed.close()  # the stream given back
        proxy.stall()
        timer.start()
        answers: dict[str, tuple[int, float]] = {}
        for path in PATHS:
            started = time.monotonic()
            response = client.get(path)
            answers[path] = (response.status_code, round(time.monotonic() - started, 2))
            if response.status_code == 503:
                assert "no answer within 1 s" in response.json["error"]
        started = time.monotonic()
        resumed = client.get(EVENTS, headers=RESUME)
        answers[f"{EVENTS} (resumed)"] = (resumed.status_code, round(time.monotonic() - started, 2))
        resumed.close()
        timer.cancel()
        proxy.resume()
        print(
            f"\nFAULT database-stalled-{pg_driver}: "
            + json.dumps({"read_timeout_seconds": READ_TIMEOUT, "answers": answers}),
            flush=True,
        )
        for path, (status, took) in answers.items():
            assert status == 503, path
            assert took < READ_TIMEOUT + SLACK, (path, took)
        deadline = time.monotonic() + 30
        while client.get(PATHS[0]).status_code != 200:
            assert time.monotonic() < deadline, "reads did not come back after the stall"
            time.sleep(0.1)
    finally:
        timer.cancel()
        proxy.resume()
        app.extensions["inference"].close(timeout=5)


@pytest.mark.slow
@BOTH_DRIVERS
def test_status_with_budgets_answers_within_the_read_timeout_while_the_database_stalls(
    postgres_proxy: tuple[TcpProxy, str], emulator: Any, tmp_path: Path, pg_driver: str
) -> None:
    # The budgets are counted in the database: /status reads them, and asks whether the
    # database answers, each within the read bound.
    proxy, url = postgres_proxy
    app = create_app(
        overrides={
            "database": {"url": url, "read_timeout_seconds": READ_TIMEOUT},
            "openrouter": {"base_url": emulator.base_url, "api_key": "sk-or-stall",
                           "budgets": [{"window": "day", "cap_usd": 1}]},
            "inference": {"spool_path": str(tmp_path / "spool")},
            # The guard asks the database again right away, not after the default 5 s.
            "redis": {"retry_interval_seconds": 0.1},
        }
    )  # fmt: skip
    client = app.test_client()
    timer = threading.Timer(STALL_LIMIT, proxy.resume)
    try:
        assert app.extensions["inference"].infer("turn", "stall", "counted").text
        assert client.get("/api/inference/status").json["spend_guard"]["shared"]
        proxy.stall()
        timer.start()
        time.sleep(0.2)  # past the guard's retry interval: the next status asks the database
        started = time.monotonic()
        status = client.get("/api/inference/status")
        took = round(time.monotonic() - started, 2)
        timer.cancel()
        proxy.resume()
        figures = {"status": status.status_code, "seconds": took}
        print(f"\nFAULT status-with-budgets-stalled-{pg_driver}: {json.dumps(figures)}", flush=True)
        assert status.status_code == 200
        assert not status.json["spend_guard"]["shared"]
        assert took < 2 * READ_TIMEOUT + SLACK
    finally:
        timer.cancel()
        proxy.resume()
        app.extensions["inference"].close(timeout=5)
