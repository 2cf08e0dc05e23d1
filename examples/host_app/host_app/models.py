"""The host's own tables (no objectives): the service links its calls to these by id."""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

db = SQLAlchemy()


class Project(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(db.String(100), unique=True)
    inference_paused: Mapped[bool] = mapped_column(default=False)
    description: Mapped[str | None] = mapped_column(db.Text)


class Agent(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))


class Command(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(primary_key=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    completion_summary: Mapped[str | None] = mapped_column(db.Text)


class Turn(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "turns"

    id: Mapped[int] = mapped_column(primary_key=True)
    command_id: Mapped[int] = mapped_column(ForeignKey("commands.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(db.Text)
    summary: Mapped[str | None] = mapped_column(db.Text)
