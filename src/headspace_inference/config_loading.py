"""Reading the settings: YAML file, environment and code, merged and validated once.

Precedence, lowest first: built-in defaults < the YAML file < ``HEADSPACE__SECTION__KEY``
variables < ``OPENROUTER_API_KEY`` / ``DATABASE_URL`` / ``REDIS_URL`` < ``overrides`` passed
to :func:`load_settings` by code. The models are settings.py's.
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
from typing import Any, TypeVar

import yaml
from dotenv import load_dotenv
from pydantic import BaseModel, ValidationError
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
    Settings,
)

log = logging.getLogger(__name__)


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
        elif stripped[0] in "[{" and path[-1] not in SECRET_KEYS:
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

    Every call is journalled there, so a directory that cannot be written is a configuration
    error, named as such, before the service takes a call.
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
