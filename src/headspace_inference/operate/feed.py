"""The live call feed behind GET /api/inference/events: every call recorded by any process
sharing this call log, delivered to this process's open streams; and the spend guard's
budget events, from any process, beside them.

```
call-log writer (any process) --commit--> on_committed --(bounded queue)--> publisher thread
   --> transport: pg_notify / Redis PUBLISH / in-process      (request ids, never rows)
listener thread (each process with open streams) <-- transport
   --> one SELECT of the rows by request_id --> each stream's bounded queue --> SSE
service.on_budget_event (any process) --> announce --(bounded queue)--> publisher thread
   --> the same transport (the event's JSON) --> each stream's queue --> SSE, with no id
```

The transport is PostgreSQL ``LISTEN/NOTIFY`` when the call log is on PostgreSQL: the
database every process already shares, no extra moving part, and a notification sent after
the batch's commit names rows any listener can already read. On SQLite with ``redis.url``
set, Redis pub/sub (processes on one host sharing the file and the Redis); on SQLite alone,
in-process delivery. Notifications carry request ids only: the rows themselves are read from
the table, so an event is exactly what the calls API shows, with its row ``id`` as the SSE
event id, and ``Last-Event-ID`` replays the rows with a larger id from the table.

A budget event (a warning, a cap reached, the storm breaker tripping: ``Feed.announce``)
travels whole, as its JSON, on the same transport: one message is either a list of request
ids or one event, told apart by its first character (an event is a JSON object, ``{``; a
request id is hex, or ``adopted-<id>``). It reaches each stream as ``event:
inference_budget`` with no ``id:`` line, so a client's ``Last-Event-ID`` stays the last
call's and a resume replays calls as before; events themselves are not replayed (the table
does not hold them; /status shows the budgets' state).

Nothing here can hold up a call or the writer: the writer's hook appends to a bounded queue
and returns (a full queue drops the notification, counted); a stream whose queue fills (a
slow or vanished client) is dropped, not waited for, and its client resumes from the table
with ``Last-Event-ID``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from ..calllog.batches import in_id_order
from ..calllog.call_json import call_json, calls_with_request_ids, select_calls
from ..calllog.database import Database
from ..calllog.models import InferenceCall
from ..calllog.record import CallRecord
from ..settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "headspace_inference_calls"
# pg_notify payloads are limited to 8000 bytes: ids go in chunks well under it, and an
# event longer than this is not sent (the guard's events are a few hundred bytes).
_IDS_PER_MESSAGE = 200
MAX_EVENT_BYTES = 7_900
# Budget events waiting to be published; more are dropped (and counted).
ANNOUNCE_QUEUE = 1_000
# Request ids waiting to be published; more are dropped (and counted): a writer faster than
# the transport must not grow memory without bound.
PUBLISH_QUEUE = 10_000
# Events waiting for one stream's client; a fuller stream is dropped (its client resumes).
STREAM_QUEUE = 1_000
# Rows one Last-Event-ID resume replays from the table at most (then live events go on).
REPLAY_MAX = 5_000
_REPLAY_CHUNK = 500
# How long the listener (with its connection) and the publisher live on with nothing to do.
_THREAD_IDLE_SECONDS = 30.0


class Transport(Protocol):
    """Carries the feed's messages (text, each under 8000 bytes: a list of request ids, or a
    budget event) from the processes that commit rows or meet a budget to those that stream."""

    name: str
    # Published on the writer's thread right after the commit (the database the writer
    # just wrote to, or memory), or else by a thread of the feed's (a separate service).
    synchronous: bool

    def publish(self, messages: Sequence[str]) -> None:
        """Send these messages to every listening process, in order."""
        ...

    def listen(self, stop: Callable[[], bool], ready: Callable[[], None]) -> Iterator[str]:
        """Yield each published message until ``stop()`` (asked at least every second); call
        ``ready()`` once listening, so nothing published after it is missed."""
        ...


class LocalTransport:
    """In-process delivery: SQLite without Redis, where no other process shares the feed."""

    name = "local"
    synchronous = True

    def __init__(self) -> None:
        self._inbox: queue.Queue[str] = queue.Queue(maxsize=PUBLISH_QUEUE)

    def publish(self, messages: Sequence[str]) -> None:
        for message in messages:
            try:
                self._inbox.put_nowait(message)
            except queue.Full:
                log.warning("event feed: local inbox full; a message dropped")

    def listen(self, stop: Callable[[], bool], ready: Callable[[], None]) -> Iterator[str]:
        # What was published while nobody listened is older than every open stream.
        with contextlib.suppress(queue.Empty):
            while True:
                self._inbox.get_nowait()
        ready()
        while not stop():
            try:
                yield self._inbox.get(timeout=1.0)
            except queue.Empty:
                continue


class PostgresTransport:
    """``pg_notify`` on publish; a dedicated autocommit connection LISTENing."""

    name = "postgresql"
    synchronous = True

    def __init__(self, database: Database) -> None:
        self._engine = database.engine

    def publish(self, messages: Sequence[str]) -> None:
        with self._engine.begin() as conn:
            for message in messages:
                conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": CHANNEL, "payload": message},
                )

    def listen(self, stop: Callable[[], bool], ready: Callable[[], None]) -> Iterator[str]:
        # A connection of the engine's own driver (psycopg 3 or a host's psycopg2), taken
        # out of the pool for good: it stays in LISTEN until the stream ends, then closes.
        raw = self._engine.raw_connection()
        dbapi: Any = raw.driver_connection
        raw.detach()
        try:
            raw.rollback()  # the pool's checkout ping may have begun a transaction
            dbapi.autocommit = True
            with dbapi.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            ready()
            psycopg2 = self._engine.dialect.driver == "psycopg2"
            payloads = _psycopg2_notifies if psycopg2 else _notifies
            while not stop():
                for payload in payloads(dbapi, timeout=1.0):
                    yield payload
                    if stop():
                        return
        finally:
            raw.close()


def _notifies(connection: Any, timeout: float) -> Iterator[str]:
    """psycopg 3: the payloads that arrive within ``timeout`` seconds."""
    for notify in connection.notifies(timeout=timeout):
        yield notify.payload


def _psycopg2_notifies(connection: Any, timeout: float) -> Iterator[str]:
    """psycopg2: wait up to ``timeout`` seconds for the socket, then the payloads read."""
    import select

    if select.select([connection], [], [], timeout)[0]:
        connection.poll()
        while connection.notifies:
            yield connection.notifies.pop(0).payload


class RedisTransport:
    """Redis PUBLISH and SUBSCRIBE on ``<key_prefix>:inference_calls``."""

    name = "redis"
    synchronous = False

    def __init__(self, url: str, key_prefix: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.channel = f"{key_prefix}:inference_calls"

    def publish(self, messages: Sequence[str]) -> None:
        for message in messages:
            self._client.publish(self.channel, message)

    def listen(self, stop: Callable[[], bool], ready: Callable[[], None]) -> Iterator[str]:
        # Untyped before redis-py 7: the ignore holds for every version the extra admits.
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
        try:
            pubsub.subscribe(self.channel)
            pubsub.get_message(timeout=5.0)  # the subscription's confirmation: now listening
            ready()
            while not stop():
                message = pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    yield message["data"].decode()
        finally:
            pubsub.close()


def id_messages(request_ids: Sequence[str]) -> list[str]:
    """The messages that carry these request ids: comma-separated, in chunks."""
    return [
        ",".join(request_ids[start : start + _IDS_PER_MESSAGE])
        for start in range(0, len(request_ids), _IDS_PER_MESSAGE)
    ]


def event_message(event: dict[str, Any]) -> str:
    """The message that carries a budget event: its JSON object."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)


def read_message(message: str) -> list[str] | dict[str, Any] | None:
    """A message's request ids, or its event; None for one that is neither (a newer
    process's, say). An event is a JSON object; no request id begins with ``{``."""
    if not message.startswith("{"):
        return [i for i in message.split(",") if i]
    try:
        event = json.loads(message)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def transport_for(settings: Settings, database: Database) -> Transport:
    """PostgreSQL's own LISTEN/NOTIFY on PostgreSQL; Redis pub/sub on SQLite with Redis;
    else in-process."""
    if not database.is_sqlite:
        return PostgresTransport(database)
    if settings.redis.url is not None:
        return RedisTransport(settings.redis.url, settings.redis.key_prefix)
    return LocalTransport()


class TooManyStreams(Exception):
    """This process already serves its limit of open event streams."""


_CLOSED: dict[str, Any] = {}  # put in a stream's queue when it is dropped


@dataclass(frozen=True, eq=False)
class Announcement:
    """A budget event on its way to a stream (a CALL travels as its dict)."""

    event: dict[str, Any]


@dataclass(eq=False)
class Stream:
    """One open event stream: its queue of CALLs and budget events, and why it was dropped,
    if it was."""

    events: queue.Queue[dict[str, Any] | Announcement] = field(
        default_factory=lambda: queue.Queue(maxsize=STREAM_QUEUE)
    )
    dropped: str | None = None


class Feed:
    """This process's end of the live feed: publishes committed rows, fans received ones out."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        transport: Transport,
        *,
        max_streams: int = 4,
        keepalive_seconds: float = 15.0,
        max_stream_seconds: float = 600.0,
        stream_queue: int = STREAM_QUEUE,
    ) -> None:
        self._sessions = sessions
        self.transport = transport
        self.max_streams = max_streams
        self.keepalive_seconds = keepalive_seconds
        self.max_stream_seconds = max_stream_seconds
        self._stream_queue = stream_queue
        self._lock = threading.Lock()
        self._streams: set[Stream] = set()
        self._outbox: deque[str] = deque()
        self._announcements: deque[str] = deque()  # budget events' messages
        self._outbox_ready = threading.Event()
        # Held while ids taken from the outbox are being published (drain() waits for it).
        self._publishing = threading.Lock()
        self._publisher: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._last_stream_at = time.monotonic()
        self.published = 0
        self.announced = 0
        self.announce_dropped = 0
        self.publish_dropped = 0
        self.publish_failures = 0
        self.streams_dropped = 0

    # ------------------------------------------------------------------ the writer's side

    def committed(self, records: Sequence[CallRecord]) -> None:
        """The call-log writer's hook: publish the rows' ids (or queue them for the
        publisher thread when the transport is a service of its own), and return."""
        if self.transport.synchronous:
            # In process, no stream means nobody to tell; across processes, anyone may listen.
            if isinstance(self.transport, LocalTransport) and not self.open_streams():
                return
            self._publish([r.request_id for r in records])
            return
        with self._lock:
            room = PUBLISH_QUEUE - len(self._outbox)
            taken = records[: max(room, 0)]
            self._outbox.extend(r.request_id for r in taken)
            self.publish_dropped += len(records) - len(taken)
            self._wake_publisher()

    def announce(self, event: dict[str, Any]) -> None:
        """The spend guard's hook (``service.on_budget_event``): send a budget event to every
        process's open streams, and return at once. It is queued for the publisher thread,
        whatever the transport: the caller is in the middle of a call, and pg_notify or
        PUBLISH is a round trip."""
        message = event_message(event)
        size = len(message.encode())
        with self._lock:
            # In process, no stream means nobody to tell; across processes, anyone may listen.
            if isinstance(self.transport, LocalTransport) and not self._streams:
                return
            too_long = size > MAX_EVENT_BYTES
            if too_long or len(self._announcements) >= ANNOUNCE_QUEUE:
                self.announce_dropped += 1
            else:
                self._announcements.append(message)
                self._wake_publisher()
        if too_long:
            log.warning("event feed: a budget event of %d bytes not sent", size)

    def _wake_publisher(self) -> None:
        """Start the publisher thread if it is not running, and wake it (lock held)."""
        if self._publisher is None:
            self._publisher = _start(self._publish_loop, "event-feed-publisher")
        self._outbox_ready.set()

    def drain(self, timeout: float = 5.0) -> None:
        """Publish what is queued now, on this thread, after what the publisher thread is
        publishing (at exit: the publisher is a daemon, stopped mid-publish by the exit)."""
        if not self._publishing.acquire(timeout=timeout):
            return
        try:
            ids, events = self._take()
            self._publish(ids)
            self._publish_events(events)
        finally:
            self._publishing.release()

    def _take(self) -> tuple[list[str], list[str]]:
        """The queued request ids and budget events' messages, taken out of their queues."""
        with self._lock:
            ids, events = list(self._outbox), list(self._announcements)
            self._outbox.clear()
            self._announcements.clear()
        return ids, events

    def _publish(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            self.transport.publish(id_messages(ids))
            self.published += len(ids)
        except Exception as exc:  # the feed is best effort; the rows are in the table
            self.publish_failures += 1
            log.warning("event feed: publishing %d calls failed: %s", len(ids), exc)

    def _publish_events(self, messages: list[str]) -> None:
        if not messages:
            return
        try:
            self.transport.publish(messages)
            self.announced += len(messages)
        except Exception as exc:  # best effort too: the guard logged each event already
            self.publish_failures += 1
            log.warning("event feed: publishing %d budget events failed: %s", len(messages), exc)

    def _publish_loop(self) -> None:
        idle_since = time.monotonic()
        while not self._stop.is_set():
            self._outbox_ready.wait(timeout=1.0)
            self._outbox_ready.clear()
            with self._publishing:
                ids, events = self._take()
                if not ids and not events:
                    with self._lock:
                        if self._outbox or self._announcements:
                            continue  # queued since: publish it on the next turn
                        if time.monotonic() - idle_since > _THREAD_IDLE_SECONDS:
                            self._publisher = None  # the next commit or event starts another
                            return
                    continue
                idle_since = time.monotonic()
                self._publish(ids)
                self._publish_events(events)

    # ------------------------------------------------------------------ the streams' side

    def open(self) -> Stream:
        """A new stream receiving every call from now on; TooManyStreams at the limit."""
        with self._lock:
            if len(self._streams) >= self.max_streams:
                raise TooManyStreams(f"{self.max_streams} event streams are open in this process")
            stream = Stream(queue.Queue(maxsize=self._stream_queue))
            self._streams.add(stream)
            if self._listener is None:
                self._listening.clear()
                self._listener = _start(self._listen_loop, "event-feed-listener")
        # Events are delivered from the moment the listener listens: wait for that (briefly;
        # a transport that is down shows as a stream with no events, and its log lines).
        self._listening.wait(timeout=5.0)
        return stream

    def close_stream(self, stream: Stream) -> None:
        """Stop delivering to ``stream``."""
        with self._lock:
            self._streams.discard(stream)

    def open_streams(self) -> int:
        """How many streams are open in this process."""
        with self._lock:
            return len(self._streams)

    def _listen_loop(self) -> None:
        while True:
            try:
                for message in self.transport.listen(self._listener_done, self._listening.set):
                    got = read_message(message)
                    if isinstance(got, dict):
                        self._deliver_event(got)
                    elif got:
                        self._deliver(got)
            except Exception as exc:  # a dropped connection: say so, listen again shortly
                log.warning("event feed: listening failed (%s); retrying", exc)
                self._stop.wait(1.0)
            with self._lock:
                if self._listener_done(locked=True):
                    self._listener = None  # the next stream starts another
                    self._listening.clear()
                    return

    def _listener_done(self, *, locked: bool = False) -> bool:
        """Whether the listener should end: the feed is closed, or no stream has been open
        for a while (it keeps a database or Redis connection)."""
        if self._stop.is_set():
            return True
        streams = len(self._streams) if locked else self.open_streams()
        now = time.monotonic()
        if streams:
            self._last_stream_at = now
            return False
        return now - self._last_stream_at > _THREAD_IDLE_SECONDS

    def _deliver(self, request_ids: list[str]) -> None:
        with self._lock:
            streams = list(self._streams)
        if not streams or not request_ids:
            return
        try:
            with self._sessions() as session:
                calls = calls_with_request_ids(session, request_ids)
        except Exception as exc:
            log.warning("event feed: reading %d calls failed: %s", len(request_ids), exc)
            return
        for stream in streams:
            for call in calls:
                if not self._put(stream, call):
                    break

    def _deliver_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            self._put(stream, Announcement(event))

    def _put(self, stream: Stream, item: dict[str, Any] | Announcement) -> bool:
        """Queue ``item`` for ``stream``; a stream whose queue is full is dropped."""
        try:
            stream.events.put_nowait(item)
        except queue.Full:
            self._drop(stream, "the client read too slowly")
            return False
        return True

    def _drop(self, stream: Stream, why: str) -> None:
        with self._lock:
            self._streams.discard(stream)
            self.streams_dropped += 1
        stream.dropped = why
        # Make room for the marker, so the stream's reader wakes and ends.
        while True:
            try:
                stream.events.put_nowait(_CLOSED)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    stream.events.get_nowait()

    def close(self) -> None:
        """End the feed's threads and every stream."""
        self._stop.set()
        self._outbox_ready.set()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            self._drop(stream, "the service is closing")

    def stats(self) -> dict[str, Any]:
        """Counters for tests and the metrics."""
        with self._lock:
            return {
                "transport": self.transport.name,
                "streams": len(self._streams),
                "published": self.published,
                "publish_dropped": self.publish_dropped,
                "announced": self.announced,
                "announce_dropped": self.announce_dropped,
                "publish_failures": self.publish_failures,
                "streams_dropped": self.streams_dropped,
            }

    # ------------------------------------------------------------------ SSE

    def sse(
        self,
        stream: Stream,
        replayed: list[dict[str, Any]],
        *,
        monotonic: Callable[[], float],
    ) -> Iterator[str]:
        """The stream's text: replayed rows, then live calls and budget events, a comment
        when quiet."""
        seen = {call["id"] for call in replayed}
        started = monotonic()
        try:
            yield f"retry: 2000\n: {self.transport.name} feed\n\n"
            for call in replayed:
                yield _event(call)
            while (left := self.max_stream_seconds - (monotonic() - started)) > 0:
                # Waits at most to the stream's end: a quiet stream ends on time too.
                try:
                    item = stream.events.get(timeout=min(self.keepalive_seconds, left))
                except queue.Empty:
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(item, Announcement):
                    yield _budget_event(item.event)
                elif item is _CLOSED:
                    yield f": closed: {stream.dropped}\n\n"
                    return
                elif item["id"] not in seen:
                    yield _event(item)
        finally:
            self.close_stream(stream)


def replay(session: Session, after_id: int) -> list[dict[str, Any]]:
    """The CALLs with a row id above ``after_id``, oldest first (at most REPLAY_MAX): what a
    stream resuming with Last-Event-ID is sent before live events."""
    out: list[dict[str, Any]] = []
    after = select_calls().where(InferenceCall.id > after_id)
    for rows in in_id_order(session, after, InferenceCall.id, _REPLAY_CHUNK):
        out += [call_json(row) for row in rows]
        if len(out) >= REPLAY_MAX or len(rows) < _REPLAY_CHUNK:
            break
    return out[:REPLAY_MAX]


def _event(call: dict[str, Any]) -> str:
    data = json.dumps(call, separators=(",", ":"), ensure_ascii=False)
    return f"id: {call['id']}\nevent: inference_call\ndata: {data}\n\n"


def _budget_event(event: dict[str, Any]) -> str:
    # No id: line, so the client's Last-Event-ID stays the last call's row id.
    return f"event: inference_budget\ndata: {event_message(event)}\n\n"


def _start(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
