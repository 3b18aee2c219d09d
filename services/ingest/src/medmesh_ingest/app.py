"""The ingest service's composition root: FHIR over HTTP (``http_api``) and from
medmesh.fhir.inbound (``inbound``), over one set of parts (``parts.Ingest``).

Here: the Kafka clients, the transactional inbound loop, the HTTP path's group commit, the
readings state rebuilt on start, and the order things start and stop in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from starlette.routing import Route

from medmesh_contracts import topics
from medmesh_ingest.auth import check_listen_address
from medmesh_ingest.http_api import fhir_routes
from medmesh_ingest.inbound import DeliverRequests, InboundPoll
from medmesh_ingest.parts import SERVICE, Ingest
from medmesh_ingest.settings import DEVELOPMENT_PSEUDONYM_KEY, IngestSettings
from medmesh_ingest.state_topic import ReadingsFollower
from medmesh_runtime.health import health_routes
from medmesh_runtime.kafka import stage_clients
from medmesh_runtime.logging import get_logger
from medmesh_runtime.otel import use_stable_http_conventions
from medmesh_runtime.service import ServiceRuntime
from medmesh_runtime.transactional import GroupCommit, LoopSettings, StageClients, TransactionalLoop

log = get_logger("medmesh.ingest")


async def _nothing() -> None:
    """No hook: ingest as a service."""


def create_app(
    settings: IngestSettings,
    *,
    service: str = SERVICE,
    clients: StageClients | None = None,
    publish_requests: DeliverRequests | None = None,
    on_start: Callable[[], Awaitable[None]] = _nothing,
    on_stop: Callable[[], Awaitable[None]] = _nothing,
) -> FastAPI:
    """Build the ingest ASGI app; Kafka connects in its lifespan, not here.

    ``service`` names the process in logs, spans and metrics (the monolith topology serves this
    same app as "monolith"). ``clients`` replaces the transactional Kafka clients (tests:
    in-memory fakes). Raises ValueError when asked to listen beyond loopback without bearer
    tokens.

    The monolith's points of composition (by default: ingest as a service): ``publish_requests``
    takes every payload's requests, from HTTP and from the inbound topic, instead of their being
    produced (the patient states still commit to Kafka in their transaction); ``on_start`` is
    awaited before ingest starts anything, ``on_stop`` once it takes no more payloads (the
    inbound poll stopped) and before its Kafka clients stop.
    """
    check_listen_address(settings)
    runtime = ServiceRuntime.build(service, settings, settings.ingest_group_id)
    broker = runtime.broker
    tracer = runtime.tracer_provider.get_tracer("medmesh.ingest")
    ingest = Ingest(settings, tracer, publish_requests=publish_requests)
    kafka = clients or stage_clients(
        settings, f"medmesh-{service}-{settings.instance_id}", settings.ingest_group_id
    )
    inbound = TransactionalLoop(
        kafka,
        InboundPoll(ingest, settings.ingest_group_id, deliver_requests=publish_requests),
        LoopSettings(
            group_id=settings.ingest_group_id,
            topics=(topics.FHIR_INBOUND,),
            transactional_id_prefix=settings.ingest_group_id,
            max_records=settings.inbound_max_batch,
        ),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await on_start()
        if settings.pseudonym_key.get_secret_value() == DEVELOPMENT_PSEUDONYM_KEY:
            log.warning("development pseudonym key in use; set MEDMESH_PSEUDONYM_KEY in production")
        if not ingest.auth.required:
            log.warning("no bearer tokens configured: listening on loopback only")
        follower = ReadingsFollower(ingest.store, settings, ingest.service.subscriptions)
        if settings.rebuild_readings_on_start:
            ingest.records.state_partitions = await follower.start()
        ingest.http_client = httpx.AsyncClient(follow_redirects=False)
        await broker.start()
        ingest.broker = broker
        # Per instance: a restart with the same MEDMESH_INSTANCE_ID aborts what it left open.
        ingest.group_commit = GroupCommit(
            kafka.producer, f"{settings.ingest_group_id}-http-{settings.instance_id}"
        )
        await ingest.group_commit.start()
        inbound_task = asyncio.create_task(inbound.run(), name="ingest-inbound")
        await runtime.start()
        ingest.ready = True
        log.info("ingest started", models=sorted(ingest.specs), port=settings.ingest_port)
        try:
            yield
        finally:
            ingest.ready = False
            inbound_task.cancel()
            await asyncio.gather(inbound_task, return_exceptions=True)
            await on_stop()
            await ingest.group_commit.stop()
            await broker.stop()
            await follower.stop()
            await ingest.http_client.aclose()
            await runtime.stop()

    # The API description is for development (MEDMESH_HTTP_DOCS): in production it only tells a
    # caller which routes to probe.
    docs = settings.http_docs
    app = FastAPI(
        title="medmesh ingest",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.include_router(fhir_routes(ingest))
    # One SERVER span per request, named by its route ("POST /fhir"), and the http.server.*
    # metrics, by OpenTelemetry's stable HTTP conventions (durations in seconds); the probes
    # would only add noise. No header is recorded (Authorization carries a token).
    use_stable_http_conventions()
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=runtime.tracer_provider,
        excluded_urls="/healthz,/readyz",
        exclude_spans=["receive", "send"],
    )

    async def ready() -> bool:
        return ingest.ready

    # The same /healthz and /readyz as every service's (an ASGI route each).
    for path, handler in health_routes(broker, ready):
        app.router.routes.append(Route(path, handler, include_in_schema=False))
    # /metrics is answered in front of this app by medmesh_runtime.serve (metricsgate).

    app.state.broker = broker
    app.state.ingest = ingest
    return app
