"""GET <url_prefix>/openapi.json (/api/inference/openapi.json): the OpenAPI document of the
JSON API.

The answers' schemas are generated from their models (schemas.py); what is written here is
only the endpoints' table: paths, parameters and which errors each can answer.

The document is OpenAPI 3.0.3, the version every client generator and schemathesis (< 4,
where 3.1 is an experimental opt-in) read fully. Pydantic writes JSON Schema 2020-12, so
the schemas are rewritten into 3.0's dialect: ``anyOf [X, {"type": "null"}]`` becomes X with
``nullable: true``, and a keyword 3.0 lacks is refused rather than published.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, jsonify
from pydantic.json_schema import models_json_schema

from ..app_state import DEFAULT_URL_PREFIX, app_state
from ..calllog.models import MAX_INTEGER
from .calls import MAX_LIMIT, MAX_SEARCH_CHARS, STATUSES
from .daily import MAX_DAYS
from .http import bp, current_service
from .schemas import DOCUMENTED

REF = "#/components/schemas/{model}"

ERRORS = {
    400: "a bad parameter, named in error",
    401: "the request lacks 'Authorization: Bearer <api.token>'",
    404: "no call with this id",
    503: "the database cannot be read right now",
}


@dataclass(frozen=True)
class Endpoint:
    """One GET: its 200 answers the ``answer`` model; ``errors`` are the statuses it can
    answer in the error shape (401 is added to every endpoint but a public one when api.token
    is set). A parameter named in the path is a path parameter."""

    path: str  # below the API's prefix
    operation_id: str
    summary: str
    answer: str | None  # None: any JSON object
    params: tuple[tuple[str, dict[str, Any]], ...] = ()
    errors: tuple[int, ...] = ()
    public: bool = False


def endpoints(levels: tuple[str, ...]) -> tuple[Endpoint, ...]:
    """Every endpoint of the API, for the configured ``levels``."""
    time = {"type": "string", "format": "date-time"}
    level = {"type": "string", "enum": list(levels)}
    model = {"type": "string", "minLength": 1, "maxLength": 200}
    project_id = {"type": "integer", "minimum": 1, "maximum": MAX_INTEGER}
    window = (("since", time), ("until", time))
    read = (400, 503)
    return (
        Endpoint("/status", "getStatus",
                 "Service health, configuration and live statistics", "Status"),
        Endpoint("/openapi.json", "getOpenApi",
                 "This document (public, even when api.token is set)", None, public=True),
        Endpoint("/usage", "getUsage",
                 "Usage and cost over a window [since, until)", "Usage",
                 (*window, ("level", level), ("model", model), ("project_id", project_id)),
                 read),
        Endpoint("/usage/daily", "getDailyCost",
                 "Cost per UTC day by model over the last `days` days", "DailyCost",
                 (("days", {"type": "integer", "minimum": 1, "maximum": MAX_DAYS}),), read),
        Endpoint("/calls", "listCalls",
                 "The call log, newest first, a page at a time (keyset cursor)", "CallPage",
                 (("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
                  ("cursor", {"type": "string"}), ("level", level), ("model", model),
                  ("status", {"type": "string", "enum": list(STATUSES)}),
                  ("project_id", project_id), *window,
                  ("search", {"type": "string", "minLength": 1, "maxLength": MAX_SEARCH_CHARS,
                              "description": "text found, case-insensitively, in the prompt"
                                             " (when kept), the answer or the purpose"})),
                 read),
        Endpoint("/calls/{id}", "getCall", "One call, with its answer",
                 "CallDetail", (("id", {"type": "integer"}),), (400, 404, 503)),
    )  # fmt: skip


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 document of these endpoints."""
    settings = current_service().settings
    return jsonify(
        openapi_document(
            settings.levels,
            token_required=settings.api.token is not None,
            prefix=app_state(current_app).url_prefix,
        )
    )


def openapi_document(
    levels: tuple[str, ...], *, token_required: bool = False, prefix: str = DEFAULT_URL_PREFIX
) -> dict[str, Any]:
    """The OpenAPI 3.0 document of the API for the configured ``levels``, its paths under
    ``prefix`` (the host's url_prefix); with ``token_required`` (api.token set) every endpoint
    but the document itself declares bearer authentication and its 401."""
    schemas = copy.deepcopy(component_schemas())
    # The levels are configuration: the status names each configured one.
    schemas["Status"]["properties"]["models"]["required"] = list(levels)
    return {
        "openapi": "3.0.3",
        "info": {"title": "Claude Headspace inference API", "version": "1.0.0"},
        "paths": {
            prefix + e.path: {"get": _operation(e, token_required)} for e in endpoints(levels)
        },
        "components": {
            "schemas": schemas,
            # The document itself is public: it describes the API, not its data.
            "securitySchemes": {"bearerToken": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(e: Endpoint, token_required: bool) -> dict[str, Any]:
    def json_of(name: str | None) -> dict[str, Any]:
        schema = {"type": "object"} if name is None else {"$ref": REF.format(model=name)}
        return {"application/json": {"schema": schema}}

    guarded = token_required and not e.public
    errors = (*e.errors, 401) if guarded else e.errors
    op: dict[str, Any] = {"summary": e.summary, "operationId": e.operation_id}
    if guarded:
        op["security"] = [{"bearerToken": []}]
    if e.params:
        op["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": schema}
            if f"{{{name}}}" in e.path
            else {"name": name, "in": "query", "schema": schema}
            for name, schema in e.params
        ]
    op["responses"] = {
        "200": {"description": e.answer or "the document", "content": json_of(e.answer)},
        **{str(s): {"description": ERRORS[s], "content": json_of("Error")} for s in errors},
    }
    return op


@functools.cache
def component_schemas() -> dict[str, Any]:
    """The answers' schemas, by model name, in OpenAPI 3.0's dialect (levels not yet set)."""
    _, top = models_json_schema([(m, "serialization") for m in DOCUMENTED], ref_template=REF)
    return {name: openapi_30(schema) for name, schema in top["$defs"].items()}


# JSON Schema 2020-12 keywords OpenAPI 3.0's schema object lacks (or reads differently).
_NOT_IN_30 = frozenset(
    {"const", "prefixItems", "$defs", "exclusiveMinimum", "exclusiveMaximum", "examples",
     "unevaluatedProperties", "dependentRequired", "dependentSchemas", "contains", "if"}
)  # fmt: skip
_NULL = {"type": "null"}


def openapi_30(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (pydantic's JSON Schema 2020-12) as an OpenAPI 3.0 schema object, without
    the titles pydantic adds; ValueError names a keyword 3.0 cannot say."""
    out = {k: v for k, v in schema.items() if k != "title"}
    lacking = sorted(_NOT_IN_30 & out.keys())
    if lacking or not isinstance(out.get("type", ""), str) or out.get("type") == "null":
        raise ValueError(f"not expressible in OpenAPI 3.0: {lacking or out['type']} in {schema}")
    if "anyOf" in out:
        branches = out.pop("anyOf")
        kept = [b for b in branches if b != _NULL]
        if len(kept) == len(branches):
            out["anyOf"] = [openapi_30(b) for b in branches]
        elif len(kept) == 1:
            inner = openapi_30(kept[0])
            # 3.0 ignores siblings of $ref, so a nullable reference wraps it in allOf.
            out |= ({"allOf": [inner]} if "$ref" in inner else inner) | {"nullable": True}
        else:
            out["anyOf"] = [openapi_30(b) for b in kept]
            out["nullable"] = True
    for key in ("allOf", "oneOf"):
        if key in out:
            out[key] = [openapi_30(b) for b in out[key]]
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = openapi_30(out[key])
    if "properties" in out:
        out["properties"] = {name: openapi_30(s) for name, s in out["properties"].items()}
    return out
