"""Under `headspace-inference serve`, the requests gunicorn refuses before the app sees them are
answered in the API's JSON error shape too, not gunicorn's HTML page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.served import serving


@pytest.fixture
def served(tmp_path: Path, emulator: Any) -> Iterator[str]:
    database = f"sqlite:///{tmp_path / 'served.db'}"
    with serving(tmp_path, emulator, database, "--workers", "1") as server:
        yield server.base


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
    # A head over 64 KiB is refused before a thread takes it (each header within gunicorn's own
    # limit), in the same shape.
    big_head = httpx.get(
        f"{served}/api/inference/status", headers={f"x-h{i}": "v" * 7000 for i in range(10)},
        timeout=10,
    )  # fmt: skip
    assert (big_head.status_code, big_head.json()["status"]) == (431, 431), big_head.text
    assert "over 65536 bytes" in big_head.json()["error"]
    # The app's own answers are untouched, and the worker still serves.
    missing = httpx.get(f"{served}/api/no-such-thing", timeout=10)
    assert missing.status_code == 404 and missing.json()["status"] == 404
    assert httpx.get(f"{served}/api/inference/status", timeout=10).json()["state"] == "healthy"
