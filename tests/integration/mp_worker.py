"""One worker process of the multi-process tests, in one of two modes.

``mp_worker.py <index> <start_at> <plan>``: builds the app from $HEADSPACE_CONFIG, waits
for a common start time, makes its calls and prints one JSON line of outcomes.

``mp_worker.py flight <start_at> <key> <hold_seconds> <lock_seconds>``: builds only the
backends from $HEADSPACE_CONFIG, waits for the start time and runs one single-flight call
for ``key`` whose "upstream" counts itself in Redis, takes ``hold_seconds`` and puts its
answer in the cache; prints "holding" when it makes the call, then one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import Future
from typing import Any

from headspace_inference import create_app
from headspace_inference.config_loading import load_settings
from headspace_inference.inference import InferenceError
from headspace_inference.inference.backends import build_backends
from headspace_inference.inference.types import Answer


def main() -> None:
    index = int(sys.argv[1])
    start_at = float(sys.argv[2])
    plan = json.loads(sys.argv[3])
    app = create_app()
    service = app.extensions["inference"]
    out: dict[str, Any] = {"index": index, "calls": []}
    for phase in plan:
        time.sleep(max(0.0, phase["at"] + start_at - time.time()))
        level, max_tokens = phase.get("level", "turn"), phase.get("max_tokens")
        futures: list[tuple[str, Future[Any]]] = [
            (text, service.submit(level, "mp", text, max_tokens=max_tokens))
            for text in phase["inputs"]
        ]
        for text, future in futures:
            try:
                result = future.result(timeout=120)
                out["calls"].append(
                    {"input": text, "ok": True, "cached": result.cached, "id": result.call_id}
                )
            except InferenceError as exc:
                out["calls"].append(
                    {"input": text, "ok": False, "error": type(exc).__name__, "why": str(exc)}
                )
    service.close()
    print(json.dumps(out), flush=True)


def flight() -> None:
    start_at, key = float(sys.argv[2]), sys.argv[3]
    hold, lock_seconds = float(sys.argv[4]), float(sys.argv[5])
    settings = load_settings()
    backends = build_backends(settings, lock_seconds=lock_seconds)
    assert backends.client is not None
    counter = f"{settings.redis.key_prefix}:test-upstream-calls"
    time.sleep(max(0.0, start_at - time.time()))

    def call() -> Answer:
        backends.client.incr(counter)  # type: ignore[union-attr]
        print("holding", flush=True)
        time.sleep(hold)
        answer = Answer(text=f"from process {os.getpid()}", model="m", input_tokens=1,
                        output_tokens=1, finish_reason="stop")  # fmt: skip
        backends.cache.put(key, answer)
        return answer

    started = time.monotonic()
    outcome = backends.flight.run(key, call, lambda: backends.cache.peek(key))
    waited = time.monotonic() - started
    value = outcome.result()
    backends.close()
    print(json.dumps({"led": outcome.led, "text": value.text, "waited": waited}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "flight":
        flight()
    else:
        main()
