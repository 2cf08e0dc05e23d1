"""The operator console's figures, on PostgreSQL.

    .venv/bin/python bench/bench_console.py --rows 1000000 3000000

- GET /api/inference/calls: the first page, and a deep page (a cursor 90 % down the table,
  and the same with a level filter), at each size: the table is filled inside PostgreSQL
  (bench_usage.fill), then each page is timed through the Flask test client (median).
- The live feed: from a call's return (its row journalled) to its event on one open SSE
  stream, through the call log's batch (its linger is 50 ms), the commit, NOTIFY, the
  listener's read of the rows and the stream.
- GET /metrics scraped over HTTP from `headspace-inference serve --workers 4` (multiprocess mode),
  after calls spread over the workers.

--quick takes few samples on small tables (CI); --json prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.bench_usage import fill
from bench.common import BENCH_KEY, emulator_process, postgres_database

SERVER = Path(__file__).with_name("console_server.py")


def median_ms(fn: Any, repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def overrides(url: str, base_url: str | None, spool: str) -> dict[str, Any]:
    return {
        "database": {"url": url, "auto_migrate": True},
        "openrouter": {
            "base_url": base_url or "http://127.0.0.1:9/api/v1",
            "api_key": BENCH_KEY if base_url else None,
            "rate_limits": {"calls_per_minute": 10**7, "tokens_per_minute": 10**9},
            "health": {"cache_seconds": 3600},
        },
        "inference": {"spool_path": spool},
    }


def calls_pages(url: str, sizes: list[int], repeat: int) -> dict[str, Any]:
    from headspace_inference import create_app
    from headspace_inference.operate.calls import encode_cursor

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as spool:
        app = create_app(overrides=overrides(url, None, spool))
        client = app.test_client()
        engine = app.extensions["inference"].database.engine
        for total in sorted(sizes):
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE inference_calls"))
            fill(engine, 1, total + 1, total)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE inference_calls"))
                # The bench finds its deep cursor with OFFSET; the API never does.
                ts, row_id = conn.execute(
                    text(
                        "SELECT timestamp, id FROM inference_calls "
                        "ORDER BY timestamp DESC, id DESC OFFSET :n LIMIT 1"
                    ),
                    {"n": int(total * 0.9)},
                ).one()
            cursor = encode_cursor(ts.replace(tzinfo=UTC), row_id)

            def page(query: str) -> None:
                response = client.get(f"/api/inference/calls?limit=50{query}")
                assert response.status_code == 200, response.json
                assert len(response.json["calls"]) == 50

            out[str(total)] = {
                "first_page_ms": round(median_ms(lambda: page(""), repeat), 2),
                "deep_page_ms": round(median_ms(lambda c=cursor: page(f"&cursor={c}"), repeat), 2),
                "deep_page_level_ms": round(
                    median_ms(lambda c=cursor: page(f"&level=task&cursor={c}"), repeat), 2
                ),
            }
        app.extensions["inference"].close()
    sizes_ = sorted(out, key=int)
    growth = None
    if len(sizes_) > 1:
        growth = round(out[sizes_[-1]]["deep_page_ms"] / out[sizes_[0]]["deep_page_ms"], 2)
    return {"rows": out, "deep_growth": growth}


def feed_delay(url: str, base_url: str, events: int) -> dict[str, Any]:
    from headspace_inference import create_app
    from headspace_inference.operate.live import console_for

    with tempfile.TemporaryDirectory() as spool:
        app = create_app(overrides=overrides(url, base_url, spool))
        service = app.extensions["inference"]
        response = app.test_client().get("/api/inference/events", buffered=False)
        arrived: queue.Queue[tuple[str, float]] = queue.Queue()

        def read() -> None:
            buffer = ""
            for chunk in response.response:
                buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    for line in block.split("\n"):
                        if line.startswith("data: "):
                            arrived.put((json.loads(line[6:])["call_id"], time.perf_counter()))

        threading.Thread(target=read, daemon=True).start()
        delays = []
        for i in range(events):
            result = service.infer("turn", "feed bench", f"event {i}")
            returned = time.perf_counter()
            while True:
                call_id, at = arrived.get(timeout=30)
                if call_id == result.call_id:
                    delays.append((at - returned) * 1000)
                    break
        console_for(app).close()
        service.close()
    return {
        "events": events,
        "transport": "postgresql",
        "median_ms": round(statistics.median(delays), 1),
        "p90_ms": round(sorted(delays)[int(len(delays) * 0.9) - 1], 1),
    }


def metrics_scrape(url: str, base_url: str, calls: int, repeat: int) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(overrides(url, base_url, str(Path(tmp) / "spool"))))
        env = {**os.environ, "HEADSPACE_CONFIG": str(config)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(port), "4"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{base}/api/inference/status", timeout=5)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            levels = ["turn", "task", "project", "objective"]
            for i in range(calls):  # a new connection each: spread over the workers
                httpx.post(
                    f"{base}/bench/call",
                    json={"level": levels[i % 4], "text": f"scrape {i}"},
                    timeout=30,
                )
            time.sleep(1.5)  # the writers' last batch and a sampler tick
            with httpx.Client(base_url=base, timeout=30) as client:
                body = client.get("/metrics").text
                ms = median_ms(lambda: client.get("/metrics").raise_for_status(), repeat)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    return {"workers": 4, "calls": calls, "series": series, "median_ms": round(ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    parser.add_argument("--quick", action="store_true", help="few samples, small tables")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [20_000, 60_000] if args.quick else args.rows
    repeat = 10 if args.quick else 50
    results: dict[str, Any] = {}
    with postgres_database() as url:
        results["calls"] = calls_pages(url, rows, repeat)
        if not args.json:
            print(json.dumps(results["calls"]), flush=True)
    with emulator_process(latency_ms=0) as base_url:
        with postgres_database() as url:
            results["feed"] = feed_delay(url, base_url, 10 if args.quick else 100)
            if not args.json:
                print(json.dumps(results["feed"]), flush=True)
        with postgres_database() as url:
            results["metrics"] = metrics_scrape(url, base_url, 40 if args.quick else 200,
                                                repeat)  # fmt: skip
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
