"""A damaged entry in the shared (Redis) response cache, written for real under the key the
service reads: each identical call treats it as a miss, removes it, goes upstream and leaves
its row; nothing raises anything but what the answer itself would.

Prints one `FAULT ...` line per case, like tests/faults/test_faults.py, for RELIABILITY.md.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import redis
from flask import Flask

from headspace_inference.inference.cache import TieredCache
from headspace_inference.inference.service import InferenceService
from tests.service_fixtures import CHAT, AppFactory, rows
from tests.structured_schemas import FRUSTRATION

pytestmark = pytest.mark.redis

CALLS = 4
CACHE_LOGGER = "headspace_inference.inference"


def _fitting_text_but_not_the_schema(client: redis.Redis, key: str) -> None:
    stored = json.loads(client.get(key) or b"{}")
    client.set(key, json.dumps({**stored, "text": '{"summary": 3}'}))


DAMAGE: dict[str, Any] = {
    "not-json": lambda client, key: client.set(key, b"\xff{not json"),
    "another-shape": lambda client, key: client.set(key, json.dumps([1, "two"])),
    "wrong-types": lambda client, key: client.set(
        key, json.dumps({"text": 7, "model": None, "input_tokens": "5", "output_tokens": -1})
    ),
    "not-a-string": lambda client, key: (client.delete(key), client.hset(key, "text", "x")),
    "text-not-fitting-schema": _fitting_text_but_not_the_schema,
}


@pytest.fixture
def shared_app(
    make_app: AppFactory, redis_server_url: str, redis_prefix: str
) -> tuple[Flask, redis.Redis]:
    app = make_app(redis={"url": redis_server_url, "key_prefix": redis_prefix})
    client = redis.Redis.from_url(redis_server_url)
    return app, client


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shared_entry_is_a_miss_and_every_call_leaves_its_row(
    shared_app: tuple[Flask, redis.Redis],
    emulator: Any,
    redis_prefix: str,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, client = shared_app
    service: InferenceService = app.extensions["inference"]
    assert isinstance(service.cache, TieredCache)
    options: dict[str, Any] = {}
    if damage == "text-not-fitting-schema":
        options["response_format"] = FRUSTRATION

    def call() -> Any:
        return service.infer("turn", "summarise", "the same input every time", **options)

    call()  # fills the shared entry
    (key,) = client.scan_iter(match=f"{redis_prefix}:cache:*")
    upstream_before = emulator.request_count(CHAT)
    raised: list[str] = []
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    for _ in range(CALLS):
        DAMAGE[damage](client, key)
        service.cache.local.clear()  # as in another process: only the shared tier has it
        try:
            call()
        except Exception as exc:  # what the property forbids; counted, then asserted
            raised.append(type(exc).__name__)
    logged = rows(app)
    upstream = emulator.request_count(CHAT) - upstream_before
    warnings = [r for r in caplog.records if "response cache" in r.getMessage()]
    print(
        f"\nFAULT shared-cache-{damage}: "
        + json.dumps(
            {"calls": CALLS, "rows": len(logged) - 1, "raised": raised, "upstream": upstream}
        ),
        flush=True,
    )
    assert raised == []
    assert len(logged) == CALLS + 1
    assert [r.status for r in logged[1:]] == ["ok"] * CALLS
    assert upstream == CALLS
    assert len(warnings) == CALLS  # one line per damaged entry found
    # The fresh answer replaced the damaged entry: the next call is a hit.
    service.cache.local.clear()
    assert call().cached
    if damage != "text-not-fitting-schema":
        assert service.cache.shared.stats()["unreadable"] == CALLS
