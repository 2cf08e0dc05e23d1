"""Under `headspace-inference serve`, the requests gunicorn refuses before the app sees them are
answered in the API's JSON error shape too, not gunicorn's HTML page."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path, emulator: Any) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE")}
    env |= {"HEADSPACE__OPENROUTER__BASE_URL": emulator.base_url,
            "OPENROUTER_API_KEY": "sk-or-serve-errors",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'served.db'}"}  # fmt: skip
    proc = subprocess.Popen(
        [str(BIN / "headspace-inference"), "serve", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{base}/api/inference/status", timeout=10)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            proc.kill()
            raise AssertionError(f"the server never answered:\n{proc.communicate()[1][-3000:]}")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_gunicorns_own_refusals_are_json(served: str) -> None:
    # gunicorn refuses a request line over 4094 bytes (at most 8190, whatever it is told).
    long_line = httpx.get(f"{served}/api/inference/usage?model={'m' * 5000}", timeout=10)
    too_many_headers = httpx.get(
        f"{served}/api/inference/status", headers={f"x-h{i}": "v" for i in range(120)}, timeout=10
    )
    for answer, status in ((long_line, 400), (too_many_headers, 431)):
        assert answer.status_code == status
        assert answer.headers["content-type"] == "application/json"
        body = answer.json()
        assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    assert "Request Line is too large" in long_line.json()["error"]
    # The app's own answers are untouched, and the worker still serves.
    missing = httpx.get(f"{served}/api/no-such-thing", timeout=10)
    assert missing.status_code == 404 and missing.json()["status"] == 404
    assert httpx.get(f"{served}/api/inference/status", timeout=10).json()["state"] == "healthy"
