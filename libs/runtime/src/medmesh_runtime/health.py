"""/healthz and /readyz of every service: the faststream ASGI apps' (``ServiceRuntime.app``) and
ingest's FastAPI app (mounted as ASGI routes).

/metrics is not among them: ``serve`` answers it in front of every app (``metricsgate``), on the
port and with the token the settings ask for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from faststream.asgi import AsgiResponse, get
from faststream.asgi.handlers import GetHandler
from faststream.asgi.types import Scope
from faststream.kafka import KafkaBroker

Check = Callable[[], Awaitable[bool]]


def health_routes(
    broker: KafkaBroker, extra_ready: Check | None = None
) -> list[tuple[str, GetHandler]]:
    """Liveness always answers 204; readiness 204 once Kafka (and ``extra_ready``) is up."""

    @get(include_in_schema=False)
    async def healthz(scope: Scope) -> AsgiResponse:
        return AsgiResponse(b"", 204)

    @get(include_in_schema=False)
    async def readyz(scope: Scope) -> AsgiResponse:
        ready = await broker.ping(timeout=2.0)
        if ready and extra_ready is not None:
            ready = await extra_ready()
        return AsgiResponse(b"", 204 if ready else 503)

    return [("/healthz", healthz), ("/readyz", readyz)]
