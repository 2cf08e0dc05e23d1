"""Purging calls keeps the usage rollup equal to the rows (service.purge and the `purge`
command), and `usage --check` / `--rebuild` find and repair a rollup that a direct DELETE
left counting calls that are gone; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text
from tests.call_rows import call, write

from headspace_inference import create_app
from headspace_inference.calllog.rollup import count_calls, rollup_disagreements

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
PROJECTS = (1, 2, None)
ROWS = 12


@pytest.fixture
def app(database_url: str, emulator: Any, tmp_path: Path) -> Iterator[Flask]:
    app = create_app(
        overrides={
            "database": {"url": database_url},
            "openrouter": {"base_url": emulator.base_url, "api_key": "sk-or-purge-test"},
            "inference": {"spool_path": str(tmp_path / "spool")},
        }
    )
    database = app.extensions["inference"].database
    with database.engine.begin() as conn:
        for i in (1, 2):
            conn.execute(
                text("INSERT INTO projects (id, name, created_at) VALUES (:i, :n, :t)"),
                {"i": i, "n": f"project {i}", "t": T0.replace(tzinfo=None)},
            )
    rows = [
        call(T0 + timedelta(hours=5 * i), level=("turn", "project")[i % 2],
             project_id=PROJECTS[i % 3], status="cached" if i % 4 == 3 else "ok",
             latency_ms=40 * i, cost=Decimal("0.000125") * i, saved=Decimal("0.0001"))
        for i in range(ROWS)
    ]  # fmt: skip
    write(database.sessions, rows, 5)
    yield app
    app.extensions["inference"].close()


def counts(app: Flask) -> tuple[int, int]:
    with app.extensions["inference"].database.sessions() as session:
        assert rollup_disagreements(session) == []
        return count_calls(session)


def total_calls(app: Flask) -> int:
    return int(app.test_client().get("/api/inference/usage").json["total_calls"])


def test_purge_by_project_age_both_and_all_keeps_the_rollup_equal(app: Flask) -> None:
    service = app.extensions["inference"]
    assert counts(app) == (ROWS, ROWS)
    for bad in (
        {},
        {"all": True, "project_id": 1},
        {"project_id": 0},
        {"before": T0.replace(tzinfo=None)},
    ):
        with pytest.raises(ValueError, match="purge: "):
            service.purge(**bad)
    assert counts(app) == (ROWS, ROWS)

    # Row i is at hour 5i, in project 1, 2, none for i % 3 = 0, 1, 2.
    assert service.purge(project_id=1) == 4  # rows 0, 3, 6, 9
    assert counts(app) == (8, 8) and total_calls(app) == 8
    # Project 2's rows before hour 40: 1, 4 and 7 (10, at hour 50, stays).
    assert service.purge(project_id=2, before=T0 + timedelta(hours=40)) == 3
    assert counts(app) == (5, 5)
    assert service.purge(before=T0 + timedelta(hours=30)) == 2  # rows 2 and 5
    assert counts(app) == (3, 3) and total_calls(app) == 3
    assert service.purge(project_id=1) == 0
    assert service.purge(all=True) == 3
    assert counts(app) == (0, 0) and total_calls(app) == 0


def test_the_purge_command(app: Flask) -> None:
    runner = app.test_cli_runner()
    refused = runner.invoke(args=["purge"])
    assert refused.exit_code == 2
    assert "give --project, --before (or both), or --all alone" in refused.output
    assert runner.invoke(args=["purge", "--all", "--project", "1"]).exit_code == 2
    bad = runner.invoke(args=["purge", "--before", "yesterday"])
    assert bad.exit_code == 2 and "--before: not an ISO 8601 date" in bad.output
    kept = runner.invoke(args=["purge", "--all"], input="n\n")
    assert "Delete 12 calls from the call log?" in kept.output and "nothing deleted" in kept.output
    assert counts(app) == (ROWS, ROWS)
    done = runner.invoke(args=["purge", "--project", "2", "--before", "2026-11-02", "--yes"])
    assert done.exit_code == 0, done.output
    assert "1 calls deleted" in done.output  # row 1 (row 4 is at 05:00 on the 2nd)
    assert counts(app) == (ROWS - 1, ROWS - 1)


def test_usage_check_finds_a_direct_delete_and_rebuild_repairs_it(app: Flask) -> None:
    runner = app.test_cli_runner()
    good = runner.invoke(args=["usage", "--check"])
    assert good.exit_code == 0 and f"agrees with the call log ({ROWS} calls)" in good.output
    # What a host's "clear log" button did: rows gone behind the rollup's back.
    with app.extensions["inference"].database.engine.begin() as conn:
        conn.execute(text("DELETE FROM inference_calls WHERE project_id = 1"))
    assert total_calls(app) == ROWS  # the rollup still counts them
    bad = runner.invoke(args=["usage", "--check"])
    assert bad.exit_code == 1
    assert f"it counts {ROWS} calls, the log has {ROWS - 4} rows" in bad.output
    assert "run `inference usage --rebuild`" in bad.output
    assert "level=project model=anthropic/claude-haiku-4.5:" in bad.output
    fixed = runner.invoke(args=["usage", "--rebuild"])
    assert fixed.exit_code == 0 and f"rebuilt from {ROWS - 4} calls" in fixed.output
    assert runner.invoke(args=["usage", "--check"]).exit_code == 0
    assert counts(app) == (ROWS - 4, ROWS - 4) and total_calls(app) == ROWS - 4


def test_the_purge_command_finds_the_service_under_the_host_s_key(tmp_path: Path) -> None:
    from headspace_inference import Inference

    host = Flask("host")
    Inference().init_app(
        host,
        database_url=f"sqlite:///{tmp_path / 'host.db'}",
        overrides={"inference": {"spool_path": str(tmp_path / "spool")}},
        extension_key="inference_service",
    )
    runner = host.test_cli_runner()
    assert runner.invoke(args=["inference", "db", "upgrade"]).exit_code == 0
    done = runner.invoke(args=["inference", "purge", "--all", "--yes"])
    assert done.exit_code == 0, done.output
    assert "0 calls deleted" in done.output
