"""The database engine, session factory and migrations."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from ..settings import DatabaseSettings, normalise_url
from .link_keys import reconcile_links
from .models import SERVICE_TABLES, Base

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The service's own Alembic version table: a host's `alembic_version` is the host's.
SERVICE_VERSION_TABLE = "alembic_version_inference"


class ReadTimeoutError(Exception):
    """A bounded read (Database.read) got no answer within its bound."""


# What is raised when the database cannot be reached or does not answer in time (not when a
# statement is wrong).
DATABASE_AWAY: tuple[type[Exception], ...] = (
    OperationalError, InterfaceError, PoolTimeoutError, ReadTimeoutError,
)  # fmt: skip

# TCP keepalives and a user timeout on the connections the service opens to PostgreSQL
# (libpq's, for psycopg 3 and psycopg2 alike): a peer that vanished (a partition, a host
# gone without a reset) ends a connection in about KEEPALIVE_IDLE + KEEPALIVE_INTERVAL x
# KEEPALIVE_COUNT seconds when it is waiting for an answer, TCP_USER_TIMEOUT_MS when
# it has sent bytes that are never acknowledged, not after the kernel's ~15 minutes.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3
TCP_USER_TIMEOUT_MS = 30_000


def include_name(name: str | None, type_: str, parent_names: Any = None) -> bool:
    """For a host's Alembic ``include_name``: False for the service's tables and its version
    table, so the host's autogenerate neither creates nor drops them."""
    return not (type_ == "table" and (name in SERVICE_TABLES or name == SERVICE_VERSION_TABLE))


def is_sqlite(url: str) -> bool:
    """Whether the URL names an SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def build_engine(settings: DatabaseSettings) -> Engine:
    """An engine for the configured database: SQLite (WAL, foreign keys) or PostgreSQL."""
    url = normalise_url(settings.url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=settings.echo,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        echo=settings.echo,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        pool_pre_ping=True,
        pool_timeout=5,
        connect_args={
            "connect_timeout": math.ceil(settings.connect_timeout_seconds),
            "keepalives": 1,
            "keepalives_idle": KEEPALIVE_IDLE,
            "keepalives_interval": KEEPALIVE_INTERVAL,
            "keepalives_count": KEEPALIVE_COUNT,
            "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        },
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@dataclass(frozen=True)
class History:
    """One Alembic history: its scripts, the version table it keeps its place in, and the
    tables it creates (for autogenerate). ``prepare`` runs on the database before it is
    upgraded, ``finish`` after (each in a transaction of its own)."""

    name: str
    scripts: Path
    version_table: str
    metadata: MetaData
    prepare: Callable[[Connection], object] | None = None
    finish: Callable[[Connection], object] | None = None

    def config(self, engine_or_url: Engine | str) -> Any:
        """An Alembic Config for this history on the given database."""
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(self.scripts))
        cfg.attributes["history"] = self
        if isinstance(engine_or_url, str):
            cfg.set_main_option("sqlalchemy.url", normalise_url(engine_or_url).replace("%", "%%"))
        else:
            cfg.attributes["engine"] = engine_or_url
        return cfg

    @cached_property
    def script_directory(self) -> ScriptDirectory:
        """Its revision scripts, read once (they ship with the package)."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self.config("sqlite://"))

    def head(self) -> str:
        """The newest revision this history ships."""
        head = self.script_directory.get_current_head()
        if head is None:
            raise RuntimeError(f"no migrations found in {self.scripts}")
        return head

    def has_revision(self, revision: str) -> bool:
        """Whether ``revision`` (an id or a prefix of one) is one of this history's."""
        from alembic.util import CommandError

        try:
            return self.script_directory.get_revision(revision) is not None
        except CommandError:
            return False

    def current(self, engine: Engine) -> str | None:
        """The revision the database is at in this history, or None before its first."""
        from alembic.runtime.migration import MigrationContext

        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": self.version_table})
            rev: str | None = context.get_current_revision()
            return rev

    def upgrade(self, engine: Engine, revision: str = "head") -> None:
        """Apply this history's migrations up to ``revision``."""
        from alembic import command

        if self.prepare is not None:
            with engine.begin() as conn:
                self.prepare(conn)
        command.upgrade(self.config(engine), revision)
        if self.finish is not None:
            with engine.begin() as conn:
                self.finish(conn)

    def downgrade(self, engine: Engine, revision: str) -> None:
        """Revert this history's migrations down to ``revision``."""
        from alembic import command

        command.downgrade(self.config(engine), revision)


def _before_upgrade(connection: Connection) -> None:
    # A host's own inference_calls is adopted by the migrations (calllog/adopt.py); one that
    # cannot be is refused here, in one line, before anything is changed.
    from alembic.runtime.migration import MigrationContext

    from . import adopt

    context = MigrationContext.configure(connection, opts={"version_table": SERVICE_VERSION_TABLE})
    adopt.check(connection, context.get_current_revision())


def _after_upgrade(connection: Connection) -> None:
    from .rollup import refill_empty_rollup

    reconcile_links(connection)
    refill_empty_rollup(Session(bind=connection))


# The service's history: only its own tables, then the links' constraints where the linked
# tables exist (link_keys.py) and the rollup made again where a migration carried
# rows in. Embedded it is the only one; the standalone app runs its own before it.
SERVICE_HISTORY = History(
    "inference",
    MIGRATIONS_DIR,
    SERVICE_VERSION_TABLE,
    Base.metadata,
    prepare=_before_upgrade,
    finish=_after_upgrade,
)


class _SessionsOnFirstUse(sessionmaker[Session]):
    """Sessions bound to the database's engine when the first one is made, not before: a
    host's Flask-SQLAlchemy engine exists only once the host has set it up, which may be
    after ``init_app``."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        super().__init__(expire_on_commit=False)
        self._engine = engine

    def __call__(self, **local_kw: Any) -> Session:
        if self.kw.get("bind") is None:
            self.configure(bind=self._engine())
        return super().__call__(**local_kw)


class Database:
    """One engine, its session factory, and the migration histories that shape it.

    The engine is found when first used (nothing connects, nothing is imported before):
    ``engine``, an engine the host has; else what ``host_engine`` returns then (the host's
    Flask-SQLAlchemy engine, None when it has none); else one built here from the settings.
    A host's engine stays the host's: ``dispose`` leaves it alone, and it keeps its own
    connect hooks (the SQLite pragmas are set on the engines built here only).
    ``histories`` are applied in order on upgrade and in reverse on downgrade: the
    service's alone inside a host; the standalone app's own domain history, then the
    service's, in ``create_app()``.
    """

    def __init__(
        self,
        settings: DatabaseSettings,
        *,
        engine: Engine | None = None,
        host_engine: Callable[[], Engine | None] | None = None,
        histories: Sequence[History] = (SERVICE_HISTORY,),
    ) -> None:
        self.settings = settings
        self.histories = tuple(histories)
        self._engine = engine
        self._host_engine = host_engine
        self._owns_engine = False
        self._lock = threading.Lock()
        self.sessions: sessionmaker[Session] = _SessionsOnFirstUse(lambda: self.engine)

    @property
    def engine(self) -> Engine:
        """The engine, found (or built) on first use."""
        with self._lock:
            if self._engine is None:
                found = self._host_engine() if self._host_engine is not None else None
                self._owns_engine = found is None
                self._engine = found if found is not None else build_engine(self.settings)
            return self._engine

    def read(self, work: Callable[[Session], T]) -> T:
        """``work(session)``'s result within ``read_timeout_seconds``, else ReadTimeoutError
        (one of DATABASE_AWAY): how a request handler reads, so that no database holds it.

        The work runs on a thread of its own while the caller waits at most the bound. A
        database that takes bytes and never answers (a stalled peer or proxy, whose
        acknowledgements keep every TCP timer quiet) then holds that thread, not the
        caller's, until the stall ends or the driver gives up; the thread holds a pooled
        connection, so at most the pool's size of them wait (others give up at the pool's
        timeout). On PostgreSQL the read's transaction also carries the bound as its
        ``statement_timeout`` (``set_config(..., true)``, i.e. SET LOCAL: a host's engine
        and its other sessions are left as they are), so the server stops a slow read too.
        """
        bound = self.settings.read_timeout_seconds
        outcome: Future[T] = Future()

        def run() -> None:
            try:
                with self.sessions() as session:
                    if session.get_bind().dialect.name == "postgresql":
                        limit = str(max(1, int(bound * 1000)))
                        session.execute(select(func.set_config("statement_timeout", limit, True)))
                    result = work(session)
            except BaseException as exc:  # handed to the caller, if it still waits
                outcome.set_exception(exc)
            else:
                outcome.set_result(result)

        threading.Thread(target=run, name="call-log-read", daemon=True).start()
        try:
            return outcome.result(timeout=bound)
        except FutureTimeoutError:
            raise ReadTimeoutError(f"no answer within {bound:g} s") from None

    @property
    def url(self) -> str:
        """The engine's URL, password included (never logged)."""
        return self.engine.url.render_as_string(hide_password=False)

    @property
    def is_sqlite(self) -> bool:
        """Whether this is an SQLite database."""
        return self.engine.dialect.name == "sqlite"

    def _histories_for(self, revision: str) -> tuple[History, ...]:
        if revision in ("head", "heads", "base"):
            return self.histories
        found = tuple(h for h in self.histories if h.has_revision(revision))
        if len(found) != 1:
            names = ", ".join(f"{h.name} (head {h.head()})" for h in self.histories)
            raise ValueError(f"revision {revision!r:.40} is not one of the histories {names}")
        return found

    def upgrade(self, revision: str = "head") -> None:
        """Apply migrations up to ``revision`` (head: every history, in order)."""
        for history in self._histories_for(revision):
            history.upgrade(self.engine, revision)

    def downgrade(self, revision: str) -> None:
        """Revert migrations down to ``revision`` (base: every history, in reverse order)."""
        for history in reversed(self._histories_for(revision)):
            history.downgrade(self.engine, revision)

    def revisions(self) -> dict[str, str | None]:
        """Each history's current revision (None before its first), by history name."""
        return {h.name: h.current(self.engine) for h in self.histories}

    def behind(self) -> list[str]:
        """The histories not at their head: ``name (at REV, head HEAD)``, for a warning."""
        out = []
        for history in self.histories:
            current, head = history.current(self.engine), history.head()
            if current != head:
                out.append(f"{history.name} (at {current or 'base'}, head {head})")
        return out

    def dispose(self) -> None:
        """Close every pooled connection of an engine built here (a host's is left alone)."""
        with self._lock:
            engine = self._engine if self._owns_engine else None
        if engine is not None:
            engine.dispose()
