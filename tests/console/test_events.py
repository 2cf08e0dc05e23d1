"""GET /api/inference/events: one event per recorded call with the calls API's JSON, from
this process and from another one sharing PostgreSQL or Redis; Last-Event-ID replays from
the table; keep-alive comments; a slow client is dropped without holding up the writer; the
stream limit and the token; budget events announced in this process or another one arrive
beside the calls, with no id, and leave the resume to the calls."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from headspace_inference import create_app
from headspace_inference.calllog.recorder import CallWriter
from headspace_inference.calllog.rollup import apply_rollup
from headspace_inference.inference.request import new_request_id
from headspace_inference.operate.feed import (
    MAX_EVENT_BYTES,
    REPLAY_MAX,
    Feed,
    LocalTransport,
    event_message,
    id_messages,
    read_message,
    replay,
)
from headspace_inference.operate.live import console_for
from tests.call_rows import make_record, write
from tests.console.sse import Event, SseReader
from tests.drivers import BOTH_DRIVERS
from tests.service_fixtures import settings_for

CALLER = Path(__file__).with_name("caller.py")


def overrides(url: str, emulator: Any, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    spool = tmp_path / f"spool-{uuid.uuid4().hex[:6]}"
    return settings_for(url, emulator, tmp_path, inference={"spool_path": str(spool)}, **extra)


@pytest.fixture
def apps() -> Iterator[list[Flask]]:
    made: list[Flask] = []
    yield made
    for app in made:
        console_for(app).close()
        app.extensions["inference"].close(timeout=5)


def build(apps: list[Flask], settings: dict[str, Any]) -> Flask:
    app = create_app(overrides=settings)
    apps.append(app)
    return app


def stream(app: Flask, **headers: str) -> SseReader:
    response = app.test_client().get("/api/inference/events", headers=headers, buffered=False)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    return SseReader(response.response)


def is_call(call_id: str) -> Any:
    return lambda e: e.event == "inference_call" and e.call()["call_id"] == call_id


def test_a_call_appears_with_the_json_of_the_calls_api(
    apps: list[Flask], database_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(database_url, emulator, tmp_path))
    reader = stream(app)
    result = app.extensions["inference"].infer("turn", "feed test", "hello feed")
    seen = reader.wait_for(is_call(result.call_id))
    event = seen[-1]
    (listed,) = app.test_client().get("/api/inference/calls").json["calls"]
    assert event.call() == listed
    assert event.id == str(listed["id"])
    transport = console_for(app).feed.transport.name
    assert transport == ("local" if database_url.startswith("sqlite") else "postgresql")


def test_last_event_id_replays_the_rows_after_it(
    apps: list[Flask], database_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(database_url, emulator, tmp_path))
    write(app.extensions["inference"].database.sessions, [make_record(i) for i in range(5)], 5)
    ids = sorted(c["id"] for c in app.test_client().get("/api/inference/calls").json["calls"])
    reader = stream(app, **{"Last-Event-ID": str(ids[1])})
    seen = reader.wait_for(lambda e: e.id == str(ids[-1]))
    assert [int(e.id) for e in seen if e.event == "inference_call"] == ids[2:]


def test_a_replay_reads_past_its_chunks_in_id_order_up_to_its_most(
    apps: list[Flask], sqlite_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(sqlite_url, emulator, tmp_path))
    sessions = app.extensions["inference"].database.sessions
    total = REPLAY_MAX + 200
    write(sessions, [make_record(i) for i in range(total)], 1000)
    with sessions() as session:
        everything = replay(session, 0)
        ids = [c["id"] for c in everything]
        assert len(ids) == REPLAY_MAX and ids == sorted(ids)  # the oldest, in id order
        after = replay(session, ids[-1])
    assert len(after) == total - REPLAY_MAX
    assert after[0]["id"] > ids[-1]


def test_a_quiet_stream_gets_keep_alive_comments(
    apps: list[Flask], sqlite_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(sqlite_url, emulator, tmp_path))
    console_for(app).feed.keepalive_seconds = 0.05
    reader = stream(app)
    reader.wait_for(lambda e: "keep-alive" in e.comments)


def test_a_client_that_does_not_read_is_dropped_and_the_writer_goes_on(database_url: str) -> None:
    app_db = create_app(overrides={"database": {"url": database_url}})
    try:
        sessions = app_db.extensions["inference"].database.sessions
        feed = Feed(sessions, LocalTransport(), stream_queue=2)
        rejected = Path(tempfile.gettempdir()) / f"feed-test-{uuid.uuid4().hex}.jsonl"
        writer = CallWriter(sessions, rollup=apply_rollup, rejected_path=rejected, batch_size=1)
        writer.committed.append(feed.committed)
        writer.start()
        slow = feed.open()  # never read
        for seq in range(1, 11):
            writer.submit(seq, make_record(seq))
        assert writer.flush(timeout=30)
        writer.stop(timeout=10)
        deadline = time.monotonic() + 20
        while feed.stats()["streams_dropped"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert feed.stats()["streams_dropped"] == 1
        assert feed.open_streams() == 0
        text = "".join(feed.sse(slow, [], monotonic=time.monotonic))
        assert ": closed: the client read too slowly" in text
        feed.close()
    finally:
        app_db.extensions["inference"].close()


def test_a_quiet_stream_ends_at_its_limit_not_at_the_next_keep_alive(database_url: str) -> None:
    # A stream holds a server thread: it must end at max_stream_seconds even when no event
    # and no keep-alive is due before then.
    app_db = create_app(overrides={"database": {"url": database_url}})
    try:
        sessions = app_db.extensions["inference"].database.sessions
        feed = Feed(sessions, LocalTransport(), keepalive_seconds=15.0, max_stream_seconds=0.2)
        stream = feed.open()
        started = time.monotonic()
        text = "".join(feed.sse(stream, [], monotonic=time.monotonic))
        assert time.monotonic() - started < 5.0  # the limit and slack, far below 15 s
        assert text.startswith("retry:") and feed.open_streams() == 0
        feed.close()
    finally:
        app_db.extensions["inference"].close()


def test_the_stream_limit_answers_503(
    apps: list[Flask], sqlite_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(sqlite_url, emulator, tmp_path))
    console_for(app).feed.max_streams = 1
    stream(app)
    refused = app.test_client().get("/api/inference/events")
    assert (refused.status_code, refused.json["status"]) == (503, 503)
    assert refused.headers["Retry-After"]


def test_bad_requests_and_the_token(
    apps: list[Flask], sqlite_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(sqlite_url, emulator, tmp_path, api={"token": "feed-token"}))
    client = app.test_client()
    assert client.get("/api/inference/events").status_code == 401
    auth = {"Authorization": "Bearer feed-token"}
    bad = client.get("/api/inference/events", headers={**auth, "Last-Event-ID": "x1"})
    assert bad.status_code == 400
    assert bad.json["error"].startswith("Last-Event-ID:")
    extra = client.get("/api/inference/events?since=now", headers=auth)
    assert extra.status_code == 400
    assert extra.json["error"].startswith("since:")


def run_caller(settings: dict[str, Any], n: int) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(CALLER), json.dumps(settings), str(n)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return ids


def wait_for_all(reader: SseReader, call_ids: list[str]) -> list[Event]:
    missing = set(call_ids)

    def wanted(event: Event) -> bool:
        if event.event == "inference_call":
            missing.discard(event.call()["call_id"])
        return not missing

    return reader.wait_for(wanted, seconds=60)


@pytest.mark.postgres
@BOTH_DRIVERS
def test_calls_of_another_process_on_postgresql_appear(
    apps: list[Flask], migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(migrated_postgres_url, emulator, tmp_path))
    reader = stream(app)
    ids = run_caller(overrides(migrated_postgres_url, emulator, tmp_path), 3)
    wait_for_all(reader, ids)
    assert console_for(app).feed.transport.name == "postgresql"


@pytest.mark.redis
def test_calls_of_another_process_sharing_redis_appear(
    apps: list[Flask], redis_server_url: str, redis_prefix: str, emulator: Any, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    redis = {"redis": {"url": redis_server_url, "key_prefix": redis_prefix}}
    app = build(apps, overrides(url, emulator, tmp_path, **redis))
    assert console_for(app).feed.transport.name == "redis"
    reader = stream(app)
    ids = run_caller(overrides(url, emulator, tmp_path, **redis), 3)
    wait_for_all(reader, ids)


# --------------------------------------------------------------------------- budget events


def budget_warning(**extra: Any) -> dict[str, Any]:
    """A budget event as the spend guard gives it (service.on_budget_event)."""
    return {
        "kind": "warning", "rule": "summaries", "window": "day", "scope": {"level": "turn"},
        "project_id": None, "used_usd": 1.61, "cap_usd": 2.0, "used_tokens": 123,
        "cap_tokens": None, "warn_at": 0.8, "resets_at": "2026-12-06T00:00:00+00:00",
        "at": "2026-12-05T23:00:00+00:00", **extra,
    }  # fmt: skip


def last_event_id(events: list[Event]) -> str | None:
    """What an SSE client sends as Last-Event-ID after these: the last id it was given (an
    event without an id: line leaves it as it was)."""
    ids = [e.id for e in events if e.id is not None]
    return ids[-1] if ids else None


def an_announcement_arrives_and_calls_resume_as_before(streaming: Flask, announcing: Flask) -> None:
    """A budget event announced by ``announcing``'s feed reaches a stream of ``streaming``,
    between calls, with no id; a stream resumed from what the client was given replays the
    calls after it, as without the event."""
    service = streaming.extensions["inference"]
    reader = stream(streaming)
    before = service.infer("turn", "feed test", "a call before the event")
    seen = reader.wait_for(is_call(before.call_id))
    warning, storm = budget_warning(), {
        "kind": "storm", "rule": "storm_breaker", "purpose": "summarise_turn", "project_id": 7,
        "calls": 60, "seconds": 60.0, "cooldown_seconds": 300.0, "note": "naïve ✓",
        "resets_at": "2026-12-05T23:05:00+00:00", "at": "2026-12-05T23:00:00+00:00",
    }  # fmt: skip
    console_for(announcing).feed.announce(warning)
    console_for(announcing).feed.announce(storm)
    seen += reader.wait_for(lambda e: e.event == "inference_budget" and "storm" in e.data)
    budget = [e for e in seen if e.event == "inference_budget"]
    assert [json.loads(e.data) for e in budget] == [warning, storm]
    assert [e.id for e in budget] == [None, None]
    resume_from = last_event_id(seen)
    assert resume_from is not None
    (listed,) = streaming.test_client().get("/api/inference/calls").json["calls"]
    assert resume_from == str(listed["id"])  # the call's row id, untouched by the events

    after = service.infer("turn", "feed test", "a call after the event")
    reader.wait_for(is_call(after.call_id))  # live calls flow on
    assert service.recorder.flush(timeout=30)
    resumed = stream(streaming, **{"Last-Event-ID": resume_from}).wait_for(is_call(after.call_id))
    calls = [e.call()["call_id"] for e in resumed if e.event == "inference_call"]
    assert calls == [after.call_id]


def test_a_budget_event_reaches_this_processs_streams_on_sqlite_alone(
    apps: list[Flask], sqlite_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(sqlite_url, emulator, tmp_path))
    assert console_for(app).feed.transport.name == "local"
    an_announcement_arrives_and_calls_resume_as_before(app, app)
    assert console_for(app).feed.stats()["announced"] == 2


@pytest.mark.redis
def test_a_budget_event_reaches_another_processs_streams_through_redis(
    apps: list[Flask], redis_server_url: str, redis_prefix: str, emulator: Any, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    redis = {"redis": {"url": redis_server_url, "key_prefix": redis_prefix}}
    streaming = build(apps, overrides(url, emulator, tmp_path, **redis))
    announcing = build(apps, overrides(url, emulator, tmp_path, **redis))
    assert console_for(announcing).feed.transport.name == "redis"
    an_announcement_arrives_and_calls_resume_as_before(streaming, announcing)
    assert console_for(announcing).feed.open_streams() == 0  # sent, though nobody listens there


@pytest.mark.postgres
@BOTH_DRIVERS
def test_a_budget_event_reaches_another_processs_streams_through_postgresql(
    apps: list[Flask], migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    streaming = build(apps, overrides(migrated_postgres_url, emulator, tmp_path))
    announcing = build(apps, overrides(migrated_postgres_url, emulator, tmp_path))
    assert console_for(announcing).feed.transport.name == "postgresql"
    an_announcement_arrives_and_calls_resume_as_before(streaming, announcing)


def test_an_announcement_returns_at_once_and_what_cannot_go_is_dropped_and_counted(
    apps: list[Flask], sqlite_url: str, emulator: Any, tmp_path: Path
) -> None:
    app = build(apps, overrides(sqlite_url, emulator, tmp_path))
    feed = console_for(app).feed
    feed.announce(budget_warning())  # in process with no stream: nobody to tell
    assert feed.stats()["announced"] == feed.stats()["announce_dropped"] == 0
    reader = stream(app)
    feed.announce(budget_warning(rule="x" * MAX_EVENT_BYTES))  # over pg_notify's limit
    assert feed.stats()["announce_dropped"] == 1
    feed.announce(budget_warning(rule="small"))
    (event,) = [e for e in reader.wait_for(lambda e: "small" in e.data) if e.data]
    assert json.loads(event.data)["rule"] == "small"


@pytest.mark.parametrize(
    ("message", "read"),
    [
        ("0a1b,0a1c", ["0a1b", "0a1c"]),
        ("adopted-12", ["adopted-12"]),
        ('{"kind":"cap"}', {"kind": "cap"}),
        ("{not json", None),
        ('{"kind"', None),
    ],
)
def test_one_message_shape_tells_ids_from_an_event(message: str, read: Any) -> None:
    assert read_message(message) == read
    ids = [new_request_id() for _ in range(450)]
    messages = id_messages(ids)
    assert [len(m.split(",")) for m in messages] == [200, 200, 50]
    assert [i for m in messages for i in read_message(m) or []] == ids
    assert read_message(event_message(budget_warning())) == budget_warning()


WARN_EARLY = [{"name": "turns", "scope": {"level": "turn"}, "window": "month",
               "cap_tokens": 1_000_000, "warn_at": 0.00001}]  # fmt: skip


def test_the_guards_warning_arrives_on_the_feed(
    apps: list[Flask], sqlite_url: str, emulator: Any, tmp_path: Path
) -> None:
    settings = overrides(sqlite_url, emulator, tmp_path, openrouter={"budgets": WARN_EARLY})
    app = build(apps, settings)
    reader = stream(app)
    app.extensions["inference"].infer("turn", "feed test", "past the warning mark")
    seen = reader.wait_for(lambda e: e.event == "inference_budget")
    event = json.loads(seen[-1].data)
    assert (event["kind"], event["rule"], event["cap_tokens"]) == ("warning", "turns", 1_000_000)
    assert seen[-1].id is None


@pytest.mark.postgres
def test_the_guards_warning_in_another_process_arrives_on_postgresql(
    apps: list[Flask], migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    settings = overrides(
        migrated_postgres_url, emulator, tmp_path, openrouter={"budgets": WARN_EARLY}
    )
    reader = stream(build(apps, settings))
    ids = run_caller(settings, 2)  # its first call passes the mark: the warning is its own
    missing, warnings = set(ids), []

    def wanted(event: Event) -> bool:
        if event.event == "inference_call":
            missing.discard(event.call()["call_id"])
        elif event.event == "inference_budget":
            warnings.append(json.loads(event.data))
        return not missing and bool(warnings)

    reader.wait_for(wanted, seconds=60)
    assert [(w["kind"], w["rule"]) for w in warnings] == [("warning", "turns")]
