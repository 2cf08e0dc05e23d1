"""The OpenRouter HTTP client: one request, one parsed answer or one InferenceError.

httpx errors are translated here and nowhere else; callers only see our error tree.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Any

# httpx imports httpcore lazily, when the first client is built. Our first client is built
# on the start-up health probe's thread while the app's thread may still be importing: a
# cross-thread import that hung or broke gunicorn workers. Imported here, once, up front.
import httpcore  # noqa: F401
import httpx

from .._version import __version__
from ..calllog.models import MAX_INTEGER
from ..calllog.models.inference_call import USD_QUANTUM
from ..clock import SYSTEM_CLOCK, Clock
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
    error_for_status,
)
from .pricing import PriceTable
from .structured import AnswerFormatError, AnswerSchema
from .types import Answer, GenerationParams

_SHOWN_BYTES = 200
_USER_AGENT = f"headspace-inference/{__version__} httpx/{httpx.__version__}"


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
        self._lock = threading.Lock()
        self._closed = False
        # One TLS context for every connection: building one loads the CA bundle, a cost
        # that a new context per connection would pay on the call path.
        self._tls: ssl.SSLContext | None = None

    @property
    def is_closed(self) -> bool:
        return self._closed

    def send(self, request: httpx.Request, wait: float | None) -> httpx.Response:
        """``request`` sent and its body read, over a free slot; raises as httpx does."""
        bounded = wait is not None and math.isfinite(wait)
        if not self._free.acquire(timeout=wait if bounded else None):
            raise httpx.PoolTimeout(f"no free connection within {wait:g} s", request=request)
        try:
            client = self._idle.pop() if self._idle else self._open()
        except BaseException:
            self._free.release()
            raise
        try:
            return client.send(request, auth=None, follow_redirects=False)
        finally:
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
        response = self._send("POST", self._chat_url, content=json.dumps(body).encode())
        answer = self._answer(self._json(response), model, fallbacks=bool(fallbacks))
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
        return self._json(self._send("GET", self._key_url, timeout=timeout))

    def list_models(self, *, timeout: float) -> dict[str, Any]:
        """GET /models: the model list (proves OpenRouter answers)."""
        return self._json(self._send("GET", self._models_url, timeout=timeout))

    # ------------------------------------------------------------------ plumbing

    def _send(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        if self._closed:
            raise self._closed_error()
        wait = self.timeout if timeout is None else httpx.Timeout(timeout)
        try:
            # Built here, not by the client: an absolute URL and only our headers, so a
            # host's client (its base_url, headers, params, cookies) cannot redirect or
            # add to the call. The timeout is the documented per-request extension, as
            # httpx's own build_request sets it; auth=None: the Authorization is ours.
            request = httpx.Request(
                method, url, headers=self._headers, content=content,
                extensions={"timeout": self._timeouts if timeout is None else wait.as_dict()},
            )  # fmt: skip
            # Not streamed: the body is read, and the connection back in the pool, on return.
            sender = self._sender
            if isinstance(sender, ClientSlots):
                response = sender.send(request, wait.pool)
            else:
                response = sender.send(request, auth=None, follow_redirects=False)
        except (httpx.HTTPError, httpx.InvalidURL, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not self._refused_as_closed():
                raise  # not a closed client's refusal: a bug, shown as it is
            raise self._translate(exc, method, url, wait) from self._redacted(exc)
        if response.status_code >= 400:
            raise self._http_error(response)
        return response

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

    def _http_error(self, response: httpx.Response) -> UpstreamError:
        status = response.status_code
        cls = error_for_status(status)
        code: int | str | None = status
        metadata: dict[str, Any] = {}
        try:
            payload = response.json()
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            message = self._clean(error.get("message") or response.reason_phrase)
            code = error.get("code", status)
            if isinstance(error.get("metadata"), dict):
                metadata = self._scrub(error["metadata"])
                message += _metadata_note(metadata)
        elif payload is None:
            message = f"the body is not JSON: {self._preview(response.content)}"
        else:
            message = f"{response.reason_phrase or 'error'}; body {self._preview(response.content)}"
        return cls(
            f"OpenRouter answered {status} ({cls.__name__}): {message}",
            status_code=status,
            retry_after=parse_retry_after(response.headers, self._clock.time()),
            code=code,
            metadata=metadata,
        )

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError as exc:
            raise InvalidResponseError(
                f"OpenRouter answered {response.status_code} with a body that is not JSON: "
                f"{self._preview(response.content)}",
                status_code=response.status_code,
            ) from self._redacted(exc)
        except RecursionError:
            raise InvalidResponseError(
                f"OpenRouter answered {response.status_code} with JSON nested deeper than "
                "it can be read",
                status_code=response.status_code,
            ) from None
        if not isinstance(data, dict):
            raise InvalidResponseError(
                f"OpenRouter answered {response.status_code} with JSON that is not an object: "
                f"{self._preview(response.content)}",
                status_code=response.status_code,
            )
        return data

    def _answer(self, data: dict[str, Any], model: str, *, fallbacks: bool) -> Answer:
        error = data.get("error")
        if error is not None:
            detail = error if isinstance(error, dict) else {"message": error}
            metadata = self._scrub(detail.get("metadata"))
            note = _metadata_note(metadata) if isinstance(metadata, dict) else ""
            raise ErrorInResponseError(
                "OpenRouter answered 200 but the body carries an error: "
                f"{self._clean(detail.get('message', detail))}{note}",
                status_code=200,
                code=detail.get("code"),
                metadata=metadata if isinstance(metadata, dict) else None,
            )
        choices = data.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise EmptyResponseError("OpenRouter answered 200 with no choices", status_code=200)
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise EmptyResponseError(
                "OpenRouter answered 200 with a choice that carries no message", status_code=200
            )
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
