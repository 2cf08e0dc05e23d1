"""The Alembic environment of every history (the service's, the standalone app's): runs on the
engine the app built, or on a URL, keeping its place in the history's own version table."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from ..database import History


def _run(connection: object, history: History) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=history.metadata,
        version_table=history.version_table,
        render_as_batch=connection.dialect.name == "sqlite",  # type: ignore[attr-defined]
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    """Run the history's migrations, from env.py: through the app's engine when given one,
    else through the configured URL (or offline, to SQL)."""
    config = context.config
    history: History = config.attributes["history"]
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=history.metadata,
            version_table=history.version_table,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = config.attributes.get("engine")
    if engine is None:
        engine = create_engine(
            config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool
        )
    with engine.connect() as connection:
        _run(connection, history)
        connection.commit()
