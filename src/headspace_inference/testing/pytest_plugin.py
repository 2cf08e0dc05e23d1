"""Pytest fixtures for a host's tests: the OpenRouter emulator, and the configuration that
points the service at it.

Enabled by the host, never by itself (no ``pytest11`` entry point)::

    pytest_plugins = ["headspace_inference.testing.pytest_plugin"]

- ``openrouter_emulator``: a running emulator (``headspace_inference.testing.emulator``'s
  ``EmulatorServer``), one for the session, reset before each test: ``base_url``,
  ``script([Fault(status=503), ...])`` for the next answers, ``set_down(model)``,
  ``set_latency(ms)``, and what it received in ``requests`` / ``request_count(path)``.
- ``inference_config``: the ``openrouter`` and ``inference`` sections (the config file's
  shape) that send the service to that emulator with a test key, retry without waiting,
  limit no test's rate, and keep its spool and price file in the test's tmp_path:
  ``init_app(app, overrides=inference_config, ...)``, or merged into the host's own
  configuration.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .emulator import EmulatorServer

__all__ = ["EMULATOR_TEST_KEY", "inference_config", "openrouter_emulator"]

# A key of OpenRouter's form that only the emulator accepts.
EMULATOR_TEST_KEY = "sk-or-v1-emulator-test-key"


@pytest.fixture(scope="session")
def _headspace_inference_emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer().start()
    yield server
    server.stop()


@pytest.fixture
def openrouter_emulator(_headspace_inference_emulator: EmulatorServer) -> EmulatorServer:
    """The local OpenRouter emulator on a loopback port, reset for this test (no scripted
    faults, no latency, nothing received yet)."""
    _headspace_inference_emulator.reset()
    return _headspace_inference_emulator


@pytest.fixture
def inference_config(openrouter_emulator: EmulatorServer, tmp_path: Path) -> dict[str, Any]:
    """The service's sections pointing at ``openrouter_emulator``, with a test key, no
    waiting between retries, rate limits no test reaches, and this test's own spool
    directory and synced-price file (none: only configured prices count)."""
    return {
        "openrouter": {
            "base_url": openrouter_emulator.base_url,
            "api_key": EMULATOR_TEST_KEY,
            "retry": {"base_delay_seconds": 0.0, "max_delay_seconds": 0.0},
            "rate_limits": {"calls_per_minute": 100_000, "tokens_per_minute": 100_000_000},
            "pricing_file": str(tmp_path / "openrouter-pricing.json"),
        },
        "inference": {"spool_path": str(tmp_path / "inference-spool")},
    }
