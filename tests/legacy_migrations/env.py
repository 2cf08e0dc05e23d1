"""Alembic's entry point for this history; the environment is shared (environment.py)."""

from headspace_inference.calllog.migrations.environment import run

run()
