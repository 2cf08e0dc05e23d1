"""``headspace serve``: the app under gunicorn, one service per worker process."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

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


def _worker_exit(server: Any, worker: Any) -> None:
    # Flush this worker's call log before it goes (SIGTERM, reload, max-requests).
    service = getattr(worker.wsgi, "extensions", {}).get("inference")
    if service is not None:
        service.close()


def serve(host: str, port: int, workers: int, threads: int, timeout: int) -> None:
    """Run gunicorn in the foreground until it is stopped."""
    HeadspaceServer(
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": "gthread",
            "timeout": timeout,
            "graceful_timeout": timeout,
            "worker_exit": _worker_exit,
            "accesslog": "-",
        }
    ).run()
