"""The host trial's database and end-to-end steps, run by trial.py inside the trial's venv
(the host and this library installed together), from the host's tree.

    e2e.py db-reset URL   drop (if there) and create the database of URL
    e2e.py db-drop URL    drop it
    e2e.py seed           (the ORIGINAL host) a project, an agent, a command, turns, an
                          objective and some call rows written with the host's own model
    e2e.py count          (the patched host) the rows of the service's call log, and the
                          tables the host's autogenerate would drop
    e2e.py run            (the patched host) its consumers against the OpenRouter emulator,
                          then the checks: rows, /usage, the log page API, the live event,
                          the project delete and the "clear log" button

Each prints its result as one JSON line after RESULT_MARK; a failed check exits non-zero naming it.
The host is built as its tests build it: create_app(testing=True), so no background
watcher, poller or tmux thread starts; DATABASE_URL (set by trial.py) is its database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Some of the host's call history as its own model wrote it: every level, a cache hit, an
# error, links of each kind, a cost and a prompt. (purpose, level, links, cost, cached, error)
HOST_ROWS: tuple[tuple[str, str, tuple[str, ...], float | None, bool, str | None], ...] = (
    ("summarise_turn", "turn", ("project", "agent", "command", "turn"), 0.00042, False, None),
    ("summarise_command", "command", ("project", "agent", "command"), 0.0011, False, None),
    ("summarise_turn", "turn", ("project", "agent", "command", "turn"), 0.0, True, None),
    ("progress_summary", "project", ("project",), 0.0123, False, None),
    ("handoff_classification", "turn", ("agent",), None, False, "OpenRouter timed out"),
)
# How long the run waits for the service to record a call (its writer commits in the
# background; the host's live event follows each commit).
RECORD_WAIT_SECONDS = 30.0
# The paths this trial's patch gives the host (url_prefix in host.patch's app.py).
SERVICE_API = "/api/llm"
HOST_LOG_API = "/api/inference/calls"
# The line trial.py reads the result from (the host logs to stdout too).
RESULT_MARK = "host-trial-result:"


class CheckFailed(Exception):
    """One end-to-end check failed: the message says which, and what was seen."""


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    actions = {"db-reset": db_reset, "db-drop": db_drop, "seed": seed, "count": count, "run": run}
    if command not in actions:
        print(f"e2e.py: unknown command {command!r}; one of {', '.join(actions)}", file=sys.stderr)
        return 2
    try:
        result = actions[command](*args)
    except CheckFailed as exc:
        print(f"e2e.py {command}: CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    print(RESULT_MARK, json.dumps(result, default=str), flush=True)
    return 0


# -- databases ----------------------------------------------------------------------------


def _admin(url: str) -> tuple[Any, str]:
    import psycopg2
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    admin = psycopg2.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username,
        password=parsed.password, dbname="postgres",
    )  # fmt: skip
    admin.autocommit = True
    return admin, str(parsed.database)


def db_reset(url: str) -> dict[str, Any]:
    admin, name = _admin(url)
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return {"created": name}


def db_drop(url: str) -> dict[str, Any]:
    admin, name = _admin(url)
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()
    return {"dropped": name}


# -- the host -----------------------------------------------------------------------------


def _host_app() -> Any:
    from claude_headspace.app import create_app

    return create_app(config_path=str(Path.cwd() / "config.yaml"), testing=True)


def _project_repo() -> Path:
    """A git repository with a few commits, for the progress summary to read."""
    repo = Path.cwd().parent / "trial-project"
    shutil.rmtree(repo, ignore_errors=True)  # a summary left by a last run would empty the scope
    repo.mkdir(parents=True)
    env = {
        **os.environ, "GIT_AUTHOR_NAME": "Trial", "GIT_AUTHOR_EMAIL": "trial@example.invalid",
        "GIT_COMMITTER_NAME": "Trial", "GIT_COMMITTER_EMAIL": "trial@example.invalid",
    }  # fmt: skip
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    for n, message in enumerate(("Start the trial project", "Add the summary", "Fix a typo")):
        (repo / f"file{n}.txt").write_text(f"{message}\n")
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
        subprocess.run(["git", "-C", str(repo), "commit", "-qm", message], check=True, env=env)
    return repo


def seed() -> dict[str, Any]:
    """With the ORIGINAL host: its domain rows and some call rows, through its own models."""
    from claude_headspace.database import db
    from claude_headspace.models import (
        Agent,
        Command,
        CommandState,
        InferenceCall,
        Objective,
        Project,
        Turn,
        TurnActor,
        TurnIntent,
    )  # fmt: skip

    app = _host_app()
    repo = _project_repo()
    with app.app_context():
        project = Project(name="trial-project", slug="trial-project", path=str(repo))
        db.session.add(project)
        db.session.flush()
        agent = Agent(session_uuid=uuid.uuid4(), project_id=project.id)
        db.session.add(agent)
        db.session.flush()
        command = Command(
            agent_id=agent.id, state=CommandState.COMPLETE,
            instruction="Adopt headspace-inference in the host",
            started_at=datetime.now(UTC) - timedelta(hours=1), completed_at=datetime.now(UTC),
        )  # fmt: skip
        db.session.add(command)
        db.session.flush()
        turns = [
            Turn(command_id=command.id, actor=TurnActor.USER, intent=TurnIntent.COMMAND,
                 text="Please swap our inference layer for the library and keep the log page."),
            Turn(command_id=command.id, actor=TurnActor.AGENT, intent=TurnIntent.PROGRESS,
                 text="I replaced the service wiring in app.py and ran the consumer tests; "
                      "all of them pass against the emulator."),
            Turn(command_id=command.id, actor=TurnActor.AGENT, intent=TurnIntent.COMPLETION,
                 text="Done: the host now calls OpenRouter through headspace-inference."),
        ]  # fmt: skip
        db.session.add_all(turns)
        db.session.add(Objective(current_text="Ship the adoption of headspace-inference"))
        db.session.flush()
        links = {"project": project.id, "agent": agent.id, "command": command.id,
                 "turn": turns[0].id}  # fmt: skip
        base = datetime.now(UTC) - timedelta(days=3)
        for n, (purpose, level, linked, cost, cached, error) in enumerate(HOST_ROWS):
            db.session.add(
                InferenceCall(
                    timestamp=base + timedelta(hours=n), level=level, purpose=purpose,
                    model="anthropic/claude-3-haiku", input_tokens=100 + n, output_tokens=20 + n,
                    input_hash=f"{n:064x}", input_text=f"host prompt {n}: {purpose}",
                    result_text=None if error else f"host answer {n}", latency_ms=300 + n,
                    cost=cost, cached=cached, error_message=error,
                    **{f"{name}_id": links[name] for name in linked},
                )
            )  # fmt: skip
        db.session.commit()
        seeded = _totals(InferenceCall)
        db.session.remove()
    _stop(app)
    return seeded


def count() -> dict[str, Any]:
    """With the patched host: the service's call log as the host's log page reads it, and
    what the host's autogenerate (`flask db migrate`) would now drop: nothing, since
    init_app gave the host's Migrate the service's include_name."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from claude_headspace.database import db
    from flask import current_app

    from headspace_inference.calllog.models import InferenceCall

    app = _host_app()
    with app.app_context():
        totals = _totals(InferenceCall)
        options = current_app.extensions["migrate"].configure_args
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts=dict(options))
            diff = compare_metadata(context, db.metadata)
        drops = sorted(op[1].name for op in _flat(diff) if op[0] == "remove_table")
        db.session.remove()
    _stop(app)
    return {**totals, "autogenerate_drops": drops}


def _totals(model: Any) -> dict[str, Any]:
    """Rows, tokens, cost and kept prompts of a call log (the host's model or the service's)."""
    from claude_headspace.database import db
    from sqlalchemy import func

    cost = getattr(model, "cost", None) or model.cost_usd
    row = db.session.query(
        func.count(model.id), func.sum(model.input_tokens), func.sum(model.output_tokens),
        func.sum(cost), func.count(model.input_text),
    ).one()  # fmt: skip
    return {
        "rows": row[0], "input_tokens": int(row[1] or 0), "output_tokens": int(row[2] or 0),
        "cost": round(float(row[3] or 0), 6), "prompts": row[4],
    }  # fmt: skip


def _flat(diff: list[Any]) -> list[Any]:
    """Alembic's diff: tuples, and lists of tuples for column changes."""
    return [op for item in diff for op in (item if isinstance(item, list) else [item])]


# -- the end-to-end run -------------------------------------------------------------------


# An operator's budgets, in the host's own config.yaml (merged over its DEFAULTS): the
# config.example.yaml block, generous enough for the run's five calls.
OPERATOR_CONFIG = """\
openrouter:
  budgets:
    - {name: turn-summaries, scope: {purpose: summarise_turn}, window: day, cap_usd: 2.0}
    - {name: per-project, scope: {project_id: each}, window: month, cap_usd: 5.0}
    - {name: everything, scope: {}, window: day, cap_usd: 10.0, cap_tokens: 5000000}
"""


def run() -> dict[str, Any]:
    from headspace_inference.testing.emulator import EmulatorServer, Fault

    config = Path.cwd() / "config.yaml"
    config.write_text(OPERATOR_CONFIG)
    with EmulatorServer() as emulator:
        os.environ["OPENROUTER_BASE_URL"] = emulator.base_url
        os.environ["OPENROUTER_API_KEY"] = "sk-or-trial"
        app = _host_app()
        try:
            return _run(app, emulator, Fault)
        finally:
            _stop(app)
            config.unlink()


def _run(app: Any, emulator: Any, Fault: Any) -> dict[str, Any]:
    from claude_headspace.database import db
    from claude_headspace.models import Agent, Command, Project, Turn, TurnActor
    from claude_headspace.services.broadcaster import get_broadcaster

    from headspace_inference.calllog.models import InferenceCall

    client = app.test_client()
    service = app.extensions["inference_service"]
    _check(service.is_available, "the service is available (key and base URL from the env)")
    broadcaster = get_broadcaster()
    listener = broadcaster.register_client(types=["inference_call"])
    _check(listener is not None, "the host's broadcaster took a listener")

    with app.app_context():
        old_rows = db.session.query(InferenceCall).count()
        old_ids = {row.id for row in db.session.query(InferenceCall.id)}
        project = db.session.query(Project).one()
        agent = db.session.query(Agent).one()
        command = db.session.query(Command).one()
        user_turn, progress_turn, _ = db.session.query(Turn).order_by(Turn.id).all()
        _check(user_turn.actor == TurnActor.USER, "the seeded first turn is the user's")

        summaries = app.extensions["summarisation_service"]
        # A user turn is summarised with the frustration prompt: a JSON object comes back.
        emulator.script([Fault(content='{"summary": "Swap the layer", "frustration_score": 2}')])
        user_summary = summaries.summarise_turn(user_turn, db_session=db.session)
        _check(user_summary == "Swap the layer", f"user turn summary: {user_summary!r}")
        turn_summary = summaries.summarise_turn(progress_turn, db_session=db.session)
        _check(bool(turn_summary), f"agent turn summary: {turn_summary!r}")
        command_summary = summaries.summarise_command(command, db_session=db.session)
        _check(bool(command_summary), f"command summary: {command_summary!r}")

        emulator.script(
            [Fault(content=json.dumps([{"agent_id": agent.id, "score": 77, "reason": "trial"}]))]
        )
        scored = app.extensions["priority_scoring_service"].score_all_agents(db.session)
        _check(scored.get("scored") == 1, f"priority scoring: {scored}")
        db.session.refresh(agent)
        _check(agent.priority_score == 77, f"the agent's score: {agent.priority_score}")

        progress = app.extensions["progress_summary_service"].generate(project)
        _check(progress.get("status") == "success", f"progress summary: {progress}")
        project_id = project.id
        db.session.remove()

    # Every call recorded: one host event each, after its row committed.
    new_calls = 5
    events = _events(broadcaster, listener, new_calls)
    _check(len(events) == new_calls, f"{new_calls} live inference_call events, got {len(events)}")
    for event in events:
        data = event.data
        _check(
            data.get("cost") is None or isinstance(data["cost"], int | float),
            f"the event's cost is a number for the host's page: {data.get('cost')!r}",
        )
    event_ids = {e.data["id"] for e in events}

    with app.app_context():
        rows = db.session.query(InferenceCall).order_by(InferenceCall.id).all()
        new = [r for r in rows if r.id not in old_ids]
        levels = sorted(r.level for r in new)
        _check(len(rows) == old_rows + new_calls, f"rows: {old_rows} old + {len(new)} new")
        _check(
            levels == ["command", "objective", "project", "turn", "turn"],
            f"the new rows' levels: {levels}",
        )
        _check({r.id for r in new} == event_ids, "the events name the new rows")
        _check(
            all(r.input_text for r in new),
            "every new row keeps its prompt (inference.store_input_text)",
        )
        db.session.remove()

    usage = _json(client.get(f"{SERVICE_API}/usage"), "service usage")
    _check(
        usage["total_calls"] == old_rows + new_calls,
        f"/usage counts old and new rows: {usage['total_calls']} != {old_rows} + {new_calls}",
    )
    page = _json(client.get(f"{HOST_LOG_API}?page=1&per_page=50"), "the host's log page API")
    listed = {c["id"] for c in page["calls"]}
    _check(page["total"] == old_rows + new_calls, f"the log page's total: {page['total']}")
    _check(old_ids | event_ids == listed, "the log page lists every old and new row")
    _check(
        all(c["cost"] is None or isinstance(c["cost"], int | float) for c in page["calls"]),
        "the log page's costs are numbers",
    )
    found = _json(client.get(f"{HOST_LOG_API}?search=keep+the+log+page"), "log page search")
    _check(found["total"] >= 1, "the log page's search finds a prompt (input_text)")
    filters = _json(client.get(f"{HOST_LOG_API}/filters"), "the log page's filters")
    _check("objective" in filters["levels"], f"filters: {filters['levels']}")
    status = _json(client.get(f"{SERVICE_API}/status"), "service status")
    budgets = _check_budgets(status, new, project_id)

    # The project delete: its calls go through the service's purge; the unlinked stay.
    unlinked = 2  # priority scoring and the host's agent-only row: no project link
    deleted = client.delete(f"/api/projects/{project_id}")
    _check(deleted.status_code == 200, f"project delete: {deleted.status_code}")
    after_delete = _json(client.get(f"{SERVICE_API}/usage"), "usage after the project delete")
    page = _json(client.get(f"{HOST_LOG_API}?page=1&per_page=50"), "log page after delete")
    _check(
        after_delete["total_calls"] == page["total"] == unlinked,
        f"after the project delete: usage {after_delete['total_calls']}, "
        f"page {page['total']}, expected {unlinked}",
    )
    # The "clear log" button.
    cleared = client.delete(HOST_LOG_API, headers={"X-Confirm-Destructive": "true"})
    cleared_json = _json(cleared, "clear log")
    after_clear = _json(client.get(f"{SERVICE_API}/usage"), "usage after the clear")
    page = _json(client.get(f"{HOST_LOG_API}?page=1&per_page=50"), "log page after clear")
    _check(
        cleared_json.get("deleted") == unlinked and after_clear["total_calls"] == 0
        and page["total"] == 0,
        f"clear log: deleted {cleared_json.get('deleted')}, usage "
        f"{after_clear['total_calls']}, page {page['total']}",
    )  # fmt: skip
    broadcaster.unregister_client(listener)
    return {
        "old_rows": old_rows, "new_rows": new_calls, "usage_total_calls": usage["total_calls"],
        "usage_total_cost": usage.get("total_cost"), "log_page_total": old_rows + new_calls,
        "events": len(events), "status_state": status.get("state"),
        "after_project_delete": after_delete["total_calls"], "after_clear": 0,
        "budgets": budgets,
    }  # fmt: skip


def _check_budgets(status: dict[str, Any], new: list[Any], project_id: int) -> dict[str, Any]:
    """The operator's budgets, read from the host's config, counted in the host's own
    database through its engine: each rule's use is what OpenRouter charged its calls."""
    guard = status["spend_guard"]
    _check(
        (guard["store"], guard["shared"]) == ("database", True),
        f"the budgets are counted in the host's database: {guard}",
    )
    by_rule = {(b["rule"], b["project_id"]): b for b in status["budgets"]}

    def charged(rows: list[Any]) -> float:
        return float(sum(r.upstream_cost_usd or 0 for r in rows))

    expected = {
        ("turn-summaries", None): [r for r in new if r.purpose == "summarise_turn"],
        ("per-project", project_id): [r for r in new if r.project_id == project_id],
        ("everything", None): new,
    }
    for rule, rows in expected.items():
        _check(rule in by_rule, f"/status lists the budget {rule}: {sorted(by_rule)}")
        used = by_rule[rule]["used_usd"]
        _check(
            abs(used - charged(rows)) < 1e-8 and used > 0,
            f"budget {rule} used {used}, its {len(rows)} calls were charged {charged(rows)}",
        )
    everything = by_rule[("everything", None)]
    tokens = sum(r.input_tokens + r.output_tokens for r in new)
    _check(everything["used_tokens"] == tokens, f"tokens {everything['used_tokens']} != {tokens}")
    return {f"{rule}/{project or ''}": by_rule[(rule, project)]["used_usd"]
            for rule, project in expected}  # fmt: skip


def _events(broadcaster: Any, listener: str, wanted: int) -> list[Any]:
    """Up to ``wanted`` inference_call events, each waited for at most RECORD_WAIT_SECONDS."""
    events = []
    while len(events) < wanted:
        event = broadcaster.get_next_event(listener, timeout=RECORD_WAIT_SECONDS)
        if event is None:
            break
        if event.event_type == "inference_call":
            events.append(event)
    return events


def _json(response: Any, what: str) -> Any:
    _check(response.status_code == 200, f"{what}: HTTP {response.status_code} {response.data!r}")
    return response.get_json()


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def _stop(app: Any) -> None:
    """Give back what the app took: the service, the event writer, the engine."""
    with app.app_context():
        for key in ("inference_service", "event_writer"):
            part = app.extensions.get(key)
            if part is not None:
                part.stop()
        from claude_headspace.database import db

        db.engine.dispose()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
