"""``headspace-inference serve``: the app under gunicorn, one service per worker process.

A gthread worker runs each request on one of its ``--threads``, on a blocking socket: left
as it is, a client that sends half a request, or stops reading a stream, holds that thread
for as long as it likes. So this worker (``SlowClientWorker``) reads a request's head in
its event loop, where waiting costs no thread, and gives the connection to a thread only
once the head is complete (or refuses it at HEAD_SECONDS after the connection or beyond
HEAD_MAX_BYTES); and a thread's socket reads and writes time out after SOCKET_SECONDS, so
a stream whose client stopped reading ends and gives its thread and its slot back.

A request's body can still trickle (within SOCKET_SECONDS a read) and connections are
still counted per worker: in front of the open internet put a buffering proxy
(examples/deploy/nginx.conf, README "Production").
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import tempfile
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import TConn, ThreadWorker

from .app import create_app

# A request's head (request line and headers) must arrive whole within this many seconds
# of the connection, and within this many bytes (nginx's default allows 32 KiB).
HEAD_SECONDS = 10.0
HEAD_MAX_BYTES = 64 * 1024
# A thread's socket read that gets nothing, or write that is not done, within this many
# seconds ends its request: a stream whose client stopped reading is dropped, its thread and
# stream slot given back. (A write is one chunk of the answer: a whole JSON body, one event.)
SOCKET_SECONDS = 10.0
# The directory of its own that serve keeps its workers' metrics in, under a given
# PROMETHEUS_MULTIPROC_DIR (it empties it at start; nothing else there is touched).
METRICS_SUBDIR = "headspace-inference-metrics"


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


class _Conn(TConn):  # type: ignore[misc]
    """A connection with the part of its request head received so far."""

    def __init__(self, cfg: Any, sock: Any, client: Any, server: Any, deadline: float) -> None:
        super().__init__(cfg, sock, client, server)
        self.head = b""
        self.deadline = deadline
        self.head_done = False  # handed to a thread, or ended


class SlowClientWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker where slow or silent clients hold no thread (module
    docstring), answering the requests it refuses itself in JSON.

    gunicorn answers a request it cannot parse (a request line over its limit of 4094 bytes,
    too many or too large headers, a malformed line) before the app sees it, with an HTML
    page; clients of this API parse ``{"error": ..., "status": N}``. Runs with keep-alive
    off (serve sets it), so every request arrives on a fresh connection, read here first.
    """

    def init_process(self) -> None:
        # Only in the worker, after the fork: write_error's one caller is the worker's
        # handle_error, which keeps choosing the status and logging the refusal.
        util.write_error = _write_json_error
        # Connections still receiving their head, oldest (earliest deadline) first.
        self._heads: deque[_Conn] = deque()
        super().init_process()

    def accept(self, server: Any, listener: Any) -> None:
        """gunicorn's accept, with the connection's head deadline."""
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = _Conn(self.cfg, sock, client, server, time.monotonic() + HEAD_SECONDS)
        self.nr_conns += 1
        self._heads.append(conn)
        with self._lock:
            self.poller.register(
                conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn)
            )

    def on_client_socket_readable(self, conn: _Conn, client: Any) -> None:
        """Take what arrived; hand the connection to a thread once its head is whole."""
        try:
            data = conn.sock.recv(HEAD_MAX_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before finishing its request
            self._end(conn)
            return
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if (end + 4 if end >= 0 else len(conn.head)) > HEAD_MAX_BYTES:
            self._refuse(conn, 431, "Request Header Fields Too Large",
                         f"the request's head is over {HEAD_MAX_BYTES} bytes")  # fmt: skip
            return
        if end < 0:
            return
        with self._lock:
            self.poller.unregister(client)
        conn.head_done = True
        conn.init()  # blocking, with gunicorn's parser, which reads the head from here
        conn.parser.unreader.unread(conn.head)
        conn.head = b""
        conn.sock.settimeout(SOCKET_SECONDS)
        self._wrap_future(self.tpool.submit(self.handle, conn), conn)

    def murder_keepalived(self) -> None:
        """Also end the connections whose head did not arrive in time (gunicorn calls this
        from its loop about every second)."""
        super().murder_keepalived()
        now = time.monotonic()
        while self._heads and (self._heads[0].head_done or self._heads[0].deadline <= now):
            conn = self._heads.popleft()
            if not conn.head_done:
                late = f"the request's head did not arrive within {HEAD_SECONDS:g} s"
                self._refuse(conn, 408, "Request Timeout", late)

    def _refuse(self, conn: _Conn, status: int, reason: str, message: str) -> None:
        self.log.info("%s:%s refused: %s", *_peer(conn.client), message)
        with contextlib.suppress(OSError):  # a courtesy: the connection ends either way
            _write_json_error(conn.sock, status, reason, message)
        self._end(conn)

    def _end(self, conn: _Conn) -> None:
        if conn.head_done:
            return
        conn.head_done = True  # the sweep drops it from _heads
        with self._lock, contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()

    def handle_request(self, req: Any, conn: Any) -> bool:
        """gunicorn's, with a read or write past SOCKET_SECONDS ending the request in one
        log line (the response, a stream say, is closed on the way out)."""
        try:
            return bool(super().handle_request(req, conn))
        except TimeoutError:
            self.log.warning(
                "%s:%s %s %s: the client neither read nor sent for %g s; connection closed",
                *_peer(conn.client), req.method, req.path, SOCKET_SECONDS,
            )  # fmt: skip
            return False


def _peer(client: Any) -> tuple[str, str]:
    if isinstance(client, tuple) and len(client) >= 2:
        return str(client[0]), str(client[1])
    return str(client), "-"


def _worker_exit(server: Any, worker: Any) -> None:
    # Flush this worker's call log before it goes (SIGTERM, reload, max-requests).
    service = getattr(worker.wsgi, "extensions", {}).get("inference")
    if service is not None:
        service.close()


def prepare_metrics_dir() -> str:
    """PROMETHEUS_MULTIPROC_DIR for the workers' metrics: a fresh temporary directory, or,
    when the variable names a directory, METRICS_SUBDIR in it, emptied of an earlier run's
    values (only there: the operator's other files in the named directory are left alone).
    It must be set before any worker imports prometheus_client, which reads it at import."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given) / METRICS_SUBDIR
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
            "worker_class": f"{__name__}.SlowClientWorker",
            # Every request on a fresh connection, whose head the worker reads off-thread.
            "keepalive": 0,
            "timeout": timeout,
            "graceful_timeout": timeout,
            "worker_exit": _worker_exit,
            "child_exit": child_exit,
            "accesslog": "-",
        }
    ).run()
