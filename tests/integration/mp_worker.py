"""One worker process of the multi-process test: builds the app from $HEADSPACE_CONFIG,
waits for a common start time, makes its calls and prints one JSON line of outcomes."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import Future
from typing import Any

from claude_headspace import create_app
from claude_headspace.inference import InferenceError


def main() -> None:
    index = int(sys.argv[1])
    start_at = float(sys.argv[2])
    plan = json.loads(sys.argv[3])
    app = create_app()
    service = app.extensions["inference"]
    out: dict[str, Any] = {"index": index, "calls": []}
    for phase in plan:
        time.sleep(max(0.0, phase["at"] + start_at - time.time()))
        futures: list[tuple[str, Future[Any]]] = [
            (text, service.submit(phase.get("level", "turn"), "mp", text))
            for text in phase["inputs"]
        ]
        for text, future in futures:
            try:
                result = future.result(timeout=120)
                out["calls"].append(
                    {"input": text, "ok": True, "cached": result.cached, "id": result.call_id}
                )
            except InferenceError as exc:
                out["calls"].append({"input": text, "ok": False, "error": type(exc).__name__})
    service.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
