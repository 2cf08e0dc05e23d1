"""Typed settings, read once from config.yaml and the environment.

Precedence, lowest first: built-in defaults < the YAML file < ``HEADSPACE__SECTION__KEY``
variables < ``OPENROUTER_API_KEY`` / ``DATABASE_URL`` / ``REDIS_URL`` < ``overrides`` passed
to :func:`load_settings` by code. Nothing inward of this module reads a dict of settings.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import reprlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from dotenv import load_dotenv
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
)
from redis.connection import parse_url
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import Node

from .db import check_url

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
_SECRET_KEYS = frozenset({"api_key", "token"})

# Every duration has an upper bound: 1.0e+308 s passed validation, then overflowed where it
# became milliseconds (Redis) or was added to a clock.
DAY = 86_400.0
YEAR = 365 * DAY
Seconds = Annotated[float, Field(gt=0, le=DAY)]
SecondsOrZero = Annotated[float, Field(ge=0, le=DAY)]


class ConfigError(Exception):
    """The configuration is invalid; one line naming each bad key (and value, unless secret)."""


class _Section(BaseModel):
    # No inf or NaN: an infinite timeout passed validation and then broke every call.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )


class DatabaseOptions(_Section):
    """How the service uses its database (inside a host: ``inference.database``)."""

    auto_migrate: bool = False
    pool_size: PositiveInt = 10
    echo: bool = False

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
        # Here rather than at the first connection, where it was a traceback.
        check_url(value)
        return value


class RedisSettings(_Section):
    """Optional Redis: when set, rate limits and the cache are shared by every process."""

    url: str | None = None
    key_prefix: str = "headspace"
    socket_timeout_seconds: Seconds = 0.5
    retry_interval_seconds: Seconds = 5.0

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # By redis-py's own rules (what Redis.from_url reads), without quoting the URL.
        if value is not None:
            if not value.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError("must start with redis://, rediss:// or unix://")
            try:
                parse_url(value)  # type: ignore[no-untyped-call]  # redis-py has no hints here
            except ValueError:
                raise ValueError("not a Redis URL (check its port and options)") from None
        return value


ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# A level's models: one name, or the primary then OpenRouter's fallbacks, in order. Told
# apart by type, so an error is about the form given; the tags (with a space, so never a
# key) are left out of error messages.
_ONE, _LIST = "one model", "model list"
LevelModels = Annotated[
    Annotated[ModelName, Tag(_ONE)] | Annotated[list[ModelName], Field(min_length=1), Tag(_LIST)],
    Discriminator(lambda v: _LIST if isinstance(v, list) else _ONE),
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


class RetrySettings(_Section):
    """How retryable upstream failures are retried."""

    max_attempts: PositiveInt = 3
    base_delay_seconds: SecondsOrZero = 1.0
    max_delay_seconds: SecondsOrZero = 30.0


class HealthSettings(_Section):
    """The connectivity probe behind /api/inference/status."""

    timeout_seconds: Seconds = 5.0
    cache_seconds: SecondsOrZero = 60.0


class PriceSettings(_Section):
    """USD per million tokens for one model; a cache price not given is the input price."""

    input_per_million: NonNegativeFloat
    output_per_million: NonNegativeFloat
    cache_read_per_million: NonNegativeFloat | None = None
    cache_write_per_million: NonNegativeFloat | None = None


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


class OpenRouterSettings(_Section):
    """How to reach OpenRouter and what to ask of it."""

    enabled: bool = True
    base_url: str = "https://openrouter.ai/api/v1"
    api_key: SecretStr | None = None
    timeout_seconds: Seconds = 30.0
    connect_timeout_seconds: Seconds = 5.0
    max_connections: PositiveInt = 64
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
        # Sent as HTTP-Referer and X-Title: httpx refuses anything else there, so a newline
        # or an accented letter passed validation and then failed every call.
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

    def spool_dir(self, instance: Path | None = None) -> Path:
        """Where the call log's journal lives: spool_path, else call-log/ in the app's
        instance folder (./instance by default)."""
        if self.spool_path:
            return Path(self.spool_path)
        return (Path.cwd() / "instance" if instance is None else instance) / "call-log"


class ApiSettings(_Section):
    """Access to the operator endpoints."""

    token: SecretStr | None = None

    @field_validator("token", mode="before")
    @classmethod
    def _header_safe_token(cls, value: Any) -> Any:
        return _header_secret(value)


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

    @property
    def levels(self) -> tuple[str, ...]:
        """The inference levels: the keys of openrouter.models, in their order."""
        return tuple(self.openrouter.models)


def _merge(base: dict[str, Any], extra: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            out[key] = _merge(current, value, f"{prefix}{key}.")
        elif isinstance(value, Mapping) and current is not None:
            # `openrouter: 'oops'` in the file and a variable setting openrouter.api_key: the
            # variable's mapping replaced the bad section, which fell back to its defaults.
            raise ConfigError(f"{prefix}{key}: must be a mapping (got {_type_name(current)})")
        else:
            out[key] = value
    return out


def _set_path(target: dict[str, Any], path: list[str], value: Any, name: str) -> None:
    node = target
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{name}: {'.'.join(path)} cannot be set, {part} is not a section")
        node = child
    node[path[-1]] = value


# The variables that name a setting, and where it lives: in the standalone file's shape,
# and in a host's (whose database URL is chosen by the extension, not read from its file).
NAMED_VARIABLES: dict[str, list[str]] = {
    "OPENROUTER_API_KEY": ["openrouter", "api_key"],
    "DATABASE_URL": ["database", "url"],
    "REDIS_URL": ["redis", "url"],
}
HOST_NAMED_VARIABLES: dict[str, list[str]] = {
    "OPENROUTER_API_KEY": ["openrouter", "api_key"],
    "REDIS_URL": ["inference", "redis", "url"],
}


def environment_overrides(
    environ: Mapping[str, str], named: Mapping[str, list[str]] = NAMED_VARIABLES
) -> dict[str, Any]:
    """The nested settings that ``HEADSPACE__SECTION__KEY`` variables and the ``named`` ones
    set."""
    out: dict[str, Any] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: an empty section or key in the variable name")
        raw = environ[name]
        # The text as it is (pydantic turns "60", "0.25" and "false" into the field's type),
        # so that a string setting keeps its value: read as YAML, "2024" became a number and
        # "Headspace #2" lost its "#2". Only a flow list or mapping, and null, are YAML; never
        # for a secret, which is text: "{tok-..." failed as YAML, in an error quoting it.
        stripped = raw.strip()
        value: Any = raw
        if not stripped or stripped in ("null", "~"):
            value = None
        elif stripped[0] in "[{" and path[-1] not in _SECRET_KEYS:
            try:
                value = _load_yaml(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"{name}: not a valid YAML list or mapping: {_yaml_problem(exc)}"
                ) from None
        _set_path(out, path, value, name)
    for var, path in named.items():
        if environ.get(var):
            _set_path(out, path, environ[var], var)
    return out


# A bad value is shown as a bounded prefix, built without rendering the rest: repr() of a
# whole value, then cut, hung start-up on a nested one.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 1, 4, 4
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 60, 60, 40


# Values never shown in an error: the secrets, and URLs (they may carry a password).
_UNSHOWN_KEYS = _SECRET_KEYS | {"url"}
# Errors whose input is a whole section, which may hold a secret: only its type is shown.
_SECTION_ERRORS = frozenset({"model_type", "dict_type"})


def _describe(error: Mapping[str, Any]) -> str:
    # A key from the file as written, unless it would break the one line or run long.
    loc = ".".join(
        s if (s := str(p)).isprintable() and len(s) <= 60 else _SHOWN.repr(s)
        for p in error.get("loc", ())
        if p not in (_ONE, _LIST)
    )
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key{_suggestion(str(error.get('loc', ('',))[-1]))}"
    message = f"{loc}: {error.get('msg', 'invalid')}"
    value = error.get("input")
    if _UNSHOWN_KEYS.intersection(str(p) for p in error.get("loc", ())):
        return message
    if kind in _SECTION_ERRORS:
        return f"{message} (got {_type_name(value)})"
    return f"{message} (got {_SHOWN.repr(value)})"


def _keys(model: type[BaseModel]) -> set[str]:
    out = set(model.model_fields)
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= _keys(field.annotation)
    return out


def _suggestion(key: str) -> str:
    # A host's file says `timeout: 30` where this one says timeout_seconds.
    known = _keys(Settings) | _keys(HostSettings)
    longer = sorted(k for k in known if k.startswith(f"{key}_"))
    close = longer or difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def _type_name(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "text", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases.

    An alias (``*name``) stands for its anchored value, so nine nested levels of them in a
    few hundred bytes ("billion laughs") stand for 9**9 values, and anything that walks the
    result walks them all. A configuration of some sixty keys has no need of them.
    """

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # stubs
            raise ComposerError(None, None, "aliases (*name) are not allowed", mark)
        return super().compose_node(parent, index)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError:
            # A number past Python's 4,300-digit limit, or a date like 2024-02-30.
            raise ConstructorError(
                None, None, "a number or date that cannot be read", node.start_mark
            ) from None


def _unknown_tag(loader: yaml.SafeLoader, node: Node) -> Any:
    # PyYAML's own error quotes the tag, which may be a secret's text (``token: !a3f...``).
    raise ConstructorError(None, None, "an unknown tag (!name)", node.start_mark)


_ConfigLoader.add_constructor(None, _unknown_tag)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # What is wrong and where, never PyYAML's whole text: it quotes the offending line,
    # which may hold a secret.
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or "a syntax error"
    # "found undefined tag handle '!x!'": a value starting with "!" is read as a tag.
    problem = re.sub(r"tag handle '.*'", "tag handle (!name!)", problem)
    return f"{problem}{where}"


def _load_yaml(text: str) -> Any:
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise yaml.MarkedYAMLError(problem="lists or mappings nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; a missing file is an empty mapping."""
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (at byte offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_env_file() -> None:
    """Load ``./.env`` into the environment; variables already set win.

    Production machines keep OPENROUTER_API_KEY (and perhaps DATABASE_URL) there.
    """
    load_dotenv(Path.cwd() / ".env", override=False)


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The configuration file: the explicit path, else $HEADSPACE_CONFIG, else ./config.yaml."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("HEADSPACE_CONFIG") or "config.yaml")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read, merge and validate the configuration; raise ConfigError naming every bad key."""
    source = config_path(path)
    data = read_yaml(source)
    data = _merge(data, environment_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    settings = _validated(Settings, data, source)
    # A model with no price is warned of when the service builds its price table, which
    # also knows the prices `headspace-inference pricing sync` stored.
    return settings


def load_host_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    redis_url: str | None = None,
) -> HostSettings:
    """The ``openrouter`` and ``inference`` sections of a host's config file, merged with
    ``HEADSPACE__...``, OPENROUTER_API_KEY and REDIS_URL (below ``redis_url``, below
    ``overrides``, which have the file's shape) and validated as strictly as load_settings."""
    source = config_path(path)
    data = {k: v for k, v in read_yaml(source).items() if k in HostSettings.model_fields}
    env = os.environ if environ is None else environ
    data = _merge(data, environment_overrides(env, HOST_NAMED_VARIABLES))
    if redis_url is not None:
        data = _merge(data, {"inference": {"redis": {"url": redis_url}}})
    if overrides:
        data = _merge(data, overrides)
    host = _validated(HostSettings, data, source)
    return host


_Model = TypeVar("_Model", bound=BaseModel)


def _validated(model: type[_Model], data: dict[str, Any], source: Path) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration ({source}): {problems}") from None


def check_spool_dir(path: str | os.PathLike[str]) -> Path:
    """Create the call-log spool directory and prove it writable, or raise ConfigError.

    Every call is journalled there; an unwritable one ended start-up in a traceback from
    inside the call recorder.
    """
    spool = Path(path)
    try:
        # Private, as the call log makes it: start-up now makes it first.
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=spool, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"inference.spool_path: cannot write to {spool} ({reason})") from None
    return spool
