"""Under ``headspace-inference serve``, clients that stop reading or never finish their
request hold no thread for long: an event stream whose client does not read is dropped
within seconds of its socket filling (its thread and stream slot given back), and a
connection that sends part of a request waits for the rest off the request threads, for a
bounded time. /status keeps answering with more such clients than a worker has threads.
(tests/served.py: the clients, and calls published as another process's are.)"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from tests.served import (
    Publisher,
    half_sent,
    reading_stream_gets_a_call,
    serving,
    status_answers,
    stuck_stream,
)

from headspace_inference.standalone.server import HEAD_SECONDS, SOCKET_SECONDS

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# A worker's request threads (serve's default --threads) and open streams (the app's).
THREADS = 8
STREAMS = 4


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
                    assert status_answers(served.base), "/status stopped answering"
            # The streams' blocked writes time out: their threads and slots come back, and a
            # reading client gets a stream and every call published.
            deadline = time.monotonic() + SOCKET_SECONDS + 30
            while served.log_text().count("the client neither read nor sent") < STREAMS:
                assert time.monotonic() < deadline, served.log_text()[-3000:]
                time.sleep(0.5)
            while not reading_stream_gets_a_call(served.base, publisher):
                assert time.monotonic() < deadline, "no stream slot came back"
                time.sleep(0.5)
            assert status_answers(served.base)
        finally:
            for sock in stuck:
                sock.close()


def test_half_sent_requests_hold_no_thread_and_are_refused_in_time(
    migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    with serving(tmp_path, emulator, migrated_postgres_url, "--workers", "1") as served:
        waiting = [half_sent(served.port) for _ in range(2 * THREADS)]
        try:
            started = time.monotonic()
            assert status_answers(served.base), "/status stopped answering"
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
