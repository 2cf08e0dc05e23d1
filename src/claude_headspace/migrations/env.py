"""Alembic's entry point for this history; the environment is shared (environment.py)."""

from claude_headspace.migrations.environment import run

run()
