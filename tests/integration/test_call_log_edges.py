"""Upstream oddities and outages at the call log: every call still ends in a result or an
InferenceError, and a row that agrees with /usage."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from tests.service_fixtures import KEY, AppFactory, rows
from tests.tcp_proxy import TcpProxy

from headspace_inference import create_app
from headspace_inference.inference import InferenceError
from headspace_inference.inference.service import InferenceService
from headspace_inference.operate.usage import UsageQuery, usage_report_raw
from headspace_inference.settings import normalise_url
from headspace_inference.testing.emulator import Fault

# These tests script each answer: one attempt each, so a scripted fault is not retried.
ONE_ATTEMPT = {"retry": {"max_attempts": 1}}


def completion_body(text: str = "an answer", cost: str = "0.00001") -> str:
    """A raw 200 chat completion as an upstream could send it (JSON text, ASCII only)."""
    return (
        '{"id":"gen-review-b","provider":"Anthropic","model":"anthropic/claude-haiku-4.5",'
        '"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant",'
        f'"content":{json.dumps(text)}}}}}],'
        f'"usage":{{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10,"cost":{cost}}}}}'
    )


def test_upstream_error_message_with_a_lone_surrogate_is_an_inference_error_and_a_row(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter=ONE_ATTEMPT)
    service: InferenceService = app.extensions["inference"]
    # Valid JSON: the escape decodes to a lone surrogate, which UTF-8 cannot encode.
    emulator.script([Fault(status=400, message="bad \ud800 request")])
    with pytest.raises(InferenceError):
        service.infer("turn", "p", "the upstream error names a lone surrogate")
    (row,) = rows(app)
    assert row.status == "error"


def test_upstream_answer_with_a_lone_surrogate_is_returned_and_logged(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter=ONE_ATTEMPT)
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(status=200, body=completion_body(text="half an emoji \ud83d"))])
    result = service.infer("turn", "p", "an answer cut in the middle of a surrogate pair")
    assert result.text.startswith("half an emoji")
    (row,) = rows(app)
    assert row.status == "ok"


def test_upstream_costs_with_more_than_twelve_decimals_keep_usage_and_raw_rows_equal(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter=ONE_ATTEMPT)
    service: InferenceService = app.extensions["inference"]
    # OpenRouter's cost is a JSON double: nothing bounds it to the call log's twelve decimals.
    # Each row stores 12345625 picodollars; their exact sum carries 0.8 pico more.
    cost = "0.0000123456254"
    emulator.script([Fault(status=200, body=completion_body(cost=cost)) for _ in range(2)])
    service.infer("turn", "p", "first")
    service.infer("turn", "p", "second")
    stored = rows(app)
    assert len(stored) == 2
    raw_sum = sum((r.upstream_cost_usd for r in stored if r.upstream_cost_usd), Decimal(0))
    assert raw_sum == Decimal("0.000024691250")
    answer = app.test_client().get("/api/inference/usage").json
    database = app.extensions["inference"].database
    with database.sessions() as session:
        raw = usage_report_raw(session, UsageQuery())
    assert answer["upstream_reported_cost"] == raw["upstream_reported_cost"]
    assert answer["upstream_reported_cost"] == float(round(raw_sum, 10))


def test_a_huge_upstream_cost_neither_loses_the_row_nor_blocks_the_call_log(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter=ONE_ATTEMPT)
    service: InferenceService = app.extensions["inference"]
    # Finite and non-negative, so kept; but past NUMERIC(20, 12) on PostgreSQL and past
    # SQLite's 64-bit picodollar rollup.
    emulator.script([Fault(status=200, body=completion_body(cost="1e8"))])
    service.infer("turn", "p", "an upstream reports a nonsense cost")
    service.infer("turn", "p", "a normal call after it")
    recorder = service.recorder
    assert recorder.flush(timeout=15), recorder.stats()
    assert [r.status for r in rows(app)] == ["ok", "ok"]
    assert recorder.stats()["rejected"] == 0


def test_a_call_linked_to_a_project_during_a_database_outage_is_answered_and_logged(
    migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    url = make_url(normalise_url(migrated_postgres_url))
    with create_engine(url, poolclass=NullPool).begin() as conn:
        conn.execute(
            text("INSERT INTO projects (id, name, created_at) VALUES (7, 'p7', :t)"),
            {"t": datetime(2026, 1, 1)},
        )
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    app = create_app(
        overrides={
            "database": {"url": proxied},
            "openrouter": {"base_url": emulator.base_url, "api_key": KEY},
            "inference": {"spool_path": str(tmp_path / "spool")},
        }
    )
    service: InferenceService = app.extensions["inference"]
    try:
        proxy.cut()
        # The call log spools through an outage, and the call is still answered (its link
        # unchecked) -- not failed with the database driver's exception.
        result = service.infer("project", "p", "while the database is away", project_id=7)
        assert result.text
    finally:
        proxy.restore()
        service.close(timeout=15)
        proxy.close()
    with create_engine(url, poolclass=NullPool).connect() as conn:
        linked = conn.execute(text("SELECT project_id FROM inference_calls")).scalars().all()
    assert linked == [7]
