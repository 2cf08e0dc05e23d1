"""The host's Alembic environment (Flask-Migrate's, trimmed): the host's engine, its
metadata, its version table (alembic_version), and Migrate()'s configure arguments, which
carry include_name so the service's tables stay out of autogenerate."""

from __future__ import annotations

from alembic import context
from flask import current_app

migrate = current_app.extensions["migrate"]


def run() -> None:
    with migrate.db.engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=migrate.db.metadata,
            **migrate.configure_args,  # render_as_batch, and the host's include_name
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
