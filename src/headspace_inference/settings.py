"""Typed settings: what every part of the service is configured with, validated.

The models only; reading them from YAML, the environment and a host's mapping is
config_loading's. Nothing inward of these models reads a dict of settings.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    PositiveInt,
    SecretStr,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .row_bounds import MAX_INTEGER, MAX_USD, MODEL_NAME_CHARS, PURPOSE_CHARS

log = logging.getLogger(__name__)

# The levels and their models when openrouter.models is not configured; a configured
# mapping replaces them all (the host's has `command` where this has `task`).
DEFAULT_MODELS: dict[str, str | list[str]] = {
    "turn": "anthropic/claude-haiku-4.5",
    "task": "anthropic/claude-haiku-4.5",
    "project": "anthropic/claude-sonnet-4.5",
    "objective": "anthropic/claude-sonnet-4.5",
}

ENV_PREFIX = "HEADSPACE__"
SECRET_KEYS = frozenset({"api_key", "token"})

# Every duration has an upper bound, so that converting it to milliseconds (Redis) or adding
# it to a clock cannot overflow.
DAY = 86_400.0
YEAR = 365 * DAY
Seconds = Annotated[float, Field(gt=0, le=DAY)]
SecondsOrZero = Annotated[float, Field(ge=0, le=DAY)]
MIB = 2**20


# The drivers a PostgreSQL URL that names none is read with, in order of preference.
POSTGRES_DRIVERS = ("psycopg", "psycopg2")


def normalise_url(url: str) -> str:
    """Name a driver in PostgreSQL URLs that name none: psycopg 3 (the ``postgres`` extra),
    else psycopg2 where only it is installed (a host's), whatever SQLAlchemy's own default
    (2.0 reads ``postgresql://`` as psycopg2, 2.1 as psycopg 3)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = f"postgresql+{_postgres_driver()}://" + url[len("postgresql://") :]
    return url


def _postgres_driver() -> str:
    # Found, not imported: a URL is normalised long before its engine connects.
    for module in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return module
    return POSTGRES_DRIVERS[0]  # neither: check_url's error says what to install


def check_url(url: str) -> None:
    """Raise ValueError unless ``url`` parses and names a dialect whose driver is installed.

    The message never quotes the URL: it may hold a password.
    """
    try:
        parsed = make_url(normalise_url(url))
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ValueError(
            "not a database URL (e.g. sqlite:///instance/headspace.db or postgresql://user@host/db)"
        ) from None
    try:
        parsed.get_dialect().import_dbapi()
    except (NoSuchModuleError, ImportError):
        raise ValueError(
            f"no installed driver for {parsed.drivername}{_driver_hint(parsed)}"
        ) from None


def _driver_hint(url: Any) -> str:
    if url.get_backend_name() != "postgresql":
        return " (PostgreSQL and SQLite are supported)"
    if url.get_driver_name() == "psycopg2":
        return ": pip install psycopg2-binary"
    return ": pip install 'headspace-inference[postgres]' (psycopg 3), or psycopg2-binary"


class ConfigError(Exception):
    """The configuration is invalid; one line naming each bad key (and value, unless secret)."""


class _Section(BaseModel):
    # No inf or NaN: every number here ends up in arithmetic or a timeout, where either
    # would break every call.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )


class DatabaseOptions(_Section):
    """How the service uses its database (inside a host: ``inference.database``)."""

    auto_migrate: bool = False
    pool_size: PositiveInt = 10
    echo: bool = False
    # A request's read of the call log (/usage, /calls, the page's data) answers 503 past
    # this, whatever the database or the network does; on PostgreSQL it is also the read's
    # statement_timeout. The status probe has its own (openrouter.health is OpenRouter's).
    read_timeout_seconds: Annotated[float, Field(ge=0.1, le=DAY)] = 5.0
    # Opening a PostgreSQL connection (libpq's connect_timeout, which counts whole seconds:
    # rounded up; engines the service builds).
    connect_timeout_seconds: Annotated[float, Field(ge=1, le=DAY)] = 5.0

    def with_url(self, url: str, *, source: str) -> DatabaseSettings:
        """These options on the database at ``url``; ConfigError names ``source`` (where the
        URL came from) and never quotes the URL, which may hold a password."""
        options = self.model_dump(include=set(DatabaseOptions.model_fields))
        try:
            return DatabaseSettings(url=url, **options)
        except ValidationError as exc:
            problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ConfigError(f"{source}: {problems}") from None


class DatabaseSettings(DatabaseOptions):
    """Where the call log (and, standalone, the domain tables) live."""

    url: str = "sqlite:///instance/headspace.db"

    @field_validator("url")
    @classmethod
    def _usable_url(cls, value: str) -> str:
        # At start-up, naming the key, rather than at the first connection.
        check_url(value)
        return value


class RedisSettings(_Section):
    """Optional Redis: when set, rate limits and the cache are shared by every process."""

    url: str | None = None
    # Not "headspace": a host's own keys live under headspace:, and its namespace flush
    # (SCAN MATCH headspace:*) must never reach the service's.
    key_prefix: str = "headspace-inference"
    socket_timeout_seconds: Seconds = 0.5
    retry_interval_seconds: Seconds = 5.0

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # By redis-py's own rules (what Redis.from_url reads), without quoting the URL.
        if value is not None:
            if not value.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError("must start with redis://, rediss:// or unix://")
            try:  # the redis extra, imported when a URL is configured
                from redis.connection import parse_url
            except ImportError:
                raise ValueError(
                    "needs the redis extra: pip install 'headspace-inference[redis]'"
                ) from None
            try:
                parse_url(value)  # type: ignore[no-untyped-call]  # redis-py has no hints here
            except ValueError:
                raise ValueError("not a Redis URL (check its port and options)") from None
        return value


# A model name is stored in every row of its level: no longer than the column.
ModelName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MODEL_NAME_CHARS)
]
# A level's models: one name, or the primary then OpenRouter's fallbacks, in order. Told
# apart by type, so an error is about the form given; the tags (with a space, so never a
# key) are left out of error messages.
ONE_MODEL, MODEL_LIST = "one model", "model list"
LevelModels = Annotated[
    Annotated[ModelName, Tag(ONE_MODEL)]
    | Annotated[list[ModelName], Field(min_length=1), Tag(MODEL_LIST)],
    Discriminator(lambda v: MODEL_LIST if isinstance(v, list) else ONE_MODEL),
]
# A level is a name callers pass and the call log stores (a 16-character column).
LevelName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,15}$")]


class RateLimitSettings(_Section):
    """Calls and tokens per window (a minute unless tests shorten it)."""

    calls_per_minute: PositiveInt = 30
    tokens_per_minute: PositiveInt = 10000
    max_wait_seconds: SecondsOrZero = 30.0
    window_seconds: Seconds = 60.0


class CacheSettings(_Section):
    """The response cache keyed by request content."""

    enabled: bool = True
    ttl_seconds: Annotated[float, Field(gt=0, le=YEAR)] = 300.0
    max_entries: PositiveInt = 10000
    # What the memory tier may hold, in bytes of answers; an answer over an eighth of it is
    # not kept there.
    max_memory_bytes: Annotated[int, Field(ge=64 * 1024, le=64 * 1024 * MIB)] = 64 * MIB


class RetrySettings(_Section):
    """How retryable upstream failures are retried."""

    max_attempts: PositiveInt = 3
    base_delay_seconds: SecondsOrZero = 1.0
    max_delay_seconds: SecondsOrZero = 30.0


class HealthSettings(_Section):
    """The connectivity probe behind /api/inference/status."""

    timeout_seconds: Seconds = 5.0
    cache_seconds: SecondsOrZero = 60.0


# The most a price may be, USD per million tokens: at it, a call of the largest size a row
# counts (each of the four token counts a cost is made of at MAX_INTEGER) still costs no
# more than the call log holds (MAX_USD). 1,073: OpenRouter's dearest models are far below.
MAX_PRICE_PER_MILLION = int(MAX_USD * 1_000_000 / (4 * MAX_INTEGER))
Price = Annotated[float, Field(ge=0, le=MAX_PRICE_PER_MILLION)]


class PriceSettings(_Section):
    """USD per million tokens for one model; a cache price not given is the input price."""

    input_per_million: Price
    output_per_million: Price
    cache_read_per_million: Price | None = None
    cache_write_per_million: Price | None = None


# OpenRouter's documented provider preferences (provider routing), each typed as documented.
Quantization = Literal["int4", "int8", "fp4", "fp6", "fp8", "fp16", "bf16", "fp32", "unknown"]
ProviderName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class MaxPriceSettings(_Section):
    """The most to pay, USD per million tokens (per request or image for those two)."""

    prompt: NonNegativeFloat | None = None
    completion: NonNegativeFloat | None = None
    request: NonNegativeFloat | None = None
    image: NonNegativeFloat | None = None


class ProviderSettings(_Section):
    """OpenRouter's ``provider`` routing preferences, sent as they are; an unknown key is
    refused by name (a typo would otherwise route every call as if it were not there)."""

    order: list[ProviderName] | None = None
    allow_fallbacks: bool | None = None
    require_parameters: bool | None = None
    data_collection: Literal["allow", "deny"] | None = None
    zdr: bool | None = None
    only: list[ProviderName] | None = None
    ignore: list[ProviderName] | None = None
    quantizations: list[Quantization] | None = None
    sort: Literal["price", "throughput", "latency"] | None = None
    max_price: MaxPriceSettings | None = None

    def as_body(self) -> dict[str, Any]:
        """The preferences set, as OpenRouter's ``provider`` object."""
        return self.model_dump(exclude_none=True)


def default_pricing() -> dict[str, PriceSettings]:
    """The prices openrouter.pricing has when not configured (the emulator charges them too)."""
    # Anthropic's cache reads cost a tenth of the input price, its (5-minute) writes 1.25x.
    return {
        "anthropic/claude-haiku-4.5": PriceSettings(
            input_per_million=1.0,
            output_per_million=5.0,
            cache_read_per_million=0.1,
            cache_write_per_million=1.25,
        ),
        "anthropic/claude-sonnet-4.5": PriceSettings(
            input_per_million=3.0,
            output_per_million=15.0,
            cache_read_per_million=0.3,
            cache_write_per_million=3.75,
        ),
    }


# A budget's calendar window, in UTC: the hour, the day or the month a call is made in.
BudgetWindow = Literal["hour", "day", "month"]
# Named in errors, log lines, /status and the store's keys: printable, short.
RuleName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[ -~]+$")
]
Purpose = Annotated[str, StringConstraints(min_length=1, max_length=PURPOSE_CHARS)]
ProjectId = Annotated[int, Field(ge=1, le=MAX_INTEGER)]
# The guard counts USD in whole nanodollars, which Lua's doubles add exactly to 2**53: a
# million dollars is far below that and far above any budget.
MAX_BUDGET_USD = 1_000_000
MAX_BUDGET_TOKENS = 10**12
# The longest label a budget may have without a name (``<scope>/<window>``).
MAX_RULE_LABEL = 120


class BudgetScope(_Section):
    """The calls a budget counts: every call ({}), or those of a ``level``, a ``purpose``
    and/or a project: one (``project_id: 42``), or each project apart (``project_id: each``,
    a cap per project). Keys given together must all match."""

    level: LevelName | None = None
    purpose: Purpose | None = None
    project_id: ProjectId | Literal["each"] | None = None

    def describe(self) -> str:
        """``level=turn, project_id=each``; ``all`` for every call."""
        given = self.model_dump(exclude_none=True)
        return ", ".join(f"{k}={v}" for k, v in given.items()) or "all"


class BudgetRule(_Section):
    """A cap on what the calls of a scope may spend in a window: USD and/or tokens, with a
    warning when ``warn_at`` of a cap is used."""

    name: RuleName | None = None
    scope: BudgetScope = Field(default_factory=BudgetScope)
    window: BudgetWindow
    cap_usd: Annotated[float, Field(gt=0, le=MAX_BUDGET_USD)] | None = None
    cap_tokens: Annotated[int, Field(gt=0, le=MAX_BUDGET_TOKENS)] | None = None
    warn_at: Annotated[float, Field(gt=0, le=1)] = 0.8

    @model_validator(mode="after")
    def _a_cap(self) -> BudgetRule:
        if self.cap_usd is None and self.cap_tokens is None:
            raise ValueError("a budget needs cap_usd and/or cap_tokens")
        if self.name is None and len(self.label) > MAX_RULE_LABEL:
            # The label keys the budget's counts (a Redis key, a database column).
            raise ValueError(
                "a budget whose scope is this long needs a name (at most 64 characters)"
            )
        return self

    @property
    def label(self) -> str:
        """Its name, else ``<scope>/<window>`` (``level=turn/day``, ``all/month``)."""
        return self.name or f"{self.scope.describe()}/{self.window}"


class StormBreakerSettings(_Section):
    """Refuse a purpose (per project, when the call names one) that makes more than
    ``calls`` calls that go upstream in ``seconds``, for ``cooldown_seconds``. On by
    default, far above what the host's features make: a loop, not a busy hour."""

    enabled: bool = True
    calls: PositiveInt = 60
    seconds: Seconds = 60.0
    cooldown_seconds: Seconds = 300.0


class OpenRouterSettings(_Section):
    """How to reach OpenRouter and what to ask of it."""

    enabled: bool = True
    base_url: str = "https://openrouter.ai/api/v1"
    api_key: SecretStr | None = None
    timeout_seconds: Seconds = 30.0
    connect_timeout_seconds: Seconds = 5.0
    max_connections: PositiveInt = 64
    # The most an answer may be, in bytes, on the wire and decoded; a larger one is refused.
    max_response_bytes: Annotated[int, Field(ge=64 * 1024, le=1024 * MIB)] = 8 * MIB
    site_url: str = "https://github.com/claude-headspace"
    app_name: str = "Claude Headspace"
    # Level -> model, or models (primary first, then fallbacks); its keys are the levels
    # callers may use, in this order.
    models: dict[LevelName, LevelModels] = Field(
        default_factory=lambda: dict(DEFAULT_MODELS), min_length=1
    )
    provider: ProviderSettings | None = None
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    pricing: dict[str, PriceSettings] = Field(default_factory=default_pricing)
    # The spend guard: caps per scope and window, and the breaker for call storms.
    budgets: list[BudgetRule] = Field(default_factory=list)
    storm_breaker: StormBreakerSettings = Field(default_factory=StormBreakerSettings)
    # Prices read from OpenRouter's /models by `headspace-inference pricing sync`
    # (openrouter.pricing wins over them); default ./instance/openrouter-pricing.json.
    pricing_file: str | None = None

    def route(self, level: str) -> tuple[str, tuple[str, ...]]:
        """The level's primary model and its fallbacks (empty when it has none)."""
        models = self.models[level]
        if isinstance(models, str):
            return models, ()
        return models[0], tuple(models[1:])

    def all_models(self) -> list[str]:
        """Every configured model, primaries and fallbacks, once each, sorted."""
        found: set[str] = set()
        for level in self.models:
            primary, fallbacks = self.route(level)
            found.update((primary, *fallbacks))
        return sorted(found)

    def pricing_path(self) -> Path:
        """Where synced prices are kept: pricing_file, else ./instance/openrouter-pricing.json."""
        if self.pricing_file:
            return Path(self.pricing_file)
        return Path.cwd() / "instance" / "openrouter-pricing.json"

    @model_validator(mode="after")
    def _budgets_fit_the_levels(self) -> OpenRouterSettings:
        labels: set[str] = set()
        for rule in self.budgets:
            if rule.scope.level is not None and rule.scope.level not in self.models:
                raise ValueError(
                    f"budget {rule.label!r}: scope.level {rule.scope.level!r} is not a level of "
                    f"openrouter.models ({', '.join(self.models)})"
                )
            if rule.label in labels:
                raise ValueError(f"two budgets are called {rule.label!r}: give each its own name")
            labels.add(rule.label)
        return self

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_key", mode="before")
    @classmethod
    def _header_safe_key(cls, value: Any) -> Any:
        return _header_secret(value)

    @field_validator("site_url", "app_name")
    @classmethod
    def _header_value(cls, value: str) -> str:
        # Sent as HTTP-Referer and X-Title, where httpx accepts printable ASCII only: anything
        # else would fail every call, so it fails here, naming the key.
        if not all(" " <= ch <= "~" for ch in value):
            raise ValueError("must be printable ASCII (it is sent in an HTTP header)")
        return value


def _header_secret(value: Any) -> Any:
    # A secret that goes into an HTTP header. Surrounding whitespace (a key file's trailing
    # newline) is dropped; anything else that is not printable ASCII is refused, without
    # showing it: httpx would reject it on every request, in a message quoting it escaped.
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value
    value = value.strip()
    if not all(" " < ch <= "~" for ch in value):
        raise ValueError("must be printable ASCII without spaces (the value is not shown)")
    return value or None


class InferenceSettings(_Section):
    """The service's own limits: input size, workers, queue, shutdown."""

    max_input_chars: PositiveInt = 200_000
    workers: PositiveInt = 8
    queue_size: PositiveInt = 1000
    default_max_tokens: PositiveInt = 1024
    shutdown_timeout_seconds: SecondsOrZero = 10.0
    log_batch_size: PositiveInt = 200
    spool_path: str | None = None
    # The prompt is kept on the call's row only when the host asks: it is the host's
    # conversation text. Bounded, and redacted like answers (logsafe).
    store_input_text: bool = False
    input_text_max_chars: PositiveInt = 20_000

    def spool_dir(self, database_url: str) -> Path:
        """Where the call log's journal lives: spool_path, else a directory of the database's
        own in the user's state directory (see default_spool_dir)."""
        if self.spool_path:
            return Path(self.spool_path)
        return default_spool_dir(database_url)


def default_spool_dir(database_url: str) -> Path:
    """``<user state dir>/headspace-inference/call-log/<database>-<hash>``: outside any
    source tree (a src-layout host's instance folder is inside src/), and one per database.

    The journal replays what a dead process left into the database it finds itself on, so
    two databases must never share a spool; processes and apps on one database do share it
    (journal.py: a live process's segments are locked, only a dead one's are taken). The
    hash is of the database's identity without its password or driver: the same database
    reached through psycopg2 or psycopg 3 keeps one spool.
    """
    import hashlib

    from platformdirs import user_state_path

    url = make_url(normalise_url(database_url))
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:"):
        database = str(Path(database).resolve())
    where = f"{url.username or ''}@{url.host or ''}:{url.port or ''}"
    identity = f"{url.get_backend_name()}://{where}/{database}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(database).stem)[:40]
    return user_state_path("headspace-inference") / "call-log" / f"{name or 'db'}-{digest}"


class ApiSettings(_Section):
    """Access to the operator endpoints: open without ``token``, bearer-token guarded with it."""

    # Absent: the endpoints are open (a local, single-user setup). Present, it must hold a
    # token: a blank one (``token: ''``, ``token:``, ``HEADSPACE__API__TOKEN=``, an unset
    # secret in a deployment template) would otherwise open them silently, so it fails
    # start-up. Hence the default is not validated: only a given value is.
    token: SecretStr | None = Field(default=None, validate_default=False)

    @field_validator("token", mode="before")
    @classmethod
    def _header_safe_token(cls, value: Any) -> Any:
        token = _header_secret(value)
        if token is None:
            raise ValueError(
                "is blank, which would leave every endpoint open: set a token, or remove "
                "the key to run without one"
            )
        return token


class HostInferenceSettings(InferenceSettings):
    """A host's ``inference:`` section: the service's own limits, and what a standalone
    file keeps in its ``redis:``, ``api:`` and ``database:`` sections (the host has its own
    of those, of another shape). The database's URL is not here: it is the host's."""

    redis: RedisSettings = Field(default_factory=RedisSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    database: DatabaseOptions = Field(default_factory=DatabaseOptions)


class HostSettings(_Section):
    """What the service reads from a host's config file: ``openrouter`` and ``inference``.
    Every other top-level section is the host's own, and ignored."""

    model_config = ConfigDict(extra="ignore")

    openrouter: OpenRouterSettings = Field(default_factory=OpenRouterSettings)
    inference: HostInferenceSettings = Field(default_factory=HostInferenceSettings)

    def settings(self, database_url: str, *, source: str) -> Settings:
        """The service's settings on the host's database; ``source`` names where its URL came
        from, for the error when it cannot be used."""
        database = self.inference.database.with_url(database_url, source=source)
        own = InferenceSettings.model_validate(
            self.inference.model_dump(exclude={"redis", "api", "database"})
        )
        return Settings(
            database=database,
            redis=self.inference.redis,
            openrouter=self.openrouter,
            inference=own,
            api=self.inference.api,
        )


class Settings(_Section):
    """Everything the app needs, validated."""

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    openrouter: OpenRouterSettings = Field(default_factory=OpenRouterSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

    @property
    def api_key(self) -> str | None:
        """The OpenRouter key in clear, for the client's Authorization header only."""
        key = self.openrouter.api_key
        return key.get_secret_value() if key is not None else None

    def spool_dir(self) -> Path:
        """Where the call log's journal lives (InferenceSettings.spool_dir)."""
        return self.inference.spool_dir(self.database.url)

    @property
    def levels(self) -> tuple[str, ...]:
        """The inference levels: the keys of openrouter.models, in their order."""
        return tuple(self.openrouter.models)
