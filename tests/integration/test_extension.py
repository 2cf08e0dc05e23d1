"""The Flask extension inside a host of its own: the host's config file, database, tables and
levels (SQLite and PostgreSQL). The example host (examples/host_app) adds Flask-SQLAlchemy
and Flask-Migrate on top of this; here the host is a bare Flask app and a few tables."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    text,
)
from tests.service_fixtures import rows

from headspace_inference import Inference
from headspace_inference.calllog.database import SERVICE_HISTORY
from headspace_inference.inference.errors import (
    ShuttingDownError,
    UnknownEntityError,
    UnknownLevelError,
)
from headspace_inference.settings import ConfigError, normalise_url

KEY = "sk-or-host-key-000"
TOKEN = "host-operator-token"
HOST_LEVELS = ("turn", "command", "project", "objective")

# The host's file: many sections of its own (its database: and redis: of another shape),
# the `openrouter:` section with its `command` level, and the service's `inference:`.
HOST_CONFIG = """\
server: {{host: 0.0.0.0, port: 5055}}
database: {{host: db.internal, port: 5432, name: headspace, user: hs}}
redis: {{host: cache.internal, port: 6379}}
dashboard: [refresh, 5]
openrouter:
  base_url: {base_url}
  models:
    turn: anthropic/claude-haiku-4.5
    command: anthropic/claude-haiku-4.5
    project: anthropic/claude-sonnet-4.5
    objective: anthropic/claude-sonnet-4.5
  retry: {{base_delay_seconds: 0, max_delay_seconds: 0}}
  rate_limits: {{calls_per_minute: 10000, tokens_per_minute: 10000000}}
inference:
  spool_path: {spool}
  api: {{token: {token}}}
"""

# The host's own tables (no objectives): integer ids, its own foreign keys.
host_metadata = MetaData()
Table(
    "projects", host_metadata, Column("id", Integer, primary_key=True), Column("name", String(50))
)
Table(
    "agents",
    host_metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", ForeignKey("projects.id", ondelete="CASCADE")),
)
Table(
    "commands",
    host_metadata,
    Column("id", Integer, primary_key=True),
    Column("agent_id", ForeignKey("agents.id", ondelete="CASCADE")),
)
Table(
    "turns",
    host_metadata,
    Column("id", Integer, primary_key=True),
    Column("command_id", ForeignKey("commands.id", ondelete="CASCADE")),
)


@pytest.fixture(params=["sqlite", "postgres"])
def host_url(request: pytest.FixtureRequest) -> str:
    """An empty database of the host's own (no service tables, no migrations run)."""
    return str(
        request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    )


def host_engine(url: str) -> Engine:
    engine = create_engine(normalise_url(url))
    if engine.dialect.name == "sqlite":
        from sqlalchemy import event

        from headspace_inference.calllog.database import _sqlite_pragmas

        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def make_host_tables(url: str) -> None:
    engine = host_engine(url)
    host_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO projects (id, name) VALUES (1, 'headspace')"))
        conn.execute(text("INSERT INTO agents (id, project_id) VALUES (2, 1)"))
        conn.execute(text("INSERT INTO commands (id, agent_id) VALUES (3, 2)"))
        conn.execute(text("INSERT INTO turns (id, command_id) VALUES (4, 3)"))
    engine.dispose()


def host_columns(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    inspector = inspect(engine)
    return {
        t: [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(t)]
        + sorted(str(fk) for fk in inspector.get_foreign_keys(t))  # type: ignore[operator]
        for t in host_metadata.tables
    }


@pytest.fixture
def host_config(tmp_path: Path, emulator: Any) -> Path:
    path = tmp_path / "config.yaml"
    body = HOST_CONFIG.format(base_url=emulator.base_url, spool=tmp_path / "spool", token=TOKEN)
    path.write_text(body)
    return path


@pytest.fixture
def host_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    for name in ("DATABASE_URL", "REDIS_URL", "HEADSPACE_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def apps() -> Iterator[list[Flask]]:
    made: list[Flask] = []
    yield made
    for app in made:
        app.extensions["inference"].close(timeout=5)


def host_app(apps: list[Flask], url: str | None = None, name: str = "host") -> Flask:
    app = Flask(name)
    if url is not None:
        app.config["SQLALCHEMY_DATABASE_URI"] = url
    apps.append(app)
    return app


def test_the_service_drops_into_a_host(
    host_url: str,
    host_config: Path,
    host_env: None,
    apps: list[Flask],
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_host_tables(host_url)
    app = host_app(apps, host_url)
    inference = Inference()
    with caplog.at_level("WARNING", logger="headspace_inference"):
        service = inference.init_app(app, config_path=host_config)
        assert not caplog.text  # init_app reads no database
        service.start()
    # Not migrated yet: said once, at start, with the command to run.
    head = SERVICE_HISTORY.head()
    assert f"migrations: inference (at base, head {head}); run `flask inference db upgrade`" in (
        caplog.text
    )
    assert app.extensions["inference"] is service
    with app.app_context():
        assert inference.service is service
    assert service.is_available
    assert service.settings.levels == HOST_LEVELS

    # The host migrates the service with the service's own command, on its own history.
    runner = app.test_cli_runner()
    assert runner.invoke(args=["inference", "db", "current"]).output.strip() == "base"
    upgraded = runner.invoke(args=["inference", "db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.output.strip() == f"database at {SERVICE_HISTORY.head()}"
    inspector = inspect(service.database.engine)
    assert set(inspector.get_table_names()) == {
        "projects", "agents", "commands", "turns",
        "inference_calls", "inference_usage_rollup", "inference_budget_use",
        "alembic_version_inference",
    }  # fmt: skip
    fks = {f["constrained_columns"][0]: f["referred_table"] for f in
           inspector.get_foreign_keys("inference_calls")}  # fmt: skip
    assert fks == {"project_id": "projects", "agent_id": "agents", "command_id": "commands",
                   "turn_id": "turns"}  # fmt: skip

    # The host's call sites, unchanged: keywords, level "command", result.text.
    linked = service.infer(
        level="command", purpose="summarise_command", input_text="The agent fixed the bug.",
        project_id=1, agent_id=2, command_id=3, turn_id=4,
    )  # fmt: skip
    assert linked.text
    unlinked = service.infer(level="objective", purpose="priority_scoring", input_text="rank")
    with pytest.raises(UnknownLevelError, match="level must be one of turn, command, project, obj"):
        service.infer(level="task", purpose="p", input_text="x")
    with pytest.raises(UnknownEntityError, match="turn_id 99 does not exist"):
        service.infer(level="turn", purpose="p", input_text="x", turn_id=99)
    logged = {r.request_id: r for r in rows(app)}
    assert set(logged) == {linked.call_id, unlinked.call_id}  # refused arguments leave none
    row = logged[linked.call_id]
    assert (row.level, row.project_id, row.agent_id, row.command_id, row.turn_id) == (
        "command", 1, 2, 3, 4,
    )  # fmt: skip
    row = logged[unlinked.call_id]
    assert (row.level, row.project_id, row.turn_id) == ("objective", None, None)

    # The host deletes its project: the log keeps the call, its link set to NULL.
    with service.database.engine.begin() as conn:
        conn.execute(text("DELETE FROM projects WHERE id = 1"))
    assert {r.request_id: r.project_id for r in rows(app)}[linked.call_id] is None

    # Its routes, behind its token (inference.api.token), list its levels.
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/inference/status").status_code == 401
    status = client.get("/api/inference/status", headers=auth).json
    assert set(status["models"]) == set(HOST_LEVELS)  # (the host's JSON sorts keys)
    usage = client.get("/api/inference/usage", headers=auth).json
    assert usage["calls_by_level"] == {"command": 1, "objective": 1}
    assert usage["total_calls"] == 2
    bad = client.get("/api/inference/usage?level=task", headers=auth)
    assert bad.status_code == 400 and "turn, command, project, objective" in bad.json["error"]
    doc = client.get("/api/inference/openapi.json").json
    level = next(p for p in doc["paths"]["/api/inference/usage"]["get"]["parameters"]
                 if p["name"] == "level")  # fmt: skip
    assert level["schema"]["enum"] == list(HOST_LEVELS)
    # The service's errors are JSON; the host's own pages stay the host's.
    assert client.get("/nowhere").mimetype == "text/html"

    # A threading.Timer callback with no app context, as the host's debounced scoring.
    done: list[str] = []
    timer = threading.Timer(
        0.01, lambda: done.append(service.infer(level="objective", purpose="timer",
                                                input_text="from a timer").text)
    )  # fmt: skip
    timer.start()
    timer.join(30)
    assert done and done[0]

    # The host's exit path.
    service.stop()
    assert not service.is_available
    with pytest.raises(ShuttingDownError):
        service.infer(level="turn", purpose="p", input_text="after stop")


def test_migrations_in_both_orders_leave_the_host_s_history_alone(
    host_url: str, host_config: Path, host_env: None, apps: list[Flask]
) -> None:
    # The service first, on a database where the host has not run its migrations yet.
    engine = host_engine(host_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('host0007')"))
    app = host_app(apps, host_url)
    Inference(app, config_path=host_config)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["inference", "db", "upgrade"]).exit_code == 0
    assert inspect(engine).get_foreign_keys("inference_calls") == []  # nothing to link to yet
    make_host_tables(host_url)  # then the host's migration
    before = host_columns(engine)
    # The host's tables are linked by the service's next upgrade.
    assert runner.invoke(args=["inference", "db", "upgrade"]).exit_code == 0
    engine.dispose()  # SQLite's PRAGMAs read a connection's schema as it was
    assert len(inspect(engine).get_foreign_keys("inference_calls")) == 4
    assert host_columns(engine) == before
    assert runner.invoke(args=["inference", "db", "downgrade", "base"]).exit_code == 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [
            ("host0007",)
        ]
    assert set(inspect(engine).get_table_names()) == {
        "alembic_version",
        "alembic_version_inference",
        *host_metadata.tables,
    }
    engine.dispose()


def test_one_extension_object_serves_several_apps(
    tmp_path: Path, host_config: Path, host_env: None, apps: list[Flask]
) -> None:
    inference = Inference(config_path=host_config)
    first = host_app(apps, f"sqlite:///{tmp_path / 'one.db'}", name="one")
    second = host_app(apps, f"sqlite:///{tmp_path / 'two.db'}", name="two")
    a, b = inference.init_app(first), inference.init_app(second)
    assert a is not b
    assert a.database.url.endswith("one.db") and b.database.url.endswith("two.db")
    for app, service in ((first, a), (second, b)):
        with app.app_context():
            assert inference.service is service
    with pytest.raises(RuntimeError, match="already has an inference service"):
        inference.init_app(first)
    # Options given to init_app win over the object's; routes can be left out.
    third = Flask("three")
    apps.append(third)
    inference.init_app(third, database_url=f"sqlite:///{tmp_path / 'three.db'}", routes=False)
    assert third.test_client().get("/api/inference/status").status_code == 404


def test_the_database_is_the_argument_then_database_url_then_the_app_s(
    tmp_path: Path,
    host_config: Path,
    host_env: None,
    apps: list[Flask],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def url(name: str) -> str:
        return f"sqlite:///{tmp_path / name}"

    def database_of(**options: Any) -> str:
        app = host_app(apps, url("app.db"))
        return str(Inference().init_app(app, config_path=host_config, **options).database.url)

    assert database_of().endswith("app.db")
    monkeypatch.setenv("DATABASE_URL", url("env.db"))
    assert database_of().endswith("env.db")
    assert database_of(database_url=url("given.db")).endswith("given.db")
    engine = create_engine(url("engine.db"))
    service = Inference().init_app(host_app(apps), config_path=host_config, engine=engine)
    assert service.database.engine is engine
    service.close()
    with engine.connect() as conn:  # the host's engine is still the host's, still usable
        assert conn.execute(text("SELECT 1")).scalar() == 1
    with pytest.raises(ConfigError, match="give one of them, not both"):
        Inference(host_app(apps), config_path=host_config, engine=engine, database_url=url("x"))
    apps.pop()
    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(ConfigError, match=r"no database for the call log: pass database_url="):
        Inference(Flask("nodb"), config_path=host_config)
    with pytest.raises(ConfigError, match=r"^database_url: not a database URL") as caught:
        Inference(Flask("bad"), config_path=host_config, database_url="postgresql://u:pw@h:x/d")
    assert "pw" not in str(caught.value)


def test_redis_is_the_argument_then_redis_url_then_the_file_s(
    tmp_path: Path,
    host_config: Path,
    host_env: None,
    apps: list[Flask],
    monkeypatch: pytest.MonkeyPatch,
    redis_server_url: str,
    redis_prefix: str,
) -> None:
    import redis

    base = redis_server_url.rsplit("/", 1)[0]
    host_config.write_text(
        host_config.read_text() + f"  redis: {{url: '{base}/1', key_prefix: {redis_prefix}}}\n"
    )

    def redis_db_used(**options: Any) -> int:
        """Which Redis database the service's cache wrote its answer to."""
        app = host_app(apps, f"sqlite:///{tmp_path / 'db.sqlite'}")
        service = Inference().init_app(app, config_path=host_config, **options)
        service.infer(level="turn", purpose="p", input_text=f"cache me {len(apps)}")
        used = []
        for db in (1, 2, 3):
            client = redis.Redis.from_url(f"{base}/{db}")
            keys = list(client.scan_iter(match=f"{redis_prefix}*"))
            if keys:
                used.append(db)
                client.delete(*keys)
            client.close()
        assert len(used) == 1, used
        return used[0]

    assert redis_db_used() == 1
    monkeypatch.setenv("REDIS_URL", f"{base}/2")
    assert redis_db_used() == 2
    assert redis_db_used(redis_url=f"{base}/3") == 3


@pytest.mark.parametrize(
    ("body", "named"),
    [
        # The host's own keys inside openrouter: are the host's (test_host_embedding.py);
        # what is the service's stays checked.
        ("openrouter: {timeout: 0}", "openrouter.timeout_seconds: Input should be greater than 0"),
        ("openrouter: {timeout: 3, timeout_seconds: 3}", "openrouter.timeout and openrouter.tim"),
        (
            "openrouter: {rate_limits: {calls_per_min: 3}}",
            "openrouter.rate_limits.calls_per_min: u",
        ),
        ("inference: {redis: {url: 'http://cache'}}", "inference.redis.url: Value error, must st"),
        ("inference: {api: {token: 'tok en'}}", "inference.api.token: Value error, must be print"),
        ("inference: {database: {url: 'sqlite://'}}", "inference.database.url: unknown key"),
        ("inference: {workers: 0}", "inference.workers: Input should be greater than 0"),
        ("openrouter: {models: {Command: a/m}}", "openrouter.models.Command.[key]: String should"),
    ],
)
def test_the_host_s_file_is_checked_as_strictly_naming_the_key(
    tmp_path: Path, host_env: None, body: str, named: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"database: [the host's, own, shape]\nredis: 6379\n{body}\n")
    with pytest.raises(ConfigError) as caught:
        Inference(Flask("h"), config_path=path, database_url=f"sqlite:///{tmp_path / 'x.db'}")
    assert named in str(caught.value)
    assert "tok en" not in str(caught.value)


def test_the_host_s_own_sections_of_any_shape_are_ignored(
    tmp_path: Path, host_env: None, apps: list[Flask]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("database: [1, 2]\nredis: 6379\napi: {token: 5}\nserver: null\n")
    app = host_app(apps, f"sqlite:///{tmp_path / 'x.db'}")
    overrides = {"inference": {"spool_path": str(tmp_path / "spool")}}
    service = Inference().init_app(app, config_path=path, overrides=overrides)
    assert service.settings.redis.url is None and service.settings.api.token is None
    assert service.settings.levels == ("turn", "task", "project", "objective")


def test_a_linked_table_the_host_drops_is_refused_by_name(
    host_url: str, host_config: Path, host_env: None, apps: list[Flask]
) -> None:
    make_host_tables(host_url)
    app = host_app(apps, host_url)
    service = Inference().init_app(app, config_path=host_config)
    app.test_cli_runner().invoke(args=["inference", "db", "upgrade"])
    service.infer(level="turn", purpose="p", input_text="linked", turn_id=4)  # table seen
    with service.database.engine.begin() as conn:
        cascade = "" if service.database.is_sqlite else " CASCADE"  # PG: drops only our key
        conn.execute(text(f"DROP TABLE turns{cascade}"))
    with pytest.raises(
        UnknownEntityError, match="turn_id 5 cannot be linked: the database has no turns table"
    ):
        service.infer(level="turn", purpose="p", input_text="after the drop", turn_id=5)
    assert service.infer(level="turn", purpose="p", input_text="no link").text
