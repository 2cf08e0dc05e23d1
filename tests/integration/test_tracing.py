"""OpenTelemetry: one span per call in the GenAI semantic conventions, sent to the tracer
provider the host configured (here the SDK's, exporting to memory); and nothing at all
without the package."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from tests.service_fixtures import AppFactory

from headspace_inference.inference.errors import UpstreamServerError
from headspace_inference.testing.emulator.server import Fault

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    # The process's tracer provider can be set once; the service's tracer is a proxy to it.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def test_each_call_is_one_span_in_the_genai_conventions(
    make_app: AppFactory, emulator: Any, spans: InMemorySpanExporter
) -> None:
    service = make_app().extensions["inference"]
    tracer = trace.get_tracer("the host")
    with tracer.start_as_current_span("host request") as parent:
        fresh = service.infer("turn", "summarise", "one span please", max_tokens=64,
                              temperature=0.2, project_id=None)  # fmt: skip
    hit = service.infer("turn", "summarise", "one span please", max_tokens=64, temperature=0.2)
    found = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    assert [s.name for s in found] == ["chat anthropic/claude-haiku-4.5"] * 2
    first, second = found
    assert first.kind is SpanKind.CLIENT
    assert first.parent is not None and first.parent.span_id == parent.get_span_context().span_id
    attributes = dict(first.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openrouter"
    assert attributes["gen_ai.request.model"] == "anthropic/claude-haiku-4.5"
    assert attributes["gen_ai.response.model"] == fresh.model
    assert attributes["gen_ai.usage.input_tokens"] == fresh.input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == fresh.output_tokens
    assert attributes["gen_ai.request.max_tokens"] == 64
    assert attributes["gen_ai.request.temperature"] == 0.2
    assert attributes["gen_ai.response.id"].startswith("gen-")
    assert attributes["headspace.inference.call_id"] == fresh.call_id
    assert attributes["headspace.inference.status"] == "ok"
    assert attributes["headspace.inference.level"] == "turn"
    assert "one span please" not in str(attributes)  # users' text stays off spans
    assert first.status.status_code is StatusCode.UNSET
    # The span lasts as long as the call did.
    assert first.end_time is not None and first.start_time is not None
    assert abs((first.end_time - first.start_time) / 1e6 - fresh.latency_ms) < 5
    second_attributes = dict(second.attributes or {})
    assert second_attributes["headspace.inference.status"] == "cached"
    assert second_attributes["headspace.inference.call_id"] == hit.call_id
    assert second.parent is None


def test_a_failed_call_s_span_is_an_error_naming_its_type(
    make_app: AppFactory, emulator: Any, spans: InMemorySpanExporter
) -> None:
    service = make_app(openrouter={"retry": {"max_attempts": 1}}).extensions["inference"]
    emulator.script([Fault(status=503)])
    with pytest.raises(UpstreamServerError):
        service.infer("project", "summarise", "this one fails")
    (span,) = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    attributes = dict(span.attributes or {})
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["error.type"] == "UpstreamServerError"
    assert attributes["headspace.inference.status"] == "error"
    assert "gen_ai.usage.input_tokens" not in attributes


def test_with_the_api_alone_no_span_is_made() -> None:
    # A process with the API but no SDK configured: nothing is built for a span that would
    # go nowhere (building its attributes is what a call would pay for).
    code = (
        "from headspace_inference.inference import tracing\n"
        "assert tracing.available()\n"
        "def refuse(*args): raise AssertionError('attributes built')\n"
        "tracing._attributes = refuse\n"
        "tracing.Tracing().record(None, None, 0.0)\n"
        "print('nothing made')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "nothing made"


def test_without_the_package_nothing_runs() -> None:
    # A process where opentelemetry cannot be imported: the service builds and calls as ever.
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from headspace_inference.inference import tracing\n"
        "assert not tracing.available()\n"
        "t = tracing.Tracing(); t.record(None, None, 0.0)\n"  # returns at once, touches nothing
        "print('off')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "off"
