"""The shipped nginx setup (examples/deploy/nginx.conf) run by Debian's real nginx in front
of the real ``headspace-inference serve`` (2 workers): half-sent requests and clients that
stop reading the live feed cost the server nothing that /status or a reading stream needs.

nginx runs in the foreground (not as a daemon), from a temporary prefix, on a loopback port,
with the shipped file included as it is but for its two addresses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.console.sse import SseReader
from tests.served import (
    Publisher,
    free_port,
    half_sent,
    reading_stream_gets_a_call,
    serving,
    status_answers,
    stuck_stream,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

NGINX = "/usr/sbin/nginx"
SHIPPED = Path(__file__).resolve().parents[2] / "examples" / "deploy" / "nginx.conf"
# The addresses the shipped file names, replaced by the test's own.
UPSTREAM = "server 127.0.0.1:5000;"
LISTEN = "listen 8080;"


@pytest.fixture
def nginx_binary() -> str:
    if not Path(NGINX).exists():
        # CI installs it (.ci/run) and sets REQUIRE_NGINX, so there it fails, never skips.
        message = f"{NGINX} is missing: apt-get install -y nginx (.ci/run does)"
        if os.environ.get("REQUIRE_NGINX"):
            pytest.fail(message)
        pytest.skip(message)
    return NGINX


@contextmanager
def nginx_in_front(binary: str, tmp_path: Path, upstream_port: int) -> Iterator[str]:
    """nginx with the shipped server block, proxying to ``upstream_port``; its base URL."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    shipped = SHIPPED.read_text()
    assert shipped.count(UPSTREAM) == 1 and shipped.count(LISTEN) == 1
    port = free_port()
    site = shipped.replace(UPSTREAM, f"server 127.0.0.1:{upstream_port};").replace(
        LISTEN, f"listen 127.0.0.1:{port};"
    )
    (prefix / "site.conf").write_text(site)
    temps = " ".join(
        f"{kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                          "uwsgi", "scgi")
    )  # fmt: skip
    user = "user root;" if os.geteuid() == 0 else ""  # else its workers could not reach tmp
    (prefix / "nginx.conf").write_text(
        f"{user} daemon off; worker_processes 1; pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log {prefix / 'access.log'}; {temps}\n"
        f"  include {prefix / 'site.conf'}; }}\n"
    )
    command = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
               "-c", str(prefix / "nginx.conf")]  # fmt: skip
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (prefix / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: open streams are cut
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_nginx_in_front_takes_the_slow_clients(
    nginx_binary: str,
    migrated_postgres_url: str,
    emulator: Any,
    tmp_path: Path,
    publisher: Publisher,
) -> None:
    with (
        serving(tmp_path, emulator, migrated_postgres_url, "--workers", "2") as served,
        nginx_in_front(nginx_binary, tmp_path, served.port) as base,
        httpx.Client(timeout=30) as client,
        client.stream("GET", f"{base}/api/inference/events") as live,
    ):
        # A stream through nginx, read as it comes.
        assert live.status_code == 200
        reader = SseReader(live.iter_text())
        reader.wait_for(lambda e: any(c.endswith(" feed") for c in e.comments))
        port = int(base.rsplit(":", 1)[1])
        # 24 half-sent requests (more than both workers' 16 threads), and 8 clients that
        # open the feed and never read (as many as the two workers' stream slots).
        waiting = [half_sent(port) for _ in range(24)]
        stuck = [stuck_stream(port) for _ in range(8)]
        try:
            ids: list[str] = []
            for _ in range(25):
                ids = publisher.calls(200)
                assert status_answers(base), "/status through nginx stopped answering"
            # The reading stream got every call, the last one included.
            reader.wait_for(
                lambda e: e.event == "inference_call" and e.call()["call_id"] == ids[-1],
                seconds=60,
            )
            # The non-reading clients were dropped (nginx's send_timeout, the server's
            # socket timeout): their slots came back, and a new stream gets its calls.
            deadline = time.monotonic() + 60
            while not reading_stream_gets_a_call(base, publisher):
                assert time.monotonic() < deadline, "no stream slot came back"
                time.sleep(0.5)
            # nginx closed each half-sent request at its client_header_timeout (10 s).
            for sock in waiting:
                sock.settimeout(30)
                assert sock.recv(4096) == b""  # closed, unanswered
        finally:
            for sock in waiting + stuck:
                sock.close()
