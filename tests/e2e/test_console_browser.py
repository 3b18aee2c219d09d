"""The console in a real browser: Debian's chromium driven by Playwright against the console of
the end-to-end stack, after a report, a dead letter and a short rollout went through it.

Chromium missing is a failure that says how to get it (``make deps`` installs it), never a skip.
Each page's screenshot is written to the stack's run folder, or to the folder
MEDMESH_CONSOLE_SCREENSHOTS names (``MEDMESH_CONSOLE_SCREENSHOTS=docs/console`` refreshes the
committed ones; a plain test run leaves the tree as it was).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from playwright.async_api import Page, Request, Route, async_playwright

from medmesh_cli.devstack.chromium import ChromiumMissingError, chromium_binary
from medmesh_cli.devstack.paths import run_dir
from medmesh_cli.devstack.stack import ServiceSpec, Stack, service_environment
from medmesh_cli.models import write_change
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import Producer, utc_now
from medmesh_contracts.lifecycle import (
    LifecycleError,
    RolloutPolicy,
    decision,
    deploy_version,
    roll_back,
)
from tests.e2e.conftest import E2E_PORT_BASE, Record, TopicTap, fixture_with_new_patient
from tests.e2e.router_view import current_deployment, wait_for_view
from tests.e2e.test_observability import _patient_data

SCREENSHOTS = Path(
    os.environ.get("MEDMESH_CONSOLE_SCREENSHOTS") or run_dir(f"e2e-{E2E_PORT_BASE}") / "console"
)
MODEL = "deterioration"
PRODUCER = Producer(service="e2e", instance="console-browser")
POISON_KEY = b"console-browser-poison"


async def _rollout_and_back(stack: Stack) -> None:
    """v2 deployed, stepped to 50 % by the router's controller, then rolled back by hand: the
    registry ends at 100 % v1, as every other test expects."""
    current = await current_deployment(stack, MODEL)
    policy = RolloutPolicy(steps=(50, 100), interval_s=600, min_requests=1000)
    deployed = deploy_version(current, 2, PRODUCER, utc_now(), "e2e", policy=policy)
    await write_change(
        stack.config.bootstrap,
        deployed,
        decision(current, deployed, "deploy", "e2e", "console browser test", PRODUCER, utc_now()),
    )
    try:
        await wait_for_view(
            stack, MODEL, lambda v: v["effective_weights"] == {"1": 50, "2": 50}, "50 % v2"
        )
    finally:
        latest = await current_deployment(stack, MODEL)
        with contextlib.suppress(LifecycleError):  # nothing left to roll back
            after = roll_back(latest, PRODUCER, utc_now(), "e2e")
            audit = decision(
                latest, after, "rollback", "e2e", "console test done", PRODUCER, utc_now()
            )
            await write_change(stack.config.bootstrap, after, audit)
        await wait_for_view(
            stack, MODEL, lambda v: v["effective_weights"] == {"1": 100}, "100 % v1"
        )


async def _a_report(stack: Stack, tap: TopicTap) -> tuple[str, list[str]]:
    """A new patient's report: its pseudonym, and what must never show (the patient's id, name,
    birth date, identifiers, contact details, and the report's subject reference)."""
    payload, patient = fixture_with_new_patient("vitals-bundle-high.json")
    personal = [patient, *_patient_data(json.loads(payload))]
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post("/fhir", content=payload)
    assert response.status_code == 202
    correlation = response.headers[h.CORRELATION_ID]
    report: Record = await tap.wait_for(
        topics.REPORTS_DIAGNOSTIC, lambda r: r.headers.get(h.CORRELATION_ID) == correlation
    )
    for entry in json.loads(report.value)["entry"]:
        reference = entry["resource"].get("subject", {}).get("reference")
        if reference:
            personal.append(reference)
    return (report.key or b"").decode(), personal


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"the console never showed {what} within {timeout_s:.0f}s")


async def _shows(page: Page, url: str, text: str) -> bool:
    answer = await page.goto(url)
    return answer is not None and answer.status == 200 and text in await page.content()


async def test_the_console_shows_the_stack_in_a_real_browser(
    stack: Stack, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """Chromium shows every page offline, without script, with no patient data; screenshots saved."""
    try:
        executable = chromium_binary()
    except ChromiumMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    pseudonym, personal = await _a_report(stack, tap)
    await producer.send_and_wait(topics.INFERENCE_REQUESTS, b"{not a request", key=POISON_KEY)
    await _rollout_and_back(stack)

    base = f"http://127.0.0.1:{stack.config.ports.console}"
    outside: list[str] = []
    await asyncio.to_thread(SCREENSHOTS.mkdir, parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(executable), args=["--no-sandbox"]
        )
        try:
            context = await browser.new_context(
                java_script_enabled=False, viewport={"width": 1280, "height": 900}
            )

            async def only_the_console(route: Route, request: Request) -> None:
                if request.url.startswith(base):
                    await route.continue_()
                else:
                    outside.append(request.url)
                    await route.abort()

            await context.route("**/*", only_the_console)
            page = await context.new_page()

            await _until(lambda: _shows(page, f"{base}/reports", pseudonym), "the new report")
            reports = await page.content()
            for value in personal:
                assert value not in reports
            await page.screenshot(path=str(SCREENSHOTS / "reports.png"), full_page=True)

            await _until(
                lambda: _shows(page, f"{base}/dead-letters", "medmesh.deadletter.router"),
                "the router's dead letters",
            )
            assert await page.locator("h2", has_text="By reason").count() == 1
            assert "{not a request" not in await page.content()  # the refused value stays hidden
            assert await page.locator("td", has_text="medmesh.deadletter.router").count() >= 2
            await page.screenshot(path=str(SCREENSHOTS / "dead-letters.png"), full_page=True)

            await _until(lambda: _shows(page, f"{base}/rollouts", "v2: rollback"), "the rollout")
            rollout = page.locator("svg.timeline").first
            assert await rollout.locator("circle").count() >= 3  # deploy, step, rollback
            await page.screenshot(path=str(SCREENSHOTS / "rollouts.png"), full_page=True)

            assert await _shows(page, f"{base}/", "deterioration")
            assert await page.locator("td", has_text="stable").count() >= 1
            await page.screenshot(path=str(SCREENSHOTS / "models.png"), full_page=True)

            await _until(lambda: _shows(page, f"{base}/lag", "medmesh-router"), "the lag")
            await page.screenshot(path=str(SCREENSHOTS / "lag.png"), full_page=True)
        finally:
            await browser.close()
    assert outside == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _console_with_token(stack: Stack, token: str) -> Iterator[str]:
    """A second console on the stack, asking for ``token``; its base URL while open."""
    port = _free_port()
    spec = ServiceSpec("console-signed", "medmesh_console", port)
    env = {
        **service_environment(stack.config, spec),
        "MEDMESH_CONSOLE_PORT": str(port),
        "MEDMESH_CONSOLE_TOKENS": token,
        "MEDMESH_ROUTER_URL": f"http://127.0.0.1:{stack.config.ports.router}",
    }
    log = Path(stack.config.state_dir) / "console-signed.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "medmesh_console"], env=env, stdout=out, stderr=out
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 204:
                        break
                assert process.poll() is None, log.read_text(errors="replace")[-2000:]
                time.sleep(0.3)
            else:
                pytest.fail("the console with a token never became ready")
            yield base
        finally:
            process.terminate()
            process.wait(timeout=15)


async def test_the_console_signs_a_browser_in_with_a_token_once(stack: Stack) -> None:
    """Without a token chromium gets 401; ?token= once sets an HttpOnly cookie that opens all."""
    try:
        executable = chromium_binary()
    except ChromiumMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    token = secrets.token_urlsafe(16)
    with _console_with_token(stack, token) as base:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(executable), args=["--no-sandbox"]
            )
            try:
                context = await browser.new_context(java_script_enabled=False)
                page = await context.new_page()
                refused = await page.goto(f"{base}/")
                assert refused is not None
                assert refused.status == 401
                assert "deterioration" not in await page.content()
                signed = await page.goto(f"{base}/?token={token}")
                assert signed is not None
                assert signed.status == 200
                assert page.url == f"{base}/"  # the token left the address at once
                assert "deterioration" in await page.content()
                (cookie,) = await context.cookies()
                assert cookie["httpOnly"] is True
                assert cookie["sameSite"] == "Strict"
                later = await page.goto(f"{base}/rollouts")
                assert later is not None
                assert later.status == 200
            finally:
                await browser.close()
