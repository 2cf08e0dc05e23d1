"""An example host: a Flask app of its own (Flask-SQLAlchemy, Flask-Migrate, its own tables,
history and config.yaml) that adopts the inference service. The lines marked ``# +`` are
all it adds for it."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, Flask, current_app, jsonify
from flask_migrate import Migrate
from sqlalchemy import event

from headspace_inference import Inference  # +

from .models import Agent, Command, Project, Turn, db

HERE = Path(__file__).parent
migrate = Migrate()
inference = Inference()  # +
routes = Blueprint("host", __name__)


def create_app(config_path: str | Path = HERE.parent / "config.yaml",
               database_url: str | None = None) -> Flask:  # fmt: skip
    """The host's factory: its own config, database and routes, then the service."""
    app = Flask(__name__)
    config = yaml.safe_load(Path(config_path).read_text())
    app.config["SQLALCHEMY_DATABASE_URI"] = (
        database_url or os.environ.get("DATABASE_URL") or _host_url(config["database"])
    )
    db.init_app(app)
    with app.app_context():
        if db.engine.dialect.name == "sqlite":  # so that ON DELETE acts (the host's and ours)
            event.listen(db.engine, "connect", _sqlite_foreign_keys)
    migrate.init_app(app, db, directory=str(HERE / "migrations"))
    # The service uses db.engine (found on first use) and gives the Migrate above its
    # include_name, so the host's autogenerate leaves the service's tables alone.
    inference.init_app(app, config=config)  # +
    app.register_blueprint(routes)
    return app


def _host_url(section: dict[str, Any]) -> str:
    return f"postgresql://{section['user']}@{section['host']}:{section['port']}/{section['name']}"


def _sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys=ON")


# --- the host's call sites, as Claude Headspace writes them ------------------------------


@routes.post("/turns/<int:turn_id>/summarise")
def summarise_turn(turn_id: int) -> Any:
    """Answer at once; summarise in a thread of the host's (as its hook handler does)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    threading.Thread(target=_summarise_turn, args=(app, turn_id), daemon=True).start()
    return jsonify({"queued": turn_id}), 202


def _summarise_turn(app: Flask, turn_id: int) -> None:
    with app.app_context():
        turn = db.session.get(Turn, turn_id)
        command = db.session.get(Command, turn.command_id)
        agent = db.session.get(Agent, command.agent_id)
        service = app.extensions["inference"]
        if not service.is_available:
            return
        result = service.infer(
            level="turn",
            purpose="summarise_turn",
            input_text=turn.text,
            project_id=agent.project_id,
            agent_id=agent.id,
            command_id=command.id,
            turn_id=turn.id,
        )
        turn.summary = result.text.strip()
        db.session.commit()


@routes.post("/commands/<int:command_id>/summarise")
def summarise_command(command_id: int) -> Any:
    """A blocking call from a handler would hold the request: submit() and return."""
    command = db.session.get(Command, command_id)
    agent = db.session.get(Agent, command.agent_id)
    inference.service.submit(
        level="command",
        purpose="summarise_command",
        input_text=f"Summarise command {command.id}",
        project_id=agent.project_id,
        agent_id=agent.id,
        command_id=command.id,
    )
    return jsonify({"queued": command_id}), 202


def score_priorities() -> str:
    """Priority scoring: an objective-level call with no link at all."""
    projects = db.session.scalars(db.select(Project).where(~Project.inference_paused)).all()
    listing = "\n".join(p.name for p in projects)
    prompt = f"Rank these projects:\n{listing}"
    service = inference.service
    result = service.infer(level="objective", purpose="priority_scoring", input_text=prompt)
    return str(result.text)
