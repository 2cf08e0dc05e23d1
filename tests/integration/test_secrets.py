"""A canary API key through every path never shows up in a log, an answer, an error or the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from headspace_inference import create_app
from headspace_inference.inference import InferenceError
from headspace_inference.standalone.cli import main
from headspace_inference.testing.emulator import Fault

CANARY = "sk-or-v1-CANARY-7f3e9c1d5b2a4e6f8091"


def overrides(url: str, emulator: Any, tmp_path: Path, **openrouter: Any) -> dict[str, Any]:
    return {
        "database": {"url": url},
        "openrouter": {
            "base_url": emulator.base_url,
            "api_key": CANARY,
            "retry": {"max_attempts": 2, "base_delay_seconds": 0, "max_delay_seconds": 0},
            "health": {"cache_seconds": 0},
            **openrouter,
        },
        "inference": {"spool_path": str(tmp_path / "spool")},
    }


def test_canary_key_never_leaks(
    sqlite_url: str, emulator: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)
    app = create_app(overrides=overrides(sqlite_url, emulator, tmp_path))
    service = app.extensions["inference"]
    client = app.test_client()
    try:
        seen.append(repr(app.extensions["inference"].settings))
        seen.append(service.infer("turn", "p", "a good call").text)
        for fault in (
            Fault(status=400),
            Fault(status=401),
            Fault(status=402),
            Fault(status=403, metadata={"reasons": ["violence"]}),
            Fault(status=404),
            Fault(status=429, retry_after=0),
            Fault(status=500),
            Fault(error_in_200=True),
            Fault(no_choices=True),
            Fault(body="<html>bad gateway</html>", status=502),
            Fault(drop=True),
        ):
            emulator.script([fault, fault])
            try:
                service.infer("turn", "p", f"fails with {fault}")
            except InferenceError as exc:
                seen += [str(exc), repr(exc), json.dumps(exc.to_dict()), repr(exc.metadata)]
        seen.append(json.dumps(service.health.check(force=True).to_dict()))
        for path in ("/api/inference/status", "/api/inference/usage"):
            seen.append(client.get(path).get_data(as_text=True))
        assert service.recorder.flush(timeout=30)
    finally:
        service.close()
    # The key was sent where it belongs...
    assert any(r.headers.get("authorization") == f"Bearer {CANARY}" for r in emulator.requests)
    # ...and nowhere else.
    for text in seen:
        assert CANARY not in text
    for record in caplog.records:
        assert CANARY not in record.getMessage()
        assert CANARY not in str(record.exc_text or "")
    assert CANARY not in caplog.text


def test_canary_key_never_in_cli_output(
    sqlite_url: str, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(overrides(sqlite_url, emulator, tmp_path))  # JSON is YAML
    )
    monkeypatch.setenv("HEADSPACE_CONFIG", str(config))
    runner = CliRunner()
    outputs = []
    for args in (
        ["infer", "--level", "turn", "--purpose", "p", "hello"],
        ["status"],
        ["usage"],
    ):
        result = runner.invoke(main, args)
        outputs.append(result.output + (result.stderr if result.stderr_bytes else ""))
        assert result.exit_code == 0, result.output
    emulator.script([Fault(status=401), Fault(status=401)])
    failed = runner.invoke(main, ["infer", "--level", "turn", "--purpose", "p", "boom"])
    assert failed.exit_code == 1
    outputs.append(failed.output + failed.stderr)
    assert "AuthenticationError" in failed.stderr
    for text in outputs:
        assert CANARY not in text
