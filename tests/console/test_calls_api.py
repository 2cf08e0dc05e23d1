"""GET /api/inference/calls and /calls/<id>: newest first, keyset pages with no row twice
and none missed (also across equal timestamps and rows written between pages), filters,
the detail, and bad parameters as 400s naming them."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from headspace_inference import create_app
from headspace_inference.operate.calls import encode_cursor
from headspace_inference.operate.schemas import Call, CallDetail
from headspace_inference.standalone.models import Agent, Command, Project, Turn
from tests.api_document import validate_answer
from tests.call_rows import call, make_record, write

T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


def build(url: str, emulator: Any, tmp_path: Path, **overrides: Any) -> Flask:
    return create_app(
        overrides={
            "database": {"url": url},
            "openrouter": {"base_url": emulator.base_url, "api_key": "sk-or-calls-api"},
            "inference": {"spool_path": str(tmp_path / "spool")},
            **overrides,
        }
    )


@pytest.fixture
def app(database_url: str, emulator: Any, tmp_path: Path) -> Iterator[Flask]:
    app = build(database_url, emulator, tmp_path)
    yield app
    app.extensions["inference"].close()


def sessions(app: Flask) -> Any:
    return app.extensions["inference"].database.sessions


def all_pages(
    client: Any, query: str = "", limit: int = 4, cursor: str | None = None
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    url = f"/api/inference/calls?limit={limit}{query}"
    if cursor is not None:
        url += f"&cursor={cursor}"
    while True:
        page = client.get(url)
        assert page.status_code == 200, page.json
        assert len(page.json["calls"]) <= limit
        seen += page.json["calls"]
        cursor = page.json["next_cursor"]
        if cursor is None:
            return seen
        url = f"/api/inference/calls?limit={limit}{query}&cursor={cursor}"


def test_pages_cover_every_row_once_newest_first_across_equal_timestamps(app: Flask) -> None:
    # 23 rows over 5 timestamps: most pages end in the middle of a run of equal timestamps.
    records = [make_record(i, timestamp=T0 + timedelta(seconds=i % 5)) for i in range(23)]
    write(sessions(app), records, batch=7)
    got = all_pages(app.test_client())
    assert len(got) == 23
    assert len({c["id"] for c in got}) == 23
    keys = [(c["timestamp"], c["id"]) for c in got]
    assert keys == sorted(keys, reverse=True)
    assert {c["call_id"] for c in got} == {r.request_id for r in records}


def test_rows_written_between_pages_neither_repeat_nor_hide_older_ones(app: Flask) -> None:
    write(sessions(app), [make_record(i) for i in range(10)], batch=10)
    client = app.test_client()
    first = client.get("/api/inference/calls?limit=4").json
    # Newer rows arrive: the next page still continues after the last row shown.
    write(sessions(app), [make_record(100 + i) for i in range(5)], batch=5)
    rest = all_pages(client, cursor=first["next_cursor"])
    ids = [c["id"] for c in first["calls"] + rest]
    assert len(ids) == len(set(ids)) == 10


def test_a_call_has_the_promised_fields_and_the_detail_its_answer(app: Flask) -> None:
    record = replace(
        call(T0, status="ok", project_id=None, cost=None), result_text="the answer text"
    )
    write(sessions(app), [record], batch=1)
    client = app.test_client()
    (listed,) = client.get("/api/inference/calls").json["calls"]
    for name in ("id", "call_id", "timestamp", "level", "purpose", "model", "status",
                 "input_tokens", "output_tokens", "cost_usd", "latency_ms", "cached",
                 "error_message", "project_id", "agent_id", "command_id", "turn_id"):  # fmt: skip
        assert name in listed
    assert "result_text" not in listed
    assert listed["call_id"] == record.request_id
    assert listed["timestamp"] == "2026-05-01T09:00:00Z"
    detail = client.get(f"/api/inference/calls/{listed['id']}")
    assert detail.status_code == 200
    assert detail.json["result_text"] == "the answer text"
    assert detail.json["input_hash"] == record.input_hash
    assert {k: detail.json[k] for k in listed} == listed
    missing = client.get(f"/api/inference/calls/{listed['id'] + 1}")
    assert (missing.status_code, missing.json["status"]) == (404, 404)


def test_a_call_with_every_field_set_answers_per_the_document(app: Flask) -> None:
    # A row in each table a call links to.
    with sessions(app)() as session, session.begin():
        session.add(Project(id=7, name="every field"))
        session.flush()
        session.add(Agent(id=8, project_id=7))
        session.flush()
        session.add(Command(id=9, agent_id=8))
        session.flush()
        session.add(Turn(id=10, command_id=9))
    record = make_record(
        0, timestamp=T0 + timedelta(microseconds=250), status="error", cached=True,
        cost_usd=Decimal("0.000123456789"), saved_cost_usd=Decimal("0.5"),
        upstream_cost_usd=Decimal("0.00013"), error_type="UpstreamServerError",
        error_message="upstream said 500", generation_id="gen-1", provider="Anthropic",
        finish_reason="stop", project_id=7, agent_id=8, command_id=9, turn_id=10,
        input_text="the prompt",
    )  # fmt: skip
    write(sessions(app), [record], batch=1)
    client = app.test_client()
    (listed,) = client.get("/api/inference/calls").json["calls"]
    detail = client.get(f"/api/inference/calls/{listed['id']}").json
    for answer, model in ((listed, Call), (detail, CallDetail)):
        assert list(answer) == list(model.model_fields)
        assert [name for name, value in answer.items() if value is None] == []
        validate_answer(answer, model.__name__)
    assert detail["timestamp"] == "2026-05-01T09:00:00.000250Z"
    money = {k: detail[k] for k in ("cost_usd", "saved_cost_usd", "upstream_cost_usd")}
    assert money == {
        "cost_usd": 0.000123456789,
        "saved_cost_usd": 0.5,
        "upstream_cost_usd": 0.00013,
    }
    assert (detail["project_id"], detail["turn_id"], detail["cached"]) == (7, 10, True)
    page = client.get("/api/inference/calls").json
    validate_answer(page, "CallPage")


def add_projects(app: Flask, *ids: int) -> None:
    with app.extensions["inference"].database.engine.begin() as conn:
        for i in ids:
            conn.execute(
                text("INSERT INTO projects (id, name, created_at) VALUES (:i, :n, :t)"),
                {"i": i, "n": f"project {i}", "t": T0.replace(tzinfo=None)},
            )


def test_filters_narrow_the_pages(app: Flask) -> None:
    add_projects(app, 1, 2)
    records = [
        call(T0, level="turn", status="ok", project_id=1),
        call(T0 + timedelta(minutes=1), level="task", status="error", project_id=2),
        call(T0 + timedelta(minutes=2), level="turn", status="cached", model="m/other"),
        call(T0 + timedelta(minutes=3), level="project", status="rate_limited", project_id=1),
        call(T0 + timedelta(hours=2), level="turn", status="refused"),
    ]
    write(sessions(app), records, batch=5)
    client = app.test_client()

    def ids(query: str) -> list[str]:
        return [c["call_id"] for c in all_pages(client, query, limit=2)]

    rid = [r.request_id for r in records]
    assert ids("") == rid[::-1]
    assert ids("&level=turn") == [rid[4], rid[2], rid[0]]
    assert ids("&status=error") == [rid[1]]
    assert ids("&model=m/other") == [rid[2]]
    assert ids("&project_id=1") == [rid[3], rid[0]]
    assert ids("&since=2026-05-01T09:01:00Z&until=2026-05-01T09:03:00Z") == [rid[2], rid[1]]
    assert ids("&level=turn&since=2026-05-01T10:00:00") == [rid[4]]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=" + encode_cursor(T0, 1)[:-3], "cursor"),
        ("level=nonsense", "level"),
        ("status=fine", "status"),
        ("project_id=0", "project_id"),
        ("project_id=99999999999", "project_id"),
        ("since=yesterday", "since"),
        ("until=2026-13-01", "until"),
        ("since=2026-05-02&until=2026-05-01", "since"),
        ("model=", "model"),
        ("colour=red", "colour"),
        ("limit=5&limit=6", "limit"),
    ],
)
def test_bad_parameters_are_400_naming_them(app: Flask, query: str, named: str) -> None:
    response = app.test_client().get(f"/api/inference/calls?{query}")
    assert response.status_code == 400
    assert response.json["error"].startswith(f"{named}:")


def _cursor(payload: object) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


EDGE_TIMES = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00+01:00",
            "0001-01-01T00:00:00-01:00",
            "0001-01-01T00:00:00+00:00",
            "9999-12-31T23:59:59-01:00",
            "9999-12-31T23:59:59.999999+00:00",
            "9999-12-31T23:59:59+23:59",
            "0001-01-01T00:00:00-23:59:59.999999",
            "2026-02-30T00:00:00Z",
        ]
    ),
    st.builds(
        lambda moment, minutes: (
            moment.isoformat() + f"{'+' if minutes >= 0 else '-'}"
            f"{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
        ),
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(1, 1, 3))
        | st.datetimes(min_value=datetime(9999, 12, 29), max_value=datetime(9999, 12, 31, 23)),
        st.integers(-24 * 60 + 1, 24 * 60 - 1),
    ),
    st.text(max_size=30),
)
ROW_IDS = st.one_of(
    st.integers(-2, 3),
    st.integers(2**63 - 2, 2**64),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
CURSORS = st.one_of(
    st.builds(lambda t, i: _cursor([t, i]), EDGE_TIMES, ROW_IDS),
    st.builds(_cursor, st.lists(EDGE_TIMES | ROW_IDS, max_size=3)),
    st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.text(max_size=60),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(cursor=CURSORS)
def test_every_cursor_is_a_page_or_a_400_naming_it(app: Flask, cursor: str) -> None:
    # Generated cursors, at the calendar's edges too (an offset that takes year 1 or 9999
    # out of range): each is a page, or a 400 naming the cursor; never a 500.
    response = app.test_client().get("/api/inference/calls", query_string={"cursor": cursor})
    assert response.status_code in (200, 400), (cursor, response.json)
    if response.status_code == 400:
        assert response.json["error"].startswith("cursor:")


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_cursor_past_the_calendar_is_a_400(app: Flask, moment: str) -> None:
    response = app.test_client().get(f"/api/inference/calls?cursor={_cursor([moment, 1])}")
    assert response.status_code == 400
    assert response.json["error"].startswith("cursor:")


def test_limit_bounds_and_default(app: Flask) -> None:
    write(sessions(app), [make_record(i) for i in range(60)], batch=60)
    client = app.test_client()
    assert len(client.get("/api/inference/calls").json["calls"]) == 50
    assert len(client.get("/api/inference/calls?limit=1").json["calls"]) == 1
    whole = client.get("/api/inference/calls?limit=500").json
    assert (len(whole["calls"]), whole["next_cursor"]) == (60, None)


def test_the_token_guards_both(sqlite_url: str, emulator: Any, tmp_path: Path) -> None:
    app = build(sqlite_url, emulator, tmp_path, api={"token": "tok-calls"})
    try:
        client = app.test_client()
        for path in ("/api/inference/calls", "/api/inference/calls/1"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/api/inference/calls", headers={"Authorization": "Bearer tok-calls"})
        assert ok.status_code == 200
    finally:
        app.extensions["inference"].close()


def test_daily_cost_sums_the_day_rows_and_names_a_bad_days(app: Flask) -> None:
    today = datetime.now(UTC)
    records = [
        call(today, cost=Decimal("0.5")),
        call(today, cost=Decimal("0.25"), model="m/other"),
        call(today - timedelta(days=2), cost=Decimal("1")),
        call(today - timedelta(days=20), cost=Decimal("7")),  # outside a 14-day window
    ]
    write(sessions(app), records, batch=4)
    client = app.test_client()
    answer = client.get("/api/inference/usage/daily?days=14").json
    assert len(answer["days"]) == 14
    by_day = {d["day"]: d["cost_by_model"] for d in answer["days"] if d["cost_by_model"]}
    assert by_day == {
        today.date().isoformat(): {"anthropic/claude-haiku-4.5": 0.5, "m/other": 0.25},
        (today - timedelta(days=2)).date().isoformat(): {"anthropic/claude-haiku-4.5": 1.0},
    }
    for bad in ("days=0", "days=367", "days=x", "weeks=2"):
        response = client.get(f"/api/inference/usage/daily?{bad}")
        assert response.status_code == 400
        assert response.json["error"].startswith(bad.split("=")[0] + ":")
