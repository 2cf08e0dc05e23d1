"""Pytest plugin: clients built against the emulator, an emulator of one's own, a closed port.

The shared ``emulator`` fixture itself (one server for the session, reset per test) lives in
tests/conftest.py; these build on it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from headspace_inference.clock import Clock
from headspace_inference.inference.client import OpenRouterClient
from headspace_inference.settings import OpenRouterSettings
from headspace_inference.testing.emulator import EmulatorServer

TEST_KEY = "sk-or-v1-test-key-0123456789"
ClientFactory = Callable[..., OpenRouterClient]


def settings_for(base_url: str, **extra: Any) -> OpenRouterSettings:
    """OpenRouter settings pointing at ``base_url``, with ``extra`` fields set."""
    return OpenRouterSettings(base_url=base_url, **extra)


@pytest.fixture
def own_emulator() -> Iterator[Callable[..., EmulatorServer]]:
    """A factory for emulators of this test's own (other options); all stopped afterwards."""
    started: list[EmulatorServer] = []

    def make(**options: Any) -> EmulatorServer:
        server = EmulatorServer(**options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def make_client(emulator: EmulatorServer) -> Iterator[ClientFactory]:
    """A factory for OpenRouterClients (default: the shared emulator, TEST_KEY); all closed."""
    made: list[OpenRouterClient] = []

    def make(
        *,
        base_url: str | None = None,
        key: str | None = TEST_KEY,
        clock: Clock | None = None,
        **settings: Any,
    ) -> OpenRouterClient:
        options: dict[str, Any] = {} if clock is None else {"clock": clock}
        client = OpenRouterClient(
            settings_for(base_url or emulator.base_url, **settings), api_key=key, **options
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def answer_body(**fields: Any) -> str:
    """A whole 200 answer body, as OpenRouter shapes it, with ``fields`` replaced: for a
    Fault(status=200, body=...) that sends exactly this."""
    body: dict[str, Any] = {
        "id": "gen-1",
        "provider": "Anthropic",
        "model": "anthropic/claude-haiku-4.5",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    body.update(fields)
    return json.dumps(body)
