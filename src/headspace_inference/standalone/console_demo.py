"""`make console`: the operator page, live, against the bundled emulator.

Seeds an embedded SQLite log with two weeks of calls (through the service's own call log),
serves the app on http://127.0.0.1:$CONSOLE_PORT (5050), and keeps making a call every few
seconds (some repeated, so cached; now and then one the emulator refuses) until Ctrl-C, so
the page's table, chart and figures move while you watch.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

from ..calllog.record import CallRecord
from ..inference.errors import InferenceError
from ..inference.request import new_request_id
from ..testing.emulator import EmulatorServer
from ..testing.emulator.server import Fault
from .app import create_app

TEXTS = [
    "The agent ran the test suite; 3 tests failed in test_api.py.",
    "Fix the failing API tests and make CI green again.",
    "Recent commits: add rate limiter; fix cache TTL; docs.",
    "Objective: ship the inference layer this week.",
    "Summarise: the user asked for a migration to PostgreSQL 16.",
    "Classify: is this turn a question for the user?",
]
PURPOSES = {"turn": "summarise turn", "task": "summarise command",
            "project": "progress summary", "objective": "priority scoring"}  # fmt: skip
SEED_DAYS = 14


def seed(service: Any, rng: random.Random) -> int:
    """Two weeks of plausible rows, written by the service's own call log."""
    now = datetime.now(UTC)
    models = dict(service.settings.openrouter.models)
    count = 0
    for day in range(SEED_DAYS, 0, -1):
        for _ in range(rng.randint(15, 45)):
            level = rng.choice(list(models))
            at = now - timedelta(days=day, seconds=rng.randint(0, 86_399))
            status = rng.choices(["ok", "cached", "error", "rate_limited"], [80, 12, 5, 3])[0]
            tokens_in, tokens_out = rng.randint(200, 4000), rng.randint(20, 600)
            cost = Decimal(tokens_in * 1 + tokens_out * 5) / Decimal(1_000_000)
            answered = status in ("ok", "cached")
            service.recorder.record(
                CallRecord(
                    request_id=new_request_id(), timestamp=at, level=level,
                    purpose=PURPOSES.get(level, level), model=models[level], status=status,
                    input_hash=f"{rng.getrandbits(256):064x}",
                    input_tokens=tokens_in if answered else 0,
                    output_tokens=tokens_out if answered else 0,
                    result_text="(seeded) " + rng.choice(TEXTS) if answered else None,
                    latency_ms=rng.randint(2, 40) if status == "cached" else rng.randint(300, 4000),
                    cost_usd=(Decimal(0) if status == "cached" else cost) if answered else None,
                    saved_cost_usd=cost if status == "cached" else None,
                    error_type=None if answered else "UpstreamServerError",
                    error_message=None if answered else "upstream said 503 (seeded)",
                    cached=status == "cached", attempts=0 if status == "cached" else 1,
                )
            )  # fmt: skip
            count += 1
    service.recorder.flush(timeout=60)
    return count


def main() -> int:
    """Serve the page and keep calling until interrupted."""
    port = int(os.environ.get("CONSOLE_PORT", "5050"))
    instance = Path("instance")
    database = instance / "console.db"
    for leftover in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(instance / "console-call-log", ignore_errors=True)
    emulator = EmulatorServer(latency_ms=250).start()
    app = create_app(
        overrides={
            "database": {"url": f"sqlite:///{database}"},
            "inference": {"spool_path": str(instance / "console-call-log")},
            "openrouter": {"base_url": emulator.base_url, "api_key": "sk-or-console-emulator"},
        }
    )
    service = app.extensions["inference"]
    rng = random.Random(15)  # noqa: S311  (made-up demo traffic)
    print(f"seeded {seed(service, rng)} calls over {SEED_DAYS} days")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"the operator page: http://127.0.0.1:{port}/inference  (Ctrl-C to stop)")
    levels = list(service.settings.levels)
    try:
        while True:
            time.sleep(rng.uniform(1.5, 4.0))
            if rng.random() < 0.1:
                emulator.script([Fault(status=400, message="the emulator refuses this one")])
            level = rng.choice(levels)
            try:
                service.submit(level, PURPOSES.get(level, level), rng.choice(TEXTS))
            except InferenceError as exc:
                print(f"refused: {exc}")
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        server.shutdown()
        service.close()
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
