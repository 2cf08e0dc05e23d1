"""The operator endpoints: /status and /usage answer per their OpenAPI document (checked
with jsonschema and by schemathesis against the live app), reject bad parameters by name,
honour api.token, and never show the API key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from pydantic import BaseModel, Field, TypeAdapter
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR
from tests.api_document import DEFAULT_LEVELS, validate_answer
from tests.tcp_proxy import TcpProxy

from headspace_inference import create_app
from headspace_inference.operate.openapi import REF, openapi_30, openapi_document
from headspace_inference.operate.schemas import DOCUMENTED, Call, CallDetail, Usage
from headspace_inference.operate.usage import UsageQuery, usage_report

SECRET = "sk-or-v1-USAGE-API-SECRET-0000"
TOKEN = "operator-token-123"


def build_app(url: str, emulator: Any, tmp_path: Path, **overrides: Any) -> Flask:
    return create_app(
        overrides={
            "database": {"url": url},
            "openrouter": {"base_url": emulator.base_url, "api_key": SECRET},
            "inference": {"spool_path": str(tmp_path / "spool")},
            **overrides,
        }
    )


@pytest.fixture
def app(database_url: str, emulator: Any, tmp_path: Path) -> Iterator[Flask]:
    app = build_app(database_url, emulator, tmp_path)
    yield app
    app.extensions["inference"].close()


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
    validate_answer(status.json, "Status")
    validate_answer(usage.json, "Usage")
    assert doc.json == json.loads(json.dumps(openapi_document(DEFAULT_LEVELS)))
    s = status.json
    assert s["enabled"] is True and s["state"] == "healthy" and s["reason"] is None
    assert s["openrouter"]["reachable"] is True
    assert set(s["models"]) == {"turn", "task", "project", "objective"}
    assert s["rate_limits"]["calls_per_minute"] == 30
    assert s["cache"] == s["cache"] | {"enabled": True, "ttl_seconds": 300}
    assert s["cache"]["stats"]["hits"] == 1
    u = usage.json
    assert (u["total_calls"], u["cache_hits"], u["errors"]) == (2, 1, 0)
    assert u["calls_by_level"] == {"turn": 2}
    assert u["saved_cost"] == u["total_cost"] > 0
    with app.extensions["inference"].database.sessions() as session:
        assert u == json.loads(json.dumps(usage_report(session, UsageQuery())))


def test_status_of_a_stopped_service(sqlite_url: str, emulator: Any, tmp_path: Path) -> None:
    for enabled, state in ((True, "degraded"), (False, "disabled")):
        app = build_app(sqlite_url, emulator, tmp_path, openrouter={
            "base_url": emulator.base_url, "api_key": SECRET, "enabled": enabled})  # fmt: skip
        app.extensions["inference"].close()
        response = app.test_client().get("/api/inference/status")
        assert response.status_code == 200
        validate_answer(response.json, "Status")
        assert (response.json["enabled"], response.json["state"]) == (enabled, state)
        assert response.json["reason"]
        assert response.json["openrouter"]["api_key_configured"] is True
        assert SECRET not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("since=yesterday", "since"),
        ("until=2026-13-01", "until"),
        ("since=2026-11-02&until=2026-11-01", "since"),
        ("since=9999-12-31T23:30:00", "since"),
        ("since=9999-12-31T23:59:59-01:00", "since"),
        ("until=0001-01-01T00:00:00%2B01:00", "until"),
        ("level=epic", "level"),
        ("level=", "level"),
        ("project_id=0", "project_id"),
        ("project_id=abc", "project_id"),
        ("project_id=-3", "project_id"),
        ("project_id=99999999999999999999", "project_id"),
        ("project_id=2147483648", "project_id"),  # past projects.id, refused by PostgreSQL
        ("colour=blue", "colour"),
        ("level=turn&level=task", "level"),
        ("model=", "model"),
        ("model=a%00b", "model"),
    ],
)
def test_bad_usage_parameters_are_400_naming_them(app: Flask, query: str, named: str) -> None:
    response = app.test_client().get(f"/api/inference/usage?{query}")
    assert response.status_code == 400
    assert response.json["error"].startswith(f"{named}:")
    assert response.json["status"] == 400
    validate_answer(response.json, "Error")


def test_usage_window_and_filters(app: Flask) -> None:
    service = app.extensions["inference"]
    service.infer("turn", "p", "one")
    service.infer("project", "p", "two")
    assert service.recorder.flush(timeout=30)
    client = app.test_client()
    now = datetime.now(UTC)
    later = (now + timedelta(hours=1)).isoformat()
    earlier = (now - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    naive = (now - timedelta(hours=1)).replace(tzinfo=None).isoformat()
    assert (
        client.get("/api/inference/usage", query_string={"since": later}).json["total_calls"] == 0
    )
    window = client.get("/api/inference/usage", query_string={"since": earlier, "until": later})
    assert window.json["total_calls"] == 2
    assert window.json["window"]["until"] == datetime.fromisoformat(later).isoformat()
    # Naive means UTC.
    assert (
        client.get("/api/inference/usage", query_string={"since": naive}).json["total_calls"] == 2
    )
    assert client.get("/api/inference/usage?level=project").json["calls_by_level"] == {"project": 1}
    by_model = client.get("/api/inference/usage?model=anthropic/claude-haiku-4.5").json
    assert by_model["calls_by_model"] == {"anthropic/claude-haiku-4.5": 1}
    assert by_model["filters"]["model"] == "anthropic/claude-haiku-4.5"
    assert client.get("/api/inference/usage?project_id=5").json["total_calls"] == 0


def test_api_token_guards_both_endpoints(sqlite_url: str, emulator: Any, tmp_path: Path) -> None:
    app = build_app(sqlite_url, emulator, tmp_path, api={"token": TOKEN})
    client = app.test_client()
    try:
        for path in ("/api/inference/status", "/api/inference/usage"):
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": f"bearer{TOKEN}"},
                {"Authorization": "Basic x"},
            ):
                denied = client.get(path, headers=headers)
                assert denied.status_code == 401
                assert denied.json["status"] == 401
                assert denied.headers["WWW-Authenticate"] == "Bearer"
                assert TOKEN not in denied.get_data(as_text=True)
            allowed = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert allowed.status_code == 200
            assert TOKEN not in allowed.get_data(as_text=True)
        # Even a bad parameter is not named to a caller without the token.
        assert client.get("/api/inference/usage?level=epic").status_code == 401
        # The document is public: it describes the API, not its data, and declares the token.
        doc = client.get("/api/inference/openapi.json")
        assert doc.status_code == 200
        assert doc.json == json.loads(
            json.dumps(openapi_document(DEFAULT_LEVELS, token_required=True))
        )
        assert doc.json["paths"]["/api/inference/usage"]["get"]["security"] == [{"bearerToken": []}]
    finally:
        app.extensions["inference"].close()


def test_the_document_is_openapi_3_0_with_the_models_schemas_and_the_app_s_levels() -> None:
    levels = ("turn", "command", "objective")
    for token_required in (False, True):
        doc = openapi_document(levels, token_required=token_required)
        OPENAPI_30_VALIDATOR.validate(doc)
        guarded = [p for p, op in doc["paths"].items() if "security" in op["get"]]
        assert ("401" in json.dumps(doc)) is token_required
        assert len(guarded) == (len(doc["paths"]) - 1 if token_required else 0)
    schemas = doc["components"]["schemas"]
    assert {m.__name__ for m in DOCUMENTED} <= set(schemas)
    for model in (Call, CallDetail, Usage):
        assert list(schemas[model.__name__]["properties"]) == list(model.model_fields)
    assert schemas["Status"]["properties"]["models"]["required"] == list(levels)
    for path in ("/api/inference/usage", "/api/inference/calls"):
        (level,) = [p for p in doc["paths"][path]["get"]["parameters"] if p["name"] == "level"]
        assert level["schema"]["enum"] == list(levels)
    # Another app's levels do not leak into this one's (the schemas are cached).
    again = openapi_document(DEFAULT_LEVELS)["components"]["schemas"]["Status"]
    assert again["properties"]["models"]["required"] == list(DEFAULT_LEVELS)


class Linked(BaseModel):
    name: str


def test_json_schema_2020_12_is_rewritten_for_openapi_3_0_or_refused() -> None:
    def schema_of(kind: Any) -> dict[str, Any]:
        schema = TypeAdapter(kind).json_schema(mode="serialization", ref_template=REF)
        schema.pop("$defs", None)  # (the document keeps them in its components)
        return schema

    assert openapi_30(schema_of(int | None)) == {"type": "integer", "nullable": True}
    assert openapi_30(schema_of(list[str] | None)) == {
        "type": "array", "items": {"type": "string"}, "nullable": True}  # fmt: skip
    nullable_ref = openapi_30(schema_of(Linked | None))
    # 3.0 ignores a $ref's siblings: a nullable reference is an allOf.
    assert nullable_ref["anyOf" if "anyOf" in nullable_ref else "allOf"] == [
        {"$ref": "#/components/schemas/Linked"}]  # fmt: skip
    assert nullable_ref["nullable"] is True
    for unsayable in (Literal["only"], Annotated[int, Field(gt=0)], tuple[int, str]):
        with pytest.raises(ValueError, match=r"not expressible in OpenAPI 3\.0"):
            openapi_30(schema_of(unsayable))


def test_unknown_paths_and_methods_answer_in_the_one_error_shape(app: Flask) -> None:
    client = app.test_client()
    missing = client.get("/api/inference/nothing")
    assert (missing.status_code, missing.json["status"]) == (404, 404)
    post = client.post("/api/inference/usage")
    assert (post.status_code, post.json["status"]) == (405, 405)


# --------------------------------------------------------------------------- schemathesis


@pytest.fixture
def api_schema(database_url: str, emulator: Any, tmp_path: Path) -> Iterator[Any]:
    app = build_app(database_url, emulator, tmp_path)
    app.extensions["inference"].infer("objective", "p", "some usage to report")
    assert app.extensions["inference"].recorder.flush(timeout=30)
    yield schemathesis.from_wsgi("/api/inference/openapi.json", app, validate_schema=True)
    app.extensions["inference"].close()


@pytest.fixture
def api_schema_with_token(sqlite_url: str, emulator: Any, tmp_path: Path) -> Iterator[Any]:
    app = build_app(sqlite_url, emulator, tmp_path, api={"token": TOKEN})
    yield schemathesis.from_wsgi("/api/inference/openapi.json", app, validate_schema=True)
    app.extensions["inference"].close()


schema = schemathesis.from_pytest_fixture("api_schema")
schema_with_token = schemathesis.from_pytest_fixture("api_schema_with_token")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_response_matches_the_openapi_document(case: Any) -> None:
    response = case.call()
    assert response.status_code < 500
    case.validate_response(response)
    assert SECRET not in response.get_data(as_text=True)


class BearerToken:
    """Schemathesis auth: the configured api.token, as explicit (valid) credentials."""

    def get(self, case: Any, context: Any) -> str:
        return TOKEN

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schemathesis.auth.apply(BearerToken)
@schema_with_token.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_response_matches_the_document_with_a_token(case: Any) -> None:
    # Schemathesis's auth check also replays each case without and with a wrong token,
    # expecting 401.
    response = case.call()
    assert response.status_code < 500
    case.validate_response(response)
    assert SECRET not in response.get_data(as_text=True)
    assert TOKEN not in response.get_data(as_text=True)


def wait_for_status(client: Any, wanted: Any, seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        status = client.get("/api/inference/status").json
        if wanted(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_a_fresh_process_with_redis_away_says_so_at_its_first_status(
    sqlite_url: str, emulator: Any, tmp_path: Path, closed_port: int
) -> None:
    app = build_app(
        sqlite_url, emulator, tmp_path, redis={"url": f"redis://127.0.0.1:{closed_port}/0"}
    )
    try:
        status = app.test_client().get("/api/inference/status").json
        assert status["state"] == "degraded"
        assert "Redis" in status["reason"]
        assert status["rate_limits"]["usage"]["backend"] == "memory"
    finally:
        app.extensions["inference"].close()


def test_usage_answers_a_json_503_naming_the_database_while_it_is_away(
    postgres_proxy: tuple[TcpProxy, str], emulator: Any, tmp_path: Path
) -> None:
    proxy, proxied = postgres_proxy
    app = build_app(proxied, emulator, tmp_path)
    client = app.test_client()
    try:
        assert client.get("/api/inference/usage").status_code == 200
        proxy.cut()
        away = client.get("/api/inference/usage")
        assert away.status_code == 503
        assert away.json is not None
        validate_answer(away.json, "Error")
        assert away.json["status"] == 503
        assert away.json["error"].startswith("database unreachable, usage cannot be read now: ")
        # Every reader of the database answers so, naming what it could not do.
        for path, what in (
            ("/api/inference/usage/daily", "usage cannot be read now"),
            ("/api/inference/calls", "the call log cannot be read now"),
            ("/api/inference/calls/1", "the call log cannot be read now"),
        ):
            answer = client.get(path)
            assert (answer.status_code, answer.json["status"]) == (503, 503), path
            assert answer.json["error"].startswith(f"database unreachable, {what}: "), path
        # The status says so too, though nothing has been written (a cached probe: within
        # a few seconds).
        status = wait_for_status(client, lambda s: s["state"] == "degraded")
        assert "database" in status["reason"]
        proxy.restore()
        assert client.get("/api/inference/usage").status_code == 200
    finally:
        app.extensions["inference"].close(timeout=1)
