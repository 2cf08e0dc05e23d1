"""GET /api/inference/events: one event per recorded call with the calls API's JSON, from
this process and from another one sharing PostgreSQL or Redis; Last-Event-ID replays from
the table; keep-alive comments; a slow client is dropped without holding up the writer; the
stream limit and the token."""

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
from headspace_inference.operate.feed import REPLAY_MAX, Feed, LocalTransport, replay
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
