"""The real ``headspace-inference serve`` in a subprocess, for tests of what it does on the
wire: started with a configuration in its environment, waited for, stopped with SIGTERM.
Its output goes to a file (a pipe nobody reads would fill and stop the server)."""

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
