"""Under ``headspace-inference serve``, clients that stop reading or never finish their
request hold no thread for long: an event stream whose client does not read is dropped
within seconds of its socket filling (its thread and stream slot given back), and a
connection that sends part of a request waits for the rest off the request threads, for a
bounded time. /status keeps answering with more such clients than a worker has threads.

Calls reach the server's streams the way another process's do: rows committed to the
PostgreSQL call log it shares, then ``pg_notify`` (the feed's own transport)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.call_rows import make_record, write
from tests.console.sse import SseReader
from tests.served import Served, serving

from headspace_inference.operate.feed import PostgresTransport
from headspace_inference.settings import DatabaseSettings
from headspace_inference.standalone.database import standalone_database
from headspace_inference.standalone.server import HEAD_SECONDS, SOCKET_SECONDS

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# A worker's request threads (serve's default --threads) and open streams (the app's).
THREADS = 8
STREAMS = 4


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
    made = Publisher(migrated_postgres_url)
    yield made
    made.close()


def status_answers(served: Served, seconds: float = 30.0) -> bool:
    """Whether GET /status answers within ``seconds`` (a bound, not a speed)."""
    try:
        return httpx.get(f"{served.base}/api/inference/status", timeout=seconds).is_success
    except httpx.TimeoutException:
        return False


def test_streams_whose_clients_stop_reading_give_their_threads_back(
    migrated_postgres_url: str, emulator: Any, tmp_path: Path, publisher: Publisher
) -> None:
    with serving(tmp_path, emulator, migrated_postgres_url, "--workers", "1") as served:
        stuck: list[socket.socket] = []
        try:
            # Twice as many non-reading clients as the worker has threads, in two waves (as
            # tabs reconnecting would): each wave's sockets fill as calls are published (about
            # 2,400 calls fill a socket's buffers here), and the second wave opens after the
            # first one's streams have lost their slots.
            for _wave in range(2):
                stuck += [stuck_stream(served.port) for _ in range(THREADS)]
                for _ in range(20):
                    publisher.calls(200)
                    assert status_answers(served), "/status stopped answering"
            # The streams' blocked writes time out: their threads and slots come back, and a
            # reading client gets a stream and every call published.
            deadline = time.monotonic() + SOCKET_SECONDS + 30
            while served.log_text().count("the client neither read nor sent") < STREAMS:
                assert time.monotonic() < deadline, served.log_text()[-3000:]
                time.sleep(0.5)
            while not reading_stream_gets_a_call(served, publisher):
                assert time.monotonic() < deadline, "no stream slot came back"
                time.sleep(0.5)
            assert status_answers(served)
        finally:
            for sock in stuck:
                sock.close()


def reading_stream_gets_a_call(served: Served, publisher: Publisher) -> bool:
    """Whether a reading client gets a stream (not a 503) and the next call on it."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", f"{served.base}/api/inference/events") as response,
    ):
        if response.status_code == 503:
            return False
        assert response.status_code == 200
        reader = SseReader(response.iter_text())
        reader.wait_for(lambda e: any(c.endswith(" feed") for c in e.comments))
        (wanted,) = publisher.calls(1)
        reader.wait_for(lambda e: e.event == "inference_call" and e.call()["call_id"] == wanted)
        return True


def test_half_sent_requests_hold_no_thread_and_are_refused_in_time(
    migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    with serving(tmp_path, emulator, migrated_postgres_url, "--workers", "1") as served:
        waiting = [half_sent(served.port) for _ in range(2 * THREADS)]
        try:
            started = time.monotonic()
            assert status_answers(served), "/status stopped answering"
            # A trickle does not extend the wait: the head's deadline counts from the connection.
            for sock in waiting[:4]:
                sock.sendall(b"t")
            for sock in waiting:
                sock.settimeout(HEAD_SECONDS + 20)
                answer = sock.recv(4096)
                assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
                assert b'"status": 408' in answer
            assert time.monotonic() - started < HEAD_SECONDS + 10
        finally:
            for sock in waiting:
                sock.close()
