"""The pytest plugin, as a host enables it: run in a separate pytest session with pytester."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

HOST_CONFTEST = """
pytest_plugins = ["headspace_inference.testing.pytest_plugin"]
"""

HOST_TESTS = """
import httpx
from flask import Flask

from headspace_inference import Inference
from headspace_inference.testing import create_tables
from headspace_inference.testing.emulator import Fault
from sqlalchemy import create_engine

SEEN = []


def test_the_emulator_answers(openrouter_emulator):
    reply = httpx.post(
        f"{openrouter_emulator.base_url}/chat/completions",
        headers={"Authorization": "Bearer sk-or-v1-any"},
        json={"model": "anthropic/claude-haiku-4.5",
              "messages": [{"role": "user", "content": "hello there"}]},
    )
    assert reply.status_code == 200
    assert openrouter_emulator.request_count("/api/v1/chat/completions") == 1
    SEEN.append(openrouter_emulator.base_url)


def test_one_emulator_for_the_session_reset_per_test(openrouter_emulator):
    assert openrouter_emulator.base_url == SEEN[0]
    assert openrouter_emulator.requests == []


def test_a_service_configured_by_the_fixture(openrouter_emulator, inference_config, tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'host.db'}")
    create_tables(engine)
    app = Flask("host", instance_path=str(tmp_path))
    service = Inference().init_app(
        app, engine=engine, overrides=inference_config, config_path=tmp_path / "none.yaml"
    )
    openrouter_emulator.script([Fault(status=503), Fault(content="scripted answer")])
    try:
        result = service.infer(level="turn", purpose="p", input_text="hi")
    finally:
        service.close(timeout=5)
        engine.dispose()
    assert result.text == "scripted answer"
    assert result.attempts == 2
    assert str(tmp_path) in inference_config["inference"]["spool_path"]
"""


def test_a_host_enables_the_plugin_and_uses_its_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(HOST_CONFTEST)
    pytester.makepyfile(test_host=HOST_TESTS)

    outcome = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")

    outcome.assert_outcomes(passed=3)


def test_without_the_plugin_there_is_no_fixture(pytester: pytest.Pytester) -> None:
    # No pytest11 entry point: installing the library gives no host these fixtures.
    pytester.makepyfile(test_host="def test_it(openrouter_emulator):\n    pass\n")

    outcome = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")

    outcome.assert_outcomes(errors=1)
    outcome.stdout.fnmatch_lines(["*fixture 'openrouter_emulator' not found*"])
