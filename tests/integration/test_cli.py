"""The command line as a user runs it: real subprocesses, real databases, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tests.served import free_port

from headspace_inference.calllog.database import SERVICE_HISTORY
from headspace_inference.settings import default_spool_dir
from headspace_inference.standalone.database import APP_HISTORY

BIN = Path(sys.executable).parent
# The standalone app's database: its own history, then the service's.
HEAD = f"app {APP_HISTORY.head()}, inference {SERVICE_HISTORY.head()}"
BASE = "app base, inference base"
CHAT_PATH = "/api/v1/chat/completions"


def run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_db_commands_on_the_embedded_database(tmp_path: Path) -> None:
    headspace = str(BIN / "headspace-inference")
    assert run([headspace, "db", "current"], tmp_path).stdout.strip() == BASE
    assert f"database at {HEAD}" in run([headspace, "db", "upgrade"], tmp_path).stdout
    assert run([headspace, "db", "current"], tmp_path).stdout.strip() == HEAD
    assert f"database at {BASE}" in run([headspace, "db", "downgrade", "base"], tmp_path).stdout
    # A downgrade stays down: db commands do not migrate at start-up.
    assert run([headspace, "db", "current"], tmp_path).stdout.strip() == BASE
    bad = run([headspace, "db", "downgrade", "nope"], tmp_path)
    assert bad.returncode == 2 and "revision 'nope' is not one of the histories" in bad.stderr
    flask = run([str(BIN / "flask"), "--app", "headspace_inference", "db", "upgrade"], tmp_path)
    assert flask.returncode == 0 and f"database at {HEAD}" in flask.stdout
    assert (tmp_path / "instance" / "headspace.db").exists()


def test_db_upgrade_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    env = {"DATABASE_URL": postgres_url}
    headspace = str(BIN / "headspace-inference")
    assert run([headspace, "db", "current"], tmp_path, env).stdout.strip() == BASE
    assert run([headspace, "db", "upgrade"], tmp_path, env).returncode == 0
    assert run([headspace, "db", "current"], tmp_path, env).stdout.strip() == HEAD


def test_infer_exit_status_and_streams(tmp_path: Path, emulator: Any) -> None:
    env = {"HEADSPACE__OPENROUTER__BASE_URL": emulator.base_url,
           "OPENROUTER_API_KEY": "sk-or-cli-test"}  # fmt: skip
    headspace = str(BIN / "headspace-inference")
    ok = run([headspace, "infer", "--level", "project", "--purpose", "p", "hello there"],
             tmp_path, env)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["model"] == "anthropic/claude-sonnet-4.5" and result["text"]
    bad = run([headspace, "infer", "--level", "epic", "--purpose", "p", "x"], tmp_path, env)
    assert bad.returncode == 2
    assert json.loads(bad.stderr)["error"]["type"] == "UnknownLevelError"
    assert bad.stdout == ""
    # An id no table can hold is refused before anything is spent (it called OpenRouter,
    # exited 0, and its row was refused by PostgreSQL).
    calls = emulator.request_count(CHAT_PATH)
    huge = run([headspace, "infer", "--level", "turn", "--purpose", "p", "--project-id",
                "3000000000", "x"], tmp_path, env)  # fmt: skip
    assert huge.returncode == 2 and "project_id" in json.loads(huge.stderr)["error"]["message"]
    assert emulator.request_count(CHAT_PATH) == calls
    negative = {**env, "HEADSPACE__OPENROUTER__RATE_LIMITS__CALLS_PER_MINUTE": "-1"}
    config_error = run([headspace, "status"], tmp_path, negative)
    assert config_error.returncode == 2
    assert "openrouter.rate_limits.calls_per_minute" in config_error.stderr


def test_dotenv_is_read_but_set_variables_win(tmp_path: Path, emulator: Any) -> None:
    (tmp_path / ".env").write_text(
        "OPENROUTER_API_KEY=sk-or-from-dotenv\nHEADSPACE__OPENROUTER__APP_NAME=from dotenv\n"
    )
    env = {"HEADSPACE__OPENROUTER__BASE_URL": emulator.base_url,
           "OPENROUTER_API_KEY": "sk-or-from-environment"}  # fmt: skip
    status = run([str(BIN / "headspace-inference"), "status"], tmp_path, env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "healthy"
    seen = emulator.requests
    assert seen and {r.headers["authorization"] for r in seen} == {"Bearer sk-or-from-environment"}
    # What the environment does not set, .env does.
    assert {r.headers["x-title"] for r in seen} == {"from dotenv"}


def test_serve_with_workers_answers_and_stops_cleanly_on_sigterm(
    tmp_path: Path, emulator: Any
) -> None:
    port = free_port()
    # The key and the database come from ./.env, as on the production machines: the
    # master (which migrates) and the workers (which serve) must both read it.
    served = tmp_path / "served.db"
    (tmp_path / ".env").write_text(
        f"OPENROUTER_API_KEY=sk-or-serve-dotenv\nDATABASE_URL=sqlite:///{served}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENROUTER_API_KEY", "DATABASE_URL")}
    env["HEADSPACE__OPENROUTER__BASE_URL"] = emulator.base_url
    proc = subprocess.Popen(
        [str(BIN / "headspace-inference"), "serve", "--port", str(port), "--workers", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # The spool's default place: the user state directory (the test's own), per database.
    spool = default_spool_dir(f"sqlite:///{served}")
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/api/inference/status", timeout=10)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        if status is None:
            proc.kill()
            _, stderr = proc.communicate(timeout=10)
            raise AssertionError(f"the server never answered:\n{stderr[-3000:]}")
        assert status.status_code == 200
        assert status.json()["state"] == "healthy", status.json()["reason"]
        # The master builds no app: a thread of its own (a call-log writer, a health probe)
        # running at a fork leaves the locks it holds held forever in the workers, which
        # then hung at exit.
        assert os.listdir(f"/proc/{proc.pid}/task") == [str(proc.pid)]
        usage = httpx.get(f"http://127.0.0.1:{port}/api/inference/usage?level=turn", timeout=5)
        assert usage.status_code == 200 and usage.json()["total_calls"] == 0
        # Both workers up (each wrote its journal) before the signal: a worker still
        # importing when SIGTERM comes is gunicorn's business, not this test's.
        while time.monotonic() < deadline:
            if len(list(spool.glob("calls-*.jsonl"))) >= 2:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate(timeout=10)
            raise AssertionError(f"no clean exit 20 s after SIGTERM:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-2000:]
    assert "Booting worker" in stderr
    assert {r.headers["authorization"] for r in emulator.requests} == {"Bearer sk-or-serve-dotenv"}
    assert served.exists() and not (tmp_path / "instance" / "headspace.db").exists()
    # Each worker flushed and removed its call-log journal on the way out.
    assert list(spool.glob("calls-*.jsonl")) == []
