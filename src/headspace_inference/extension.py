"""``Inference``: the service as a Flask extension, in the ecosystem's usual shape.

```python
inference = Inference()

def create_app():
    app = Flask(__name__)
    ...
    inference.init_app(app, config_path="config.yaml")
    return app
```
``init_app`` validates the configuration and gives the app its service
(``app.extensions["inference"]``, or the ``extension_key`` the host names), the JSON API
under ``url_prefix`` (/api/inference), the operator page and /metrics only at the paths the
host gives, the CLI group (``flask inference ...``), and nothing else: no connection,
migration, thread, file, network request or exit hook until the first call, the first
request to one of its routes, or ``service.start()``. ``create_app()`` (standalone/app.py)
builds the standalone app on this same path.
"""

from __future__ import annotations

import difflib
import os
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from flask import Flask, current_app

from . import logsafe
from .app_state import (
    DEFAULT_URL_PREFIX,
    EXTENSION_KEY,
    STATE_KEY,
    AppState,
    RouteClashError,
    service_for,
)

__all__ = ["EXTENSION_KEY", "Inference", "InferenceOptions", "RouteClashError", "service_for"]

if TYPE_CHECKING:
    import httpx
    from sqlalchemy import Engine

    from .calllog.database import Database
    from .inference.service import InferenceService
    from .settings import Settings


class InferenceOptions(TypedDict, total=False):
    """What ``Inference(...)`` and ``init_app(...)`` take, all optional.

    - ``settings`` replaces the configuration file altogether; else the ``openrouter`` and
      ``inference`` sections of ``config`` (the host's already-merged configuration, a
      mapping) or of the file ``config_path`` (default $HEADSPACE_CONFIG, else
      ./config.yaml; not both) are read, with ``overrides`` in the file's shape; every other
      section is the host's, and ignored. ConfigError names a bad key; a key inside
      ``openrouter:`` that the service does not know is the host's (one warning), and the
      host's ``openrouter.timeout`` is ``timeout_seconds``.
    - The database is ``engine`` (an SQLAlchemy Engine the host has; it stays the host's),
      else ``database_url``, else the default engine of the app's Flask-SQLAlchemy (found
      when first used; the host's too), else $DATABASE_URL, else ``SQLALCHEMY_DATABASE_URI``.
      Redis is ``redis_url``, else $REDIS_URL, else ``inference.redis.url``.
    - ``database`` (a headspace_inference.calllog.database.Database: an engine and its
      migration histories) is what create_app() passes. ``transport`` carries the requests
      to OpenRouter (an egress proxy of the host's); or ``http_client``, the host's own
      ``httpx.Client`` (its proxies, TLS, event hooks), used as given and never closed by
      the service: not both.
    - URLs: the JSON API (and its live feed, /events) under ``url_prefix`` (default
      /api/inference); the operator page at ``page_path`` and the Prometheus endpoint at
      ``metrics_path`` (the metrics extra) only when given; ``routes=False`` leaves all of
      them out. A rule that is also the host's (same rule, a shared method) raises
      RouteClashError, naming both endpoints: here for the host's rules so far, and at
      start (``service.start()`` or the app's first request) for rules added after.
    - ``extension_key``: the service's key in app.extensions (default ``inference``).
    """

    config: Mapping[str, Any]
    config_path: str | os.PathLike[str]
    overrides: Mapping[str, Any]
    settings: Settings
    database_url: str
    redis_url: str
    engine: Engine
    database: Database
    transport: httpx.BaseTransport
    http_client: httpx.Client
    routes: bool
    url_prefix: str
    page_path: str | None
    metrics_path: str | None
    extension_key: str


OPTION_NAMES = frozenset(InferenceOptions.__annotations__)


def check_options(where: str, options: Mapping[str, object]) -> None:
    """TypeError naming every option ``where`` does not take (and the one meant, if close):
    a host's typo would otherwise go unnoticed."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if not unknown:
        return
    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, OPTION_NAMES, n=1)
        named.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    words = "argument" if len(named) == 1 else "arguments"
    raise TypeError(
        f"{where}() got unexpected keyword {words} {', '.join(named)}; "
        f"it takes {', '.join(sorted(OPTION_NAMES))}"
    )


class Inference:
    """The inference service for one or more Flask apps.

    ``Inference(app, **options)`` initialises ``app`` at once; ``Inference(**options)`` then
    ``init_app(app, **options)`` does it later, for each app (options given to ``init_app``
    win). The extension object keeps no app's state: each app's service is
    ``app.extensions[extension_key]`` (``"inference"`` unless the host names another key),
    and ``inference.service`` is the current app's.
    """

    def __init__(self, app: Flask | None = None, **options: Unpack[InferenceOptions]) -> None:
        check_options("Inference", options)
        self._options = options
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, **options: Unpack[InferenceOptions]) -> InferenceService:
        """Build ``app``'s service from the options (see InferenceOptions) and give the app
        its routes and the ``flask inference`` commands; start nothing (see the module)."""
        from .cli import inference_group
        from .inference.service import InferenceService

        check_options("init_app", options)
        given: InferenceOptions = {**self._options, **options}
        key = given.get("extension_key", EXTENSION_KEY)
        if not isinstance(key, str) or not key:
            raise TypeError(f"extension_key= must be a non-empty string, got {key!r:.60}")
        if STATE_KEY in app.extensions:
            raise RuntimeError(f"app {app.name!r} already has an inference service")
        if key in app.extensions:
            raise RuntimeError(
                f"app {app.name!r} already has an extension under {key!r}: "
                f"give init_app another extension_key="
            )
        if "transport" in given and "http_client" in given:
            raise TypeError("init_app() takes transport= or http_client=, not both")
        if "config" in given and ("config_path" in given or "settings" in given):
            other = "config_path" if "config_path" in given else "settings"
            raise TypeError(f"init_app() takes config= or {other}=, not both")
        urls = _urls(given) if given.get("routes", True) else None
        settings, database = _configure(app, given)
        logsafe.protect(settings.api_key)
        if settings.api.token is not None:
            logsafe.protect(settings.api.token.get_secret_value())
        service = InferenceService.from_settings(
            settings,
            database,
            spool_dir=settings.spool_dir(),
            transport=given.get("transport"),
            http_client=given.get("http_client"),
        )
        state = AppState(key)
        app.extensions[STATE_KEY] = state
        app.extensions[key] = service
        if urls is not None:
            from .operate import register_routes
            from .page.views import console_bp

            state.url_prefix, state.page_path, state.metrics_path = urls
            page = console_bp if state.page_path is not None else None
            register_routes(app, service, page)
        app.cli.add_command(inference_group)
        _leave_out_of_host_autogenerate(app)
        return service

    @property
    def service(self) -> InferenceService:
        """The current app's service (inside an app context)."""
        return service_for(current_app)


def _urls(options: InferenceOptions) -> tuple[str, str | None, str | None]:
    """The API's prefix, the page's and /metrics' paths, checked: ConfigError names a bad one."""
    from .settings import ConfigError

    def path(name: str, value: object, *, root: bool) -> str:
        # Flask joins a blueprint's prefix and its rules with "/": kept without a trailing one.
        if not isinstance(value, str) or not value.startswith("/") or "//" in value:
            raise ConfigError(f"{name}: must be a URL path starting with '/', got {value!r:.60}")
        stripped = value.rstrip("/")
        if not stripped and not root:
            raise ConfigError(f"{name}: must name a path below '/', got {value!r:.60}")
        return stripped

    prefix = path("url_prefix", options.get("url_prefix", DEFAULT_URL_PREFIX), root=True)
    page, metrics = options.get("page_path"), options.get("metrics_path")
    page = None if page is None else path("page_path", page, root=False)
    metrics = None if metrics is None else path("metrics_path", metrics, root=False)
    if metrics is not None:
        from .operate.live import metrics_installed

        if not metrics_installed():
            raise ConfigError(
                "metrics_path: /metrics needs the metrics extra: "
                "pip install 'headspace-inference[metrics]'"
            )
    return prefix, page, metrics


def _leave_out_of_host_autogenerate(app: Flask) -> None:
    """Give a host's Flask-Migrate (set up before the service) our ``include_name``, joined
    with its own: its ``flask db migrate`` compares the host's models with every table in
    the database, and would otherwise write a migration dropping the service's."""
    migrate = app.extensions.get("migrate")
    configure_args = getattr(migrate, "configure_args", None)
    if not isinstance(configure_args, dict):
        return
    from .calllog.database import include_name

    hosts = configure_args.get("include_name")
    if hosts is None:
        configure_args["include_name"] = include_name
        return

    def both(name: str | None, type_: str, parent_names: Any) -> bool:
        return include_name(name, type_, parent_names) and bool(hosts(name, type_, parent_names))

    configure_args["include_name"] = both


def _configure(app: Flask, options: InferenceOptions) -> tuple[Settings, Database]:
    """The settings and the database ``init_app``'s options describe."""
    from .calllog.database import Database
    from .config_loading import load_host_settings
    from .settings import ConfigError

    settings = options.get("settings")
    engine, database_url = options.get("engine"), options.get("database_url")
    if engine is not None and database_url is not None:
        raise ConfigError("database_url and engine: give one of them, not both")
    host_engine = None
    if settings is None:
        host = load_host_settings(
            options.get("config_path"),
            options.get("overrides"),
            redis_url=options.get("redis_url"),
            config=options.get("config"),
        )
        url, source = _database_url(app, database_url, engine)
        settings = host.settings(url, source=source)
        if engine is None and database_url is None:
            host_engine = _flask_sqlalchemy_engine(app)
    elif engine is not None or database_url is not None:
        url, source = _database_url(app, database_url, engine)
        database_settings = settings.database.with_url(url, source=source)
        settings = settings.model_copy(update={"database": database_settings})
    database = options.get("database") or Database(
        settings.database, engine=engine, host_engine=host_engine
    )
    return settings, database


def _database_url(app: Flask, given: str | None, engine: Engine | None) -> tuple[str, str]:
    """The host's database URL and what it came from (named in errors). Where the app has
    Flask-SQLAlchemy, its engine is used instead of the URL from the environment or the
    app's config (``_flask_sqlalchemy_engine``); the URL is still checked here, at init_app."""
    from .settings import ConfigError

    if engine is not None:
        return engine.url.render_as_string(hide_password=False), "engine"
    if given is not None:
        return given, "database_url"
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"], "DATABASE_URL"
    configured = app.config.get("SQLALCHEMY_DATABASE_URI")
    if configured:
        return str(configured), "SQLALCHEMY_DATABASE_URI"
    raise ConfigError(
        "no database for the call log: pass database_url= or engine=, set DATABASE_URL, "
        "or set the app's SQLALCHEMY_DATABASE_URI"
    )


def _flask_sqlalchemy_engine(app: Flask) -> Callable[[], Engine | None]:
    """What finds the default engine of the app's Flask-SQLAlchemy (None when it has none)
    when the call log first needs it: Flask-SQLAlchemy may be set up after init_app, and
    its engines are reached in an app context. The app is held weakly: the service is kept
    in the app, not the other way round."""
    app_ref = weakref.ref(app)

    def find() -> Engine | None:
        app = app_ref()
        extension = app.extensions.get("sqlalchemy") if app is not None else None
        if app is None or extension is None:
            return None
        with app.app_context():
            engines = getattr(extension, "engines", None)  # Flask-SQLAlchemy 3
            engine: Engine | None = engines.get(None) if engines is not None else None
            return engine

    return find
