"""Checks an inference request's arguments before anything is spent on it."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from ..calllog.database import DATABASE_AWAY
from ..calllog.models import LINK_TABLES
from ..calllog.models.links import link_exists
from ..row_bounds import MAX_INTEGER, PURPOSE_CHARS
from .errors import InputTooLargeError, InvalidRequestError, UnknownEntityError, UnknownLevelError
from .structured import AnswerSchema, answer_schema
from .types import CALL_OPTIONS, CallLinks, GenerationParams

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 1_000_000


def _shown(value: object) -> str:
    """A short rendering of a bad value for an error message (never a huge one whole: an
    integer's repr past 4,300 digits even raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return f"{value!r:.40}"


def _check_text(
    name: str, value: object, *, allow_control: bool, max_chars: int, setting: str = ""
) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequestError(f"{name} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{name} is not valid Unicode (a lone surrogate at position {exc.start})"
        ) from None
    if "\x00" in value:
        raise InvalidRequestError(f"{name} contains a NUL character")
    if not allow_control and any(ord(c) < 32 and c not in "\t" for c in value):
        raise InvalidRequestError(f"{name} contains control characters")
    if len(value) > max_chars:
        # Too large is its own error (a caller may shorten and retry), naming what sets it.
        raise InputTooLargeError(
            f"{name} is {len(value)} characters; the limit is {max_chars}{setting}"
        )
    return value


def check_flag(name: str, value: object) -> bool:
    """An optional yes/no option: True, False or None (False)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false, got {_shown(value)}")
    return value


def check_level(level: object, levels: tuple[str, ...]) -> str:
    """The level, if it is one of the configured ``levels`` (openrouter.models' keys)."""
    if not isinstance(level, str) or level not in levels:
        raise UnknownLevelError(f"level must be one of {', '.join(levels)}; got {level!r:.60}")
    return level


def check_purpose(purpose: object) -> str:
    """A short single-line purpose, stored with the call."""
    return _check_text("purpose", purpose, allow_control=False, max_chars=PURPOSE_CHARS)


def check_input(input_text: object, max_chars: int) -> str:
    """The input text, if it is a non-empty string within the size limit."""
    return _check_text("input_text", input_text, allow_control=True, max_chars=max_chars,
                       setting=" (inference.max_input_chars)")  # fmt: skip


def check_system_prompt(system_prompt: object, max_chars: int) -> str | None:
    """The system prompt, if any."""
    if system_prompt is None:
        return None
    return _check_text("system_prompt", system_prompt, allow_control=True, max_chars=max_chars,
                       setting=" (inference.max_input_chars)")  # fmt: skip


def check_params(max_tokens: object, temperature: object) -> GenerationParams:
    """Generation parameters within their ranges."""
    if max_tokens is not None and (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise InvalidRequestError(
            f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}; got {_shown(max_tokens)}"
        )
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        # Compared as given: float() of a huge integer raises OverflowError.
        or (isinstance(temperature, float) and not math.isfinite(temperature))
        or not 0 <= temperature <= 2
    ):
        raise InvalidRequestError(
            f"temperature must be a number from 0 to 2; got {_shown(temperature)}"
        )
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=float(temperature) if temperature is not None else None,
    )


def check_link_ids(links: CallLinks) -> None:
    """Each link given is a positive integer the database can hold (whether its row exists is
    LinkChecker's question)."""
    for name, value in links.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(
                f"{name} must be a positive integer or None; got {type(value).__name__}"
            )
        if not 0 < value <= MAX_INTEGER:
            # A larger id cannot exist, and the database would refuse to even compare it.
            raise InvalidRequestError(
                f"{name} must be a positive integer up to {MAX_INTEGER}; got {_shown(value)}"
            )


@dataclass(frozen=True, slots=True)
class CallArguments:
    """The arguments of one infer()/submit() call, checked."""

    level: str
    purpose: str
    input_text: str
    system_prompt: str | None
    params: GenerationParams
    schema: AnswerSchema | None
    cache_system_prompt: bool
    links: CallLinks


def check_call(
    level: object,
    purpose: object,
    input_text: object,
    options: Mapping[str, Any],
    *,
    levels: tuple[str, ...],
    max_input_chars: int,
) -> CallArguments:
    """Every check of a call's arguments that needs no database, in the order the service
    makes them (the one place they are made: the service and the test kit's fake share it)."""
    unknown = sorted(set(options) - CALL_OPTIONS)
    if unknown:
        # What Python says of a keyword a signature does not have.
        raise TypeError(f"inference call got an unexpected keyword argument {unknown[0]!r}")
    level_ = check_level(level, levels)
    purpose_ = check_purpose(purpose)
    text = check_input(input_text, max_input_chars)
    system = check_system_prompt(options.get("system_prompt"), max_input_chars)
    params = check_params(options.get("max_tokens"), options.get("temperature"))
    spec = options.get("response_format")
    schema = None if spec is None else answer_schema(spec)
    cache_prompt = check_flag("cache_system_prompt", options.get("cache_system_prompt"))
    if cache_prompt and system is None:
        raise InvalidRequestError("cache_system_prompt needs a system_prompt to cache")
    links = CallLinks(
        options.get("project_id"),
        options.get("agent_id"),
        options.get("command_id"),
        options.get("turn_id"),
    )
    check_link_ids(links)
    return CallArguments(level_, purpose_, text, system, params, schema, cache_prompt, links)


class LinkChecker:
    """Checks that linked project/agent/command/turn ids exist, remembering the ones that do.

    Ids are rarely deleted; when one is deleted after being remembered, the call log's
    writer records the call without that link instead of failing. The linked tables are
    the host's: whether one exists is asked once and remembered while it does.
    """

    def __init__(self, sessions: sessionmaker[Session], *, capacity: int = 100_000) -> None:
        self._sessions = sessions
        self._tables: set[str] = set()  # linked tables seen to exist
        self._known: set[tuple[str, int]] = set()
        self._capacity = capacity
        self._lock = threading.Lock()

    def check(self, links: CallLinks) -> None:
        """Raise InvalidRequestError / UnknownEntityError for a bad or missing id."""
        check_link_ids(links)
        missing = [
            (name, value)
            for name, value in links.items()
            if value is not None and (name, value) not in self._known
        ]
        if not missing:
            return
        try:
            with self._sessions() as session:
                for name, value in missing:
                    found = self._exists(session, name, value)
                    if found is None:
                        raise UnknownEntityError(
                            f"{name} {value} cannot be linked: the database has no "
                            f"{LINK_TABLES[name]} table"
                        )
                    if not found:
                        raise UnknownEntityError(f"{name} {value} does not exist")
        except DATABASE_AWAY as exc:
            # The database is away (the call log spools meanwhile): the call goes ahead with
            # its links unchecked and not remembered; the log's writer drops any link that
            # turns out not to exist when it writes the row.
            log.warning(
                "inference: could not check %s against the database (%s); calling anyway",
                ", ".join(f"{name} {value}" for name, value in missing),
                type(exc).__name__,
            )
            return
        with self._lock:
            if len(self._known) + len(missing) > self._capacity:
                self._known.clear()
            self._known.update(missing)

    def _exists(self, session: Session, name: str, value: int) -> bool | None:
        """Whether the row exists; None when its table does not."""
        table = LINK_TABLES[name]
        if table in self._tables:
            try:
                return link_exists(session, name, value, table_known=True)
            except DBAPIError:
                # The host dropped the table since (or the database went: asked again below).
                session.rollback()
                self._tables.discard(table)
        found = link_exists(session, name, value)
        if found is not None:
            self._tables.add(table)
        return found
