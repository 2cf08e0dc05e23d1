"""``headspace-inference serve``: the app under gunicorn, one service per worker process."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from .app import create_app


class HeadspaceServer(BaseApplication):  # type: ignore[misc]
    """Gunicorn running create_app() in each worker (nothing is built before the fork)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app()


def _write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error``, in the API's JSON error shape instead of HTML."""
    body = json.dumps({"error": (mesg or reason)[:200], "status": status_int}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class JsonErrorWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, answering the requests it refuses itself in JSON.

    gunicorn answers a request it cannot parse (a request line over its limit of 4094 bytes,
    too many or too large headers, a malformed line) before the app sees it, with an HTML
    page; clients of this API parse ``{"error": ..., "status": N}``.
    """

    def init_process(self) -> None:
        # Only in the worker, after the fork: write_error's one caller is the worker's
        # handle_error, which keeps choosing the status and logging the refusal.
        util.write_error = _write_json_error
        super().init_process()


def _worker_exit(server: Any, worker: Any) -> None:
    # Flush this worker's call log before it goes (SIGTERM, reload, max-requests).
    service = getattr(worker.wsgi, "extensions", {}).get("inference")
    if service is not None:
        service.close()


def prepare_metrics_dir() -> str:
    """PROMETHEUS_MULTIPROC_DIR for the workers' metrics, emptied of an earlier run's values
    (a fresh temporary directory unless the variable names one). It must be set before any
    worker imports prometheus_client, which reads it at import time."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="headspace-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return str(path)


def child_exit_hook() -> Callable[[Any, Any], None]:
    """gunicorn's child_exit: a dead worker's gauges leave the live sums (its counters stay
    counted). prometheus_client is imported here, in the master before any fork, not in the
    hook: the hook runs in the SIGCHLD handler, and a second worker's exit re-entered it
    half-way through the first one's import ("cannot import name 'Gauge' from partially
    initialized module"), failing the master's shutdown."""
    from prometheus_client import multiprocess

    def child_exit(server: Any, worker: Any) -> None:
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

    return child_exit


def serve(host: str, port: int, workers: int, threads: int, timeout: int) -> None:
    """Run gunicorn in the foreground until it is stopped.

    Each open /api/inference/events stream holds one of a worker's ``threads`` while it is
    open; the app serves at most INFERENCE_EVENT_STREAMS (4) of them per worker.
    """
    prepare_metrics_dir()
    child_exit = child_exit_hook()  # after the directory is set: the import reads it
    HeadspaceServer(
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": f"{__name__}.JsonErrorWorker",
            "timeout": timeout,
            "graceful_timeout": timeout,
            "worker_exit": _worker_exit,
            "child_exit": child_exit,
            "accesslog": "-",
        }
    ).run()
