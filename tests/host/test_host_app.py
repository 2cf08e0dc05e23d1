"""The example host (examples/host_app) adopting the service, on SQLite and PostgreSQL: its
own Flask-SQLAlchemy models, Flask-Migrate history and config.yaml; the service's
migrations beside its own in both orders; calls linked to its rows; its deletes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from sqlalchemy import Engine, func, inspect, select, text

from headspace_inference import SERVICE_TABLES
from headspace_inference.calllog.database import SERVICE_HISTORY
from headspace_inference.calllog.models import (
    HOST_ARCHIVE_CONSTRAINTS,
    HOST_ARCHIVE_TABLE,
    InferenceCall,
)
from host_app import create_app, score_priorities
from host_app.models import Agent, Command, Project, Turn, db
from tests.service_fixtures import rows

EXAMPLE = Path(__file__).parents[2] / "examples" / "host_app"
KEY = "sk-or-example-host"
HOST_TABLES = {"projects", "agents", "commands", "turns"}
# The service's tables in a host that had no call log of its own (nothing archived).
MADE = SERVICE_TABLES - {HOST_ARCHIVE_TABLE, HOST_ARCHIVE_CONSTRAINTS}


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest) -> str:
    """An empty database for the host (nothing migrated)."""
    return str(
        request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    )


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch, emulator: Any, tmp_path: Path) -> dict[str, str]:
    """How an operator points the host's service at OpenRouter (here the emulator)."""
    env = {
        "OPENROUTER_API_KEY": KEY,
        "HEADSPACE__OPENROUTER__BASE_URL": emulator.base_url,
        "HEADSPACE__OPENROUTER__RETRY__BASE_DELAY_SECONDS": "0",
        "HEADSPACE__INFERENCE__SPOOL_PATH": str(tmp_path / "spool"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("DATABASE_URL", "REDIS_URL", "HEADSPACE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return env


@pytest.fixture
def host(empty_url: str, operator_env: dict[str, str]) -> Iterator[Flask]:
    app = create_app(database_url=empty_url)
    yield app
    app.extensions["inference"].close(timeout=5)
    with app.app_context():
        db.engine.dispose()


def cli(app: Flask, *args: str) -> str:
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return str(result.output)


def host_engine(app: Flask) -> Engine:
    with app.app_context():
        engine: Engine = db.engine
        return engine


def autogenerate_diff(app: Flask, **opts: Any) -> list[Any]:
    """What the host's `flask db migrate` would write, with the host's options."""
    with app.app_context(), db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, **opts})
        return list(compare_metadata(context, db.metadata))


def host_versions(engine: Engine) -> list[tuple[Any, ...]]:
    """The host's own Alembic version table."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT version_num FROM alembic_version"))]


def columns(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    engine.dispose()  # SQLite's PRAGMAs read a connection's schema as it was
    inspector = inspect(engine)
    return {
        t: [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(t)]
        for t in sorted(HOST_TABLES)
    }


@pytest.mark.parametrize("order", ["host first", "service first"])
def test_both_histories_coexist_in_either_order(host: Flask, order: str) -> None:
    engine = host_engine(host)
    if order == "host first":
        cli(host, "db", "upgrade")
        host_only = columns(engine)
        cli(host, "inference", "db", "upgrade")
    else:
        cli(host, "inference", "db", "upgrade")
        cli(host, "db", "upgrade")
        host_only = None
        # The links to the host's tables, made after the service's migration, come with the
        # service's next upgrade (the README says: run it after the host's).
        cli(host, "inference", "db", "upgrade")
    assert host_versions(engine) == [("h0001",)]
    assert cli(host, "inference", "db", "current").strip() == SERVICE_HISTORY.head()
    engine.dispose()
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) == (
        HOST_TABLES | MADE | {"alembic_version", "alembic_version_inference"}
    )
    fks = {f["constrained_columns"][0]: (f["referred_table"], f["options"].get("ondelete"))
           for f in inspector.get_foreign_keys("inference_calls")}  # fmt: skip
    assert fks == {
        "project_id": ("projects", "SET NULL"),
        "agent_id": ("agents", "SET NULL"),
        "command_id": ("commands", "SET NULL"),
        "turn_id": ("turns", "SET NULL"),
    }
    if host_only is not None:  # the service's migration left the host's tables as they were
        assert columns(engine) == host_only
    # The host's autogenerate, with the options of its Migrate (which init_app gave the
    # service's include_name), sees nothing to do; without it, it would drop the tables.
    assert autogenerate_diff(host, **host.extensions["migrate"].configure_args) == []
    dropped = {d[1].name for d in autogenerate_diff(host) if d[0] == "remove_table"}
    assert dropped == MADE | {"alembic_version_inference"}

    # Down again: the service's downgrade leaves the host's history and tables alone.
    cli(host, "inference", "db", "downgrade", "base")
    engine.dispose()
    assert set(inspect(engine).get_table_names()) == HOST_TABLES | {
        "alembic_version",
        "alembic_version_inference",
    }
    assert host_versions(engine) == [("h0001",)]


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met within the timeout")


def test_the_host_s_call_sites_log_linked_and_unlinked_calls(host: Flask) -> None:
    cli(host, "db", "upgrade")
    cli(host, "inference", "db", "upgrade")
    with host.app_context():
        project = Project(name="headspace", inference_paused=False)
        db.session.add(project)
        db.session.flush()
        agent = Agent(project_id=project.id)
        db.session.add(agent)
        db.session.flush()
        command = Command(agent_id=agent.id)
        db.session.add(command)
        db.session.flush()
        turn = Turn(command_id=command.id, text="The agent fixed the failing test.")
        db.session.add(turn)
        db.session.commit()
        ids = (project.id, agent.id, command.id, turn.id)

    client = host.test_client()
    assert client.post(f"/turns/{ids[3]}/summarise").status_code == 202
    assert client.post(f"/commands/{ids[2]}/summarise").status_code == 202

    def summary() -> str | None:
        with host.app_context():
            return db.session.scalar(select(Turn.summary).where(Turn.id == ids[3]))

    assert wait_for(summary)
    with host.app_context():
        score_priorities()
    logged = wait_for(lambda: (found := rows(host)) and len(found) == 3 and found)
    by_purpose = {r.purpose: r for r in logged}
    turn_row = by_purpose["summarise_turn"]
    assert (turn_row.level, turn_row.project_id, turn_row.agent_id, turn_row.command_id,
            turn_row.turn_id) == ("turn", *ids)  # fmt: skip
    command_row = by_purpose["summarise_command"]
    assert (command_row.level, command_row.command_id, command_row.turn_id) == (
        "command", ids[2], None,
    )  # fmt: skip
    scoring = by_purpose["priority_scoring"]
    assert (scoring.level, scoring.project_id, scoring.status) == ("objective", None, "ok")

    usage_before = cli(host, "inference", "usage", "--project-id", str(ids[0]))
    assert '"total_calls": 2' in usage_before

    # The host deletes the project (its agents, commands and turns go with it, by its own
    # cascades): the calls stay, their links set to NULL; usage still counts them all.
    with host.app_context():
        db.session.delete(db.session.get(Project, ids[0]))
        db.session.commit()
    after = {r.purpose: r for r in rows(host)}
    assert all(
        (r.project_id, r.agent_id, r.command_id, r.turn_id) == (None, None, None, None)
        for r in after.values()
    )
    assert '"total_calls": 3' in cli(host, "inference", "usage")
    assert '"total_calls": 0' in cli(host, "inference", "usage", "--project-id", str(ids[0]))
    with host.app_context():
        assert db.session.scalar(select(InferenceCall.id).limit(1)) is not None


def test_the_commands_on_the_host_s_flask_group(
    empty_url: str, operator_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **operator_env,
        # The host reads its database from its own config; here its test URL.
        "DATABASE_URL": empty_url,
        "PYTHONPATH": str(EXAMPLE),
    }

    def flask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "flask"), "--app", "host_app", *args],
            cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    assert flask("inference", "db", "upgrade").stdout.strip() == (
        f"database at {SERVICE_HISTORY.head()}"
    )
    called = flask("inference", "infer", "--level", "command", "--purpose", "cli", "Fix CI.")
    assert called.returncode == 0, called.stderr
    assert '"level": "command"' in called.stdout
    wrong = flask("inference", "infer", "--level", "task", "--purpose", "cli", "x")
    assert wrong.returncode == 2
    assert "level must be one of turn, command, project, objective" in wrong.stderr
    status = flask("inference", "status", "--table")
    assert status.returncode == 0 and "models.command" in status.stdout
    usage = flask("inference", "usage", "--level", "command")
    assert usage.returncode == 0 and '"total_calls": 1' in usage.stdout
    env["HEADSPACE__OPENROUTER__PRICING_FILE"] = str(tmp_path / "prices.json")
    synced = flask("inference", "pricing", "sync")
    assert synced.returncode == 0, synced.stderr
    assert "2 model(s) priced" in synced.stdout  # haiku and sonnet, for the four levels
    assert "anthropic/claude-haiku-4.5" in (tmp_path / "prices.json").read_text()


def test_a_call_log_the_service_cannot_adopt_stops_the_upgrade_in_one_line(host: Flask) -> None:
    engine = host_engine(host)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE inference_calls (id INTEGER PRIMARY KEY, note TEXT)"))
    result = host.test_cli_runner().invoke(args=["inference", "db", "upgrade"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the database's inference_calls is not")
    assert "has no timestamp, level, model column; rename it or drop it" in lines[0]
    assert "Traceback" not in result.output
    engine.dispose()


def _api(app: Flask, path: str) -> Any:
    response = app.test_client().get(f"/api/inference/{path}")
    assert response.status_code == 200, response.json
    return response.json


def _project_figures(app: Flask, project_id: int) -> dict[str, int]:
    """What /usage and /calls say of one project, and what its rows say."""
    usage = _api(app, f"usage?project_id={project_id}")
    calls = _api(app, f"calls?project_id={project_id}&limit=500")["calls"]
    with app.app_context():
        linked = db.session.scalar(  # rows linked to a project that exists
            select(func.count())
            .select_from(InferenceCall)
            .join(Project, Project.id == InferenceCall.project_id)
            .where(InferenceCall.project_id == project_id)
        )
    return {"usage": usage["total_calls"], "calls": len(calls), "rows": int(linked or 0)}


@pytest.mark.parametrize("keys", ["linked", "before the link keys"])
def test_usage_agrees_with_the_rows_whatever_the_host_does_to_its_project_ids(
    host: Flask, keys: str
) -> None:
    if keys == "linked":
        cli(host, "db", "upgrade")
        cli(host, "inference", "db", "upgrade")  # the link keys: ON DELETE SET NULL
    else:
        # The host's tables made after the service's migration: no key until its next one,
        # so a deleted project's calls keep its id.
        cli(host, "inference", "db", "upgrade")
        cli(host, "db", "upgrade")
    service = host.extensions["inference"]
    with host.app_context():
        projects = [Project(name=f"p{i}", inference_paused=False) for i in range(3)]
        db.session.add_all(projects)
        db.session.commit()
        first, last = projects[0].id, projects[-1].id  # the last has the highest id
    for i in range(5):
        service.infer("turn", "old project", f"old {i}", project_id=last)
    for i in range(2):
        service.infer("turn", "first project", f"first {i}", project_id=first)
    assert service.recorder.flush(timeout=30)
    before = _project_figures(host, last)
    assert before == {"usage": 5, "calls": 5, "rows": 5}

    with host.app_context():
        db.session.delete(db.session.get(Project, last))
        db.session.commit()
    gone = _project_figures(host, last)
    figures = {"deleted": gone}
    if keys == "linked":
        # A new project under the deleted one's id: SQLite gives it the highest deleted id
        # (no AUTOINCREMENT); on PostgreSQL the host chooses it.
        with host.app_context():
            reborn = Project(name="reborn", inference_paused=False)
            if host_engine(host).dialect.name != "sqlite":
                reborn.id = last
            db.session.add(reborn)
            db.session.commit()
            assert reborn.id == last
        figures["reused"] = _project_figures(host, last)
        for i in range(2):
            service.infer("turn", "new project", f"new {i}", project_id=last)
        assert service.recorder.flush(timeout=30)
        figures["new calls"] = _project_figures(host, last)
    print(f"\nFAULT project-ids-{keys}: {figures}", flush=True)
    assert gone == {"usage": 0, "calls": 0, "rows": 0}
    if keys == "linked":
        assert figures["reused"] == {"usage": 0, "calls": 0, "rows": 0}
        assert figures["new calls"] == {"usage": 2, "calls": 2, "rows": 2}
    assert _project_figures(host, first) == {"usage": 2, "calls": 2, "rows": 2}
    # Every call still counts in the totals, whichever project it was for.
    assert _api(host, "usage")["total_calls"] == len(rows(host))
