"""The OpenRouter HTTP client: one request, one parsed answer or one InferenceError.

httpx errors are translated here and nowhere else; callers only see our error tree.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import itertools
import json
import math
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Any

# httpx imports httpcore lazily, when the first client is built. Our first client is built
# on the start-up health probe's thread while the app's thread may still be importing: a
# cross-thread import that hung or broke gunicorn workers. Imported here, once, up front.
import httpcore  # noqa: F401
import httpx

from .._version import __version__
from ..clock import SYSTEM_CLOCK, Clock
from ..row_bounds import MAX_INTEGER, USD_QUANTUM
from ..settings import OpenRouterSettings
from .errors import (
    EmptyResponseError,
    ErrorInResponseError,
    InferenceError,
    InvalidResponseError,
    StructuredAnswerError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
    classify,
    error_for_status,
)
from .pricing import PriceTable
from .structured import AnswerFormatError, AnswerSchema
from .types import Answer, GenerationParams

_SHOWN_BYTES = 200
_USER_AGENT = f"headspace-inference/{__version__} httpx/{httpx.__version__}"

# GET /models lists every model OpenRouter has (about 1 MB in 2026): its own cap, well above
# that, whatever openrouter.max_response_bytes allows an answer.
MODELS_MAX_BYTES = 64 * 2**20
# The raw body is decoded this many bytes at a time: deflate inflates at most about 1,032
# times, so one step of a gzip bomb makes at most about 4 MiB before the cap is checked.
_DECODE_STEP = 4096


# A Retry-After longer than this is taken as this: a day is longer than any real
# OpenRouter back-off, and a garbled header (or a proxy's) must not pause every call for
# years, nor put an infinity into a JSON answer.
MAX_RETRY_AFTER_SECONDS = 86_400.0
# RFC 9110 delta-seconds (fractions accepted, as OpenRouter's own may be); anything else,
# such as "inf", "nan", "-5" or "1e3", is not a number of seconds.
_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (preferred, as OpenRouter's SDKs read it) or
    ``Retry-After`` (delta-seconds or an HTTP date, measured from ``now``, epoch seconds).

    None when both are absent or unreadable; never negative, at most MAX_RETRY_AFTER_SECONDS.
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = (headers.get(name) or "").strip()
        if _DELTA_SECONDS.fullmatch(value):
            return min(float(value) * scale, MAX_RETRY_AFTER_SECONDS)
    date = headers.get("retry-after")
    if not date:
        return None
    try:
        when = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, when - now), MAX_RETRY_AFTER_SECONDS)


def _limit(timeout: httpx.Timeout, exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ReadTimeout):
        seconds = timeout.read
    elif isinstance(exc, httpx.WriteTimeout):
        seconds = timeout.write
    elif isinstance(exc, httpx.PoolTimeout):
        seconds = timeout.pool
    else:
        seconds = timeout.connect
    return "no limit" if seconds is None else f"{seconds:g} s"


def _parsed(url: str) -> httpx.URL | str:
    # Parsed once, not on every request (httpx parses a string URL in Python each time).
    # A URL httpx refuses stays a string, so that sending it fails with the usual error.
    try:
        return httpx.URL(url)
    except httpx.InvalidURL:
        return url


def _token_count(usage: Mapping[str, Any], name: str, detail: str | None = None) -> int:
    # Token counts drive the rate limiter's budget and the cost: a negative, fractional or
    # absurd one is a malformed answer, not a number to trust (a negative count would hand
    # budget back to the limiter). ``detail``: a count inside usage's ``name`` object.
    if detail is not None:
        details = usage.get(name)
        if details is None:
            return 0
        if not isinstance(details, Mapping):
            raise ValueError(f"usage.{name} is {details!r:.60}, not an object")
        return _token_count(details, detail)
    value = usage.get(name)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"usage.{name} is {value!r}, not a whole number of tokens")
    if not 0 <= value <= MAX_INTEGER:
        raise ValueError(f"usage.{name} is {value}, outside 0..{MAX_INTEGER}")
    return value


def _text(value: str) -> str:
    # JSON may carry lone surrogates (half an emoji, escaped); they cannot be encoded to
    # UTF-8, so the journal, the databases and most callers would fail on them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


# A reported cost above this is not a cost of one call; it would also overflow the call
# log's NUMERIC(20, 12) column.
_MAX_REPORTED_COST = 1_000_000.0


def _reported_cost(value: Any) -> Decimal | None:
    # OpenRouter's own figure, kept for the record beside ours: one that is not a finite,
    # non-negative number is not kept (JSON parsers accept NaN and Infinity, NUMERIC
    # columns too, and one NaN would poison every sum it enters). To the call log's
    # twelve decimals, so the rollup sums exactly what rows hold.
    try:
        cost = float(value)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(cost) and 0 <= cost <= _MAX_REPORTED_COST):
        return None
    return Decimal(str(cost)).quantize(USD_QUANTUM)


def _metadata_note(metadata: Mapping[str, Any]) -> str:
    # What an operator needs from OpenRouter's metadata; flagged_input is left out on
    # purpose, as it is the user's own text.
    notes = []
    reasons = metadata.get("reasons")
    if isinstance(reasons, list) and reasons:
        notes.append("flagged for " + ", ".join(str(r) for r in reasons))
    provider = metadata.get("provider_name")
    if provider:
        notes.append(f"provider {provider}")
    return f" ({'; '.join(notes)})" if notes else ""


def _shut(stream: Any) -> None:
    # Shut down, not closed: a thread blocked reading a socket wakes when it is shut down,
    # not when another thread closes it.
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# The watchdog acts this long after an attempt's deadline: a read that times out on its own
# (httpx's per-read timeout, as long as the attempt's) says so first.
_GRACE_SECONDS = 0.25


class _Attempt:
    """One request's deadline, and the connection carrying it once known (httpcore's
    network stream): just past the deadline the connection is shut down, whatever it is
    doing.

    Real time, as httpx's own timeouts are: the deadline bounds a wait on the network.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._done = False
        self._stream: Any = None
        self._lock = threading.Lock()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace extension: a new connection (or its TLS layer) is this one's."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self.carry(info.get("return_value"))

    def carry(self, stream: Any) -> None:
        """The connection carrying the request is ``stream`` (None: not known)."""
        if stream is None:
            return
        with self._lock:
            if self._done:
                return
            self._stream = stream
            if self.expired:
                _shut(stream)

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            _shut(self._stream)

    def finish(self) -> None:
        """Over: from now on its connection is never shut down for it (it may carry the
        next request)."""
        with self._lock:
            self._done = True
            self._stream = None

    def past(self) -> bool:
        return self.expired or time.monotonic() >= self.deadline


class _Watchdog:
    """Expires attempts at their deadlines: one thread, started by the first request and
    ended by close(), asleep until the nearest deadline. An attempt that finished early
    stays queued until its deadline, then is dropped (expiring a finished one does nothing).
    """

    def __init__(self) -> None:
        self._reset()
        self._closed = False

    def _reset(self) -> None:
        # Also after a fork: the child has neither the parent's thread nor its attempts, and
        # must not inherit a lock the thread may have held at the fork.
        self._pid = os.getpid()
        self._due: list[tuple[float, int, _Attempt]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, attempt: _Attempt) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._wake:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="openrouter-deadlines", daemon=True
                )
                self._thread.start()
            due = attempt.deadline + _GRACE_SECONDS
            heapq.heappush(self._due, (due, next(self._order), attempt))
            if self._due[0][2] is attempt:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._closed:
                    return
                _, _, attempt = heapq.heappop(self._due)
            attempt.expire()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._due.clear()
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


class _RawPieces(httpx.SyncByteStream):
    """A response's raw (still encoded) body, in pieces of at most _DECODE_STEP bytes."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        return self._response.iter_raw(_DECODE_STEP)


def _decoded(response: httpx.Response) -> Iterator[bytes]:
    if response.is_stream_consumed:
        # Read whole by its transport already (an in-memory one, such as a test's).
        return response.iter_bytes(_DECODE_STEP)
    # httpx decodes a body one piece of its stream at a time, as its headers say (gzip,
    # deflate...); fed small pieces, it never inflates much at once.
    pieces = httpx.Response(
        response.status_code, headers=response.headers, stream=_RawPieces(response)
    )
    return pieces.iter_bytes()


class ClientSlots:
    """At most ``size`` requests at once, each on a single-connection ``httpx.Client`` of
    its own, checked out for the request and back once its body has been read.

    One client with a pool of ``size`` would do the same with less code, but httpcore's
    shared pool does work in proportion to the requests waiting times the connections open
    on every request: under many threads its CPU per call, not the network, caps throughput
    (bench/bench_client.py --threads 64: about a third of the calls per second). A request
    that finds every slot busy waits at most ``wait`` (the health probe's short timeout, or
    openrouter.timeout_seconds), then fails with httpx.PoolTimeout, as a full pool would.
    """

    def __init__(self, size: int, timeout: httpx.Timeout) -> None:
        self._size = size
        self._timeout = timeout
        self._free = threading.BoundedSemaphore(size)
        self._idle: list[httpx.Client] = []
        self._all: list[httpx.Client] = []
        # Each slot's connection, as its last response showed it (by id of the slot's client).
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._closed = False
        # One TLS context for every connection: building one loads the CA bundle, a cost
        # that a new context per connection would pay on the call path.
        self._tls: ssl.SSLContext | None = None

    @property
    def is_closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def stream(
        self, request: httpx.Request, wait: float | None, attempt: _Attempt
    ) -> Iterator[httpx.Response]:
        """``request`` sent over a free slot, its response open for reading until the block
        ends; raises as httpx does. ``attempt`` learns the slot's connection up front (a
        slot has one, and a request reuses it): a deadline then ends it even while its
        answer's headers are still coming."""
        bounded = wait is not None and math.isfinite(wait)
        if not self._free.acquire(timeout=wait if bounded else None):
            raise httpx.PoolTimeout(f"no free connection within {wait:g} s", request=request)
        try:
            client = self._idle.pop() if self._idle else self._open()
        except BaseException:
            self._free.release()
            raise
        try:
            attempt.carry(self._streams.get(id(client)))
            response = client.send(request, auth=None, follow_redirects=False, stream=True)
            self._streams[id(client)] = response.extensions.get("network_stream")
            try:
                yield response
            finally:
                attempt.finish()
                response.close()
        finally:
            attempt.finish()
            # No lock: close() closes every client it ever opened, so one put back after a
            # close is closed already, and a request that takes it fails as on a closed one.
            self._idle.append(client)
            self._free.release()

    def _open(self) -> httpx.Client:
        with self._lock:
            if self._closed:
                # What httpx raises for a closed client: the caller knows it as such.
                raise RuntimeError("Cannot send a request, as the client has been closed.")
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            # The environment's proxies (HTTPS_PROXY, NO_PROXY...) are read by each client.
            client = httpx.Client(
                verify=self._tls,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                timeout=self._timeout,
                follow_redirects=False,
            )
            self._all.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._all = self._all, []
        self._idle.clear()
        for client in clients:
            client.close()


class OpenRouterClient:
    """Chat completions and account checks against OpenRouter, over httpx clients.

    Requests go through :class:`ClientSlots` (single-connection clients of ours) unless
    ``transport=`` is given (an egress proxy's ``httpx.HTTPTransport(proxy=...)``, or a
    test's), which carries them inside a client of ours, or ``http_client=`` (the host's
    own, with its proxies, TLS and event hooks), which is used as it is. Neither given
    object is closed by close(). Either way each request is built here, with an absolute
    URL, our headers and our timeouts, and sent without the client's auth or redirects: a
    given client's base_url, default headers, params and cookies do not change where or
    how OpenRouter is called.
    """

    def __init__(
        self,
        settings: OpenRouterSettings,
        *,
        api_key: str | None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        clock: Clock = SYSTEM_CLOCK,
        prices: PriceTable | None = None,
    ) -> None:
        if transport is not None and http_client is not None:
            raise TypeError(
                "OpenRouterClient takes transport= or http_client=, not both: a given "
                "http_client already has its own transport"
            )
        self._settings = settings
        # The service passes the table it built at start (synced prices, start-up warnings).
        self.prices = prices or PriceTable(settings.pricing)
        self._key = api_key or ""
        self._clock = clock
        # No key, no Authorization header: GET /models needs none
        # (`headspace-inference pricing sync`).
        authorization = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._headers = httpx.Headers(
            {
                **authorization,
                "HTTP-Referer": settings.site_url,
                "X-Title": settings.app_name,
                "Content-Type": "application/json",
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",
                "User-Agent": _USER_AGENT,
            }
        )
        # The pool timeout bounds the wait for a free connection; a short per-call timeout
        # (the health probe's) replaces all four, so a status request never queues behind
        # slow calls.
        self.timeout = httpx.Timeout(
            settings.timeout_seconds,
            connect=settings.connect_timeout_seconds,
            pool=settings.timeout_seconds,
        )
        self._timeouts = self.timeout.as_dict()
        # What is given is used, not owned: close() leaves it open. The client built around
        # a given transport is not closed either, as closing it would close the transport.
        self._sender: ClientSlots | httpx.Client
        if http_client is not None:
            self._sender = http_client
        elif transport is not None:
            self._sender = httpx.Client(
                transport=transport, timeout=self.timeout, follow_redirects=False
            )
        else:
            self._sender = ClientSlots(settings.max_connections, self.timeout)
        self._pool = (
            f"openrouter.max_connections={settings.max_connections}"
            if isinstance(self._sender, ClientSlots)
            else "the pool of the given "
            + ("httpx.Client" if http_client is not None else "transport")
        )
        self._watchdog = _Watchdog()
        self._closed = False
        base = settings.base_url
        self._chat_url = _parsed(f"{base}/chat/completions")
        self._key_url = _parsed(f"{base}/key")
        self._models_url = _parsed(f"{base}/models")

    def close(self) -> None:
        """Close every connection this client opened; later requests fail at once."""
        self._closed = True
        if isinstance(self._sender, ClientSlots):
            self._sender.close()
        self._watchdog.close()

    def _refused_as_closed(self) -> bool:
        return self._closed or self._sender.is_closed

    def _closed_error(self, *, in_flight: bool = False) -> UpstreamError:
        # Not retryable: the service closes its client when it shuts down, and a host that
        # closed the httpx.Client it gave us has shut down too.
        what = (
            "was closed while the request was in flight"
            if in_flight
            else "is closed; no request was sent"
        )
        why = "the service has shut down" if self._closed else "the host closed its httpx.Client"
        return UpstreamError(f"the OpenRouter client {what} ({why})", retryable=False)

    # ------------------------------------------------------------------ requests

    def complete(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        params: GenerationParams,
        fallbacks: Sequence[str] = (),
        provider: Mapping[str, Any] | None = None,
        schema: AnswerSchema | None = None,
    ) -> Answer:
        """One chat completion, priced by the model that answered; raises an UpstreamError
        subclass on any failure. ``fallbacks`` go as OpenRouter's ``models`` after ``model``;
        with ``schema`` the answer is parsed into ``data``, or StructuredAnswerError raised."""
        body: dict[str, Any] = {"model": model, "messages": messages, **params.as_body()}
        if fallbacks:
            body["models"] = [model, *fallbacks]
        if provider:
            body["provider"] = provider
        if schema is not None:
            body["response_format"] = schema.response_format()
        status, data = self._send(
            "POST", self._chat_url, content=json.dumps(body).encode(), model_named=True
        )
        answer = self._answer(self._json(status, data), model, fallbacks=bool(fallbacks))
        return answer if schema is None else self.structured(answer, schema)

    @staticmethod
    def structured(answer: Answer, schema: AnswerSchema) -> Answer:
        """``answer`` with its text parsed against ``schema`` into ``data``; raises
        StructuredAnswerError (retryable, keeping the answer) when it does not fit."""
        try:
            return replace(answer, data=schema.parse(answer.text))
        except AnswerFormatError as exc:
            raise StructuredAnswerError(
                f"OpenRouter answered 200 but {exc} (response_format {schema.name})",
                status_code=200,
                answer=answer,
            ) from None

    def get_key(self, *, timeout: float) -> dict[str, Any]:
        """GET /key: the key's account details (proves the key works)."""
        return self._json(*self._send("GET", self._key_url, timeout=timeout))

    def list_models(self, *, timeout: float) -> dict[str, Any]:
        """GET /models: the model list (proves OpenRouter answers); at most MODELS_MAX_BYTES."""
        return self._json(
            *self._send("GET", self._models_url, timeout=timeout, max_bytes=MODELS_MAX_BYTES)
        )

    # ------------------------------------------------------------------ plumbing

    def _send(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        timeout: float | None = None,
        max_bytes: int | None = None,
        model_named: bool = False,
    ) -> tuple[int, bytes]:
        """(status, decoded body) of one request, which ends within its timeout (the whole
        of it: waiting for a connection, sending, and the answer to its last byte) and
        whose body is at most ``max_bytes`` (openrouter.max_response_bytes), on the wire
        and decoded; an error status raises its UpstreamError."""
        if self._closed:
            raise self._closed_error()
        wait = self.timeout if timeout is None else httpx.Timeout(timeout)
        attempt = _Attempt(self._settings.timeout_seconds if timeout is None else timeout)
        cap, limit = (
            (self._settings.max_response_bytes, "openrouter.max_response_bytes")
            if max_bytes is None
            else (max_bytes, "this endpoint's limit")
        )
        try:
            # Built here, not by the client: an absolute URL and only our headers, so a
            # host's client (its base_url, headers, params, cookies) cannot redirect or
            # add to the call. The timeout is the documented per-request extension, as
            # httpx's own build_request sets it; auth=None: the Authorization is ours.
            # The trace extension tells the attempt which connection carries it.
            request = httpx.Request(
                method, url, headers=self._headers, content=content,
                extensions={"timeout": self._timeouts if timeout is None else wait.as_dict(),
                            "trace": attempt.trace},
            )  # fmt: skip
            self._watchdog.watch(attempt)
            with self._exchange(request, wait, attempt) as response:
                status = response.status_code
                body = self._read(response, attempt, cap, limit, method, url)
        except (httpx.HTTPError, httpx.InvalidURL, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not self._refused_as_closed():
                raise  # not a closed client's refusal: a bug, shown as it is
            if attempt.expired and not isinstance(exc, httpx.TimeoutException):
                raise self._late(attempt, method, url) from self._redacted(exc)
            raise self._translate(exc, method, url, wait) from self._redacted(exc)
        finally:
            attempt.finish()
        if status >= 400:
            raise self._http_error(response, body, model_named=model_named)
        return status, body

    @contextlib.contextmanager
    def _exchange(
        self, request: httpx.Request, wait: httpx.Timeout, attempt: _Attempt
    ) -> Iterator[httpx.Response]:
        """The response to ``request``, open for reading until the block ends."""
        sender = self._sender
        if isinstance(sender, ClientSlots):
            with sender.stream(request, wait.pool, attempt) as response:
                yield response
            return
        response = sender.send(request, auth=None, follow_redirects=False, stream=True)
        attempt.carry(response.extensions.get("network_stream"))
        try:
            yield response
        finally:
            # Finished first: once closed, its connection may carry another request.
            attempt.finish()
            response.close()

    def _read(
        self,
        response: httpx.Response,
        attempt: _Attempt,
        cap: int,
        limit: str,
        method: str,
        url: httpx.URL | str,
    ) -> bytes:
        """The body, decoded a small step at a time, refused past ``cap`` bytes (the setting
        or bound named ``limit``) on the wire or decoded (a gzip bomb stops within a step of
        the cap), or past the deadline."""
        body = bytearray()
        for chunk in _decoded(response):
            body += chunk
            if len(body) > cap or response.num_bytes_downloaded > cap:
                raise InvalidResponseError(
                    f"OpenRouter's answer to {method} {url} is over {cap} bytes ({limit}), "
                    "as sent or decoded; not read further",
                    retryable=False,  # another answer would be as large, and paid for
                    status_code=response.status_code,
                )
            if attempt.past():
                raise self._late(attempt, method, url)
        return bytes(body)

    def _late(self, attempt: _Attempt, method: str, url: httpx.URL | str) -> UpstreamTimeoutError:
        return UpstreamTimeoutError(
            f"OpenRouter did not answer in time (no whole answer within {attempt.seconds:g} s "
            f"on {method} {url})"
        )

    def _translate(
        self, exc: Exception, method: str, url: httpx.URL | str, wait: httpx.Timeout
    ) -> UpstreamError:
        """Our error for what httpx raised (its text cleaned of the key)."""
        if isinstance(exc, RuntimeError):
            # httpx's "the client has been closed": close() won the race with this request,
            # or the host closed the client it gave us.
            return self._closed_error()
        if isinstance(exc, httpx.PoolTimeout):
            return UpstreamTimeoutError(
                f"no free connection to OpenRouter within {_limit(wait, exc)} ({self._pool})"
            )
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeoutError(
                f"OpenRouter did not answer in time ({type(exc).__name__} after "
                f"{_limit(wait, exc)} on {method} {url})"
            )
        if isinstance(exc, httpx.TransportError):
            if self._refused_as_closed():
                return self._closed_error(in_flight=True)
            return UpstreamConnectionError(
                f"could not talk to OpenRouter at {url}: {type(exc).__name__}: {self._clean(exc)}"
            )
        if isinstance(exc, httpx.DecodingError):
            return InvalidResponseError(
                f"OpenRouter's answer to {method} {url} could not be decoded: {self._clean(exc)}"
            )
        # Not the network's fault (e.g. a malformed openrouter.base_url): retrying won't help.
        return UpstreamError(
            f"could not send {method} {url}: {type(exc).__name__}: {self._clean(exc)}",
            retryable=False,
        )

    def _redacted(self, exc: BaseException) -> BaseException:
        """``exc``, kept as our error's cause, with the key cleaned from its text and from
        the text of every exception it was raised from: a traceback prints them all, and a
        server's malformed answer that httpx quotes could echo the key back."""
        seen: set[int] = set()
        link: BaseException | None = exc
        while self._key and link is not None and id(link) not in seen:
            seen.add(id(link))
            if any(self._key in str(arg) for arg in link.args):
                link.args = tuple(self._clean(arg) for arg in link.args)
            link = link.__cause__ or link.__context__
        return exc

    def _clean(self, value: object) -> str:
        text = _text(str(value))
        return text.replace(self._key, "[REDACTED]") if self._key else text

    def _optional_text(self, value: Any) -> str | None:
        # A field OpenRouter sends as a string; any other type is not kept.
        return self._clean(value) if isinstance(value, str) else None

    def _scrub(self, value: Any) -> Any:
        # OpenRouter's error metadata, kept on the exception for callers to inspect, with
        # the key redacted wherever an upstream echoed it.
        if isinstance(value, str):
            return self._clean(value)
        if isinstance(value, dict):
            return {self._scrub(k): self._scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v) for v in value]
        return value

    def _preview(self, content: bytes) -> str:
        # The first bytes of a body, for the operator. A proxy or error page may echo the
        # request headers back, so the key is redacted before the cut: the window is wide
        # enough that any key starting inside the shown part is replaced whole.
        window = content[: _SHOWN_BYTES + len(self._key.encode())]
        text = self._clean(window.decode("utf-8", "replace"))[:_SHOWN_BYTES]
        return repr(text) + (" ..." if len(content) > _SHOWN_BYTES else "")

    def _http_error(
        self, response: httpx.Response, body: bytes, *, model_named: bool
    ) -> UpstreamError:
        status = response.status_code
        code: int | str | None = status
        said = ""
        metadata: dict[str, Any] = {}
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            said = self._clean(error.get("message") or response.reason_phrase)
            message = said
            code = error.get("code", status)
            if isinstance(error.get("metadata"), dict):
                metadata = self._scrub(error["metadata"])
                message += _metadata_note(metadata)
        elif payload is None:
            message = f"the body is not JSON: {self._preview(body)}"
        else:
            message = f"{response.reason_phrase or 'error'}; body {self._preview(body)}"
        cls = classify(status, code, said, model_named=model_named)
        if cls is not error_for_status(status):
            message += " (a provider's transient failure, whatever the status says)"
        return cls(
            f"OpenRouter answered {status} ({cls.__name__}): {message}",
            status_code=status,
            retry_after=parse_retry_after(response.headers, self._clock.time()),
            code=code,
            metadata=metadata,
        )

    def _json(self, status: int, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise InvalidResponseError(
                f"OpenRouter answered {status} with a body that is not JSON: {self._preview(body)}",
                status_code=status,
            ) from self._redacted(exc)
        except RecursionError:
            raise InvalidResponseError(
                f"OpenRouter answered {status} with JSON nested deeper than it can be read",
                status_code=status,
            ) from None
        if not isinstance(data, dict):
            raise InvalidResponseError(
                f"OpenRouter answered {status} with JSON that is not an object: "
                f"{self._preview(body)}",
                status_code=status,
            )
        return data

    def _answer(self, data: dict[str, Any], model: str, *, fallbacks: bool) -> Answer:
        error = data.get("error")
        failure: InferenceError | None = None
        if error is not None:
            detail = error if isinstance(error, dict) else {"message": error}
            metadata = self._scrub(detail.get("metadata"))
            note = _metadata_note(metadata) if isinstance(metadata, dict) else ""
            failure = ErrorInResponseError(
                "OpenRouter answered 200 but the body carries an error: "
                f"{self._clean(detail.get('message', detail))}{note}",
                status_code=200,
                code=detail.get("code"),
                metadata=metadata if isinstance(metadata, dict) else None,
            )
        else:
            choices = data.get("choices")
            if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
                failure = EmptyResponseError(
                    "OpenRouter answered 200 with no choices", status_code=200
                )
            elif not isinstance(choices[0].get("message"), dict):
                failure = EmptyResponseError(
                    "OpenRouter answered 200 with a choice that carries no message",
                    status_code=200,
                )
        if failure is not None:
            # A failed 200 that reports usage was charged for it: the call counts it.
            if isinstance(data.get("usage"), dict) and data["usage"]:
                with contextlib.suppress(InvalidResponseError):
                    failure.answer = self._priced(data, {}, {}, model, fallbacks=fallbacks)
            raise failure
        choice = data["choices"][0]
        return self._priced(data, choice, choice["message"], model, fallbacks=fallbacks)

    def _priced(
        self,
        data: dict[str, Any],
        choice: dict[str, Any],
        message: dict[str, Any],
        model: str,
        *,
        fallbacks: bool,
    ) -> Answer:
        """The answer a 200 body gives: its text, tokens and costs as ``usage`` reports them."""
        usage = data.get("usage") or {}
        try:
            input_tokens = _token_count(usage, "prompt_tokens")
            output_tokens = _token_count(usage, "completion_tokens")
            cached = _token_count(usage, "prompt_tokens_details", "cached_tokens")
            written = _token_count(usage, "prompt_tokens_details", "cache_write_tokens")
            # Every text field is cleaned of the key, as errors are: an upstream that echoes
            # the request could put it in any of them, and an answer is cached, logged and
            # shown. The text too: the model never sees the key, so only an echo carries it.
            answered = self._clean(data.get("model") or model)
            # Priced by the model that answered. Without fallbacks that is the model asked
            # for, perhaps under a dated name (OpenRouter's canonical slug) with no price
            # of its own; with fallbacks an unpriced one has no cost rather than a wrong one.
            priced = answered if fallbacks or self.prices.has(answered) else model
            charge = self.prices.charge(
                priced, input_tokens, output_tokens,
                cached_tokens=cached, cache_write_tokens=written,
            )  # fmt: skip
            return Answer(
                text=self._clean(message.get("content") or ""),
                model=answered,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_usd=None if charge is None else charge.cost,
                upstream_cost_usd=_reported_cost(usage.get("cost")),
                generation_id=self._optional_text(data.get("id")),
                provider=self._optional_text(data.get("provider")),
                finish_reason=self._optional_text(choice.get("finish_reason")),
                cached_input_tokens=cached,
                cache_write_tokens=written,
                reasoning_tokens=_token_count(
                    usage, "completion_tokens_details", "reasoning_tokens"
                ),
                cache_discount_usd=None if charge is None else charge.cache_discount,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidResponseError(
                f"OpenRouter answered 200 with a malformed completion: {self._clean(exc)}",
                status_code=200,
            ) from self._redacted(exc)


__all__ = ["ClientSlots", "InferenceError", "OpenRouterClient", "parse_retry_after"]
