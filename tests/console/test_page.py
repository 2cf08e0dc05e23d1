"""The operator page in a real browser: Debian's headless Chromium driven by Playwright.

With api.token set, the page asks for the token; then the chart shows the seeded log's cost
per day by model, a call made after the page opened arrives in the live table, the filters
narrow the table, and a row opens the call's detail; the Spend panel shows each budget,
the guard's store, the storm breaker and the key's credit, and a budget passing its warning
mark shows a notice from the feed and its new use; no console error along the way. A
screenshot of each state is kept under instance/console/ (CI keeps them as artifacts).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from headspace_inference import create_app
from headspace_inference.inference import CallStormError
from headspace_inference.operate.live import console_for
from headspace_inference.page.views import SECURITY_HEADERS
from tests.call_rows import call, write
from tests.console.live_server import serving
from tests.service_fixtures import settings_for

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "instance" / "console"
TOKEN = "page-token-7"
WAIT_MS = 20_000

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def app(sqlite_url: str, emulator: Any, tmp_path: Path) -> Iterator[Flask]:
    app = create_app(overrides=settings_for(sqlite_url, emulator, tmp_path, api={"token": TOKEN}))
    yield app
    console_for(app).close()
    app.extensions["inference"].close(timeout=5)


def seed(app: Flask) -> dict[tuple[str, str], Decimal]:
    """Calls on three recent days with two models; their cost per (day, model)."""
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    plan = [
        (today - timedelta(days=3), "anthropic/claude-haiku-4.5", "turn", Decimal("0.0125")),
        (today - timedelta(days=3), "anthropic/claude-sonnet-4.5", "task", Decimal("0.0400")),
        (today - timedelta(days=1), "anthropic/claude-haiku-4.5", "turn", Decimal("0.0075")),
        (today - timedelta(days=1), "anthropic/claude-haiku-4.5", "task", Decimal("0.0025")),
        (today - timedelta(hours=1), "anthropic/claude-sonnet-4.5", "project", Decimal("0.02")),
    ]
    records = [
        replace(call(at, level=level, model=model, cost=cost), result_text=f"seeded {i}")
        for i, (at, model, level, cost) in enumerate(plan)
    ]
    write(app.extensions["inference"].database.sessions, records, batch=10)
    expected: dict[tuple[str, str], Decimal] = {}
    for at, model, _, cost in plan:
        key = (at.date().isoformat(), model)
        expected[key] = expected.get(key, Decimal(0)) + cost
    return expected


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        # Like the PostgreSQL and Redis tests: they run where the part is, and CI makes sure
        # it is there (.ci/run installs chromium and sets REQUIRE_BROWSER, so it never skips).
        message = f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def test_the_operator_page_live(app: Flask, browser: Any) -> None:
    expected = seed(app)
    SHOTS.mkdir(parents=True, exist_ok=True)
    service = app.extensions["inference"]
    errors: list[str] = []
    with serving(app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        expect = sync_api.expect
        # Its security headers: the page works under its Content-Security-Policy (a
        # violation would be a console error, asserted absent below).
        answer = page.goto(f"{base}/inference")
        assert answer is not None
        assert {k: answer.headers.get(k.lower()) for k in SECURITY_HEADERS} == SECURITY_HEADERS

        # The token is asked for, kept in the tab, and sent as a header.
        expect(page.locator("#token-form")).to_be_visible(timeout=WAIT_MS)
        page.screenshot(path=str(SHOTS / "1-token.png"))
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")

        # The chart: one bar per seeded (day, model), with its cost.
        bars = page.locator("#cost-chart rect.bar")
        expect(bars).to_have_count(len(expected), timeout=WAIT_MS)
        drawn = {
            (b.get_attribute("data-day"), b.get_attribute("data-model")): Decimal(
                b.get_attribute("data-cost")
            )
            for b in bars.all()
        }
        assert drawn == expected
        swatches = page.locator("#cost-chart .legend i")
        expect(swatches).to_have_count(2)
        colours = {s.evaluate("e => getComputedStyle(e).backgroundColor") for s in swatches.all()}
        assert len(colours) == 2 and "rgba(0, 0, 0, 0)" not in colours
        expect(page.locator("#state")).to_have_attribute("data-state", "healthy", timeout=WAIT_MS)
        expect(page.locator("#calls-by-level tr[data-level=turn] td.num")).to_have_text("2")
        expect(page.locator("#call-table tbody tr")).to_have_count(5)
        expect(page.locator("#live")).to_have_attribute("data-live", "true", timeout=WAIT_MS)
        page.screenshot(path=str(SHOTS / "2-chart.png"), full_page=True)

        # A call made after the page opened arrives in the live table.
        result = service.infer("objective", "live on the page", "appear in the table, please")
        live_row = page.locator(f'#call-table tr[data-call-id="{result.call_id}"]')
        expect(live_row).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#call-table tbody tr").first).to_have_attribute(
            "data-call-id", result.call_id
        )
        page.screenshot(path=str(SHOTS / "3-live-call.png"), full_page=True)

        # The filters narrow the table: only the task calls, and new turn calls stay out.
        page.select_option("#filters select[name=level]", "task")
        page.click("#filters button")
        rows = page.locator("#call-table tbody tr")
        expect(rows).to_have_count(2, timeout=WAIT_MS)
        for text in rows.locator("td:nth-child(2)").all_inner_texts():
            assert text == "task"
        later = service.infer("task", "filtered live", "a task call after the filter")
        expect(page.locator(f'#call-table tr[data-call-id="{later.call_id}"]')).to_be_visible(
            timeout=WAIT_MS
        )
        expect(rows).to_have_count(3)
        page.screenshot(path=str(SHOTS / "4-filtered.png"), full_page=True)

        # A row opens the call's detail, with its answer.
        page.locator(f'#call-table tr[data-call-id="{later.call_id}"]').click()
        expect(page.locator("#detail")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator('#detail dd[data-field="call_id"]')).to_have_text(later.call_id)
        expect(page.locator("#detail-result")).to_have_text(later.text)
        page.screenshot(path=str(SHOTS / "5-detail.png"), full_page=True)
        page.close()
    assert errors == []


def test_the_page_needs_no_token_when_none_is_set(
    sqlite_url: str, emulator: Any, tmp_path: Path, browser: Any
) -> None:
    app = create_app(overrides=settings_for(sqlite_url, emulator, tmp_path))
    try:
        client = app.test_client()  # the page's own HTML is public either way
        json_answer = client.get("/api/inference/status")
        assert json_answer.headers["X-Content-Type-Options"] == "nosniff"
        with serving(app) as base:
            page = browser.new_page()
            page.goto(f"{base}/inference")
            sync_api.expect(page.locator("#live")).to_have_attribute(
                "data-live", "true", timeout=WAIT_MS
            )
            assert page.locator("#token-form").is_hidden()
            sync_api.expect(page.locator("#cost-chart .legend")).to_contain_text(
                "no cost in this window"
            )
            page.close()
    finally:
        console_for(app).close()
        app.extensions["inference"].close(timeout=5)


def test_the_spend_panel_shows_the_budgets_and_a_warning_from_the_feed(
    sqlite_url: str, emulator: Any, tmp_path: Path, browser: Any
) -> None:
    budgets = [
        {"name": "summaries", "scope": {"level": "turn"}, "window": "month", "cap_usd": 0.002,
         "warn_at": 0.5},
        {"name": "everything", "window": "month", "cap_tokens": 1_000_000},
    ]  # fmt: skip
    emulator.set_key_credit(25.0, usage=5.0)
    breaker = {"calls": 12, "seconds": 60, "cooldown_seconds": 30}
    settings = settings_for(
        sqlite_url, emulator, tmp_path, openrouter={"budgets": budgets, "storm_breaker": breaker}
    )
    app = create_app(overrides=settings)
    service = app.extensions["inference"]
    errors: list[str] = []
    expect = sync_api.expect
    try:
        with serving(app) as base:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/inference")
            expect(page.locator("#live")).to_have_attribute("data-live", "true", timeout=WAIT_MS)
            summaries = page.locator('#budgets tr[data-rule="summaries"]')
            expect(summaries).to_have_attribute("data-used-usd", "0", timeout=WAIT_MS)
            expect(summaries.locator("td").nth(1)).to_have_text("level turn")
            expect(summaries.locator(".meter")).to_have_attribute("data-state", "ok")
            expect(page.locator('#budgets tr[data-rule="everything"] td').nth(1)).to_have_text(
                "every call"
            )
            expect(page.locator("#guard")).to_have_attribute("data-shared", "true")
            expect(page.locator("#guard")).to_contain_text("database")
            expect(page.locator("#storm-breaker")).to_have_text(
                "a purpose making over 12 calls in 60 s is refused for 30 s"
            )
            expect(page.locator("#key-credit")).to_have_text("$20.0000 left of $25.0000")
            page.screenshot(path=str(SHOTS / "6-spend.png"), full_page=True)

            # Calls (whose worst case fits the cap) until the summaries budget passes its
            # warning mark: a notice, and the panel read again.
            for i in range(40):
                service.infer("turn", "summarise", f"summary {i}: " + "words " * 20, max_tokens=60)
                if service.budget(level="turn")[0]["used_usd"] >= 0.001:
                    break
            (used,) = [s["used_usd"] for s in service.budget() if s["rule"] == "summaries"]
            notice = page.locator('#budget-notices li[data-kind="warning"]')
            expect(notice).to_have_count(1, timeout=WAIT_MS)
            expect(notice).to_contain_text('Budget "summaries"')
            expect(notice).to_contain_text("warning mark (50 %)")
            expect(summaries).to_have_attribute("data-used-usd", str(used), timeout=WAIT_MS)
            expect(summaries.locator(".meter")).to_have_attribute("data-state", "warning")
            width = summaries.locator(".meter .fill").evaluate("e => e.style.width")
            assert float(width.removesuffix("%")) == pytest.approx(used / 0.002 * 100)
            page.screenshot(path=str(SHOTS / "7-budget-warning.png"), full_page=True)

            # A loop of one purpose trips the storm breaker: its notice comes first.
            with pytest.raises(CallStormError):
                for i in range(13):
                    service.infer("task", "loop", f"hook {i}", max_tokens=20)
            storm = page.locator("#budget-notices li").first
            expect(storm).to_have_attribute("data-kind", "storm", timeout=WAIT_MS)
            expect(storm).to_contain_text('Storm breaker: "loop" made over 12 calls in 60 s')
            expect(page.locator("#budget-notices li")).to_have_count(2)
            page.close()
    finally:
        console_for(app).close()
        service.close(timeout=5)
    assert errors == []


def test_the_spend_panel_says_when_the_guard_counts_per_process(
    sqlite_url: str, emulator: Any, tmp_path: Path, browser: Any, closed_port: int
) -> None:
    # Redis configured but away: the guard counts in this process alone, and says why.
    redis = {"url": f"redis://127.0.0.1:{closed_port}/0"}
    app = create_app(overrides=settings_for(sqlite_url, emulator, tmp_path, redis=redis))
    try:
        app.extensions["inference"].infer("turn", "guard away", "counted here alone")
        with serving(app) as base:
            page = browser.new_page()
            page.goto(f"{base}/inference")
            guard = page.locator("#guard")
            sync_api.expect(guard).to_have_attribute("data-shared", "false", timeout=WAIT_MS)
            sync_api.expect(guard).to_contain_text("counted per process")
            sync_api.expect(guard).to_contain_text("Redis unreachable")
            sync_api.expect(page.locator("#no-budgets")).to_be_visible()
            assert page.locator("#budgets").is_hidden()
            page.close()
    finally:
        console_for(app).close()
        app.extensions["inference"].close(timeout=5)
