"""`make demo`: the whole service on an embedded SQLite database, end to end.

Starts the bundled OpenRouter emulator (or, with DEMO_UPSTREAM=openrouter and
OPENROUTER_API_KEY set, uses the real OpenRouter), serves the app on a loopback port,
makes a call at every level plus one repeated call, and prints what the operator
endpoints then say.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
from werkzeug.serving import make_server

from ..inference.errors import InferenceError
from .app import create_app

CALLS = [
    ("turn", "summarise turn", "The agent ran the test suite; 3 tests failed in test_api.py."),
    ("task", "summarise command", "Fix the failing API tests and make CI green again."),
    ("project", "progress summary", "Recent commits: add rate limiter; fix cache TTL; docs."),
    ("objective", "priority scoring", "Objective: ship the inference layer this week."),
]


def _print(title: str, data: Any) -> None:
    print(f"\n== {title}")
    print(json.dumps(data, indent=2) if not isinstance(data, str) else data)


def main() -> int:
    """Run the demo; 0 when every step did what it should."""
    upstream = os.environ.get("DEMO_UPSTREAM", "emulator")
    instance = Path("instance")
    database = instance / "demo.db"
    for leftover in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(instance / "demo-call-log", ignore_errors=True)
    overrides: dict[str, Any] = {
        "database": {"url": f"sqlite:///{database}"},
        "inference": {"spool_path": str(instance / "demo-call-log")},
    }
    emulator = None
    if upstream == "openrouter":
        if not os.environ.get("OPENROUTER_API_KEY"):
            print("DEMO_UPSTREAM=openrouter needs OPENROUTER_API_KEY", file=sys.stderr)
            return 2
        print("upstream: the real OpenRouter")
    else:
        from ..testing.emulator import EmulatorServer

        emulator = EmulatorServer(latency_ms=150).start()
        overrides["openrouter"] = {"base_url": emulator.base_url, "api_key": "sk-or-demo-emulator"}
        print(f"upstream: the bundled OpenRouter emulator at {emulator.base_url}")

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app(overrides=overrides)
    service = app.extensions["inference"]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/api/inference"
    print(f"app: serving on http://127.0.0.1:{server.server_port} (database {database})")
    ok = True
    try:
        # Submitted together: the calls run on the service's workers, not on this thread.
        futures = [(level, service.submit(level, purpose, text)) for level, purpose, text in CALLS]
        for level, future in futures:
            try:
                result = future.result(timeout=120)
            except InferenceError as exc:
                ok = False
                print(f"{level:<9} failed: {exc}")
                continue
            r = result
            print(
                f"{level:<9} {r.model:<28} {r.input_tokens:>4} in {r.output_tokens:>4} out"
                f"  {r.latency_ms:>5} ms  ${r.cost_usd or 0:.6f}  cached={r.cached}"
            )
        level, purpose, text = CALLS[0]
        again = service.infer(level, purpose, text)
        print(
            f"{level:<9} repeated: cached={again.cached} in {again.latency_ms} ms, "
            f"cost ${again.cost_usd:.6f}"
        )
        ok = ok and again.cached
        service.recorder.flush(timeout=30)
        with httpx.Client(timeout=30) as http:
            status = http.get(f"{base}/status").json()
            usage = http.get(f"{base}/usage").json()
        _print("GET /api/inference/status", status)
        _print("GET /api/inference/usage", usage)
        ok = ok and usage.get("total_calls") == len(CALLS) + 1 and usage.get("cache_hits") == 1
    finally:
        server.shutdown()
        service.close()
        if emulator is not None:
            emulator.stop()
    print("\ndemo:", "every step did what it should" if ok else "SOMETHING WENT WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
