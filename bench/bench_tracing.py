"""What a call's span costs: Tracing.record with the OpenTelemetry API alone (no SDK: spans
go nowhere) and with the SDK exporting to memory. Run: python -m bench.bench_tracing"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime

SPANS = 20_000


def measure(with_sdk: bool) -> float:
    """Microseconds per span."""
    from headspace_inference.calllog.record import CallRecord
    from headspace_inference.inference.request import InferenceRequest
    from headspace_inference.inference.tracing import Tracing
    from headspace_inference.inference.types import CallLinks, GenerationParams

    if with_sdk:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)
    request = InferenceRequest("turn", "p", "text", "anthropic/claude-haiku-4.5", "key",
                               CallLinks(None, None, None, None), None,
                               GenerationParams(64, 0.2))  # fmt: skip
    record = CallRecord(request_id="r", timestamp=datetime.now(UTC), level="turn", purpose="p",
                        model="m", status="ok", input_hash="h", input_tokens=5,
                        output_tokens=9, generation_id="gen-1", finish_reason="stop")  # fmt: skip
    tracing = Tracing()
    start = time.perf_counter()
    for _ in range(SPANS):
        tracing.record(request, record, time.perf_counter())
    return (time.perf_counter() - start) / SPANS * 1e6


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(f"{measure(sys.argv[1] == 'sdk'):.1f}")
    else:
        # Each in a process of its own: a tracer provider is set once per process.
        for mode in ("api", "sdk"):
            out = subprocess.run([sys.executable, "-m", "bench.bench_tracing", mode],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            print(f"{'API alone' if mode == 'api' else 'SDK, in memory'}: "
                  f"{out.stdout.strip()} us per call's span")  # fmt: skip
