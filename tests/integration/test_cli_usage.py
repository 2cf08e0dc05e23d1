"""`headspace-inference status` and `headspace-inference usage`: the same numbers as the
endpoints, as JSON or a table, with the endpoint's parameter checks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from tests.call_rows import call, write

from headspace_inference import create_app
from headspace_inference.operate.usage import UsageQuery, usage_report

SECRET = "sk-or-v1-CLI-USAGE-SECRET-0000"
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def app(database_url: str, emulator: Any, tmp_path: Path) -> Iterator[Flask]:
    app = create_app(
        overrides={
            "database": {"url": database_url},
            "openrouter": {"base_url": emulator.base_url, "api_key": SECRET},
            "inference": {"spool_path": str(tmp_path / "spool")},
        }
    )
    rows = [
        call(T0 + timedelta(minutes=40 * i), level=("turn", "project")[i % 2], purpose="cli",
             status="cached" if i == 3 else "ok", input_tokens=100, output_tokens=10,
             latency_ms=120, cost=Decimal("0.00015"), saved=Decimal("0.00015"))
        for i in range(5)
    ]  # fmt: skip
    write(app.extensions["inference"].database.sessions, rows, 5)
    yield app
    app.extensions["inference"].close()


def test_usage_prints_what_the_endpoint_answers(app: Flask) -> None:
    runner = app.test_cli_runner()
    since, until = "2026-11-01T09:30:00Z", "2026-11-01T12:00:00"
    result = runner.invoke(args=["usage", "--since", since, "--until", until, "--level", "turn"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    endpoint = app.test_client().get(
        "/api/inference/usage", query_string={"since": since, "until": until, "level": "turn"}
    )
    assert printed == endpoint.json
    q = UsageQuery(since=T0 + timedelta(minutes=30), until=T0 + timedelta(hours=3), level="turn")
    with app.extensions["inference"].database.sessions() as session:
        assert printed == json.loads(json.dumps(usage_report(session, q)))
    assert (printed["total_calls"], printed["cache_hits"]) == (2, 0)  # turns at 10:20 and 11:40
    everything = json.loads(runner.invoke(args=["usage"]).output)
    assert (everything["total_calls"], everything["cache_hits"]) == (5, 1)
    assert everything["total_input_tokens"] == 400  # the cache hit's tokens are not re-counted
    assert everything["saved_cost"] == 0.00015
    by_project = json.loads(runner.invoke(args=["usage", "--project-id", "7"]).output)
    assert by_project["total_calls"] == 0
    by_model = runner.invoke(args=["usage", "--model", "anthropic/claude-haiku-4.5"])
    assert json.loads(by_model.output)["total_calls"] == 5


def test_usage_table(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["usage", "--table"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["total_calls"] == "5"
    assert lines["calls_by_level.turn"] == "3"
    assert lines["latency_ms.turn.p50"] == "250"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--since", "yesterday"], "since"),
        (["--since", "2026-11-02", "--until", "2026-11-01"], "since"),
        (["--level", "epic"], "level"),
        (["--project-id", "0"], "project_id"),
        (["--project-id", "x"], "project_id"),
    ],
)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_usage_rejects_what_the_endpoint_rejects(app: Flask, args: list[str], named: str) -> None:
    result = app.test_cli_runner().invoke(args=["usage", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {named}:")
    assert result.stdout == ""


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_status_json_and_table_never_show_the_key(app: Flask) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["status"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["enabled"] is True and status["state"] in ("healthy", "degraded")
    assert set(status["models"]) == {"turn", "task", "project", "objective"}
    assert SECRET not in result.output
    table = runner.invoke(args=["status", "--table"]).output
    assert re.search(r"^rate_limits\.calls_per_minute +30$", table, re.MULTILINE)
    assert SECRET not in table


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_status_of_a_stopped_service(app: Flask) -> None:
    app.extensions["inference"].close()
    result = app.test_cli_runner().invoke(args=["status"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["state"] == "degraded"
    assert status["reason"].startswith("the inference service is shut down")
