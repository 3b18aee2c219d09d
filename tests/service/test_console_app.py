"""The console app: its pages over fake sources, escaping, tokens, read-only, no patient data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from medmesh_console.app import COOKIE, create_app
from medmesh_console.settings import ConsoleSettings
from medmesh_console.views import ReportRecord
from medmesh_contracts.lifecycle import LifecycleDecision
from tests.unit.test_console_views import SUBJECT, audit, report_bundle, router_status

TOKEN = "console-secret-token"  # noqa: S105 -- a test token, not a credential
HOSTILE = "<script>alert(1)</script>"


class FakeSources:
    """What the router and Kafka would answer, in memory."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = router_status()
        self.audit: list[LifecycleDecision] = [
            audit(-1, "seed", None, {1: 100}),
            audit(0, "deploy", 2, {1: 100}),
            audit(1, "step", 2, {1: 95, 2: 5}, agreement=0.97),
            audit(2, "rollback", 2, {1: 100}).model_copy(update={"reason": HOSTILE}),
        ]
        self.fail: Exception | None = None

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def models(self) -> dict[str, Any]:
        """The router's /models."""
        self._check()
        return self.status

    async def decisions(self) -> tuple[list[LifecycleDecision], int]:
        """The audit trail, one record unreadable."""
        self._check()
        return self.audit, 1

    async def dead_letters(self) -> list[tuple[str, str]]:
        """Two dead letters of the router, one with markup in its reason."""
        self._check()
        return [
            ("medmesh.deadletter.router", "unknown model"),
            ("medmesh.deadletter.router", HOSTILE),
        ]

    async def lags(self) -> dict[str, dict[str, int]]:
        """Lag of two groups."""
        self._check()
        return {"medmesh-router": {"medmesh.inference.requests": 7}, "medmesh-reporting": {}}

    async def reports(self, limit: int) -> list[ReportRecord]:
        """Two reports whose bundles name their subject."""
        self._check()
        return [
            ReportRecord(b"pseudo-1", report_bundle("high"), {}, 1_700_000_000_000),
            ReportRecord(b"pseudo-2", report_bundle("low"), {}, 1_700_000_060_000),
        ][:limit]


@pytest.fixture
def sources() -> FakeSources:
    """Fresh fake sources."""
    return FakeSources()


async def client_for(settings: ConsoleSettings, sources: FakeSources) -> httpx.AsyncClient:
    """A client of the console app over ASGI (the lifespan does not run: the fakes are used)."""
    app = create_app(settings, sources)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console")


@pytest.fixture
async def open_client(sources: FakeSources) -> AsyncIterator[httpx.AsyncClient]:
    """A console without tokens, on loopback."""
    async with await client_for(ConsoleSettings(), sources) as client:
        yield client


@pytest.fixture
async def locked_client(sources: FakeSources) -> AsyncIterator[httpx.AsyncClient]:
    """A console that asks for a token."""
    settings = ConsoleSettings(console_tokens=SecretStr(f"other, {TOKEN}"))
    async with await client_for(settings, sources) as client:
        yield client


async def test_the_models_page_shows_states_weights_and_figures(
    open_client: httpx.AsyncClient,
) -> None:
    """The models page lists each version's state, weights and the router's figures."""
    page = await open_client.get("/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    text = page.text
    assert "deterioration" in text
    assert "canary" in text
    assert "stable" in text
    assert "<td>10%</td>" in text  # v2's effective weight
    assert "<td>1.7%</td>" in text  # v2's error rate, 2 of 120
    assert "35 ms" in text
    assert "<script" not in text


async def test_the_rollouts_page_plots_each_rollout_and_escapes_reasons(
    open_client: httpx.AsyncClient,
) -> None:
    """A rollout is an SVG plot (a seed only a table); a hostile reason is shown as text."""
    text = (await open_client.get("/rollouts")).text
    assert text.count("<svg") == 1
    assert "deterioration (no rollout): seed" in text
    assert "shadow agreement 97.0% of 50" in text
    assert "1 audit records could not be read" in text
    assert HOSTILE not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


async def test_the_lag_and_dead_letter_pages_count_what_kafka_holds(
    open_client: httpx.AsyncClient,
) -> None:
    """Lag is listed per group and topic; dead letters per topic and reason, escaped."""
    lag = (await open_client.get("/lag")).text
    assert "7 messages not yet processed" in lag
    assert "medmesh.inference.requests" in lag
    letters = (await open_client.get("/dead-letters")).text
    assert "unknown model" in letters
    assert HOSTILE not in letters
    assert "&lt;script&gt;" in letters


async def test_the_reports_page_shows_pseudonyms_and_never_patient_data(
    open_client: httpx.AsyncClient,
) -> None:
    """Reports show pseudonym, model, version and band; never the subject, a name or a value."""
    text = (await open_client.get("/reports")).text
    assert "pseudo-1" in text
    assert "pseudo-2" in text
    assert text.index("pseudo-2") < text.index("pseudo-1")  # newest first
    assert "high" in text
    assert SUBJECT not in text
    assert "SUBJECT-REFERENCE" not in text
    assert "Jane" not in text
    assert "0.42" not in text


async def test_a_failed_read_is_said_on_the_page(
    open_client: httpx.AsyncClient, sources: FakeSources
) -> None:
    """When the router or Kafka cannot be read the page answers 502 and says why."""
    sources.fail = httpx.ConnectError("connection refused")
    page = await open_client.get("/")
    assert page.status_code == 502
    assert "Could not read the router&#x27;s /models: ConnectError: connection refused" in page.text


async def test_the_console_is_read_only(open_client: httpx.AsyncClient) -> None:
    """Anything but GET and HEAD is refused with 405, on every path."""
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        answer = await open_client.request(method, "/")
        assert answer.status_code == 405
        assert answer.headers["allow"] == "GET, HEAD"
    assert (await open_client.post("/reports")).status_code == 405


async def test_pages_refuse_a_visitor_without_a_token(locked_client: httpx.AsyncClient) -> None:
    """With tokens configured every page answers 401 without one or with a wrong one."""
    for path in ("/", "/rollouts", "/lag", "/dead-letters", "/reports"):
        answer = await locked_client.get(path)
        assert answer.status_code == 401
        assert "deterioration" not in answer.text
    wrong = await locked_client.get("/", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert (await locked_client.get("/", headers={"cookie": f"{COOKIE}=nope"})).status_code == 401


async def test_a_bearer_token_opens_the_pages(locked_client: httpx.AsyncClient) -> None:
    """A valid bearer header opens a page; the health probes need no token."""
    answer = await locked_client.get("/", headers={"authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert "deterioration" in answer.text
    assert (await locked_client.get("/healthz")).status_code == 204


async def test_a_token_in_the_url_becomes_an_http_only_cookie(
    locked_client: httpx.AsyncClient,
) -> None:
    """?token= once redirects to the page without it and sets an HttpOnly cookie that opens it."""
    answer = await locked_client.get("/lag", params={"token": TOKEN})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/lag"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={TOKEN};")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    page = await locked_client.get("/lag", headers={"cookie": f"{COOKIE}={TOKEN}"})
    assert page.status_code == 200
    assert "medmesh-router" in page.text


async def test_pages_carry_a_policy_that_allows_no_script(open_client: httpx.AsyncClient) -> None:
    """Every page forbids scripts and external assets, and is never cached."""
    answer = await open_client.get("/")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["referrer-policy"] == "no-referrer"


def test_the_console_will_not_listen_publicly_without_tokens(sources: FakeSources) -> None:
    """Without tokens a non-loopback listen address is refused; with one it is allowed."""
    with pytest.raises(ValueError, match="MEDMESH_CONSOLE_TOKENS"):
        create_app(ConsoleSettings(http_host="0.0.0.0"), sources)  # noqa: S104 -- the refused case
    create_app(
        ConsoleSettings(http_host="0.0.0.0", console_tokens=SecretStr(TOKEN)),  # noqa: S104 -- allowed with a token
        sources,
    )
