"""/healthz, /readyz and /metrics for services run as faststream ASGI apps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from faststream.asgi import AsgiResponse, get
from faststream.asgi.handlers import GetHandler
from faststream.asgi.types import Scope
from faststream.kafka import KafkaBroker

from medmesh_runtime.metrics import PROMETHEUS_CONTENT_TYPE, prometheus_text

Check = Callable[[], Awaitable[bool]]


def health_routes(
    broker: KafkaBroker, extra_ready: Check | None = None
) -> list[tuple[str, GetHandler]]:
    """Liveness always answers 204; readiness 204 once Kafka (and ``extra_ready``) is up; metrics."""

    @get(include_in_schema=False)
    async def healthz(scope: Scope) -> AsgiResponse:
        return AsgiResponse(b"", 204)

    @get(include_in_schema=False)
    async def readyz(scope: Scope) -> AsgiResponse:
        ready = await broker.ping(timeout=2.0)
        if ready and extra_ready is not None:
            ready = await extra_ready()
        return AsgiResponse(b"", 204 if ready else 503)

    @get(include_in_schema=False)
    async def prometheus(scope: Scope) -> AsgiResponse:
        return AsgiResponse(
            prometheus_text(), 200, headers={"content-type": PROMETHEUS_CONTENT_TYPE}
        )

    return [("/healthz", healthz), ("/readyz", readyz), ("/metrics", prometheus)]
