"""The API's answers checked against its OpenAPI 3.0 document, as plain JSON Schema."""

from __future__ import annotations

from typing import Any

import jsonschema

from headspace_inference.operate.openapi import openapi_document
from headspace_inference.settings import DEFAULT_MODELS

DEFAULT_LEVELS = tuple(DEFAULT_MODELS)


def nullable_to_jsonschema(schema: Any) -> Any:
    """OpenAPI 3.0's `nullable` as plain JSON Schema."""
    if isinstance(schema, dict):
        out = {k: nullable_to_jsonschema(v) for k, v in schema.items() if k != "nullable"}
        return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") else out
    if isinstance(schema, list):
        return [nullable_to_jsonschema(v) for v in schema]
    return schema


def answer_schema(name: str, levels: tuple[str, ...] = DEFAULT_LEVELS) -> Any:
    """The document's schema ``name``, with the components its references point into."""
    components = openapi_document(levels)["components"]
    return nullable_to_jsonschema(
        {"$ref": f"#/components/schemas/{name}", "components": components}
    )


def validate_answer(answer: Any, name: str, levels: tuple[str, ...] = DEFAULT_LEVELS) -> None:
    """Raise unless ``answer`` is a ``name`` of the document (formats checked too)."""
    jsonschema.validate(
        answer, answer_schema(name, levels), format_checker=jsonschema.FormatChecker()
    )
