"""Call-log rows for usage tests, made the way the service makes them: ``call_record`` for
the row, the call log's own ``CallWriter`` (rows and rollup in one transaction) to write it."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from headspace_inference.calllog.record import CallRecord
from headspace_inference.calllog.recorder import CallWriter
from headspace_inference.calllog.rollup import apply_rollup
from headspace_inference.inference.errors import UpstreamServerError
from headspace_inference.inference.request import InferenceRequest, call_record, new_request_id
from headspace_inference.inference.types import Answer, CallLinks, GenerationParams

HAIKU = "anthropic/claude-haiku-4.5"


def call(
    moment: datetime,
    *,
    level: str = "turn",
    model: str = HAIKU,
    status: str = "ok",
    project_id: int | None = None,
    input_tokens: int = 10,
    output_tokens: int = 5,
    latency_ms: int = 100,
    cost: Decimal | None = None,
    saved: Decimal | None = None,
    upstream: Decimal | None = None,
    purpose: str = "usage test",
) -> CallRecord:
    """The row of one call at ``moment`` with ``status``; a cache hit saved ``saved``."""
    links = CallLinks(project_id=project_id)
    request = InferenceRequest(level, purpose, "input", model, "h" * 64, links, None,
                               GenerationParams())  # fmt: skip
    if status in ("ok", "cached"):
        cached = status == "cached"
        answer = Answer("answer", model, input_tokens, output_tokens,
                        cost_usd=saved if cached else cost, upstream_cost_usd=upstream)  # fmt: skip
        record = call_record(request, status=status, latency_ms=latency_ms, answer=answer,
                               attempts=0 if cached else 1)  # fmt: skip
    else:
        error = UpstreamServerError("upstream said 500", status_code=500)
        record = call_record(request, status=status, latency_ms=latency_ms, error=error,
                               attempts=0 if status == "refused" else 1)  # fmt: skip
    return replace(record, timestamp=moment)


def make_record(i: int = 0, **changes: object) -> CallRecord:
    values: dict[str, object] = {
        "request_id": new_request_id(),
        "timestamp": datetime(2026, 11, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=i),
        "level": "turn",
        "purpose": "summarise turn",
        "model": "anthropic/claude-haiku-4.5",
        "status": "ok",
        "input_hash": f"{i:064x}",
        "input_tokens": 10 + i,
        "output_tokens": 5,
        "result_text": f"answer {i} — ünïcode",
        "latency_ms": 3,
        "cost_usd": Decimal("0.000035"),
        "attempts": 1,
    }
    values.update(changes)
    return CallRecord(**values)  # type: ignore[arg-type]


def write(sessions: sessionmaker[Session], records: Sequence[CallRecord], batch: int) -> None:
    """Write ``records`` through the call log's writer, at most ``batch`` a transaction."""
    rejected = Path(tempfile.gettempdir()) / f"usage-test-rejected-{uuid.uuid4().hex}.jsonl"
    writer = CallWriter(sessions, rollup=apply_rollup, rejected_path=rejected, batch_size=batch)
    writer.start()
    for seq, record in enumerate(records, 1):
        writer.submit(seq, record)
    try:
        assert writer.flush(timeout=120), writer.stats()
        assert writer.stats()["rejected"] == 0
    finally:
        writer.stop(timeout=30)
