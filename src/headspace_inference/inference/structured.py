"""Structured answers: a JSON Schema (a dict) or a pydantic model class, sent as OpenRouter's
``response_format`` and checked against the answer.

A model class is validated by pydantic (its own schema, its own types: ``data`` is an
instance). A dict is validated by the ``jsonschema`` package, the reference implementation
of the standard the dict is written in: pydantic writes JSON Schemas but does not validate
against one it is given. Either way the schema is checked once, when first seen, so a bad
one is refused before anything is spent; and the answer is checked here even where the
provider ignored ``strict``.

Every check is bounded, so that a schema or an answer cannot make a check run away:
- a schema's JSON is at most MAX_SCHEMA_BYTES and MAX_SCHEMA_DEPTH containers deep, measured
  before anything walks it (the metaschema check costs about 2 s a megabyte);
- a reference (``$ref``) points inside the schema (``#`` and a JSON pointer, or an
  ``$anchor``), and no chain of references and combinators (``allOf``, ``not``, ``if`` …)
  comes back to where it started without descending into the answer: such a cycle
  (``{"$ref": "#"}``, ``a -> b -> a``) has no base case and would recurse for ever. A
  recursive schema that descends (a tree: ``items: {"$ref": "#"}``) is fine: the answer's
  own depth bounds it;
- an answer is at most MAX_ANSWER_DEPTH containers deep, and holds no NaN or infinity (JSON
  has neither; Python's parser accepts ``NaN``, ``Infinity`` and overflows ``1e400`` to one);
- the checked schemas kept for reuse are bounded by the bytes of their JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from pydantic import BaseModel, ValidationError

from .errors import InvalidRequestError

# A whole answer wrapped in one Markdown code fence (Haiku's habit), with any info string.
_FENCE = re.compile(r"\A\s*```[^\n`]*\n(.*?)\n?[ \t]*```\s*\Z", re.DOTALL)
# OpenAI's rule for json_schema.name, which OpenRouter passes on.
_NAME = re.compile(r"[^A-Za-z0-9_-]")
_MAX_NAME = 64
_SHOWN_CHARS = 300  # of a validation message, which may quote the answer

# The bounds above. OpenAI's strict mode allows 10 levels of object nesting (about 30 of
# JSON containers); real schemas are a few kilobytes.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 64
MAX_ANSWER_DEPTH = 128
# The checked schemas kept, by the bytes of their JSON in all, and by number. Each holds
# about six times its JSON in memory (its dict, its validator): 4 MiB keeps about 27 MB.
SCHEMA_CACHE_BYTES = 4 * 1024 * 1024
SCHEMA_CACHE_ENTRIES = 256


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
    # Key order never changes a fingerprint: equal schemas must share one cache key. NaN
    # and infinities are not JSON (allow_nan=False refuses them with a ValueError).
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )


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


class _Checked:
    """Checked schemas by key, least recently used dropped first once their JSON's bytes
    pass SCHEMA_CACHE_BYTES (or their number SCHEMA_CACHE_ENTRIES). Thread-safe."""

    def __init__(self, budget: int = SCHEMA_CACHE_BYTES, entries: int = SCHEMA_CACHE_ENTRIES):
        self.budget = budget
        self.entries = entries
        self.size = 0
        self._items: OrderedDict[object, tuple[AnswerSchema, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> AnswerSchema | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: object, schema: AnswerSchema, size: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= old[1]
            self._items[key] = (schema, size)
            self.size += size
            while self._items and (self.size > self.budget or len(self._items) > self.entries):
                _, (_, dropped) = self._items.popitem(last=False)
                self.size -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.size = 0


_CHECKED = _Checked()


def answer_schema(spec: object) -> AnswerSchema:
    """The AnswerSchema for a pydantic model class or a JSON Schema dict; raises
    InvalidRequestError for anything else, or for a schema that is not valid or not within
    the bounds (the module's docstring)."""
    if isinstance(spec, type) and issubclass(spec, BaseModel):
        found = _CHECKED.get(spec)
        if found is None:
            found, size = _model_schema(spec)
            _CHECKED.put(spec, found, size)
        return found
    if isinstance(spec, dict):
        canonical, size = _bounded_json(spec)
        key = hashlib.sha256(canonical.encode()).digest()
        found = _CHECKED.get(key)
        if found is None:
            found = _dict_schema(canonical)
            _CHECKED.put(key, found, size)
        return found
    raise InvalidRequestError(
        "response_format must be a JSON Schema dict or a pydantic model class, "
        f"got {type(spec).__name__}"
    )


def _bounded_json(schema: object) -> tuple[str, int]:
    """The schema's canonical JSON and its size in bytes; refused when it is not JSON, or
    past the bounds of size (and of depth far past MAX_SCHEMA_DEPTH: the encoder's own
    limit). The JSON encoder is C: cheap whatever the size, unlike any walk in Python."""
    try:
        canonical = _canonical(schema)
    except RecursionError:
        raise InvalidRequestError(
            f"response_format is nested more than {MAX_SCHEMA_DEPTH} levels deep"
        ) from None
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"response_format is not a JSON-serialisable schema: {exc}"
        ) from None
    size = len(canonical.encode())
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(
            f"response_format is {size} bytes of JSON, over the limit of {MAX_SCHEMA_BYTES}"
        )
    return canonical, size


def _fingerprint(name: str, schema: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical([name, schema]).encode()).hexdigest()


def _model_schema(model: type[BaseModel]) -> tuple[AnswerSchema, int]:
    try:
        schema = model.model_json_schema()
    except Exception as exc:  # pydantic's several schema-generation errors, recursion too
        raise InvalidRequestError(
            f"response_format: {model.__name__} has no JSON Schema: {exc}"
        ) from None
    _, size = _bounded_json(schema)
    _check_shape(schema)

    def parse(body: str) -> Any:
        # Pydantic parses (its parser stops at 200 levels on its own), then the value is
        # held to the bounds: its depth, and no NaN or infinity, which pydantic reads from
        # the literals, from 1e400, and from strings such as "NaN" for a float.
        try:
            instance = model.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors(include_url=False)[:5]
            )
            raise AnswerFormatError(
                f"the answer does not match {model.__name__}: {problems[:_SHOWN_CHARS]}"
            ) from None
        except RecursionError:
            raise AnswerFormatError(_TOO_DEEP_TO_CHECK) from None
        try:
            _check_value(instance.model_dump())
        except AnswerFormatError as exc:
            raise AnswerFormatError(f"the answer does not match {model.__name__}: {exc}") from None
        return instance

    name = _name(model.__name__)
    return AnswerSchema(name, schema, _fingerprint(name, schema), parse), size


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
    _check_shape(schema)
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
        value = _load(body)
        try:
            error = best_match(validator.iter_errors(value))
        except RecursionError:  # not expected within the bounds; an answer all the same
            raise AnswerFormatError(_TOO_DEEP_TO_CHECK) from None
        if error is not None:
            raise AnswerFormatError(
                f"the answer does not match the schema at {error.json_path}: "
                f"{error.message[:_SHOWN_CHARS]}"
            )
        return value

    name = _name(schema.get("title"))
    return AnswerSchema(name, schema, _fingerprint(name, schema), parse)


# ---------------------------------------------------------------------- the answer's bounds

_TOO_DEEP_TO_CHECK = "the answer is nested too deeply to check"


def _refuse_constant(name: str) -> Any:
    raise AnswerFormatError(f"the answer is not JSON: {name} is not a JSON number")


def _load(body: str) -> Any:
    """The JSON value of an answer's text, within the bounds: no NaN or infinity, at most
    MAX_ANSWER_DEPTH containers deep; raises AnswerFormatError otherwise."""
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:  # the decoder's own limit, far past MAX_ANSWER_DEPTH
        raise AnswerFormatError(
            f"the answer is nested more than {MAX_ANSWER_DEPTH} levels deep"
        ) from None
    except AnswerFormatError:
        raise
    except ValueError as exc:
        raise AnswerFormatError(f"the answer is not JSON: {exc}") from None
    _check_value(value)
    return value


def _check_value(value: Any) -> None:
    too_deep = f"the answer is nested more than {MAX_ANSWER_DEPTH} levels deep"
    for item in _within_depth(value, MAX_ANSWER_DEPTH, lambda: AnswerFormatError(too_deep)):
        if (isinstance(item, float) and not math.isfinite(item)) or (
            isinstance(item, Decimal) and not item.is_finite()
        ):
            raise AnswerFormatError(f"the answer holds {item}, which is not a JSON number")


def _within_depth(value: Any, limit: int, too_deep: Callable[[], Exception]) -> Iterator[Any]:
    """Every item of ``value`` (containers and what they hold, iteratively: the walk itself
    must not recurse); raises ``too_deep()`` at a container ``limit`` containers down."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        yield item
        if isinstance(item, dict | list | tuple):
            if depth >= limit:
                raise too_deep()
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


# ---------------------------------------------------------------------- the schema's shape

# Keywords whose subschemas apply to the same value as the schema holding them: a chain of
# these (and of references) that comes back to its start never ends.
_SAME_VALUE_ONE = ("not", "if", "then", "else")
_SAME_VALUE_LIST = ("allOf", "anyOf", "oneOf")
_SAME_VALUE_MAP = ("dependentSchemas", "dependencies")
# Keywords whose subschemas apply to a part of the value (or are only definitions).
_PART_ONE = (
    "items", "additionalItems", "additionalProperties", "contains", "propertyNames",
    "unevaluatedItems", "unevaluatedProperties", "contentSchema",
)  # fmt: skip
_PART_LIST = ("items", "prefixItems")
_PART_MAP = ("properties", "patternProperties", "$defs", "definitions")


def _check_shape(schema: dict[str, Any]) -> None:
    """Refuse a schema nested past MAX_SCHEMA_DEPTH, with a reference that does not point
    inside it, or with a cycle of references and combinators that never descends."""
    _check_depth(schema)
    anchors: dict[str, str] = {}
    nodes: dict[str, Any] = {}
    for pointer, node in _subschemas(schema):
        nodes[pointer] = node
        if isinstance(node, dict):
            if "$id" in node and pointer:
                raise InvalidRequestError(
                    f"response_format: $id at #{pointer} is not supported (every $ref is "
                    "read against the whole schema)"
                )
            for keyword in ("$dynamicRef", "$recursiveRef"):
                if keyword in node:
                    raise InvalidRequestError(
                        f"response_format: {keyword} at #{pointer} is not supported"
                    )
            if isinstance(node.get("$anchor"), str):
                anchors[node["$anchor"]] = pointer
    edges: dict[str, list[str]] = {}
    todo = list(nodes)
    while todo:
        pointer = todo.pop()
        if pointer in edges:
            continue
        node = nodes[pointer]
        targets = [p for p, _ in _same_value(pointer, node)]
        ref = node.get("$ref") if isinstance(node, dict) else None
        if isinstance(ref, str):
            target = _resolve(schema, ref, anchors, pointer)
            targets.append(target)
            if target not in nodes:  # a reference into a place no keyword names
                for sub, child in _subschemas(_at(schema, target), target):
                    nodes.setdefault(sub, child)
                    todo.append(sub)
        edges[pointer] = targets
    cycle = _find_cycle(edges)
    if cycle is not None:
        path = " -> ".join("#" + p for p in cycle)
        raise InvalidRequestError(
            f"response_format refers to itself without descending into the answer "
            f"({path}): no answer could ever be checked against it"
        )


def _check_depth(schema: Any) -> None:
    too_deep = f"response_format is nested more than {MAX_SCHEMA_DEPTH} levels deep"
    for _ in _within_depth(schema, MAX_SCHEMA_DEPTH, lambda: InvalidRequestError(too_deep)):
        pass


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _children(pointer: str, node: Any) -> Iterator[tuple[str, Any, bool]]:
    """(pointer, subschema, applies to the same value) for each subschema of ``node``."""
    if not isinstance(node, dict):
        return
    for keyword, value in node.items():
        here = f"{pointer}/{_escape(keyword)}"
        if keyword in _SAME_VALUE_ONE:
            yield here, value, True
        elif keyword in _SAME_VALUE_LIST and isinstance(value, list):
            yield from ((f"{here}/{i}", v, True) for i, v in enumerate(value))
        elif keyword in _SAME_VALUE_MAP and isinstance(value, dict):
            for name, v in value.items():
                if isinstance(v, dict | bool):  # dependencies also takes lists of names
                    yield f"{here}/{_escape(name)}", v, True
        elif keyword in _PART_ONE and isinstance(value, dict | bool):
            yield here, value, False
        elif keyword in _PART_LIST and isinstance(value, list):
            yield from ((f"{here}/{i}", v, False) for i, v in enumerate(value))
        elif keyword in _PART_MAP and isinstance(value, dict):
            yield from ((f"{here}/{_escape(n)}", v, False) for n, v in value.items())


def _same_value(pointer: str, node: Any) -> list[tuple[str, Any]]:
    return [(p, v) for p, v, same in _children(pointer, node) if same]


def _subschemas(schema: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    """Every subschema at a keyword's place, with its pointer; iterative."""
    stack = [(pointer, schema)]
    while stack:
        here, node = stack.pop()
        yield here, node
        stack.extend((p, v) for p, v, _ in _children(here, node))


def _resolve(schema: Any, ref: str, anchors: dict[str, str], at: str) -> str:
    """The pointer a local ``$ref`` names; refuses any other reference."""
    if not ref.startswith("#"):
        raise InvalidRequestError(
            f"response_format: the $ref {ref[:100]!r} at #{at} points outside the schema; "
            "only references within it (#/...) are supported"
        )
    fragment = unquote(ref[1:])
    if fragment and not fragment.startswith("/"):
        if fragment not in anchors:
            raise InvalidRequestError(
                f"response_format: the $ref {ref[:100]!r} at #{at} names no $anchor"
            )
        return anchors[fragment]
    try:
        _at(schema, fragment)
    except (KeyError, IndexError, ValueError, TypeError):
        raise InvalidRequestError(
            f"response_format: the $ref {ref[:100]!r} at #{at} points to nothing"
        ) from None
    return fragment


def _at(schema: Any, pointer: str) -> Any:
    node = schema
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def _find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A cycle in ``edges`` as the list of its pointers (start repeated at the end), or
    None; iterative depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in edges:
        if root in state:
            continue
        path = [root]
        state[root] = 1
        stack = [iter(edges.get(root, ()))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(edges.get(nxt, ())))
    return None
