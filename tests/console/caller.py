"""Another process sharing the call log: ``caller.py <overrides JSON> <n>`` builds the
standalone app with those overrides, makes ``n`` calls, flushes its log and prints their
call ids as one JSON line."""

from __future__ import annotations

import json
import sys

from headspace_inference import create_app

KEPT = None


def main() -> None:
    app = create_app(overrides=json.loads(sys.argv[1]))
    service = app.extensions["inference"]
    ids = [
        service.infer("turn", "another process", f"call {i}").call_id
        for i in range(int(sys.argv[2]))
    ]
    service.close()
    # The app stays alive to the end, as a server's does: its console publishes at exit
    # what its publisher thread has not yet.
    global KEPT
    KEPT = app
    print(json.dumps(ids), flush=True)


if __name__ == "__main__":
    main()
