"""`make demo`: the service end to end on an embedded SQLite database."""

from __future__ import annotations

from .app import create_app
from .db import current_revision


def main() -> None:
    """Build the app on SQLite (migrating it) and show that it answers."""
    app = create_app()
    database = app.extensions["headspace.database"]
    print(f"database {database.url} at revision {current_revision(database.engine)}")


if __name__ == "__main__":
    main()
