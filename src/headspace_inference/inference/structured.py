"""Structured answers: a JSON Schema (a dict) or a pydantic model class, sent as OpenRouter's
``response_format`` and checked against the answer.

A model class is validated by pydantic (its own schema, its own types: ``data`` is an
instance). A dict is validated by the ``jsonschema`` package, the reference implementation
of the standard the dict is written in: pydantic writes JSON Schemas but does not validate
against one it is given. Either way the schema is checked once, when first seen, so a bad
one is refused before anything is spent; and the answer is checked here even where the
provider ignored ``strict``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InvalidRequestError

# A whole answer wrapped in one Markdown code fence (Haiku's habit), with any info string.
_FENCE = re.compile(r"\A\s*```[^\n`]*\n(.*?)\n?[ \t]*```\s*\Z", re.DOTALL)
# OpenAI's rule for json_schema.name, which OpenRouter passes on.
_NAME = re.compile(r"[^A-Za-z0-9_-]")
_MAX_NAME = 64
_SHOWN_CHARS = 300  # of a validation message, which may quote the answer


class AnswerFormatError(ValueError):
    """An answer that does not parse as JSON or does not match the schema; says where."""


def strip_fence(text: str) -> str:
    """``text`` without a Markdown code fence around all of it (a fence inside is kept)."""
    match = _FENCE.match(text)
    return match.group(1) if match else text


def _name(raw: object) -> str:
    name = _NAME.sub("_", str(raw or ""))[:_MAX_NAME]
    return name or "answer"


def _canonical(value: Any) -> str:
    # Key order never changes a fingerprint: equal schemas must share one cache key.
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True, eq=False)
class AnswerSchema:
    """A checked schema: what goes into the request, the cache key, and the answer check."""

    name: str
    schema: dict[str, Any]
    fingerprint: str
    parse_json: Callable[[str], Any]

    def response_format(self) -> dict[str, Any]:
        """OpenRouter's ``response_format`` for this schema (strict)."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "strict": True, "schema": self.schema},
        }

    def parse(self, text: str) -> Any:
        """The answer's value: an instance of the model class, or the JSON value; raises
        AnswerFormatError when it does not parse or validate."""
        return self.parse_json(strip_fence(text))


def answer_schema(spec: object) -> AnswerSchema:
    """The AnswerSchema for a pydantic model class or a JSON Schema dict; raises
    InvalidRequestError for anything else, or for a schema that is not valid."""
    if isinstance(spec, type) and issubclass(spec, BaseModel):
        return _model_schema(spec)
    if isinstance(spec, dict):
        try:
            canonical = _canonical(spec)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(
                f"response_format is not a JSON-serialisable schema: {exc}"
            ) from None
        return _dict_schema(canonical)
    raise InvalidRequestError(
        "response_format must be a JSON Schema dict or a pydantic model class, "
        f"got {type(spec).__name__}"
    )


def _fingerprint(name: str, schema: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical([name, schema]).encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def _model_schema(model: type[BaseModel]) -> AnswerSchema:
    try:
        schema = model.model_json_schema()
    except Exception as exc:  # pydantic's several schema-generation errors
        raise InvalidRequestError(
            f"response_format: {model.__name__} has no JSON Schema: {exc}"
        ) from None

    def parse(body: str) -> Any:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors(include_url=False)[:5]
            )
            raise AnswerFormatError(
                f"the answer does not match {model.__name__}: {problems[:_SHOWN_CHARS]}"
            ) from None

    name = _name(model.__name__)
    return AnswerSchema(name, schema, _fingerprint(name, schema), parse)


@functools.lru_cache(maxsize=256)
def _dict_schema(canonical: str) -> AnswerSchema:
    try:  # the jsonschema extra, imported when a dict schema is first used
        import jsonschema.validators
        from jsonschema.exceptions import SchemaError, best_match
    except ImportError:
        raise InvalidRequestError(
            "response_format: a JSON Schema dict needs the jsonschema extra "
            "(pip install 'headspace-inference[jsonschema]'); a pydantic model needs none"
        ) from None
    schema: dict[str, Any] = json.loads(canonical)
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequestError(
            f"response_format is not a valid JSON Schema: {exc.message[:_SHOWN_CHARS]} "
            f"(at {exc.json_path})"
        ) from None
    validator = validator_class(schema)

    def parse(body: str) -> Any:
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise AnswerFormatError(f"the answer is not JSON: {exc}") from None
        error = best_match(validator.iter_errors(value))
        if error is not None:
            raise AnswerFormatError(
                f"the answer does not match the schema at {error.json_path}: "
                f"{error.message[:_SHOWN_CHARS]}"
            )
        return value

    name = _name(schema.get("title"))
    return AnswerSchema(name, schema, _fingerprint(name, schema), parse)
