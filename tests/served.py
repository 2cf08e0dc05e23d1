"""The real ``headspace-inference serve`` in a subprocess, for tests of what it does on the
wire: started with a configuration in its environment, waited for, stopped with SIGTERM.
Its output goes to a file (a pipe nobody reads would fill and stop the server).

Also the clients those tests play (one that stops reading a stream, one that sends half a
request) and a publisher of calls: rows committed to the PostgreSQL call log the server
shares, then ``pg_notify``, as another process's calls reach its streams (the ``publisher``
fixture: a plugin of tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from headspace_inference.operate.feed import PostgresTransport
from headspace_inference.settings import DatabaseSettings
from headspace_inference.standalone.database import standalone_database
from tests.call_rows import make_record, write
from tests.console.sse import SseReader

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running server: its base URL, port and log file."""

    base: str
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(
    tmp_path: Path, emulator: Any, database_url: str, *args: str, **env: str
) -> Iterator[Served]:
    """``headspace-inference serve --port <free> *args`` on ``database_url``, until the block
    ends; ``env`` adds variables (a HEADSPACE__... setting, say)."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE")}
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environ |= {"HEADSPACE__OPENROUTER__BASE_URL": emulator.base_url,
                "OPENROUTER_API_KEY": "sk-or-served", "DATABASE_URL": database_url,
                "HEADSPACE__INFERENCE__SPOOL_PATH": str(tmp_path / "served-spool"),
                "HEADSPACE__OPENROUTER__PRICING_FILE": str(tmp_path / "pricing.json"),
                **env}  # fmt: skip
    log = tmp_path / f"serve-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "headspace-inference"), "serve", "--port", str(port), *args],
            cwd=tmp_path, env=environ, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{served.base}/api/inference/status", timeout=10)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(
                        f"the server never answered:\n{served.log_text()[-3000:]}"
                    ) from None
                time.sleep(0.2)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stuck_stream(port: int, path: str = "/api/inference/events") -> socket.socket:
    """A client that opens the event stream with a tiny receive buffer and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def half_sent(port: int) -> socket.socket:
    """A client that sends part of a request line and waits."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /api/inference/sta")
    return sock


class Publisher:
    """Commits call rows to the shared PostgreSQL call log and notifies the listeners."""

    def __init__(self, url: str) -> None:
        self.database = standalone_database(DatabaseSettings(url=url))
        self.transport = PostgresTransport(self.database)
        self.sent = 0

    def calls(self, n: int) -> list[str]:
        """Commit and announce ``n`` calls (each event about 700 bytes); their call ids."""
        records = [make_record(self.sent + i, purpose="p" * 200) for i in range(n)]
        self.sent += n
        write(self.database.sessions, records, 200)
        ids = [r.request_id for r in records]
        self.transport.publish(ids)
        return ids

    def close(self) -> None:
        self.database.dispose()


@pytest.fixture
def publisher(migrated_postgres_url: str) -> Iterator[Publisher]:
    """A Publisher on the test's migrated PostgreSQL database, disposed after the test."""
    made = Publisher(migrated_postgres_url)
    yield made
    made.close()


def status_answers(base: str, seconds: float = 30.0) -> bool:
    """Whether GET /status answers within ``seconds`` (a bound, not a speed)."""
    try:
        return httpx.get(f"{base}/api/inference/status", timeout=seconds).is_success
    except httpx.TimeoutException:
        return False


def reading_stream_gets_a_call(base: str, publisher: Publisher) -> bool:
    """Whether a reading client gets a stream (not a 503) and the next call on it."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", f"{base}/api/inference/events") as response,
    ):
        if response.status_code == 503:
            return False
        assert response.status_code == 200
        reader = SseReader(response.iter_text())
        reader.wait_for(lambda e: any(c.endswith(" feed") for c in e.comments))
        (wanted,) = publisher.calls(1)
        reader.wait_for(lambda e: e.event == "inference_call" and e.call()["call_id"] == wanted)
        return True
