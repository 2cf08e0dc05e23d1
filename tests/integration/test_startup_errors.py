"""A bad configuration stops start-up with one line naming the key (never a secret's value):
ConfigError from create_app(), `error: ...` and exit status 2 from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from headspace_inference import create_app
from headspace_inference.settings import ConfigError

BIN = Path(sys.executable).parent
CANARY = "CANARY-3f9a"
DAY, YEAR = 86_400, 365 * 86_400  # the longest durations config.example.yaml allows
# Variables of the test run's own that would change the outcome.
OURS = ("HEADSPACE_CONFIG", "OPENROUTER_API_KEY", "DATABASE_URL", "REDIS_URL")


def _bomb() -> str:
    lines = ["a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nopenrouter: {timeout_seconds: *i}\n"


@dataclass
class Case:
    id: str
    config: str | bytes
    named: str  # what the one line must name
    env: dict[str, str] = field(default_factory=dict)


REDIS = "redis: {url: 'redis://127.0.0.1:1/0'}\n"
CASES = [
    Case("not-utf8", b"openrouter: {app_name: caf\xe9}\n", "not UTF-8"),
    Case("yaml-bomb", _bomb(), "aliases (*name) are not allowed"),
    Case("database-url", "database: {url: 'not a url'}\n", "database.url"),
    Case("DATABASE_URL", "", "database.url", {"DATABASE_URL": "garbage"}),
    Case("mysql", "database: {url: 'mysql://u:pw@db/x'}\n", "database.url: Value error, no"),
    Case("redis-url", "redis: {url: notaurl}\n", "redis.url"),
    Case("spool", "inference: {spool_path: SPOOL}\n", "inference.spool_path"),
    Case("timeout", "openrouter: {timeout_seconds: 1.0e+308}\n", "openrouter.timeout_seconds"),
    Case(
        "max-wait",
        REDIS + "openrouter: {rate_limits: {max_wait_seconds: 1.0e+308}}\n",
        "openrouter.rate_limits.max_wait_seconds",
    ),
    Case(
        "window",
        REDIS + "openrouter: {rate_limits: {window_seconds: 1.0e+308}}\n",
        "openrouter.rate_limits.window_seconds",
    ),
    Case(
        "ttl",
        REDIS + "openrouter: {cache: {ttl_seconds: 1.0e+308}}\n",
        "openrouter.cache.ttl_seconds",
    ),
    Case("section", "openrouter: 'oops'\n", "openrouter:", {"OPENROUTER_API_KEY": "sk-or-x"}),
    Case("empty-model", "openrouter: {models: {turn: ''}}\n", "openrouter.models.turn"),
    Case("token-yaml", "", "HEADSPACE__API", {"HEADSPACE__API": f'{{token: "tok-{CANARY}'}),
    Case("token-section", f"api: tok-{CANARY}\n", "api:"),
    Case("key-spaces", "", "openrouter.api_key", {"OPENROUTER_API_KEY": f"{{sk-or-{CANARY} x"}),
    # A token key present but blank would leave every endpoint open: it fails closed.
    Case("token-empty", "api: {token: ''}\n", "api.token: Value error, is blank"),
    Case("token-spaces", "api: {token: '   '}\n", "api.token: Value error, is blank"),
    Case("token-null", "api:\n  token:\n", "api.token: Value error, is blank"),
    Case("TOKEN-empty", "", "api.token: Value error, is blank", {"HEADSPACE__API__TOKEN": ""}),
    Case("TOKEN-spaces", "", "api.token: Value error, is blank", {"HEADSPACE__API__TOKEN": " "}),
]


def _prepare(case: Case, where: Path) -> dict[str, str]:
    """The case's config file in ``where``; the variables to run it with."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "a-file").write_text("")
    config = where / "config.yaml"
    body = case.config
    if isinstance(body, str):
        # A spool directory that cannot be made, even by root: its parent is a file.
        config.write_text(body.replace("SPOOL", str(where / "a-file" / "spool")))
    else:
        config.write_bytes(body)
    return {"HEADSPACE_CONFIG": str(config), **case.env}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_create_app_raises_one_line_naming_the_key(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in OURS:
        monkeypatch.delenv(name, raising=False)
    for name, value in _prepare(case, tmp_path).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        create_app()
    message = str(info.value)
    assert case.named in message
    assert "\n" not in message
    assert CANARY not in message and "pw" not in message


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OURS and not k.startswith("HEADSPACE")}
    return {**env, **extra}


def _check(case: Case, command: str, args: list[str], where: Path) -> list[str]:
    """Run one case under one command; what is wrong with its exit: status 2, one line
    naming the key, no secret."""
    env = _environment(_prepare(case, where))
    try:  # a guard: a hang is a failure, not a wait (serve would start serving)
        proc = subprocess.run(
            [str(BIN / "headspace-inference"), *args], cwd=where, env=env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return [f"{case.id} ({command}): still running after 60 s"]
    out, err = proc.stdout, proc.stderr
    lines = err.splitlines()
    problems = []
    if proc.returncode != 2:
        problems.append(f"exit status {proc.returncode}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"not one `error: ...` line: {err[-600:]!r}")
    if case.named not in err:
        problems.append(f"{case.named!r} not named")
    if "Traceback" in err or CANARY in err or ":pw@" in err:
        problems.append("a traceback or a secret")
    if out:
        problems.append(f"stdout: {out[:200]!r}")
    return [f"{case.id} ({command}): {p}" for p in problems]


def _run_cli(cases: list[Case], commands: dict[str, list[str]], tmp_path: Path) -> list[str]:
    """Every case under every command, a few processes at a time (one per core and one
    waiting: each is an interpreter start, and 60 of them at once on a small machine would
    meet the hang guard by waiting for a core); what went wrong, if anything."""
    jobs = [
        (case, command, args, tmp_path / f"{case.id}-{command}")
        for case in cases
        for command, args in commands.items()
    ]
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 1) as pool:
        found = pool.map(lambda job: _check(*job), jobs)
        return [problem for problems in found for problem in problems]


COMMANDS = {
    "status": ["status"],
    "infer": ["infer", "--level", "turn", "--purpose", "p", "text"],
    "serve": ["serve", "--port", "0"],  # exits before binding
}
SOME = ("yaml-bomb", "spool", "mysql", "token-yaml", "TOKEN-empty")


@pytest.mark.timeout(120)
def test_cli_exits_2_with_one_line_naming_the_key(tmp_path: Path) -> None:
    assert _run_cli([c for c in CASES if c.id in SOME], COMMANDS, tmp_path) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_exits_2_with_one_line_naming_the_key_for_every_case(tmp_path: Path) -> None:
    assert _run_cli(CASES, COMMANDS, tmp_path) == []


def test_the_longest_durations_allowed_work_with_redis(
    redis_server_url: str, redis_prefix: str, emulator: Any, tmp_path: Path
) -> None:
    # The bounds are low enough that nothing overflows where Redis takes milliseconds.
    app = create_app(
        overrides={
            "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
            "redis": {"url": redis_server_url, "key_prefix": redis_prefix,
                      "retry_interval_seconds": DAY},
            "openrouter": {"base_url": emulator.base_url, "api_key": "sk-or-bounds",
                           "timeout_seconds": DAY, "connect_timeout_seconds": DAY,
                           "rate_limits": {"max_wait_seconds": DAY, "window_seconds": DAY},
                           "cache": {"ttl_seconds": YEAR},
                           "retry": {"base_delay_seconds": DAY, "max_delay_seconds": DAY},
                           "health": {"timeout_seconds": DAY, "cache_seconds": DAY}},
            "inference": {"spool_path": str(tmp_path / "spool"), "shutdown_timeout_seconds": DAY},
        }
    )  # fmt: skip
    service = app.extensions["inference"]
    try:
        first = service.infer("turn", "bounds", "hello")
        again = service.infer("turn", "bounds", "hello")
        assert first.text and again.cached
        assert service.status()["state"] == "healthy"
    finally:
        service.close(timeout=10)


@pytest.mark.parametrize("token", ["", "  ", None])
def test_a_hosts_blank_token_fails_init_app_naming_the_key(token: str | None) -> None:
    from flask import Flask

    from headspace_inference import Inference

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    with pytest.raises(ConfigError) as info:
        Inference().init_app(app, config={"inference": {"api": {"token": token}}})
    assert "inference.api.token: Value error, is blank" in str(info.value)


def test_without_a_token_key_the_endpoints_stay_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key absent (not blank) keeps today's rule: a local setup with no token is open.
    monkeypatch.chdir(tmp_path)
    for name in OURS:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.yaml").write_text("api: {}\n")
    monkeypatch.setenv("HEADSPACE_CONFIG", str(tmp_path / "config.yaml"))
    app = create_app(overrides={"database": {"url": f"sqlite:///{tmp_path / 'h.db'}"}})
    try:
        assert app.extensions["inference"].settings.api.token is None
        assert app.test_client().get("/api/inference/usage").status_code == 200
    finally:
        app.extensions["inference"].close()
