"""The OpenRouter HTTP client: one request, one parsed answer or one InferenceError.

httpx errors are translated here and nowhere else; callers only see our error tree.
"""

from __future__ import annotations

import email.utils
import json
import math
import queue
import re
import ssl
import threading
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

# httpx imports httpcore lazily, when the first client is built. Our first client is built
# on the start-up health probe's thread while the app's thread may still be importing: a
# cross-thread import that hung or broke gunicorn workers. Imported here, once, up front.
import httpcore  # noqa: F401
import httpx

from ..clock import SYSTEM_CLOCK, Clock
from ..config import OpenRouterSettings
from ..models.inference_call import USD_QUANTUM
from .errors import (
    EmptyResponseError,
    ErrorInResponseError,
    InferenceError,
    InvalidResponseError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
    error_for_status,
)
from .pricing import PriceTable
from .types import Answer, GenerationParams

_SHOWN_BYTES = 200


# A Retry-After longer than this is taken as this: a day is longer than any real
# OpenRouter back-off, and a garbled header (or a proxy's) must not pause every call for
# years, nor put an infinity into a JSON answer.
MAX_RETRY_AFTER_SECONDS = 86_400.0
_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def _delta(text: str, scale: float = 1.0) -> float | None:
    # RFC 9110 delta-seconds (fractions accepted, as OpenRouter's own may be); anything
    # else, such as "inf", "-5" or "1e3", is not a number of seconds.
    text = text.strip()
    if not _DELTA_SECONDS.fullmatch(text):
        return None
    return min(float(text) * scale, MAX_RETRY_AFTER_SECONDS)


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date);
    None when absent or unreadable, at most MAX_RETRY_AFTER_SECONDS."""
    millis = headers.get("retry-after-ms")
    if millis:
        seconds = _delta(millis, 0.001)
        if seconds is not None:
            return seconds
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _delta(value)
    if seconds is not None:
        return seconds
    when = retry_at(headers)
    return None if when is None else min(max(0.0, when - now), MAX_RETRY_AFTER_SECONDS)


def retry_at(headers: Mapping[str, str]) -> float | None:
    """The instant (epoch seconds) of an HTTP-date ``Retry-After``; None for other forms."""
    value = headers.get("retry-after")
    if not value or value.strip().replace(".", "", 1).isdigit():
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


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


_MAX_TOKENS_REPORTED = 2**31 - 1  # the call log's token columns are 32-bit


def _token_count(usage: Mapping[str, Any], name: str) -> int:
    # Token counts drive the rate limiter's budget and the cost: a negative, fractional or
    # absurd one is a malformed answer, not a number to trust (a negative count would hand
    # budget back to the limiter).
    value = usage.get(name)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"usage.{name} is {value!r}, not a whole number of tokens")
    if not 0 <= value <= _MAX_TOKENS_REPORTED:
        raise ValueError(f"usage.{name} is {value}, outside 0..{_MAX_TOKENS_REPORTED}")
    return value


def _text(value: str) -> str:
    # JSON may carry lone surrogates (half an emoji, escaped); they cannot be encoded to
    # UTF-8, so the journal, the databases and most callers would fail on them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _optional_text(value: Any) -> str | None:
    # A field OpenRouter sends as a string; any other type is not kept.
    return _text(value) if isinstance(value, str) else None


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


class OpenRouterClient:
    """Chat completions and account checks against OpenRouter over one pooled connection set."""

    def __init__(
        self,
        settings: OpenRouterSettings,
        *,
        api_key: str | None,
        http: httpx.Client | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._settings = settings
        self._prices = PriceTable(settings.pricing)
        self._key = api_key or ""
        self._clock = clock
        self._headers = {
            "Authorization": f"Bearer {self._key}",
            "HTTP-Referer": settings.site_url,
            "X-Title": settings.app_name,
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self.timeout = httpx.Timeout(
            settings.timeout_seconds,
            connect=settings.connect_timeout_seconds,
            pool=settings.timeout_seconds,
        )
        # An injected client is used as it is. Otherwise: a set of single-connection
        # clients, one checked out per request. httpcore's shared pool does work in
        # proportion to the requests waiting times the connections open on every request:
        # with 64 threads it cost 3.3 ms of CPU a call and capped throughput near 300 calls/s
        # on this machine, against 0.9 ms and 1,000 calls/s this way (BENCHMARKS.md).
        self._http = http
        self._idle: queue.LifoQueue[httpx.Client] = queue.LifoQueue()
        self._all: list[httpx.Client] = []
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._lock = threading.Lock()
        self._closed = False
        # One TLS context for every connection: building one loads the CA bundle, about
        # 18 ms of CPU, which a new client per connection would pay on the call path.
        self._tls: ssl.SSLContext | None = None
        base = settings.base_url
        self._chat_url = _parsed(f"{base}/chat/completions")
        self._key_url = _parsed(f"{base}/key")
        self._models_url = _parsed(f"{base}/models")

    def close(self) -> None:
        """Close every connection this client opened; later requests fail at once."""
        with self._lock:
            self._closed = True
            clients, self._all = self._all, []
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break
        for client in clients:
            client.close()

    def _closed_error(self, *, in_flight: bool = False) -> UpstreamError:
        # Not retryable: the service closes its client when it shuts down.
        what = (
            "was closed while the request was in flight"
            if in_flight
            else "is closed; no request was sent"
        )
        return UpstreamError(
            f"the OpenRouter client {what} (the service has shut down)", retryable=False
        )

    def _checkout(self, timeout: float) -> httpx.Client:
        if not self._slots.acquire(timeout=timeout):
            raise UpstreamTimeoutError(
                f"no free connection to OpenRouter within {timeout:g} s "
                f"(openrouter.max_connections={self._settings.max_connections})"
            )
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            return self._connect()
        except UpstreamError:
            self._slots.release()
            raise

    def _connect(self) -> httpx.Client:
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            client = httpx.Client(
                headers=self._headers,
                timeout=self.timeout,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                verify=self._tls,
            )
            self._all.append(client)
        return client

    def _checkin(self, client: httpx.Client) -> None:
        # No lock: close() closes every client it ever made, so one put back here after a
        # close is already closed, and a later checkout of it fails as a closed client.
        if self._closed:
            client.close()
        else:
            self._idle.put(client)
        self._slots.release()

    # ------------------------------------------------------------------ requests

    def complete(
        self, *, model: str, messages: list[dict[str, str]], params: GenerationParams
    ) -> Answer:
        """One chat completion, priced; raises an UpstreamError subclass on any failure."""
        body: dict[str, Any] = {"model": model, "messages": messages, **params.as_body()}
        response = self._send("POST", self._chat_url, content=json.dumps(body).encode())
        return self._answer(self._json(response), model)

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
        wait = self.timeout if timeout is None else httpx.Timeout(timeout)
        http = self._http
        # A short per-call timeout (the health probe's) bounds the wait for a free connection
        # too: a status request must not queue behind slow calls.
        pool_wait = self._settings.timeout_seconds if timeout is None else timeout
        client = http if http is not None else self._checkout(pool_wait)
        try:
            # Not streamed: the body is read before the connection goes back for reuse.
            # Our own clients carry the headers already; an injected one gets them per request.
            response = client.request(method, url, content=content, timeout=wait,
                                      headers=None if http is None else self._headers)  # fmt: skip
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(
                f"OpenRouter did not answer in time ({type(exc).__name__} after "
                f"{_limit(wait, exc)} on {method} {url})"
            ) from None
        except httpx.TransportError as exc:
            if self._closed:
                raise self._closed_error(in_flight=True) from None
            raise UpstreamConnectionError(
                f"could not talk to OpenRouter at {url}: {type(exc).__name__}: {self._clean(exc)}"
            ) from None
        except httpx.DecodingError as exc:
            raise InvalidResponseError(
                f"OpenRouter's answer to {method} {url} could not be decoded: {self._clean(exc)}"
            ) from None
        except RuntimeError:
            # httpx's "the client has been closed": close() won the race with a checkout.
            if self._closed:
                raise self._closed_error() from None
            raise
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # Not the network's fault (e.g. a malformed openrouter.base_url): retrying won't help.
            raise UpstreamError(
                f"could not send {method} {url}: {type(exc).__name__}: {self._clean(exc)}",
                retryable=False,
            ) from None
        finally:
            if http is None:
                self._checkin(client)
        if response.status_code >= 400:
            raise self._http_error(response)
        return response

    def _clean(self, value: object) -> str:
        text = _text(str(value))
        return text.replace(self._key, "[REDACTED]") if self._key else text

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
        headers = response.headers
        failure = cls(
            f"OpenRouter answered {status} ({cls.__name__}): {message}",
            status_code=status,
            retry_after=parse_retry_after(headers, self._clock.time()),
            code=code,
            metadata=metadata,
        )
        ms_wait = _delta(headers.get("retry-after-ms") or "", 0.001)
        if "retry-after" in headers and ms_wait is None:
            # The instant of an HTTP-date Retry-After, unless a readable retry-after-ms
            # (which parse_retry_after prefers) gave the wait: the two must not disagree.
            failure.retry_at = retry_at(headers)
        return failure

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            raise InvalidResponseError(
                f"OpenRouter answered {response.status_code} with a body that is not JSON: "
                f"{self._preview(response.content)}",
                status_code=response.status_code,
            ) from None
        if not isinstance(data, dict):
            raise InvalidResponseError(
                f"OpenRouter answered {response.status_code} with JSON that is not an object: "
                f"{self._preview(response.content)}",
                status_code=response.status_code,
            )
        return data

    def _answer(self, data: dict[str, Any], model: str) -> Answer:
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
            return Answer(
                text=_text(str(message.get("content") or "")),
                model=_text(str(data.get("model") or model)),
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_usd=self._prices.cost(model, input_tokens, output_tokens),
                upstream_cost_usd=_reported_cost(usage.get("cost")),
                generation_id=_optional_text(data.get("id")),
                provider=_optional_text(data.get("provider")),
                finish_reason=_optional_text(choice.get("finish_reason")),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidResponseError(
                f"OpenRouter answered 200 with a malformed completion: {exc}", status_code=200
            ) from None


__all__ = ["InferenceError", "OpenRouterClient", "parse_retry_after", "retry_at"]
