"""OpenTelemetry: one span per call, in the GenAI semantic conventions, when the
``opentelemetry-api`` package is installed (``pip install 'headspace-inference[otel]'``).

The span is made when the call is recorded, from its CallRecord (the row that every
outcome, success or failure, already has), with the call's real start and end times, so it
says exactly what the call log says. A call made with ``infer()`` is a child of the caller's
current span; one made with ``submit()`` runs on a worker thread and starts a trace of its
own. Spans go where the host's configured SDK sends them (``opentelemetry-sdk`` and an
exporter); until one is configured, and without the package, no span is made at all.
Prompts and answers are never put on a span: they are users' text.
"""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace
from typing import Any

from .._version import __version__
from ..calllog.record import CallRecord
from .request import InferenceRequest

PROVIDER = "openrouter"
ANSWERED = frozenset({"ok", "cached"})


@functools.cache
def _api() -> SimpleNamespace | None:
    """The parts of opentelemetry-api a span needs, imported on the first recorded call;
    None without the package."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace import (
            NoOpTracerProvider,
            ProxyTracerProvider,
            SpanKind,
            Status,
            StatusCode,
        )
    except ImportError:
        return None
    return SimpleNamespace(
        trace=trace,
        # The providers in place until the host configures an SDK's.
        unset=(ProxyTracerProvider, NoOpTracerProvider),
        client=SpanKind.CLIENT,
        Status=Status,
        error=StatusCode.ERROR,
    )


def available() -> bool:
    """Whether opentelemetry-api is installed (spans are made once an SDK is configured)."""
    return _api() is not None


class Tracing:
    """Makes the span of each recorded call; does nothing without opentelemetry-api."""

    def __init__(self) -> None:
        self._api: SimpleNamespace | None = None
        self._tracer: Any = None
        self._looked = False

    def record(self, request: InferenceRequest, record: CallRecord, started: float) -> None:
        """The span of a call that began at ``started`` (perf_counter) and ends now."""
        if not self._looked:
            # A proxy until the host sets its tracer provider, then that provider's tracer.
            self._api = api = _api()
            if api is not None:
                self._tracer = api.trace.get_tracer("headspace_inference.inference", __version__)
            self._looked = True
        api = self._api
        if api is None or isinstance(api.trace.get_tracer_provider(), api.unset):
            return  # no SDK configured: a span would go nowhere, so none is made
        end = time.time_ns()
        start = end - int((time.perf_counter() - started) * 1e9)
        requested = record.requested_model or request.model
        span = self._tracer.start_span(
            f"chat {requested}",
            kind=api.client,
            start_time=start,
            attributes=_attributes(request, record, requested),
        )
        if record.status not in ANSWERED:
            span.set_status(api.Status(api.error, record.error_type or record.status))
        span.end(end_time=end)


def _attributes(request: InferenceRequest, record: CallRecord, requested: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.system": PROVIDER,  # the name before semantic conventions 1.37
        "gen_ai.request.model": requested,
        "headspace.inference.call_id": record.request_id,
        "headspace.inference.level": record.level,
        "headspace.inference.purpose": record.purpose,
        "headspace.inference.status": record.status,
        "headspace.inference.cached": record.cached,
        "headspace.inference.attempts": record.attempts,
    }
    params = request.params
    if params.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = params.max_tokens
    if params.temperature is not None:
        attributes["gen_ai.request.temperature"] = params.temperature
    if record.status in ANSWERED:
        attributes |= {
            "gen_ai.response.model": record.model,
            "gen_ai.usage.input_tokens": record.input_tokens,
            "gen_ai.usage.output_tokens": record.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": record.cached_input_tokens,
            "gen_ai.usage.cache_creation.input_tokens": record.cache_write_tokens,
        }
    optional = {
        "gen_ai.response.id": record.generation_id,
        "gen_ai.response.finish_reasons": [record.finish_reason] if record.finish_reason else None,
        "error.type": record.error_type,
        "headspace.inference.cost_usd": float(record.cost_usd)
        if record.cost_usd is not None
        else None,
        "headspace.inference.project_id": record.project_id,
        "headspace.inference.agent_id": record.agent_id,
        "headspace.inference.command_id": record.command_id,
        "headspace.inference.turn_id": record.turn_id,
    }
    attributes |= {k: v for k, v in optional.items() if v is not None}
    return attributes
