"""``headspace-inference serve`` as it runs (gunicorn, its workers, the metrics directory), with one
test route added to each worker's app: ``POST /test/call`` makes a call on that worker.

``gunicorn_app.py <port> <workers>``; the configuration comes from $HEADSPACE_CONFIG.
"""

from __future__ import annotations

import sys
from typing import Any

from flask import Flask, request

from headspace_inference.inference import InferenceError
from headspace_inference.standalone import server
from headspace_inference.standalone.app import create_app


def app_with_a_call_route() -> Flask:
    app = create_app()

    @app.post("/test/call")
    def call() -> Any:
        body = request.get_json()
        try:
            result = app.extensions["inference"].infer(body["level"], "metrics", body["text"])
        except InferenceError as exc:
            return {"outcome": type(exc).__name__}
        return {"outcome": "cached" if result.cached else "ok"}

    return app


if __name__ == "__main__":
    server.create_app = app_with_a_call_route  # the app each worker loads
    server.serve("127.0.0.1", int(sys.argv[1]), int(sys.argv[2]), threads=4, timeout=30)
