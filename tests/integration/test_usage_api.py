"""Usage: the rollup and raw rows agree exactly; the operator endpoints answer per their
OpenAPI document, reject bad parameters by name, and honour api.token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, text

from claude_headspace import create_app
from claude_headspace.api.inference import openapi_document
from claude_headspace.config import DatabaseSettings
from claude_headspace.db import Database
from claude_headspace.inference.recorder import CallRecord, new_request_id
from claude_headspace.inference.usage import (
    UsageQuery,
    apply_rollup,
    compute_usage,
    compute_usage_raw,
)
from claude_headspace.models import InferenceCall, UsageRollup

T0 = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
MODELS = ["anthropic/claude-haiku-4.5", "anthropic/claude-sonnet-4.5", "acme/unpriced"]
SECRET = "sk-or-v1-USAGE-API-SECRET-0000"


# --------------------------------------------------------------------------- data


def money(draw_cents: int | None) -> Decimal | None:
    return None if draw_cents is None else Decimal(draw_cents) / Decimal(10**12)


call_strategy = st.builds(
    lambda minute, level, model, project, status, tin, tout, latency, cost, saved, up: CallRecord(
        request_id=new_request_id(),
        timestamp=T0 + timedelta(minutes=minute, seconds=minute % 7),
        level=level,
        purpose="prop",
        model=model,
        status=status,
        input_hash="h" * 64,
        input_tokens=tin,
        output_tokens=tout,
        latency_ms=latency,
        cost_usd=Decimal(0) if status == "cached" else (money(cost) if status == "ok" else None),
        saved_cost_usd=money(saved) if status == "cached" else None,
        upstream_cost_usd=money(up) if status == "ok" else None,
        cached=status == "cached",
        project_id=project,
    ),
    st.integers(0, 6 * 60),
    st.sampled_from(["turn", "task", "project", "objective"]),
    st.sampled_from(MODELS),
    st.sampled_from([None, 1, 2]),
    st.sampled_from(["ok", "ok", "cached", "error", "rate_limited", "refused"]),
    st.integers(0, 5000),
    st.integers(0, 2000),
    st.integers(0, 70_000),
    st.one_of(st.none(), st.integers(0, 10**10)),
    st.one_of(st.none(), st.integers(0, 10**10)),
    st.one_of(st.none(), st.integers(0, 10**10)),
)

window_strategy = st.builds(
    lambda a, b, level, model, project: UsageQuery(
        since=None if a is None else T0 + timedelta(minutes=a),
        until=None if b is None else T0 + timedelta(minutes=b),
        level=level,
        model=model,
        project_id=project,
    ),
    st.one_of(st.none(), st.integers(-30, 7 * 60)),
    st.one_of(st.none(), st.integers(-30, 7 * 60)),
    st.one_of(st.none(), st.sampled_from(["turn", "project"])),
    st.one_of(st.none(), st.sampled_from(MODELS[:2])),
    st.one_of(st.none(), st.sampled_from([1, 2])),
)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(DatabaseSettings(url=database_url))
    with db.engine.begin() as conn:
        for pid in (1, 2):
            conn.execute(
                text("INSERT INTO projects (id, name, created_at) VALUES (:i, :n, :t)"),
                {"i": pid, "n": f"p{pid}", "t": datetime(2026, 1, 1)},
            )
    yield db
    db.dispose()


def write(db: Database, records: list[CallRecord], batch: int) -> None:
    """Exactly what the recorder does: rows and their rollup, one transaction a batch."""
    for start in range(0, len(records), batch):
        with db.sessions() as session:
            rows = [r.to_row() for r in records[start : start + batch]]
            session.add_all(rows)
            session.flush()
            apply_rollup(session, rows)
            session.commit()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    records=st.lists(call_strategy, min_size=0, max_size=60),
    batch=st.integers(1, 25),
    queries=st.lists(window_strategy, min_size=1, max_size=6),
)
def test_rollup_and_raw_rows_agree_exactly(
    database: Database, records: list[CallRecord], batch: int, queries: list[UsageQuery]
) -> None:
    with database.sessions() as session:
        session.execute(delete(InferenceCall))
        session.execute(delete(UsageRollup))
        session.commit()
    write(database, records, batch)
    with database.sessions() as session:
        for q in [UsageQuery(), *queries]:
            if q.since and q.until and q.since > q.until:
                continue
            assert (
                compute_usage(session, q).comparable() == compute_usage_raw(session, q).comparable()
            )
        everything = compute_usage(session, UsageQuery()).to_dict(UsageQuery())
    assert everything["total_calls"] == len(records)
    assert everything["cache_hits"] == sum(r.status == "cached" for r in records)
    assert everything["errors"] == sum(r.status not in ("ok", "cached") for r in records)
    expected_cost = sum((r.cost_usd or Decimal(0)) for r in records)
    assert Decimal(str(everything["total_cost"])) == round(expected_cost, 10)


def test_usage_sums_known_rows(database: Database) -> None:
    rows = [
        CallRecord(new_request_id(), T0 + timedelta(minutes=5), "turn", "p",
                   MODELS[0], "ok", "h", 100, 20, "x", 40, Decimal("0.0002"),
                   project_id=1),
        CallRecord(new_request_id(), T0 + timedelta(minutes=65), "turn", "p",
                   MODELS[0], "cached", "h", 100, 20, "x", 1, Decimal(0),
                   saved_cost_usd=Decimal("0.0002"), cached=True),
        CallRecord(new_request_id(), T0 + timedelta(minutes=70), "project", "p",
                   MODELS[1], "error", "h", 0, 0, None, 900, None,
                   error_type="UpstreamServerError", error_message="500"),
    ]  # fmt: skip
    write(database, rows, 2)
    with database.sessions() as session:
        report = compute_usage(session, UsageQuery()).to_dict(UsageQuery())
        windowed = compute_usage(session, UsageQuery(since=T0 + timedelta(minutes=30))).to_dict(
            UsageQuery()
        )
    assert report["total_calls"] == 3
    assert report["calls_by_level"] == {"project": 1, "turn": 2}
    assert report["calls_by_model"] == {MODELS[0]: 2, MODELS[1]: 1}
    assert (report["total_input_tokens"], report["total_output_tokens"]) == (100, 20)
    assert report["total_cost"] == pytest.approx(0.0002)
    assert report["cost_by_model"] == {MODELS[0]: pytest.approx(0.0002), MODELS[1]: 0.0}
    assert report["cost_by_level"] == {"project": 0.0, "turn": pytest.approx(0.0002)}
    assert report["cache_hits"] == 1 and report["saved_cost"] == pytest.approx(0.0002)
    assert report["errors"] == 1
    assert report["latency_ms"]["turn"] == {"mean": 20.5, "p50": 5, "p90": 50, "p99": 50}
    assert report["latency_ms"]["project"]["p50"] == 1000
    assert windowed["total_calls"] == 2


# --------------------------------------------------------------------------- HTTP


@pytest.fixture
def app(database_url: str, emulator: Any, tmp_path: Path) -> Iterator[Flask]:
    app = create_app(
        overrides={
            "database": {"url": database_url},
            "openrouter": {"base_url": emulator.base_url, "api_key": SECRET},
            "inference": {"spool_path": str(tmp_path / "spool")},
        }
    )
    yield app
    app.extensions["inference"].close()


def nullable_to_jsonschema(schema: Any) -> Any:
    """OpenAPI 3.0's `nullable` as plain JSON Schema, and component refs resolved inline."""
    if isinstance(schema, dict):
        out = {k: nullable_to_jsonschema(v) for k, v in schema.items() if k != "nullable"}
        if schema.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(schema, list):
        return [nullable_to_jsonschema(v) for v in schema]
    return schema


def response_schema(name: str) -> Any:
    doc = openapi_document()
    return nullable_to_jsonschema(doc["components"]["schemas"][name])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_status_and_usage_match_their_documents_and_never_show_the_key(app: Flask) -> None:
    service = app.extensions["inference"]
    service.infer("turn", "p", "for the usage numbers")
    service.infer("turn", "p", "for the usage numbers")
    assert service.recorder.flush(timeout=30)
    client = app.test_client()
    status = client.get("/api/inference/status")
    usage = client.get("/api/inference/usage")
    doc = client.get("/api/inference/openapi.json")
    for response in (status, usage, doc):
        assert response.status_code == 200
        assert response.mimetype == "application/json"
        assert SECRET not in response.get_data(as_text=True)
    jsonschema.validate(status.json, response_schema("Status"))
    jsonschema.validate(usage.json, response_schema("Usage"))
    assert doc.json == json.loads(json.dumps(openapi_document()))
    s = status.json
    assert s["enabled"] is True and s["state"] == "healthy"
    assert set(s["models"]) == {"turn", "task", "project", "objective"}
    assert s["rate_limits"]["calls_per_minute"] == 30
    assert s["cache"] == s["cache"] | {"enabled": True, "ttl_seconds": 300}
    assert s["cache"]["stats"]["hits"] == 1
    u = usage.json
    assert (u["total_calls"], u["cache_hits"], u["errors"]) == (2, 1, 0)
    assert u["calls_by_level"] == {"turn": 2}


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("since=yesterday", "since"),
        ("until=2026-13-01", "until"),
        ("since=2026-11-02&until=2026-11-01", "since"),
        ("level=epic", "level"),
        ("project_id=0", "project_id"),
        ("project_id=abc", "project_id"),
        ("project_id=-3", "project_id"),
        ("colour=blue", "colour"),
        ("level=turn&level=task", "level"),
        ("model=", "model"),
    ],
)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_usage_parameters_are_400_naming_them(app: Flask, query: str, named: str) -> None:
    response = app.test_client().get(f"/api/inference/usage?{query}")
    assert response.status_code == 400
    assert response.json["error"].startswith(f"{named}:")
    assert response.json["status"] == 400


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_usage_window_and_filters(app: Flask) -> None:
    service = app.extensions["inference"]
    service.infer("turn", "p", "one")
    service.infer("project", "p", "two")
    assert service.recorder.flush(timeout=30)
    client = app.test_client()
    now = datetime.now(UTC)
    later = (now + timedelta(hours=1)).isoformat()
    earlier = (now - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert (
        client.get("/api/inference/usage", query_string={"since": later}).json["total_calls"] == 0
    )
    window = client.get("/api/inference/usage", query_string={"since": earlier, "until": later})
    assert window.json["total_calls"] == 2
    assert client.get("/api/inference/usage?level=project").json["calls_by_level"] == {"project": 1}
    by_model = client.get("/api/inference/usage?model=anthropic/claude-haiku-4.5").json
    assert by_model["calls_by_model"] == {"anthropic/claude-haiku-4.5": 1}
    assert client.get("/api/inference/usage?project_id=5").json["total_calls"] == 0


def test_api_token_guards_both_endpoints(sqlite_url: str, emulator: Any, tmp_path: Path) -> None:
    app = create_app(
        overrides={
            "database": {"url": sqlite_url},
            "openrouter": {"base_url": emulator.base_url, "api_key": SECRET},
            "api": {"token": "operator-token-123"},
            "inference": {"spool_path": str(tmp_path / "spool")},
        }
    )
    client = app.test_client()
    try:
        for path in ("/api/inference/status", "/api/inference/usage"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                denied = client.get(path, headers=headers)
                assert denied.status_code == 401
                assert denied.json["status"] == 401
                assert "operator-token-123" not in denied.get_data(as_text=True)
            allowed = client.get(path, headers={"Authorization": "Bearer operator-token-123"})
            assert allowed.status_code == 200
        assert client.get("/api/inference/openapi.json").status_code == 200
    finally:
        app.extensions["inference"].close()


@pytest.fixture
def api_schema(sqlite_url: str, emulator: Any, tmp_path: Path) -> Iterator[Any]:
    app = create_app(
        overrides={
            "database": {"url": sqlite_url},
            "openrouter": {"base_url": emulator.base_url, "api_key": SECRET},
            "inference": {"spool_path": str(tmp_path / "spool")},
        }
    )
    app.extensions["inference"].infer("objective", "p", "some usage to report")
    yield schemathesis.from_wsgi("/api/inference/openapi.json", app)
    app.extensions["inference"].close()


schema = schemathesis.from_pytest_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_response_matches_the_openapi_document(case: Any) -> None:
    response = case.call()
    assert response.status_code < 500
    case.validate_response(response)
    assert SECRET not in response.get_data(as_text=True)
