"""Inside a host, nothing shadowed and the host's own ways kept: its already-merged
configuration (its `openrouter:` as it writes it), URLs that never shadow a rule of the
host's, the extension key it looks the service up by, namespaces (Redis keys, spool) out of
its way, and its live feed fed by on_call_recorded."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from headspace_inference import Inference
from headspace_inference.calllog.models import InferenceCall
from headspace_inference.extension import RouteClashError
from headspace_inference.inference.errors import InferenceError
from headspace_inference.settings import ConfigError, default_spool_dir, normalise_url
from headspace_inference.testing.emulator import Fault

KEY = "sk-or-host-embedding"
HOST_LEVELS = ("turn", "command", "project", "objective")

# The real host's effective `openrouter:` section (its Python defaults, as its config
# loader merges them), written out: its `timeout`, its `command` level, a consumer's own
# `priority_scoring`, its own prices.
HOST_OPENROUTER: dict[str, Any] = {
    "base_url": "https://openrouter.ai/api/v1",
    "timeout": 30,
    "models": {
        "turn": "anthropic/claude-haiku-4.5",
        "command": "anthropic/claude-haiku-4.5",
        "project": "anthropic/claude-3.5-sonnet",
        "objective": "anthropic/claude-3.5-sonnet",
    },
    "rate_limits": {"calls_per_minute": 30, "tokens_per_minute": 50000},
    "cache": {"enabled": True, "ttl_seconds": 300},
    "priority_scoring": {"debounce_seconds": 5.0},
    "retry": {"max_attempts": 3, "base_delay_seconds": 1.0, "max_delay_seconds": 30.0},
    "pricing": {
        "anthropic/claude-3-haiku": {"input_per_million": 0.25, "output_per_million": 1.25},
        "anthropic/claude-3.5-sonnet": {"input_per_million": 3.0, "output_per_million": 15.0},
    },
}


def host_config(**openrouter: Any) -> dict[str, Any]:
    """The host's whole merged configuration: many sections of its own beside openrouter."""
    return {
        "server": {"host": "127.0.0.1", "port": 5055},
        "database": {"host": "127.0.0.1", "port": 5432, "name": "headspace", "user": "hs"},
        "redis": {"host": "127.0.0.1", "port": 6379},
        "dashboard": {"stale_processing_seconds": 600},
        "openrouter": {**copy.deepcopy(HOST_OPENROUTER), **openrouter},
    }


@pytest.fixture(autouse=True)
def host_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    for name in ("DATABASE_URL", "REDIS_URL", "HEADSPACE_CONFIG", "OPENROUTER_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def apps() -> Any:
    made: list[Flask] = []
    yield made
    for app in made:
        key = app.extensions["headspace_inference"].key
        app.extensions[key].close(timeout=5)


def host_app(apps: list[Flask], tmp_path: Path, url: str | None = None) -> Flask:
    app = Flask("host", instance_path=str(tmp_path / "src" / "host" / "instance"))
    app.config["SQLALCHEMY_DATABASE_URI"] = url or f"sqlite:///{tmp_path / 'host.db'}"
    apps.append(app)
    return app


def emulated(emulator: Any, **openrouter: Any) -> dict[str, Any]:
    """The host's configuration pointed at the emulator, retrying at once."""
    retry = {"max_attempts": 2, "base_delay_seconds": 0, "max_delay_seconds": 0}
    return host_config(base_url=emulator.base_url, retry=retry, **openrouter)


def config_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "headspace_inference.config_loading" and r.levelno == logging.WARNING
    ]


# --------------------------------------------------------------------------- configuration


def test_the_host_s_merged_config_is_read_as_it_writes_it(
    tmp_path: Path, apps: list[Flask], caplog: pytest.LogCaptureFixture
) -> None:
    config = host_config()
    before = copy.deepcopy(config)
    caplog.set_level(logging.WARNING)
    service = Inference().init_app(host_app(apps, tmp_path), config=config)
    settings = service.settings
    assert settings.levels == HOST_LEVELS
    assert settings.openrouter.timeout_seconds == 30
    assert settings.openrouter.rate_limits.tokens_per_minute == 50000
    assert set(settings.openrouter.pricing) == set(HOST_OPENROUTER["pricing"])
    # One warning for the host's own key, naming it; the host's mapping left as it was.
    (warning,) = config_warnings(caplog)
    assert "priority_scoring" in warning and "did you mean" not in warning
    assert config == before


def test_a_call_at_the_host_s_level_runs_on_its_config(
    tmp_path: Path, apps: list[Flask], emulator: Any
) -> None:
    service = Inference().init_app(host_app(apps, tmp_path), config=emulated(emulator))
    service.database.upgrade()
    result = service.infer(level="command", purpose="summarise_command", input_text="done")
    assert result.text and result.model == "anthropic/claude-haiku-4.5"


@pytest.mark.parametrize(
    ("openrouter", "said"),
    [
        ({"timeout_secs": 5}, "timeout_secs (did you mean timeout_seconds?)"),
        ({"calls_per_minute": 60}, "calls_per_minute (did you mean rate_limits.calls_per_minute?)"),
    ],
)
def test_an_unknown_key_is_the_host_s_and_a_close_one_is_suggested(
    tmp_path: Path,
    apps: list[Flask],
    caplog: pytest.LogCaptureFixture,
    openrouter: dict[str, Any],
    said: str,
) -> None:
    caplog.set_level(logging.WARNING)
    Inference().init_app(host_app(apps, tmp_path), config=host_config(**openrouter))
    (warning,) = config_warnings(caplog)
    assert said in warning and "priority_scoring" in warning


@pytest.mark.parametrize(
    ("openrouter", "named"),
    [
        ({"timeout": "soon"}, "openrouter.timeout_seconds: Input should be a valid number"),
        ({"timeout": 3, "timeout_seconds": 3}, "openrouter.timeout and openrouter.timeout_seconds"),
        ({"models": {"Command": "a/m"}}, "openrouter.models.Command.[key]"),
        ({"cache": {"ttl": 5}}, "openrouter.cache.ttl: unknown key"),
        ({"base_url": "openrouter.ai"}, "openrouter.base_url: Value error, must start with"),
    ],
)
def test_a_known_key_with_a_bad_value_still_stops_start_up(
    tmp_path: Path, openrouter: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Inference(Flask("h"), config=host_config(**openrouter), database_url="sqlite://")
    assert named in str(caught.value)


def test_config_and_config_path_are_not_both_taken(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="config= or config_path="):
        Inference(Flask("h"), config={}, config_path=tmp_path / "c.yaml", database_url="sqlite://")
    with pytest.raises(TypeError, match="config= must be a mapping, got list"):
        Inference(Flask("h"), config=[1], database_url="sqlite://")  # type: ignore[arg-type]


def test_the_standalone_file_stays_strict_about_timeout(tmp_path: Path) -> None:
    from headspace_inference.config_loading import load_settings

    path = tmp_path / "config.yaml"
    path.write_text("openrouter: {timeout: 30}\n")
    with pytest.raises(ConfigError, match=r"openrouter\.timeout: unknown key"):
        load_settings(path, environ={})


def test_openrouter_base_url_is_honoured_below_code(
    tmp_path: Path, apps: list[Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    from headspace_inference.config_loading import load_settings

    monkeypatch.setenv("OPENROUTER_BASE_URL", "http://proxy.internal/api/v1/")
    service = Inference().init_app(host_app(apps, tmp_path), config=host_config())
    assert service.settings.openrouter.base_url == "http://proxy.internal/api/v1"
    assert load_settings(tmp_path / "none.yaml").openrouter.base_url == (
        "http://proxy.internal/api/v1"
    )
    overridden = load_settings(
        tmp_path / "none.yaml", {"openrouter": {"base_url": "http://code.internal"}}
    )
    assert overridden.openrouter.base_url == "http://code.internal"


# --------------------------------------------------------------------------- URLs


def test_the_api_moves_with_url_prefix_and_the_page_and_metrics_are_the_host_s_choice(
    tmp_path: Path, apps: list[Flask]
) -> None:
    app = host_app(apps, tmp_path)
    Inference().init_app(app, config=host_config(), url_prefix="/ops/llm")
    client = app.test_client()
    assert client.get("/ops/llm/status").status_code == 200
    assert client.get("/api/inference/status").status_code == 404
    document = client.get("/ops/llm/openapi.json").get_json()
    assert "/ops/llm/calls" in document["paths"]
    assert client.get("/inference").status_code == 404  # no page unless asked for
    assert client.get("/metrics").status_code == 404  # no metrics unless asked for


def test_the_page_finds_the_api_wherever_it_is(tmp_path: Path, apps: list[Flask]) -> None:
    app = host_app(apps, tmp_path)
    Inference().init_app(
        app,
        config=host_config(),
        url_prefix="/ops/llm",
        page_path="/ops/console",
        metrics_path="/ops/metrics",
    )
    client = app.test_client()
    page = client.get("/ops/console")
    assert page.status_code == 200
    assert 'data-api="/ops/llm"' in page.get_data(as_text=True)
    assert client.get("/ops/console/static/console.js").status_code == 200
    metrics = client.get("/ops/metrics")
    assert metrics.status_code == 200 and b"headspace_inference_calls_total" in metrics.data


def _host_log_api(app: Flask) -> None:
    @app.get("/api/inference/calls", endpoint="logging.get_inference_calls")
    def calls() -> Any:
        return jsonify({"calls": []})


def test_a_host_rule_registered_first_is_refused_naming_both(
    tmp_path: Path, apps: list[Flask]
) -> None:
    app = Flask("host")
    _host_log_api(app)
    with pytest.raises(RouteClashError) as caught:
        Inference(app, config=host_config(), database_url=f"sqlite:///{tmp_path / 'h.db'}")
    message = str(caught.value)
    assert message.startswith(
        "GET /api/inference/calls: inference_api.calls clashes with the host's "
        "logging.get_inference_calls"
    )
    assert "url_prefix=" in message


def test_a_variable_named_otherwise_still_clashes_and_another_method_does_not(
    tmp_path: Path, apps: list[Flask]
) -> None:
    app = Flask("host")

    @app.delete("/api/inference/calls", endpoint="logging.clear_inference_calls")
    def clear() -> Any:  # the host's DELETE beside our GET: no request goes astray
        return jsonify({})

    app2 = Flask("host2")

    @app2.get("/api/inference/calls/<int:call_id>", endpoint="logging.one_call")
    def one(call_id: int) -> Any:
        return jsonify({})

    url = f"sqlite:///{tmp_path / 'h.db'}"
    service = Inference().init_app(app, config=host_config(), database_url=url)
    service.close()
    with pytest.raises(RouteClashError, match=r"inference_api.call clashes .* logging.one_call"):
        Inference(app2, config=host_config(), database_url=url)


def test_a_host_rule_added_later_is_refused_at_start_and_at_the_first_request(
    tmp_path: Path, apps: list[Flask]
) -> None:
    app = host_app(apps, tmp_path)
    service = Inference().init_app(app, config=host_config())
    _host_log_api(app)
    with pytest.raises(RouteClashError, match=r"logging\.get_inference_calls"):
        service.start()

    other = host_app(apps, tmp_path)
    Inference().init_app(other, config=host_config(), url_prefix="/api/llm")

    @other.get("/api/llm/usage", endpoint="reports.usage")
    def usage() -> Any:
        return jsonify({})

    other.testing = True  # the error reaches the test as it reaches the host's log
    with pytest.raises(RouteClashError, match=r"GET /api/llm/usage: inference_api\.usage"):
        other.test_client().get("/somewhere/else")


def test_the_service_lives_under_the_host_s_extension_key(
    tmp_path: Path, apps: list[Flask]
) -> None:
    inference = Inference()
    app = host_app(apps, tmp_path)
    service = inference.init_app(app, config=host_config(), extension_key="inference_service")
    assert app.extensions["inference_service"] is service
    assert "inference" not in app.extensions
    with app.app_context():
        assert inference.service is service
    assert app.test_client().get("/api/inference/status").status_code == 200
    out = app.test_cli_runner().invoke(args=["inference", "db", "current"])
    assert out.exit_code == 0, out.output

    taken = host_app(apps, tmp_path)
    taken.extensions["inference_service"] = object()
    with pytest.raises(RuntimeError, match="already has an extension under 'inference_service'"):
        inference.init_app(taken, config=host_config(), extension_key="inference_service")
    apps.remove(taken)


# --------------------------------------------------------------------------- namespaces


def test_the_spool_is_outside_the_host_s_tree_and_one_per_database(
    tmp_path: Path, apps: list[Flask], user_state_dir: Path
) -> None:
    app = host_app(apps, tmp_path)
    service = Inference().init_app(app, config=host_config())
    spool = service.recorder.spool_dir
    assert spool.is_relative_to(user_state_dir / "headspace-inference")
    assert not spool.is_relative_to(tmp_path)
    other = default_spool_dir(f"sqlite:///{tmp_path / 'other.db'}")
    assert other != spool
    # One PostgreSQL database, however reached, keeps one spool; another database another.
    pg = "postgresql://hs:secret@db.internal:5432/headspace"
    same = default_spool_dir("postgresql+psycopg2://hs:other@db.internal:5432/headspace")
    assert default_spool_dir(pg) == same
    assert "secret" not in str(same)
    assert default_spool_dir("postgresql://hs@db.internal:5432/headspace_test") != same
    spool_path = host_config()
    assert Inference().init_app(
        host_app(apps, tmp_path), config={**spool_path, "inference": {"spool_path": "/x/y"}}
    ).recorder.spool_dir == Path("/x/y")


@pytest.mark.redis
def test_no_key_of_ours_is_reached_by_a_scan_of_the_host_s_namespace(
    tmp_path: Path, apps: list[Flask], emulator: Any, redis_server_url: str
) -> None:
    import redis

    client = redis.Redis.from_url(redis_server_url)
    try:
        app = host_app(apps, tmp_path)
        config = emulated(emulator)
        config["inference"] = {"redis": {"url": redis_server_url}}
        service = Inference().init_app(app, config=config)
        service.database.upgrade()
        service.infer(level="turn", purpose="p", input_text="cached across processes")
        assert service.infer(level="turn", purpose="p", input_text="cached across processes").cached
        ours = list(client.scan_iter(match="headspace-inference:*", count=1000))
        assert ours  # the cache and the limits are there...
        assert list(client.scan_iter(match="headspace:*", count=1000)) == []  # ...not here
    finally:
        keys = list(client.scan_iter(match="headspace-inference:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


# --------------------------------------------------------------------------- the live feed


def _row_ids(url: str) -> dict[str, int]:
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    with Session(engine) as session:
        found = session.execute(select(InferenceCall.request_id, InferenceCall.id)).all()
    engine.dispose()
    return {request_id: row_id for request_id, row_id in found}


def test_each_recorded_call_reaches_the_host_s_callback_once_with_its_row(
    database_url: str, tmp_path: Path, apps: list[Flask], emulator: Any
) -> None:
    app = host_app(apps, tmp_path, database_url)
    service = Inference().init_app(app, config=emulated(emulator))
    service.database.upgrade()
    broadcast: list[tuple[str, dict[str, Any]]] = []

    def broken(call: dict[str, Any]) -> None:
        raise RuntimeError("the host's bug")

    service.on_call_recorded(broken)  # its failure reaches neither the writer nor the others
    service.on_call_recorded(lambda call: broadcast.append(("inference_call", call)))

    first = service.infer(level="turn", purpose="summarise_turn", input_text="a turn")
    again = service.infer(level="turn", purpose="summarise_turn", input_text="a turn")
    emulator.script([Fault(status=500)] * 2)
    with pytest.raises(InferenceError):
        service.infer(level="command", purpose="summarise_command", input_text="fails")
    assert service.recorder.flush(timeout=30)

    ids = _row_ids(database_url)
    assert len(ids) == 3
    assert sorted(call["call_id"] for _, call in broadcast) == sorted(ids)
    assert all(call["id"] == ids[call["call_id"]] for _, call in broadcast)
    by_request = {call["call_id"]: call for _, call in broadcast}
    assert by_request[first.call_id]["status"] == "ok"
    assert by_request[again.call_id]["status"] == "cached"
    assert [c["status"] for c in by_request.values()].count("error") == 1
    # Exactly what the calls API shows.
    listed = app.test_client().get("/api/inference/calls").get_json()["calls"]
    assert sorted(listed, key=lambda c: c["id"]) == sorted(
        by_request.values(), key=lambda c: c["id"]
    )


# --------------------------------------------------------------------------- autogenerate


def _host_autogenerate(app: Flask, url: str) -> set[str]:
    """The tables the host's `flask db migrate` would drop, with its Migrate's options."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import Column as C
    from sqlalchemy import Integer, MetaData, Table

    host_metadata = MetaData()
    Table("projects", host_metadata, C("id", Integer, primary_key=True))
    Table("legacy_notes", host_metadata, C("id", Integer, primary_key=True))
    engine = create_engine(url, poolclass=NullPool)
    host_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE host_scratch (id INTEGER)")
    app.extensions["inference"].database.upgrade()
    options = app.extensions["migrate"].configure_args
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=options)
        diff = compare_metadata(context, host_metadata)
    engine.dispose()
    return {d[1].name for d in diff if d[0] == "remove_table"}


@pytest.mark.parametrize("hosts_own", [False, True])
def test_a_host_s_migrate_leaves_the_service_s_tables_alone(
    tmp_path: Path, hosts_own: bool
) -> None:
    from flask_migrate import Migrate
    from flask_sqlalchemy import SQLAlchemy

    url = f"sqlite:///{tmp_path / 'host.db'}"
    app = Flask("host")
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    db = SQLAlchemy()
    db.init_app(app)
    seen: list[str | None] = []

    def host_include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        seen.append(name)
        return name != "host_scratch"  # the host keeps a table of its own out too

    extra = {"include_name": host_include_name} if hosts_own else {}
    Migrate().init_app(app, db, **extra)
    Inference().init_app(app, overrides={"inference": {"spool_path": str(tmp_path / "s")}})
    dropped = _host_autogenerate(app, url)
    # The host's own table that its models lack is still proposed for dropping, unless the
    # host's include_name keeps it out; none of the service's ever is.
    assert dropped == (set() if hosts_own else {"host_scratch"})
    assert ("host_scratch" in seen) is hosts_own
