"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, in the test's event loop.

Playwright never downloads a browser here: it launches /usr/bin/chromium (`make browser` installs it).
Every step leaves a screenshot under test-artifacts/browser/<test name>/.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from gateway.bootstrap import create_app
from tests.conftest import ROOT, TOKENS, auth, wait_ready

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHAT = {"model": "test-org/realtime-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
WAIT_MS = 20_000  # generous: the page polls every 2 s on a shared, noisy machine


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium from the Debian package (never one Playwright downloads)."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                                   headless=True)
        yield browser
        await browser.close()


@pytest.fixture
async def base_url(aiohttp_server: Any, make_settings: Any) -> str:
    """A full gateway on a real port; the batch dispatcher is off so submitted jobs stay queued."""
    app = create_app(make_settings(batch_dispatcher_enabled=False))
    server = await aiohttp_server(app)
    await wait_ready(app)
    return str(server.make_url("")).rstrip("/")


class Shots:
    """Numbered screenshots of one test."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.dir = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*.png"):
            old.unlink()
        self.n = 0

    async def take(self, page: Page, step: str) -> None:
        self.n += 1
        await page.screenshot(path=str(self.dir / f"{self.n:02d}-{step}.png"), full_page=True)


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    return Shots(request)


PAGE_ERRORS: list[str] = []


async def new_page(browser: Browser) -> Page:
    """A page whose script errors and CSP violations are collected in PAGE_ERRORS (checked at the end)."""
    PAGE_ERRORS.clear()
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    page.on("pageerror", lambda exc: PAGE_ERRORS.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: PAGE_ERRORS.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("response", lambda r: PAGE_ERRORS.append(f"{r.status} {r.request.method} {r.url}")
            if r.status >= 400 and not r.url.endswith("/dashboard/login") else None)
    return page


async def log_in(page: Page, base_url: str, shots: Shots) -> None:
    await page.goto(base_url + "/dashboard")
    await expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
    await shots.take(page, "login-form")
    await page.fill("#token", TOKENS["monitor"])
    await page.click("#login")
    await expect(page).to_have_url(base_url + "/dashboard")
    assert not PAGE_ERRORS, PAGE_ERRORS
    await expect(page.locator("#rt-state")).to_have_text("ready", timeout=WAIT_MS)


async def test_login_watch_traffic_cancel_a_job_and_log_out(browser: Browser, base_url: str, shots: Shots) -> None:
    page = await new_page(browser)
    async with aiohttp.ClientSession(base_url) as api:
        resp = await api.post("/v1/batch/chat/completions", headers=auth("batch"),
                              json={**CHAT, "model": "test-org/waiting-model", "priority": 3})
        assert resp.status == 202
        job_id = (await resp.json())["id"]

        await log_in(page, base_url, shots)
        cookies = await page.context.cookies()
        session = [c for c in cookies if c["name"] == "llm_gateway_session"]
        assert len(session) == 1 and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"
        assert TOKENS["monitor"] not in session[0]["value"]
        await expect(page.locator("#q-total")).to_have_text("1")
        await shots.take(page, "overview")

        # Traffic flows: the counter changes in place, without a reload (the marker survives).
        total = page.locator("#rt-requests-total")
        await expect(total).not_to_have_text("–")
        before = int((await total.inner_text()).replace(",", ""))
        await page.evaluate("window.__noReload = true")
        for _ in range(5):
            resp = await api.post("/v1/chat/completions", headers=auth("realtime"), json=CHAT)
            assert resp.status == 200
        await expect(total).to_have_text(f"{before + 5:,}", timeout=WAIT_MS)
        assert await page.evaluate("window.__noReload === true")
        await shots.take(page, "overview-after-traffic")

        # Cancel the queued job from the jobs page.
        await page.click("nav >> text=Jobs")
        row = page.locator(f'tr[data-job="{job_id}"]')
        await expect(row.locator(".badge")).to_have_text("queued")
        await shots.take(page, "jobs-queued")
        await row.locator("button[data-cancel]").click()
        await expect(page).to_have_url(base_url + "/dashboard/jobs")
        await expect(row.locator(".badge")).to_have_text("cancelled", timeout=WAIT_MS)
        await expect(row.locator("button[data-cancel]")).to_have_count(0)
        await shots.take(page, "jobs-cancelled")
        job = await (await api.get(f"/v1/jobs/{job_id}", headers=auth("batch"))).json()
        assert job["status"] == "cancelled"

        # The other pages render with the session too.
        await page.click(f'tr[data-job="{job_id}"] a')
        await expect(page.locator("#job-detail")).to_contain_text("test-org/waiting-model")
        await shots.take(page, "job-detail")
        for name, marker in (("Keys", "#keys-table"), ("Evals", "#evals-table"), ("Runtime", "#rt-history")):
            await page.click(f"nav >> text={name}")
            await expect(page.locator(marker)).to_be_visible()
            await shots.take(page, name.lower())
        await expect(page.locator("#rt-history tbody tr").first).to_be_visible()
        # The fleet view: this gateway's row in the node registry, its runtime state rendered by the script.
        await page.click("nav >> text=Fleet")
        node_row = page.locator("#fleet-table tr[data-node]")
        await expect(node_row).to_have_count(1, timeout=WAIT_MS)
        await expect(node_row.locator(".badge")).to_have_text("ready")
        await expect(page.locator("#fleet-count")).to_have_text("1")
        await shots.take(page, "fleet")

        # Log out: the cookie is gone and the pages send the browser back to the form.
        await page.click("#logout")
        await expect(page.locator("#logged-out")).to_be_visible()
        await shots.take(page, "logged-out")
        assert not [c for c in await page.context.cookies() if c["name"] == "llm_gateway_session"]
        await page.goto(base_url + "/dashboard/jobs")
        await expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
        await shots.take(page, "after-logout-redirect")


async def test_a_wrong_token_is_refused(browser: Browser, base_url: str, shots: Shots) -> None:
    page = await new_page(browser)
    await page.goto(base_url + "/dashboard/login")
    for token in ("definitely-not-a-token", TOKENS["realtime"]):
        await page.fill("#token", token)
        async with page.expect_response(
                lambda r: r.url.endswith("/dashboard/login") and r.request.method == "POST") as info:
            await page.click("#login")
        assert (await info.value).status == 401
        await expect(page.locator("#login-error")).to_contain_text("not a key with the monitor scope")
        await shots.take(page, "refused")
    assert not await page.context.cookies()
    await page.goto(base_url + "/dashboard")
    await expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))


async def test_the_coserving_panel_shows_the_batch_limit_and_ttft_against_the_slo(
        browser: Browser, aiohttp_server: Any, make_settings: Any, shots: Shots) -> None:
    app = create_app(make_settings(coserve_interval_seconds=0.1, realtime_ttft_slo_ms=250, max_concurrent_batch=8))
    server = await aiohttp_server(app)
    await wait_ready(app)
    base_url = str(server.make_url("")).rstrip("/")
    page = await new_page(browser)
    async with aiohttp.ClientSession(base_url) as api:
        # Realtime streams: the gateway measures their TTFT, and the controller starts batch cautiously.
        for _ in range(5):
            resp = await api.post("/v1/chat/completions", headers=auth("realtime"), json={**CHAT, "stream": True})
            assert resp.status == 200
            await resp.read()
        await log_in(page, base_url, shots)
        await expect(page.locator("#cs-ttft-slo")).to_have_text("250 ms")
        await expect(page.locator("#cs-limit")).to_have_text(re.compile(r"^\d / 8$"))
        await expect(page.locator("#cs-ttft")).to_have_text(re.compile(r"\d ms$"), timeout=WAIT_MS)
        await expect(page.locator("#cs-reason")).to_contain_text("last change", timeout=WAIT_MS)
        await expect(page.locator("#cs-reason")).to_contain_text("Adaptive")
        # Two charts over the last minutes: TTFT p95 with the SLO as a dashed line, and the batch limit.
        await expect(page.locator("#chart-cs-ttft svg path.ref")).to_have_count(1, timeout=WAIT_MS)
        await expect(page.locator("#chart-cs-limit svg path.line")).to_have_count(1)
        await shots.take(page, "coserving-panel")
    assert not PAGE_ERRORS, PAGE_ERRORS
