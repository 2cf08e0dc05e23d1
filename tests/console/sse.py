"""Reading an SSE response in tests: a thread parses events into a queue, so a test waits
for what it expects with a deadline instead of blocking on the stream."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    """One parsed SSE message: a comment, or an event with its id, name and data."""

    id: str | None = None
    event: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)

    def call(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


class SseReader:
    """Parses the chunks of a streaming body on a thread of its own."""

    def __init__(self, chunks: Iterable[bytes | str]) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(chunks,), daemon=True)
        self._thread.start()

    def _run(self, chunks: Iterable[bytes | str]) -> None:
        buffer = ""
        try:
            for chunk in chunks:
                buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    self.events.put(parse(block))
        except Exception:  # noqa: S110  (the stream was closed under the reader: that ends it)
            pass
        finally:
            self.ended.set()

    def wait_for(self, wanted: Callable[[Event], bool], seconds: float = 20.0) -> list[Event]:
        """Every message up to and including the first one ``wanted`` accepts; fails at the
        deadline."""
        seen: list[Event] = []
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not seen within {seconds} s; saw {seen!r:.2000}")
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            seen.append(event)
            if wanted(event):
                return seen


def parse(block: str) -> Event:
    event = Event()
    data: list[str] = []
    for line in block.split("\n"):
        if line.startswith(":"):
            event.comments.append(line[1:].strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event.id = value
            elif name == "event":
                event.event = value
            elif name == "data":
                data.append(value)
    event.data = "\n".join(data)
    return event
