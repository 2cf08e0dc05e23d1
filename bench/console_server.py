"""``headspace-inference serve`` with one route more for the /metrics benchmark:
``POST /bench/call`` makes a call on whichever worker takes it.
``console_server.py <port> <workers>``; the configuration comes from $HEADSPACE_CONFIG."""

from __future__ import annotations

import sys
from typing import Any

from flask import Flask, request

from headspace_inference.inference import InferenceError
from headspace_inference.standalone import server
from headspace_inference.standalone.app import create_app


def app_with_a_call_route() -> Flask:
    app = create_app()

    @app.post("/bench/call")
    def call() -> Any:
        body = request.get_json()
        try:
            app.extensions["inference"].infer(body["level"], "bench", body["text"])
        except InferenceError as exc:
            return {"outcome": type(exc).__name__}
        return {"outcome": "ok"}

    return app


if __name__ == "__main__":
    server.create_app = app_with_a_call_route
    server.serve("127.0.0.1", int(sys.argv[1]), int(sys.argv[2]), threads=8, timeout=60)
