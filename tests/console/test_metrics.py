"""GET /metrics: Prometheus text whose call counters equal the call log's rows, in one
process and summed over two gunicorn workers after a mixed run (ok, cached, error,
rate-limited); the sampled gauges and counters; the token rule; the budget gauges, read from
the spend guard's store at the scrape (the shared count once, whichever worker is scraped),
and the budget events by kind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from headspace_inference import create_app
from headspace_inference.calllog.models import InferenceCall
from headspace_inference.inference import BudgetExceededError, InferenceError
from headspace_inference.operate.live import console_for
from headspace_inference.settings import normalise_url
from headspace_inference.testing.emulator.server import Fault
from tests.served import free_port
from tests.service_fixtures import settings_for

GUNICORN_APP = Path(__file__).with_name("gunicorn_app.py")

Key = tuple[str, str, str]


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def calls_by_key(text: str) -> Counter[Key]:
    counted: Counter[Key] = Counter()
    for labels, value in samples(text, "headspace_inference_calls_total").items():
        d = dict(labels)
        counted[(d["level"], d["model"], d["status"])] += int(value)
    return counted


def rows_by_key(url: str) -> Counter[Key]:
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    InferenceCall.level, InferenceCall.model, InferenceCall.status, func.count()
                ).group_by(InferenceCall.level, InferenceCall.model, InferenceCall.status)
            ).all()
    finally:
        engine.dispose()
    return Counter({(level, model, status): n for level, model, status, n in rows})


def mixed_run(call: Any, emulator: Any) -> None:
    """ok, cached, error (a 400 from upstream) and rate-limited calls; with the limit at 4
    to 6 calls a minute per process, on one process or two."""
    emulator.script([Fault(status=400, message="bad request")])
    call("task", "this one fails")  # first: no limit reached yet
    for i in range(3):
        call("turn", f"fresh {i}")
    for _ in range(3):
        call("turn", "fresh 0")  # a cache hit on a process that answered it before
    for i in range(8):
        call("project", f"over the limit {i}")


@pytest.fixture
def app(database_url: str, emulator: Any, tmp_path: Path) -> Iterator[Flask]:
    limits = {"calls_per_minute": 6, "tokens_per_minute": 10_000_000, "max_wait_seconds": 0}
    settings = settings_for(database_url, emulator, tmp_path, openrouter={"rate_limits": limits})
    app = create_app(overrides=settings)
    yield app
    console_for(app).close()
    app.extensions["inference"].close(timeout=5)


def test_one_process_counts_equal_the_rows(app: Flask, database_url: str, emulator: Any) -> None:
    service = app.extensions["inference"]

    def call(level: str, text: str) -> None:
        with contextlib.suppress(InferenceError):
            service.infer(level, "metrics", text)

    mixed_run(call, emulator)
    assert service.recorder.flush(timeout=30)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    counted = calls_by_key(text)
    assert counted == rows_by_key(database_url)
    statuses = {status for _, _, status in counted}
    assert statuses == {"ok", "cached", "error", "rate_limited"}
    # Sampled from the parts: the cache and the limiter.
    cached = sum(n for (_, _, status), n in counted.items() if status == "cached")
    assert samples(text, "headspace_inference_cache_hits_total")[()] == cached == 3
    rejected = sum(n for (_, _, status), n in counted.items() if status == "rate_limited")
    assert samples(text, "headspace_inference_limiter_rejections_total")[()] == rejected
    tokens = samples(text, "headspace_inference_tokens_total")
    assert {dict(k)["kind"] for k in tokens} == {"input", "output"}
    latency = samples(text, "headspace_inference_latency_seconds_count")
    assert sum(latency.values()) == sum(counted.values())
    assert samples(text, "headspace_inference_call_log_pending")[()] == 0
    assert samples(text, "headspace_inference_call_log_spooling")[()] == 0
    assert "headspace_inference_calls_created" in text  # this process' own registry


def test_metrics_follow_the_token_rule(sqlite_url: str, emulator: Any, tmp_path: Path) -> None:
    app = create_app(overrides=settings_for(sqlite_url, emulator, tmp_path, api={"token": "m-t"}))
    try:
        client = app.test_client()
        assert client.get("/metrics").status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer m-t"})
        assert ok.status_code == 200
        assert ok.content_type.startswith("text/plain")
    finally:
        console_for(app).close()
        app.extensions["inference"].close(timeout=5)


@contextlib.contextmanager
def gunicorn(config: dict[str, Any], tmp_path: Path) -> Iterator[httpx.Client]:
    """``headspace-inference serve`` with two workers (gunicorn_app.py) on this
    configuration: a client at its address once it answers; stopped afterwards."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "HEADSPACE_CONFIG": str(config_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, str(GUNICORN_APP), str(port), "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.get("/api/inference/status")
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "gunicorn did not start"
                    time.sleep(0.2)
            yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def worker_call(client: httpx.Client, outcomes: Counter[str]) -> Any:
    """A call on one of the workers (a new connection each time, so both get calls)."""

    def call(level: str, text: str) -> None:
        response = httpx.post(
            client.base_url.join("/test/call"), json={"level": level, "text": text}
        )
        outcomes[response.json()["outcome"]] += 1

    return call


@pytest.mark.postgres
def test_two_gunicorn_workers_sum_to_the_rows(
    migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    limits = {"calls_per_minute": 4, "tokens_per_minute": 10_000_000, "max_wait_seconds": 0}
    config = settings_for(
        migrated_postgres_url, emulator, tmp_path, openrouter={"rate_limits": limits}
    )
    with gunicorn(config, tmp_path) as client:
        outcomes: Counter[str] = Counter()
        mixed_run(worker_call(client, outcomes), emulator)
        expected_rows = sum(outcomes.values())
        # The writers commit within moments; poll until the table and the scrape agree.
        deadline = time.monotonic() + 60
        while True:
            rows = rows_by_key(migrated_postgres_url)
            counted = calls_by_key(client.get("/metrics").text)
            if sum(rows.values()) == expected_rows and counted == rows:
                break
            assert time.monotonic() < deadline, (outcomes, rows, counted)
            time.sleep(0.2)
        assert {s for _, _, s in counted} == {"ok", "cached", "error", "rate_limited"}
        # Read through the multiprocess directory (one process' registry has _created).
        assert "headspace_inference_calls_created" not in client.get("/metrics").text


def test_the_child_exit_hook_imports_nothing_when_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It runs in gunicorn's SIGCHLD handler: a second worker's exit re-entered an import
    # begun there, and the master's shutdown failed on a half-imported prometheus_client.
    from types import SimpleNamespace

    from headspace_inference.standalone.server import child_exit_hook

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "gauge_livesum_12345.db").write_bytes(b"")
    hook = child_exit_hook()
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # any import now fails
    monkeypatch.setitem(sys.modules, "prometheus_client.multiprocess", None)
    hook(None, SimpleNamespace(pid=12345))
    assert not (tmp_path / "gauge_livesum_12345.db").exists()  # the dead worker's gauge left


def test_serve_keeps_its_metrics_in_a_directory_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator's PROMETHEUS_MULTIPROC_DIR may hold files of theirs (an SQLite file, say):
    # serve empties only its own subdirectory of earlier runs' values.
    from headspace_inference.standalone.server import prepare_metrics_dir

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "data.db").write_bytes(b"the operator's")
    own = Path(prepare_metrics_dir())
    assert own.parent == tmp_path and os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(own)
    (own / "counter_12345.db").write_bytes(b"")  # a worker's values from this run
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # the next start
    assert Path(prepare_metrics_dir()) == own
    assert (tmp_path / "data.db").read_bytes() == b"the operator's"
    assert not (own / "counter_12345.db").exists()


# --------------------------------------------------------------------------- budgets

BUDGET_GAUGES = ("used_usd", "cap_usd", "used_tokens", "cap_tokens")


def budget_gauges(text: str) -> dict[tuple[str, str, str], float]:
    """The budget gauges of a scrape: (gauge, rule, project) -> value."""
    out = {}
    for gauge in BUDGET_GAUGES:
        for labels, value in samples(text, f"headspace_inference_budget_{gauge}").items():
            d = dict(labels)
            out[(gauge, d["rule"], d["project"])] = value
    return out


def gauges_of(states: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """What the gauges should show of service.budget()'s entries (no series for no cap)."""
    return {
        (gauge, s["rule"], "" if s["project_id"] is None else str(s["project_id"])): float(s[gauge])
        for s in states
        for gauge in BUDGET_GAUGES
        if s[gauge] is not None
    }


def test_the_budget_gauges_are_the_stores_at_each_scrape_and_events_are_counted(
    database_url: str, emulator: Any, tmp_path: Path
) -> None:
    budgets = [
        {"name": "turns", "scope": {"level": "turn"}, "window": "month", "cap_tokens": 600,
         "warn_at": 0.25},
        {"name": "per-project", "scope": {"project_id": "each"}, "window": "month",
         "cap_usd": 1.0},
    ]  # fmt: skip
    app = create_app(
        overrides=settings_for(database_url, emulator, tmp_path, openrouter={"budgets": budgets})
    )
    try:
        service = app.extensions["inference"]
        with service.database.engine.begin() as conn:
            for project in (1, 2):
                conn.execute(
                    text("INSERT INTO projects (id, name, created_at) VALUES (:id, :n, :t)"),
                    {"id": project, "n": f"p{project}", "t": "2026-01-01 00:00:00"},
                )
        client = app.test_client()
        before = budget_gauges(client.get("/metrics").get_data(as_text=True))
        # Nothing used yet: the whole-rule entry, with its cap; no project has a series.
        assert before == {("used_usd", "turns", ""): 0, ("used_tokens", "turns", ""): 0,
                          ("cap_tokens", "turns", ""): 600}  # fmt: skip
        service.infer("task", "metrics", "a call of project one", project_id=1)
        service.infer("task", "metrics", "a call of project two", project_id=2)
        refused = 0
        for i in range(40):
            try:
                service.infer("turn", "metrics", f"turn call {i} " + "x" * 60, max_tokens=100)
            except BudgetExceededError:
                refused += 1
                break
        assert refused == 1
        scraped = client.get("/metrics").get_data(as_text=True)
        states = service.budget()
        assert {(s["rule"], s["project_id"]) for s in states} == {
            ("turns", None), ("per-project", 1), ("per-project", 2),
        }  # fmt: skip
        assert budget_gauges(scraped) == gauges_of(states)
        assert budget_gauges(scraped)[("used_usd", "per-project", "1")] > 0
        events = samples(scraped, "headspace_inference_budget_events_total")
        assert events == {(("kind", "warning"),): 1, (("kind", "cap"),): 1}
        # The next scrape reads the store again: a call since shows at once.
        service.infer("task", "metrics", "another call of project two", project_id=2)
        again = budget_gauges(client.get("/metrics").get_data(as_text=True))
        assert again == gauges_of(service.budget())
        assert (
            again[("used_usd", "per-project", "2")]
            > budget_gauges(scraped)[("used_usd", "per-project", "2")]
        )
    finally:
        console_for(app).close()
        app.extensions["inference"].close(timeout=5)


@pytest.mark.postgres
def test_every_worker_scrapes_the_shared_budget_once_and_counts_its_own_events(
    migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    budgets = [{"name": "turns", "scope": {"level": "turn"}, "window": "month",
                "cap_tokens": 1_000_000, "warn_at": 0.00005}]  # fmt: skip
    config = settings_for(
        migrated_postgres_url, emulator, tmp_path, openrouter={"budgets": budgets}
    )
    with gunicorn(config, tmp_path) as client:
        outcomes: Counter[str] = Counter()
        call = worker_call(client, outcomes)
        for i in range(8):
            call("turn", f"shared budget {i}")
        assert outcomes == {"ok": 8}
        # Every call has settled when its answer is sent: the store holds their tokens now.
        engine = create_engine(normalise_url(migrated_postgres_url), poolclass=NullPool)
        try:
            deadline = time.monotonic() + 60
            while True:
                with engine.connect() as conn:
                    rows, used = conn.execute(
                        select(
                            func.count(),
                            func.sum(InferenceCall.input_tokens + InferenceCall.output_tokens),
                        ).where(InferenceCall.status == "ok")
                    ).one()
                if rows == 8:
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
        finally:
            engine.dispose()
        # Each scrape (a new connection: either worker) shows the one shared figure, not
        # each worker's share nor their sum; the warning was given once, by one worker.
        for _ in range(6):
            text = httpx.get(client.base_url.join("/metrics")).text
            gauges = budget_gauges(text)
            assert gauges[("used_tokens", "turns", "")] == used
            assert gauges[("cap_tokens", "turns", "")] == 1_000_000
            assert samples(text, "headspace_inference_budget_events_total") == {
                (("kind", "warning"),): 1
            }
