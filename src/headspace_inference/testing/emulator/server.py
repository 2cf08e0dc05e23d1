"""A local OpenRouter stand-in: the chat, models, key and generation endpoints, with latency,
scripted faults and seeded chaos, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import socket
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ...settings import PriceSettings, default_pricing

log = logging.getLogger(__name__)

API = "/api/v1"
CONTROL = "/_emulator"

# USD per million tokens (input, output): the models and prices that openrouter.pricing
# has by default, so a default configuration's estimate matches what the emulator reports.
PRICES: dict[str, tuple[float, float]] = {
    model: (price.input_per_million, price.output_per_million)
    for model, price in default_pricing().items()
}
# Every model the emulator lists at /models, with its full price (cache reads and writes
# too): the defaults, and one non-Anthropic model to fall back to.
CATALOGUE: dict[str, PriceSettings] = {
    **default_pricing(),
    "openai/gpt-4o-mini": PriceSettings(
        input_per_million=0.15, output_per_million=0.6, cache_read_per_million=0.075
    ),
}
# OpenRouter's canonical slugs (dated names) of the listed models.
CANONICAL = {
    "anthropic/claude-haiku-4.5": "anthropic/claude-4.5-haiku-20251001",
    "anthropic/claude-sonnet-4.5": "anthropic/claude-4.5-sonnet-20250929",
    "openai/gpt-4o-mini": "openai/gpt-4o-mini-2024-07-18",
}
# What the emulator charges for a model it does not list.
_UNKNOWN_PRICE = PriceSettings(input_per_million=1.0, output_per_million=5.0)

# The outcomes chaos draws from, and their default weights.
DEFAULT_CHAOS_MIX: dict[str, float] = {
    "ok": 0.55,
    "429": 0.08,
    "500": 0.06,
    "502": 0.06,
    "503": 0.06,
    "timeout": 0.05,
    "drop": 0.07,
    "error_in_200": 0.07,
}


@dataclass(frozen=True)
class Fault:
    """One scripted answer to a chat request, in place of a normal completion."""

    status: int = 200
    retry_after: float | str | None = None  # seconds, or an HTTP date
    retry_after_ms: int | None = None  # sent as OpenRouter's retry-after-ms header
    delay_ms: int = 0
    drop: bool = False  # close the connection without answering
    error_in_200: bool = False  # 200 with an error object in the body
    no_choices: bool = False  # 200 with an empty choices list
    body: str | None = None  # a raw body (e.g. not JSON)
    raw: str | None = None  # the whole answer as sent, status line and all, then a close
    metadata: dict[str, Any] | None = None  # the error's metadata (e.g. moderation reasons)
    message: str | None = None
    content: str | None = None  # the answer's text exactly (e.g. invalid JSON for a schema)
    reasoning_tokens: int = 0  # reasoning tokens the answer reports (counted as output)
    served_model: str | None = None  # the model the answer says answered, whatever did
    code: int | None = None  # the error body's inner code, when it is not the HTTP status
    # The whole answer, status line first, sent one byte every trickle_ms (a slow upstream
    # that never lets a read time out).
    trickle_ms: int = 0
    # The answer's text (or, off the chat endpoint, a "padding" field) is this many bytes,
    # streamed in chunks and never held whole.
    huge_bytes: int = 0
    gzip: bool = False  # the body gzip-compressed as it is sent (with huge_bytes: a bomb)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """A fault from its JSON form; ValueError names any unknown field."""
        if not isinstance(data, dict):
            raise ValueError(f"a fault is a JSON object, got {data!r}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        return cls(**data)


# OpenRouter's transient provider failures that arrive with a final-looking status (see
# docs: users' reports against its SDKs): a retry of the same request succeeds.
_PROVIDER = {"provider_name": "Anthropic", "raw": ""}
PROVIDER_ERRORS: dict[str, Fault] = {
    **{
        f"provider-400-{code}": Fault(
            status=400, code=code, message="Provider returned error", metadata=_PROVIDER
        )
        for code in (502, 503, 524, 529)
    },
    "provider-404": Fault(status=404, message="Provider returned error", metadata=_PROVIDER),
    "no-models-provided": Fault(status=400, message="No models provided"),
}
# Faults by name, for the command line (``--fault NAME`` or ``--fault NAME*3``).
NAMED_FAULTS: dict[str, Fault] = {
    **PROVIDER_ERRORS,
    "trickle": Fault(trickle_ms=1000),
    "huge": Fault(huge_bytes=50 * 2**20),
    "gzip-bomb": Fault(huge_bytes=300 * 2**20, gzip=True),
}


_NAMED_OUTCOMES = frozenset({"ok", "timeout", "drop", "error_in_200", "no_choices"})


def check_chaos_mix(mix: dict[str, float]) -> dict[str, float]:
    """``mix`` if every outcome is known (a name or an HTTP status) and weights are sane."""
    if not mix:
        raise ValueError("the chaos mix is empty")
    for outcome, weight in mix.items():
        if outcome not in _NAMED_OUTCOMES and not (outcome.isdigit() and 100 <= int(outcome) < 600):
            raise ValueError(
                f"unknown chaos outcome {outcome!r}: use an HTTP status or one of "
                f"{', '.join(sorted(_NAMED_OUTCOMES))}"
            )
        if not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"chaos weight for {outcome!r} must be a number >= 0")
    if sum(mix.values()) <= 0:
        raise ValueError("the chaos weights add up to zero")
    return dict(mix)


@dataclass
class Charged:
    """What the emulator's completions charged, summed as their ``usage`` said: answers,
    tokens and cost (USD, each answer's ``usage.cost`` to twelve decimals)."""

    answers: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)


@dataclass(frozen=True)
class ReceivedRequest:
    """What the emulator saw of one request."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float = field(default_factory=time.time)


def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: about four characters a token."""
    return max(1, (len(text) + 3) // 4)


def content_text(content: Any) -> str:
    """A message's text: its string, or its text blocks joined (the content-blocks form)."""
    if isinstance(content, list):
        return " ".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return str(content if content is not None else "")


def example_of(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A small deterministic JSON value valid for ``schema`` (the usual keywords: $ref to
    $defs, const, enum, anyOf/oneOf/allOf, type with properties, items and bounds)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 20:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return example_of(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return example_of(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: example_of(sub, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        item = example_of(schema.get("items") or {}, root, depth + 1)
        return [item] * max(1, int(schema.get("minItems") or 0))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        high = schema.get("maximum", schema.get("exclusiveMaximum", low + 2) - 1)
        value = max(low, min(high, 42))
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = "example"
    return text.ljust(int(schema.get("minLength") or 0), "x")[: schema.get("maxLength") or None]


def _price(model: str) -> PriceSettings:
    return CATALOGUE.get(model, _UNKNOWN_PRICE)


def answer_text(model: str, prompt: str) -> str:
    """A deterministic answer derived from the prompt."""
    words = prompt.split()
    head = " ".join(words[:12])
    return f"Summary by {model.split('/')[-1]}: {head}{' ...' if len(words) > 12 else ''}"


_ERROR_MESSAGES = {
    400: "Invalid request",
    401: "User not found.",
    402: "Insufficient credits. Add more using https://openrouter.ai/credits",
    403: "Your input was flagged by moderation",
    404: "No endpoints found for this model",
    408: "Request timed out",
    429: "Rate limit exceeded",
    500: "Internal Server Error",
    502: "Provider returned error",
    503: "No available providers",
}


_HOLD_SECONDS = 60.0  # the longest hold() keeps a request, should a test never release it


class _State:
    def __init__(self, latency_ms: int, accept_keys: set[str] | None, key_endpoint: bool) -> None:
        self.lock = threading.Lock()
        self.key_endpoint = key_endpoint
        self.latency_ms = latency_ms
        self.accept_keys = accept_keys
        self.faults: deque[Fault] = deque()
        # Scripted answers to GET /key and GET /models, by path.
        self.path_faults: dict[str, deque[Fault]] = {}
        self.requests: deque[ReceivedRequest] = deque(maxlen=200_000)
        self.generations: dict[str, dict[str, Any]] = {}
        self.chaos: random.Random | None = None
        self.chaos_mix: dict[str, float] = dict(DEFAULT_CHAOS_MIX)
        self.chaos_hang_ms = 3000
        self.held: dict[str, threading.Event] = {}
        # Models that fail every request (downtime): OpenRouter falls back past them.
        self.down: set[str] = set()
        # Prompt prefixes marked with cache_control that a request has written (warm).
        self.prompt_cache: set[str] = set()
        # The body GET /models answers with instead of the catalogue (None: the catalogue).
        self.models_body: str | None = None
        self.charged = Charged()
        # The key's credit limit (None: unlimited) and its use before the answers charged.
        self.key_limit: float | None = None
        self.key_usage = 0.0

    def key_data(self) -> dict[str, Any]:
        """GET /key's ``data``: its usage is what it had used plus what the answers
        charged; what is left of a limit never goes below zero."""
        with self.lock:
            usage = self.key_usage + float(self.charged.cost)
            limit = self.key_limit
        return {
            "label": "sk-or-…emulator",
            "limit": limit,
            "limit_remaining": None if limit is None else max(limit - usage, 0.0),
            "usage": usage,
            "is_free_tier": False,
        }

    def next_path_fault(self, path: str) -> Fault | None:
        with self.lock:
            queue = self.path_faults.get(path)
            return queue.popleft() if queue else None

    def next_fault(self) -> Fault | None:
        with self.lock:
            if self.faults:
                return self.faults.popleft()
            if self.chaos is None:
                return None
            outcomes = list(self.chaos_mix)
            pick = self.chaos.choices(outcomes, weights=[self.chaos_mix[o] for o in outcomes])[0]
        if pick == "ok":
            return None
        if pick == "timeout":
            return Fault(delay_ms=self.chaos_hang_ms)
        if pick == "drop":
            return Fault(drop=True)
        if pick == "error_in_200":
            return Fault(error_in_200=True)
        if pick == "no_choices":
            return Fault(no_choices=True)
        status = int(pick)
        return Fault(status=status, retry_after=0 if status == 429 else None)

    def set_chaos(self, seed: int | None, mix: dict[str, float], hang_ms: int) -> None:
        """Switch seeded chaos on (or off for None); the caller holds the lock."""
        self.chaos = None if seed is None else random.Random(seed)  # noqa: S311 - reproducible chaos, not secrets
        self.chaos_mix = mix
        self.chaos_hang_ms = hang_ms

    def reset(self) -> None:
        """Forget requests, faults, chaos and latency; let held requests go."""
        with self.lock:
            for gate in self.held.values():
                gate.set()
            self.held.clear()
            self.faults.clear()
            self.path_faults.clear()
            self.requests.clear()
            self.chaos = None
            self.latency_ms = 0
            self.down.clear()
            self.prompt_cache.clear()
            self.models_body = None
            self.charged = Charged()
            self.key_limit = None
            self.key_usage = 0.0

    def key_ok(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        key = authorization[len("Bearer ") :]
        if self.accept_keys is None:
            return key.startswith("sk-or-")
        return key in self.accept_keys


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold every answer back by about 40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests and benchmarks
        pass

    # -------------------------------------------------------------- plumbing

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _send(
        self,
        status: int,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        fault: Fault | None = None,
    ) -> None:
        if fault is not None and (fault.trickle_ms or fault.huge_bytes or fault.gzip):
            self._send_shaped(status, payload, fault, headers or {})
            return
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_shaped(
        self, status: int, payload: dict[str, Any], fault: Fault, headers: dict[str, str]
    ) -> None:
        """``payload`` as ``fault`` shapes it: padded to a huge size, gzipped, trickled; a
        huge or gzipped body goes out in chunks as it is made, never held whole."""
        pieces = _json_pieces(payload, fault.huge_bytes)
        if fault.gzip:
            pieces = _gzipped(pieces)
            headers = {**headers, "Content-Encoding": "gzip"}
        if fault.trickle_ms:
            body = b"".join(pieces)
            reason = self.responses.get(status, ("Error",))[0]
            lines = [
                f"HTTP/1.1 {status} {reason}",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                *(f"{k}: {v}" for k, v in headers.items()),
            ]
            data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
            # Until the client hangs up (the write then fails and the thread ends).
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                time.sleep(fault.trickle_ms / 1000)
            return
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        for piece in pieces:
            if piece:
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def _error(self, status: int, message: str | None = None, **extra: Any) -> None:
        fault: Fault | None = extra.get("fault")
        error: dict[str, Any] = {
            "code": status if fault is None or fault.code is None else fault.code,
            "message": message or _ERROR_MESSAGES.get(status, "Error"),
        }
        if extra.get("metadata"):
            error["metadata"] = extra["metadata"]
        self._send(status, {"error": error}, headers=extra.get("headers"), fault=fault)

    def _record(self, body: Any) -> None:
        state = self.server.state
        path = urlsplit(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        state.requests.append(ReceivedRequest(self.command, path, headers, body))
        with state.lock:
            gate = state.held.get(path)
        if gate is not None:  # recorded first: a test sees the request arrive, then release it
            gate.wait(_HOLD_SECONDS)

    # -------------------------------------------------------------- routes

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path.startswith(CONTROL):
            self._control_get(parts.path, parts.query)
            return
        self._record(None)
        state = self.server.state
        fault = state.next_path_fault(parts.path)
        if fault is not None:
            time.sleep(fault.delay_ms / 1000)
            if self._fault(fault):
                return
        if parts.path == f"{API}/models":
            with state.lock:
                body = state.models_body
            if body is None:
                catalogue = {"data": [_model_entry(m) for m in CATALOGUE]}
                self._send(200, catalogue, fault=fault)
            else:
                self._send(200, body.encode())
        elif parts.path == f"{API}/key" and state.key_endpoint:
            if not state.key_ok(self.headers.get("Authorization")):
                self._error(401, "No auth credentials found")
                return
            self._send(200, {"data": state.key_data()}, fault=fault)
        elif parts.path == f"{API}/generation":
            if not state.key_ok(self.headers.get("Authorization")):
                self._error(401)
                return
            gen_id = (parse_qs(parts.query).get("id") or [""])[0]
            with state.lock:
                found = state.generations.get(gen_id)
            if found is None:
                self._error(404, f"Generation {gen_id} not found")
            else:
                self._send(200, {"data": found})
        else:
            self._error(404, f"No route for GET {parts.path}")

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        body = self._read_body()
        if parts.path.startswith(CONTROL):
            self._control_post(parts.path, body)
            return
        self._record(body)
        if parts.path != f"{API}/chat/completions":
            self._error(404, f"No route for POST {parts.path}")
            return
        self._chat(body)

    def _chat(self, body: Any) -> None:
        state = self.server.state
        if not state.key_ok(self.headers.get("Authorization")):
            self._error(401)
            return
        fault = state.next_fault()
        delay = state.latency_ms + (fault.delay_ms if fault else 0)
        if delay:
            time.sleep(delay / 1000)
        if fault is not None and self._fault(fault):
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._error(400, 'Input required: specify "messages"')
            return
        route = body.get("models") or [body.get("model")]
        if not isinstance(route, list):
            self._error(400, "models must be a list of model IDs")
            return
        for candidate in route:
            if not isinstance(candidate, str) or "/" not in candidate:
                self._error(400, f"{candidate!r} is not a valid model ID")
                return
        with state.lock:
            # OpenRouter's fallbacks: the first model of the list that is up answers.
            model = next((m for m in route if m not in state.down), None)
        if model is None:
            self._error(502, f"{route[-1]} is down (emulated), and no fallback is left")
            return
        messages = body["messages"]
        prompt = " ".join(content_text(m.get("content")) for m in messages if isinstance(m, dict))
        prompt_tokens = count_tokens(prompt) + 3 * len(messages)
        cached, written = self._prompt_cache(model, messages)
        last = content_text(messages[-1].get("content")) if messages else ""
        schema = _schema_of(body.get("response_format"))
        if fault is not None and fault.huge_bytes:
            text = _HUGE_MARK  # replaced by the huge text as it is sent
        elif fault is not None and fault.content is not None:
            text = fault.content
        elif schema is not None:
            text = json.dumps(example_of(schema))
        else:
            text = answer_text(model, last)
        reasoning = fault.reasoning_tokens if fault is not None else 0
        completion_tokens = count_tokens(text) + reasoning
        if fault is not None and fault.huge_bytes:
            completion_tokens = fault.huge_bytes // 4 + reasoning
        finish = "stop"
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and 0 < max_tokens < completion_tokens:
            text = text[: max_tokens * 4]
            completion_tokens = max_tokens
            finish = "length"
        price = _price(model)
        read = price.cache_read_per_million
        write = price.cache_write_per_million
        p_in = price.input_per_million
        cost = (
            (prompt_tokens - cached - written) * p_in
            + cached * (p_in if read is None else read)
            + written * (p_in if write is None else write)
            + completion_tokens * price.output_per_million
        ) / 1_000_000
        preferences = body.get("provider")
        provider = "Anthropic" if model.startswith("anthropic/") else model.split("/")[0].title()
        if isinstance(preferences, dict):
            named = preferences.get("order") or preferences.get("only")
            if isinstance(named, list) and named:
                provider = str(named[0])  # the provider asked for first answers
        gen_id = f"gen-{int(time.time())}-{uuid.uuid4().hex[:20]}"
        payload = {
            "id": gen_id,
            "provider": provider,
            "model": model if fault is None or fault.served_model is None else fault.served_model,
            "object": "chat.completion",
            "created": int(time.time()),
            "choices": [] if fault is not None and fault.no_choices else [
                {
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": finish,
                    "native_finish_reason": finish,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "cost": round(cost, 12),
                "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
                "completion_tokens_details": {"reasoning_tokens": reasoning},
            },
        }  # fmt: skip
        with state.lock:
            state.charged.answers += 1
            state.charged.prompt_tokens += prompt_tokens
            state.charged.completion_tokens += completion_tokens
            state.charged.cost += Decimal(str(round(cost, 12)))
            if len(state.generations) > 50_000:
                state.generations.clear()
            state.generations[gen_id] = {
                "id": gen_id, "model": model, "total_cost": round(cost, 12),
                "tokens_prompt": prompt_tokens, "tokens_completion": completion_tokens,
                "native_tokens_cached": cached, "native_tokens_reasoning": reasoning,
                "provider_name": provider, "finish_reason": finish,
            }  # fmt: skip
        self._send(200, payload, fault=fault)

    def _prompt_cache(self, model: str, messages: list[Any]) -> tuple[int, int]:
        """(cached, cache-write) tokens: a prefix up to a block marked ``cache_control`` is
        written on first sight and read afterwards, per model (as Anthropic's cache is)."""
        prefix: list[str] = []
        marked = ""
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            blocks = content if isinstance(content, list) else [{"text": content}]
            for block in blocks:
                if not isinstance(block, dict):
                    continue
                prefix.append(str(block.get("text", "")))
                if block.get("cache_control"):
                    marked = " ".join(prefix)
        if not marked:
            return 0, 0
        tokens = count_tokens(marked)
        key = f"{model}\x00{marked}"
        with self.server.state.lock:
            if key in self.server.state.prompt_cache:
                return tokens, 0
            self.server.state.prompt_cache.add(key)
        return 0, tokens

    def _fault(self, fault: Fault) -> bool:
        """Answer with the fault; False when the fault only delays a normal answer."""
        if fault.drop or fault.raw is not None:
            if fault.raw is not None:  # e.g. a broken proxy's answer that no parser accepts
                self.wfile.write(fault.raw.encode())
                self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return True
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = str(fault.retry_after_ms)
        if fault.body is not None:
            data = fault.body.encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            return True
        if fault.error_in_200:
            error: dict[str, Any] = {"code": 502, "message": fault.message or
                                     "Provider disconnected mid-stream"}  # fmt: skip
            if fault.metadata is not None:
                error["metadata"] = fault.metadata
            self._send(200, {"error": error})
            return True
        if fault.status >= 400:
            self._error(
                fault.status, fault.message, metadata=fault.metadata, headers=headers, fault=fault
            )
            return True
        return False  # a 200 fault: a delay, or no_choices, shapes the normal answer

    # -------------------------------------------------------------- control

    def _control_get(self, path: str, query: str) -> None:
        state = self.server.state
        if path == f"{CONTROL}/requests":
            wanted = parse_qs(query).get("path")
            only = wanted[0] if wanted else None
            with state.lock:
                items = [asdict(r) for r in state.requests if only is None or r.path == only]
            self._send(200, {"count": len(items), "requests": items})
        else:
            self._error(404, f"No control route for GET {path}")

    def _control_post(self, path: str, body: Any) -> None:
        state = self.server.state
        body = body if isinstance(body, dict) else {}
        try:
            # Everything is validated before anything changes, so a bad call changes nothing.
            if path == f"{CONTROL}/faults":
                faults = [Fault.from_dict(f) for f in body.get("faults", [])]
                target = body.get("path")
                if target not in (None, f"{API}/key", f"{API}/models"):
                    raise ValueError(
                        f"faults go to chat, {API}/key or {API}/models, not {target!r}"
                    )
                with state.lock:
                    queue = (
                        state.faults
                        if target is None
                        else state.path_faults.setdefault(target, deque())
                    )
                    queue.extend(faults)
            elif path == f"{CONTROL}/down":
                down = body.get("models", [])
                if not isinstance(down, list) or not all(isinstance(m, str) for m in down):
                    raise ValueError("models must be a list of model IDs")
                with state.lock:
                    state.down = set(down)
            elif path == f"{CONTROL}/models":
                body_text = body.get("body")
                if body_text is not None and not isinstance(body_text, str):
                    raise ValueError("body must be the text of the /models answer, or null")
                with state.lock:
                    state.models_body = body_text
            elif path == f"{CONTROL}/key":
                limit, usage = _key_credit(body.get("limit"), body.get("usage", 0.0))
                with state.lock:
                    state.key_limit, state.key_usage = limit, usage
            elif path == f"{CONTROL}/latency":
                ms = int(body.get("ms", 0))
                with state.lock:
                    state.latency_ms = ms
            elif path == f"{CONTROL}/chaos":
                seed = body.get("seed")
                mix = check_chaos_mix(body.get("mix") or DEFAULT_CHAOS_MIX)
                with state.lock:
                    state.set_chaos(seed, mix, int(body.get("hang_ms", state.chaos_hang_ms)))
            elif path == f"{CONTROL}/reset":
                state.reset()
            else:
                self._error(404, f"No control route for POST {path}")
                return
        except (TypeError, ValueError) as exc:
            self._error(400, f"bad control request: {exc}")
            return
        self._send(200, {"ok": True})


# Where a huge_bytes fault's text goes in the JSON, replaced as it is sent.
_HUGE_MARK = "@@emulator-huge-text@@"
_PIECE = 2**20


def _json_pieces(payload: dict[str, Any], huge: int) -> Iterator[bytes]:
    """``payload`` as JSON in pieces; with ``huge``, its huge text (the answer's, or else a
    top-level "padding") is ``huge`` bytes of "x", made a megabyte at a time."""
    text = json.dumps(payload)
    if not huge:
        yield text.encode()
        return
    if _HUGE_MARK not in text:
        text = text[:-1] + f', "padding": "{_HUGE_MARK}"}}'
    head, tail = text.split(_HUGE_MARK, 1)
    yield head.encode()
    piece = b"x" * min(huge, _PIECE)
    for start in range(0, huge, _PIECE):
        yield piece[: huge - start]
    yield tail.encode()


def _gzipped(pieces: Iterator[bytes]) -> Iterator[bytes]:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # the gzip format
    for piece in pieces:
        out = packer.compress(piece)
        if out:
            yield out
    yield packer.flush()


def _key_credit(limit: Any, usage: Any) -> tuple[float | None, float]:
    """A key's credit limit (None: unlimited) and its use so far, checked: USD, >= 0."""
    for name, value in (("limit", limit), ("usage", usage)):
        if value is None and name == "limit":
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(f"{name} must be a number of USD >= 0, not {value!r}")
    return (None if limit is None else float(limit)), float(usage)


def _schema_of(response_format: Any) -> Any:
    # The schema of a json_schema response_format (OpenRouter's and OpenAI's shape).
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    return spec.get("schema") if isinstance(spec, dict) else None


def _per_token(per_million: float) -> str:
    # OpenRouter's form: USD per token, as a decimal string.
    return f"{per_million / 1e6:.12f}".rstrip("0").rstrip(".") or "0"


def _model_entry(model: str) -> dict[str, Any]:
    """One /models entry in OpenRouter's shape (prices are strings of USD per token)."""
    price = CATALOGUE[model]
    pricing = {
        "prompt": _per_token(price.input_per_million),
        "completion": _per_token(price.output_per_million),
        "request": "0",
        "image": "0",
        "web_search": "0",
        "internal_reasoning": "0",
    }
    if price.cache_read_per_million is not None:
        pricing["input_cache_read"] = _per_token(price.cache_read_per_million)
    if price.cache_write_per_million is not None:
        pricing["input_cache_write"] = _per_token(price.cache_write_per_million)
    return {
        "id": model,
        "canonical_slug": CANONICAL.get(model, model),
        "name": model,
        "created": 1_760_000_000,
        "description": f"{model}, as the emulator serves it",
        "context_length": 200_000,
        "architecture": {
            "modality": "text->text",
            "input_modalities": ["text"],
            "output_modalities": ["text"],
            "tokenizer": "Claude" if model.startswith("anthropic/") else "GPT",
        },
        "top_provider": {
            "context_length": 200_000,
            "max_completion_tokens": 64_000,
            "is_moderated": False,
        },
        "supported_parameters": [
            "max_tokens",
            "temperature",
            "response_format",
            "structured_outputs",
        ],
        "pricing": pricing,
    }


# The name of the emulator's connection threads.
REQUEST_THREAD = "openrouter-emulator-request"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    state: _State

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Open connections, so stop() can cut kept-alive ones too: a stopped emulator must
        # look like an OpenRouter that went away, not one that still answers old sockets.
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.open_connections.add(request)
        # A thread per connection, as ThreadingMixIn's, under a name of the emulator's own:
        # a test counting what the service left running tells these apart (a kept-alive
        # connection's thread ends a moment after the client closes it).
        threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=REQUEST_THREAD,
            daemon=True,
        ).start()

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.open_connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client closing its keep-alive connection (or a test cutting it) is routine.
        log.debug("emulator: connection from %s ended abruptly", client_address)


class EmulatorServer:
    """The emulator on a loopback port, served from a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_ms: int = 0,
        accept_keys: set[str] | None = None,
        key_endpoint: bool = True,
    ) -> None:
        # key_endpoint=False stands in for an OpenRouter-compatible gateway without GET /key.
        self._httpd = _Server((host, port), _Handler)
        self._httpd.state = _State(latency_ms, accept_keys, key_endpoint)
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> _State:
        return self._httpd.state

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The OpenRouter-style base URL, e.g. http://127.0.0.1:PORT/api/v1."""
        host = str(self._httpd.server_address[0])
        return f"http://{host}:{self.port}{API}"

    def start(self) -> EmulatorServer:
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name="openrouter-emulator", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted."""
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop serving, close the listening socket and cut every open connection."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_connections()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received since the last reset, oldest first."""
        with self.state.lock:
            return list(self.state.requests)

    def request_count(self, path: str | None = None) -> int:
        """How many requests arrived (at ``path``, e.g. "/api/v1/chat/completions")."""
        with self.state.lock:
            return sum(1 for r in self.state.requests if path is None or r.path == path)

    def script(self, faults: list[Fault], *, path: str | None = None) -> None:
        """Answer the next chat requests (or, with ``path``, GET /api/v1/key or
        /api/v1/models) with these faults, one each, in order."""
        with self.state.lock:
            if path is None:
                self.state.faults.extend(faults)
            else:
                self.state.path_faults.setdefault(path, deque()).extend(faults)

    def set_down(self, *models: str) -> None:
        """Fail every request to these models (none: all are up); a request with fallbacks
        is answered by the first of its ``models`` that is up."""
        with self.state.lock:
            self.state.down = set(models)

    def set_models_body(self, body: str | None) -> None:
        """Answer GET /models with ``body`` as it is (None: the catalogue again)."""
        with self.state.lock:
            self.state.models_body = body

    def set_key_credit(self, limit: float | None, usage: float = 0.0) -> None:
        """GET /key's credit: the key's ``limit`` in USD (None: unlimited) and what it had
        used besides the answers since the last reset, whose charges /key adds to it."""
        checked = _key_credit(limit, usage)
        with self.state.lock:
            self.state.key_limit, self.state.key_usage = checked

    def set_latency(self, ms: int) -> None:
        """Delay every chat answer by ``ms``."""
        with self.state.lock:
            self.state.latency_ms = ms

    def set_chaos(
        self, seed: int | None, mix: dict[str, float] | None = None, *, hang_ms: int = 3000
    ) -> None:
        """Answer chat requests with a seeded random mix of outcomes (None switches it off)."""
        checked = check_chaos_mix(mix or DEFAULT_CHAOS_MIX)
        with self.state.lock:
            self.state.set_chaos(seed, checked, hang_ms)

    def charged(self) -> Charged:
        """What the answers since the last reset charged, summed (a copy)."""
        with self.state.lock:
            return replace(self.state.charged)

    def hold(self, path: str) -> threading.Event:
        """Hold every request to ``path`` (e.g. "/api/v1/key") once recorded, until the
        returned event is set (or reset(); at most a minute)."""
        gate = threading.Event()
        with self.state.lock:
            self.state.held[path] = gate
        return gate

    def reset(self) -> None:
        """Forget requests, faults, chaos and latency; let held requests go."""
        self.state.reset()
