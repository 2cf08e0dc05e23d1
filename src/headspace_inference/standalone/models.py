"""The standalone app's own domain tables: the minimal projects, agents, commands, turns
and objectives a call can link to. Inside the host these are the host's tables, never
these; the service's tables (headspace_inference.calllog.models) do not depend on them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..calllog.models.base import DOMAIN_NAMING_CONVENTION, UTCDateTime, utcnow


class Base(DeclarativeBase):
    """Base of the standalone app's tables (a metadata apart from the service's)."""

    metadata = MetaData(naming_convention=DOMAIN_NAMING_CONVENTION)


class Project(Base):
    """A code project whose Claude Code sessions Headspace tracks."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Agent(Base):
    """One Claude Code session working in a project."""

    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    session_uuid: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Command(Base):
    """A unit of work an agent was asked to do."""

    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), index=True)
    text: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32), default="idle")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Turn(Base):
    """One exchange within a command, by the user or the agent."""

    __tablename__ = "turns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    command_id: Mapped[int] = mapped_column(
        ForeignKey("commands.id", ondelete="CASCADE"), index=True
    )
    actor: Mapped[str] = mapped_column(String(16), default="agent")
    text: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Objective(Base):
    """What the operator is working towards right now."""

    __tablename__ = "objectives"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
