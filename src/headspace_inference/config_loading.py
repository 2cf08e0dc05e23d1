"""Reading the settings: YAML file, environment and code, merged and validated once.

Precedence, lowest first: built-in defaults < the YAML file (or a host's configuration
mapping) < ``HEADSPACE__SECTION__KEY`` variables < ``OPENROUTER_API_KEY`` /
``OPENROUTER_BASE_URL`` / ``DATABASE_URL`` / ``REDIS_URL`` < ``overrides`` passed by code.
pydantic-settings layers the sources; what is ours is the safe YAML reader, how a
variable's text is read, the one-line error per bad key, and how a host's ``openrouter:``
is read. The models are settings.py's.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import reprlib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from dotenv import load_dotenv
from pydantic import BaseModel, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import Node

from .settings import (
    ENV_PREFIX,
    MODEL_LIST,
    ONE_MODEL,
    SECRET_KEYS,
    ConfigError,
    HostSettings,
    OpenRouterSettings,
    Settings,
)

log = logging.getLogger(__name__)

NESTED_DELIMITER = "__"

# The variables that name a setting, and where it lives: in the standalone file's shape,
# and in a host's (whose database URL is chosen by the extension, not read from its file).
NAMED_VARIABLES: dict[str, list[str]] = {
    "OPENROUTER_API_KEY": ["openrouter", "api_key"],
    "OPENROUTER_BASE_URL": ["openrouter", "base_url"],
    "DATABASE_URL": ["database", "url"],
    "REDIS_URL": ["redis", "url"],
}
HOST_NAMED_VARIABLES: dict[str, list[str]] = {
    "OPENROUTER_API_KEY": ["openrouter", "api_key"],
    "OPENROUTER_BASE_URL": ["openrouter", "base_url"],
    "REDIS_URL": ["inference", "redis", "url"],
}


def _variable_value(name: str, raw: str) -> Any:
    """A ``HEADSPACE__...`` variable's value: its text as it is, for pydantic to convert to
    the setting's type, except that an empty value, ``null`` and ``~`` are null and a flow
    list or mapping (``[...]``, ``{...}``) is YAML, read by our safe loader.

    Text, not YAML, so that a string setting keeps its value ("2024" stays a string,
    "Headspace #2" keeps its "#2"); never YAML for a secret, which is text ("{tok-..." is
    not a broken mapping to be quoted in an error).
    """
    stripped = raw.strip()
    if not stripped or stripped in ("null", "~"):
        return None
    if stripped[0] in "[{" and name.rpartition(NESTED_DELIMITER)[2].lower() not in SECRET_KEYS:
        try:
            return _load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"{name}: not a valid YAML list or mapping: {_yaml_problem(exc)}"
            ) from None
    return raw


class _HeadspaceVariables(EnvSettingsSource):
    """pydantic-settings' environment source (prefix, nesting on ``__``, any case) over the
    ``HEADSPACE__`` variables of ``environ``, each value read by :func:`_variable_value`."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        for name, raw in self._environ.items():
            if not name.upper().startswith(ENV_PREFIX):
                continue
            if not all(name[len(ENV_PREFIX) :].split(NESTED_DELIMITER)):
                raise ConfigError(f"{name}: an empty section or key in the variable name")
            out[name.lower()] = _variable_value(name, raw)
        return out

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        # Already read (a flow list or mapping is YAML, see _variable_value): never JSON.
        return value

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        # A variable for a section the settings do not have: an unknown key, as in the file.
        if self.config.get("extra") == "forbid":
            for name in self.env_vars:
                section = name[len(ENV_PREFIX) :].split(NESTED_DELIMITER)[0]
                if section not in self.settings_cls.model_fields:
                    data.setdefault(section, None)
        return data


class _NamedVariables(PydanticBaseSettingsSource):
    """``OPENROUTER_API_KEY``, ``OPENROUTER_BASE_URL``, ``DATABASE_URL``, ``REDIS_URL``: each,
    when set and not empty, as the setting ``named`` maps it to."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        environ: Mapping[str, str],
        named: Mapping[str, list[str]],
    ) -> None:
        super().__init__(settings_cls)
        self._environ, self._named = environ, named

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the variables, not the fields

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for var, path in self._named.items():
            if value := self._environ.get(var):
                node = out
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = value
        return out


class _YamlFile(PydanticBaseSettingsSource):
    """The configuration below the variables: the YAML file, read by our safe loader
    (:func:`read_yaml`), or a host's mapping; a host's (``keep`` given) reduced to the
    sections ``keep`` names, its ``openrouter:`` read as a host writes it
    (:func:`_host_openrouter`)."""

    def __init__(self, settings_cls: type[BaseSettings], given: _Inputs) -> None:
        super().__init__(settings_cls)
        self._given = given

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the whole file

    def __call__(self) -> dict[str, Any]:
        given = self._given
        if given.mapping is not None:
            data = {k: _plain(v) for k, v in given.mapping.items() if isinstance(k, str)}
        else:
            data = read_yaml(given.path)
        if given.keep is not None:
            data = {k: v for k, v in data.items() if k in given.keep}
            if isinstance(data.get("openrouter"), dict):
                data["openrouter"] = _host_openrouter(data["openrouter"])
        _check_sections(data, self.current_state)
        return data


def _plain(value: Any) -> Any:
    """A host's configuration value as the YAML reader would give it: its mappings as dicts
    (copied: the host's own are never changed), its tuples as lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# The host's name for a key of ours, read as ours.
_HOST_ALIASES = {"timeout": "timeout_seconds"}


def _host_openrouter(section: dict[str, Any]) -> dict[str, Any]:
    """A host's ``openrouter:`` section as the service reads it: its aliases as our keys,
    and the keys the service does not know left out, as the host's own (a consumer's
    settings, say), with one warning naming them. Known keys stay strictly checked, and the
    sections inside (``rate_limits``, ``pricing``, ...) are the service's: checked whole."""
    out = dict(section)
    for alias, key in _HOST_ALIASES.items():
        if alias in out:
            if key in out:
                raise ConfigError(
                    f"openrouter.{alias} and openrouter.{key}: the same setting, given twice; "
                    f"keep one"
                )
            out[key] = out.pop(alias)
    known = OpenRouterSettings.model_fields
    unknown = sorted(str(k) for k in out if k not in known)
    if unknown:
        named = ", ".join(f"{_shown_key(k)}{_openrouter_suggestion(k)}" for k in unknown)
        log.warning(
            "openrouter: the host's own, not the inference service's (left alone): %s", named
        )
        out = {k: v for k, v in out.items() if k in known}
    return out


def _openrouter_suggestion(key: str) -> str:
    # A key of a section inside (the host's OPENROUTER_CALLS_PER_MINUTE lands on
    # openrouter.calls_per_minute) is named where it belongs; else a close one.
    for name, field in OpenRouterSettings.model_fields.items():
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel) and key in inner.model_fields:
            return f" (did you mean {name}.{key}?)"
    return _suggestion(key, OpenRouterSettings)


def _shown_key(key: str) -> str:
    return key if key.isprintable() and len(key) <= 60 else _SHOWN.repr(key)


def _check_sections(lower: Mapping[str, Any], higher: Mapping[str, Any], prefix: str = "") -> None:
    # A section set by a source above the file (a variable, an override) replaces the file's
    # value when that is not a mapping: `openrouter: 'oops'` would fall back to its defaults
    # (openrouter.ai) without a word. The file's section must be a mapping to be merged into.
    for key, value in higher.items():
        mine = lower.get(key)
        if not isinstance(value, dict) or mine is None:
            continue
        if not isinstance(mine, dict):
            raise ConfigError(f"{prefix}{key}: must be a mapping (got {_type_name(mine)})")
        _check_sections(mine, value, f"{prefix}{key}.")


@dataclass(frozen=True)
class _Inputs:
    """What one load reads, besides the overrides: the sources' per-call arguments."""

    path: Path
    environ: Mapping[str, str]
    named: Mapping[str, list[str]]
    keep: frozenset[str] | None = None
    redis_url: str | None = None
    mapping: Mapping[str, Any] | None = None  # a host's configuration, read instead of path

    @property
    def where(self) -> str:
        """What errors name as the configuration read."""
        return "config=" if self.mapping is not None else str(self.path)


_INPUTS: ContextVar[_Inputs] = ContextVar("headspace_settings_inputs")


class _Sources(BaseSettings):
    """The settings' sources, highest first: code overrides, the ``redis_url`` argument (a
    host's), the named variables, ``HEADSPACE__SECTION__KEY`` variables, the YAML file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, case_sensitive=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = _INPUTS.get()
        redis_url: tuple[PydanticBaseSettingsSource, ...] = ()
        if given.redis_url is not None:
            url = {"inference": {"redis": {"url": given.redis_url}}}
            redis_url = (InitSettingsSource(settings_cls, init_kwargs=url),)
        return (
            init_settings,
            *redis_url,
            _NamedVariables(settings_cls, given.environ, given.named),
            _HeadspaceVariables(settings_cls, given.environ),
            _YamlFile(settings_cls, given),
        )


class _HostSources(_Sources):
    # Every other top-level section of a host's configuration is the host's own.
    model_config = SettingsConfigDict(extra="ignore")


def _sources_for(model: type[BaseModel], base: type[_Sources]) -> type[_Sources]:
    """``base`` with ``model``'s fields: validated exactly as ``model`` validates them."""
    fields: dict[str, Any] = {
        name: (field.annotation, field) for name, field in model.model_fields.items()
    }
    return create_model(f"{model.__name__}Sources", __base__=base, **fields)


_SETTINGS_SOURCES = _sources_for(Settings, _Sources)
_HOST_SOURCES = _sources_for(HostSettings, _HostSources)


# A bad value is shown as a bounded prefix, built without rendering the rest, so that a
# deeply nested value cannot stall start-up.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 1, 4, 4
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 60, 60, 40


# Values never shown in an error: the secrets, and URLs (they may carry a password).
_UNSHOWN_KEYS = SECRET_KEYS | {"url"}
# Errors whose input is a whole section, which may hold a secret: only its type is shown.
_SECTION_ERRORS = frozenset({"model_type", "dict_type"})


def _describe(error: Mapping[str, Any]) -> str:
    # A key from the file as written, unless it would break the one line or run long.
    loc = ".".join(
        s if (s := str(p)).isprintable() and len(s) <= 60 else _SHOWN.repr(s)
        for p in error.get("loc", ())
        if p not in (ONE_MODEL, MODEL_LIST)
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


def _suggestion(key: str, within: type[BaseModel] | None = None) -> str:
    """`` (did you mean K?)`` for a key close to a known one K (one of ``within``'s fields
    when given), else nothing."""
    # A host's file says `timeout: 30` where this one says timeout_seconds.
    known = set(within.model_fields) if within else _keys(Settings) | _keys(HostSettings)
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

    Production machines keep OPENROUTER_API_KEY (and perhaps DATABASE_URL) there. Loaded
    into the process's environment, not read by a settings source: the extension reads
    DATABASE_URL from there, and gunicorn's workers inherit it from the master.
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
    env = os.environ if environ is None else environ
    given = _Inputs(source, env, NAMED_VARIABLES)
    # A model with no price is warned of when the service builds its price table, which
    # also knows the prices `headspace-inference pricing sync` stored.
    return _validated(Settings, _SETTINGS_SOURCES, given, overrides)


def load_host_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    redis_url: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> HostSettings:
    """The ``openrouter`` and ``inference`` sections of a host's configuration — the
    ``config`` mapping (its already-merged settings), else its file at ``path`` — merged
    with ``HEADSPACE__...``, OPENROUTER_API_KEY, OPENROUTER_BASE_URL and REDIS_URL (below
    ``redis_url``, below ``overrides``, which have the file's shape) and validated as
    strictly as load_settings, but for the host's ways inside ``openrouter:``: its
    ``timeout`` is timeout_seconds, and a key the service does not know is the host's
    (one warning names them)."""
    if config is not None and path is not None:
        raise TypeError("give the host's configuration as config= or config_path=, not both")
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config= must be a mapping, got {type(config).__name__}")
    source = config_path(path)
    env = os.environ if environ is None else environ
    keep = frozenset(HostSettings.model_fields)
    given = _Inputs(source, env, HOST_NAMED_VARIABLES, keep, redis_url, config)
    return _validated(HostSettings, _HOST_SOURCES, given, overrides)


_Model = TypeVar("_Model", bound=BaseModel)


def _validated(
    model: type[_Model],
    sources: type[_Sources],
    given: _Inputs,
    overrides: Mapping[str, Any] | None,
) -> _Model:
    token = _INPUTS.set(given)
    try:
        loaded = sources(**dict(overrides or {}))
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration ({given.where}): {problems}") from None
    finally:
        _INPUTS.reset(token)
    # The sections are already validated as the model's own types: taken as they are.
    return model.model_validate(dict(loaded))
