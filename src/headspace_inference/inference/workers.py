"""The threads behind ``submit()``: a fixed set of workers and a bounded queue, from which
nothing queued is ever dropped (a call the pool will not run is handed back, cancelled)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from .errors import CancelledCallError, InferenceError, QueueFullError, ShuttingDownError

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")

_STOP = object()


class WorkerPool(Generic[Job, Result]):
    """Runs jobs on ``size`` threads behind a queue of ``capacity``.

    ``run(job)`` computes a job's result; ``cancelled(job, error)`` is told of every job that
    was accepted but will never run (its caller cancelled the future, or the pool shut down
    first), so that it can still be accounted for. Workers start with the first job, so
    building a pool starts no threads.
    """

    def __init__(
        self,
        *,
        size: int,
        capacity: int,
        run: Callable[[Job], Result],
        cancelled: Callable[[Job, CancelledCallError], None],
    ) -> None:
        self._size = size
        self._capacity = capacity
        self._run = run
        self._cancelled = cancelled
        # SimpleQueue is implemented in C: far cheaper than Queue's condition variables when
        # dozens of workers wait on it. The bound is kept by hand, under the pool's lock.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued = 0
        self._running = 0
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._latency_ms = 1000.0  # a moving average, for the retry_after of a full queue

    def submit(self, job: Job) -> Future[Result]:
        """Queue ``job`` and return its future; QueueFullError or ShuttingDownError at once."""
        future: Future[Result] = Future()
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the inference service is shutting down")
            if not self._threads:
                self._start()
            if self._queued >= self._capacity:
                waiting = self._queued
                retry_after = round(max(0.1, waiting / self._size * self._latency_ms / 1000), 3)
                raise QueueFullError(
                    f"the inference queue is full ({waiting} calls waiting for "
                    f"{self._size} workers); retry in about {retry_after} s",
                    retry_after=retry_after,
                )
            self._queued += 1
            self._queue.put((job, future))
        return future

    def stats(self) -> dict[str, Any]:
        """Workers, queue and what is running, for /api/inference/status."""
        return {
            "workers": self._size,
            "queue_size": self._capacity,
            "queued": self._queued,
            "running": self._running,
            "started": bool(self._threads),
        }

    def shutdown(self, timeout: float) -> None:
        """Take no more jobs, cancel the queued ones, let running ones finish up to ``timeout``."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                job, future = item
                with self._lock:
                    self._queued -= 1
                self._cancel(job, future, "the inference service shut down before this call ran")
        for _ in threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in threads)
        if alive:
            log.warning(
                "inference: %d calls still running after %.1f s of shutdown", alive, timeout
            )

    def _start(self) -> None:
        for number in range(self._size):
            thread = threading.Thread(
                target=self._work, name=f"inference-worker-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _cancel(self, job: Job, future: Future[Result], why: str) -> None:
        error = CancelledCallError(why)
        self._cancelled(job, error)
        if not future.done():
            future.set_exception(error)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            job, future = item
            with self._lock:
                self._queued -= 1
            if not future.set_running_or_notify_cancel():
                # The caller cancelled it while queued: it never ran, but it is accounted for.
                self._cancel(job, future, "the caller cancelled this call before it ran")
                continue
            with self._lock:
                self._running += 1
            started = time.perf_counter()
            try:
                future.set_result(self._run(job))
            except InferenceError as exc:
                future.set_exception(exc)
            except BaseException as exc:  # a bug must reach the caller, not kill the worker
                log.exception("inference worker: unexpected error")
                future.set_exception(exc)
            finally:
                elapsed_ms = (time.perf_counter() - started) * 1000
                with self._lock:
                    self._running -= 1
                    self._latency_ms = 0.9 * self._latency_ms + 0.1 * elapsed_ms
