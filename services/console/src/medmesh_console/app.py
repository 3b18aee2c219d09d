"""The console's ASGI app: read-only HTML pages behind a token, /healthz and /readyz.

Each page reads what it shows when it is asked for (``sources``), computes its view
(``views``) and renders it (``pages``). A read that fails is said on the page (502), never
shown as an empty table.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.routing import Route

from medmesh_cli.ops.connection import ContextError
from medmesh_console import pages
from medmesh_console.settings import ConsoleSettings, check_listen_address
from medmesh_console.sources import LiveSources, Sources
from medmesh_console.views import dead_letter_counts, lag_rows, models_view, report_rows, timelines
from medmesh_contracts.lifecycle import LifecycleError
from medmesh_runtime.health import health_routes
from medmesh_runtime.logging import get_logger
from medmesh_runtime.service import ServiceRuntime

SERVICE = "console"
COOKIE = "console_token"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
READ_METHODS = frozenset({"GET", "HEAD"})
# What a failed read raises: the router unreachable or answering an error, Kafka unreachable or
# a topic missing, a read past its deadline, a record that does not validate.
READ_ERRORS = (httpx.HTTPError, KafkaError, LifecycleError, ContextError, TimeoutError, ValueError)
# No script, no frame, no asset from elsewhere; the token in a first URL never leaves as a referrer.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

log = get_logger("medmesh.console")
T = TypeVar("T")


class Pages:
    """The pages, over one set of sources."""

    def __init__(self, settings: ConsoleSettings, sources: Sources | None) -> None:
        self.settings = settings
        self.sources = sources

    async def _read(self, read: Callable[[], Awaitable[T]]) -> T:
        if self.sources is None:
            raise TimeoutError("the console is still starting")
        async with asyncio.timeout(self.settings.console_read_timeout_s):
            return await read()

    def _failed(self, title: str, path: str, what: str, exc: Exception) -> HTMLResponse:
        problem = f"{type(exc).__name__}: {exc}"
        log.warning("console read failed", page=path, source=what, error=problem)
        return HTMLResponse(pages.page(title, path, pages.error(what, problem)), 502)

    async def models(self, _request: Request) -> HTMLResponse:
        """Models, versions, weights, states and the router's figures."""
        title, path = "Models", "/"
        try:
            view = models_view(await self._read(lambda: self._sources().models()))
        except READ_ERRORS as exc:
            return self._failed(title, path, "the router's /models", exc)
        return HTMLResponse(pages.page(title, path, pages.models_body(view)))

    async def rollouts(self, _request: Request) -> HTMLResponse:
        """Every rollout as a timeline of its decisions."""
        title, path = "Rollouts", "/rollouts"
        try:
            decisions, unreadable = await self._read(lambda: self._sources().decisions())
        except READ_ERRORS as exc:
            return self._failed(title, path, "medmesh.models.audit", exc)
        body = pages.rollouts_body(timelines(decisions), unreadable)
        return HTMLResponse(pages.page(title, path, body))

    async def lag(self, _request: Request) -> HTMLResponse:
        """Consumer lag per group and topic."""
        title, path = "Consumer lag", "/lag"
        try:
            rows = lag_rows(await self._read(lambda: self._sources().lags()))
        except READ_ERRORS as exc:
            return self._failed(title, path, "the consumer groups' offsets", exc)
        return HTMLResponse(pages.page(title, path, pages.lag_body(rows)))

    async def dead_letters(self, _request: Request) -> HTMLResponse:
        """Dead letters per topic and reason."""
        title, path = "Dead letters", "/dead-letters"
        try:
            counts = dead_letter_counts(await self._read(lambda: self._sources().dead_letters()))
        except READ_ERRORS as exc:
            return self._failed(title, path, "the dead-letter topics", exc)
        return HTMLResponse(pages.page(title, path, pages.dead_letters_body(counts)))

    async def reports(self, _request: Request) -> HTMLResponse:
        """The newest reports by pseudonym."""
        title, path = "Reports", "/reports"
        limit = self.settings.console_reports_limit
        try:
            records = await self._read(lambda: self._sources().reports(limit))
        except READ_ERRORS as exc:
            return self._failed(title, path, "medmesh.reports.diagnostic", exc)
        rows, unreadable = report_rows(records, limit)
        return HTMLResponse(pages.page(title, path, pages.reports_body(rows, unreadable, limit)))

    def _sources(self) -> Sources:
        assert self.sources is not None  # noqa: S101 -- _read checked it first
        return self.sources


def _valid(given: str | None, tokens: tuple[str, ...]) -> bool:
    """Whether ``given`` is one of ``tokens`` (compared in constant time, each of them)."""
    if not given:
        return False
    found = False
    for token in tokens:
        found |= hmac.compare_digest(token.encode(), given.encode())
    return found


def guard(app: FastAPI, settings: ConsoleSettings) -> None:
    """Read-only (405 for anything but GET and HEAD) and, with tokens, authenticated: a bearer
    header, the cookie, or ``?token=`` once, answered by a redirect that sets the cookie."""
    tokens = settings.tokens()

    @app.middleware("http")
    async def read_only_and_signed_in(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.method not in READ_METHODS:
            response: Response = Response("read-only", 405, headers={"allow": "GET, HEAD"})
        elif not tokens or request.url.path in OPEN_PATHS:
            response = await call_next(request)
        else:
            response = await _signed_in(request, call_next, tokens, settings)
        response.headers.update(SECURITY_HEADERS)
        return response


async def _signed_in(
    request: Request,
    call_next: Callable[[Request], Awaitable[Response]],
    tokens: tuple[str, ...],
    settings: ConsoleSettings,
) -> Response:
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _valid(bearer.strip(), tokens):
        return await call_next(request)
    if _valid(request.cookies.get(COOKIE), tokens):
        return await call_next(request)
    query = request.query_params.get("token")
    if _valid(query, tokens):
        # The token leaves the URL (history, logs) at once: the same page, without it.
        rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
        response = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), 303)
        response.set_cookie(
            COOKIE,
            query or "",
            httponly=True,
            samesite="strict",
            secure=settings.tls_cert_file is not None,
        )
        return response
    return HTMLResponse(pages.unauthorized(), 401, headers={"www-authenticate": "Bearer"})


def create_app(settings: ConsoleSettings, sources: Sources | None = None) -> FastAPI:
    """Build the console; the router client and Kafka reads are built in its lifespan.

    ``sources`` replaces them (tests: fakes). Raises ValueError when asked to listen beyond
    loopback without tokens."""
    check_listen_address(settings)
    runtime = ServiceRuntime.build(SERVICE, settings, f"medmesh-{SERVICE}")
    broker = runtime.broker
    handlers = Pages(settings, sources)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if not settings.tokens():
            log.warning("no console tokens configured: listening on loopback only")
        async with httpx.AsyncClient(timeout=settings.console_read_timeout_s) as http:
            if handlers.sources is None:
                handlers.sources = LiveSources(settings, http)
            await broker.start()
            await runtime.start()
            log.info("console started", port=settings.console_port)
            try:
                yield
            finally:
                await broker.stop()
                await runtime.stop()

    app = FastAPI(
        title="medmesh console", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    routes: dict[str, Any] = {
        "/": handlers.models,
        "/rollouts": handlers.rollouts,
        "/lag": handlers.lag,
        "/dead-letters": handlers.dead_letters,
        "/reports": handlers.reports,
    }
    for path, handler in routes.items():
        app.add_api_route(path, handler, methods=["GET", "HEAD"], response_class=HTMLResponse)

    async def ready() -> bool:
        return handlers.sources is not None

    for path, check in health_routes(broker, ready):
        app.router.routes.append(Route(path, check, include_in_schema=False))
    guard(app, settings)
    return app
