"""The router service's composition root: medmesh.inference.requests ->
medmesh.model.<name>.v<version>.tasks.

The parts: ``startup`` (the state read back at start, through ``topic_reader``), ``followers``
(registry, heartbeats, observed outcomes), ``requests`` (a poll's requests routed, committed by
``medmesh_runtime.transactional`` one transaction per requests partition) and ``rollout`` (the
readiness audits and the controller, ticked every ``MEDMESH_ROUTER_TICK_S``). Here: the broker,
the publishers, the loops and the order they start in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.types import Scope

from medmesh_contracts import topics
from medmesh_contracts.catalog import SpecCatalog
from medmesh_contracts.events import Producer, schema_of, to_wire, utc_now
from medmesh_contracts.lifecycle import LifecycleDecision, ModelDeployment
from medmesh_router import startup
from medmesh_router.analysis import Analysis, headlines
from medmesh_router.followers import Followers
from medmesh_router.metrics import RouterMetrics
from medmesh_router.readiness import Readiness
from medmesh_router.requests import RequestRouting
from medmesh_router.rollout import Rollout
from medmesh_router.settings import RouterSettings
from medmesh_router.state import RouterState
from medmesh_router.topic_reader import StartupReader, read_topic_to_end
from medmesh_runtime.deadletter import DeadLetters
from medmesh_runtime.kafka import message_headers, stage_clients
from medmesh_runtime.logging import get_logger
from medmesh_runtime.service import ServiceRuntime
from medmesh_runtime.transactional import (
    LoopSettings,
    PoisonIsolation,
    StageClients,
    TransactionalLoop,
)

SERVICE = "router"
log = get_logger("medmesh.router")


class Router:
    """The router's parts, built once here and shared by its loops and handlers."""

    def __init__(
        self,
        settings: RouterSettings,
        read_to_end: StartupReader = read_topic_to_end,
        requests_clients: StageClients | None = None,
    ) -> None:
        self.settings = settings
        self._read_to_end = read_to_end
        self.catalog = SpecCatalog(settings.model_specs_dir)
        self.producer = Producer(service=SERVICE, instance=settings.instance_id)
        self.runtime = ServiceRuntime.build(SERVICE, settings, settings.router_group_id)
        self.broker = self.runtime.broker
        tracer = self.runtime.tracer_provider.get_tracer("medmesh.router")
        readiness = Readiness(require_heartbeats=settings.router_require_heartbeats)
        self.state = RouterState(self.catalog.specs, readiness)
        self.analysis = Analysis(headlines(self.catalog.specs), mirrored=self.state.mirrored)
        metrics = RouterMetrics(self.state)
        self.rollout = Rollout(
            self.state,
            self.analysis,
            self.producer,
            f"controller:{settings.instance_id}",
            self.publish_change,
            self.publish_audit,
            controller=settings.router_controller,
            metrics=metrics,
        )
        self.registry_out = self.broker.publisher(topics.MODELS_REGISTRY, title="model registry")
        self.audit_out = self.broker.publisher(topics.MODELS_AUDIT, title="lifecycle audit")
        learn = startup.spec_learner(self.catalog)
        dead_letters = DeadLetters(self.broker.publisher(topics.ROUTER_DEADLETTER), self.producer)
        self.followers = Followers(self.state, self.analysis, self.rollout, dead_letters, learn)
        self.followers.subscribe(self.broker)
        routing = RequestRouting(
            self.state, self.producer, tracer, settings.router_group_id, metrics
        )
        self.requests = TransactionalLoop(
            requests_clients
            or stage_clients(
                settings, f"medmesh-router-{settings.instance_id}", settings.router_group_id
            ),
            PoisonIsolation(routing.route_records, routing.dead_letter),
            LoopSettings(
                group_id=settings.router_group_id,
                topics=(topics.INFERENCE_REQUESTS,),
                transactional_id_prefix=settings.router_group_id,
                max_records=settings.router_max_batch,
            ),
        )
        self._learn = learn
        self._seeds: list[tuple[ModelDeployment, LifecycleDecision]] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def load(self) -> None:
        """Rebuild the state from what Kafka holds, before Kafka is connected for the rest."""
        loaded = await startup.load(
            self.state,
            self.analysis,
            self.settings,
            self.producer,
            self._read_to_end,
            utc_now(),
            learn=self._learn,
        )
        self.followers.loaded = loaded.offsets
        self._seeds = loaded.seeds

    async def started(self) -> None:
        """After Kafka connected: publish the seeds, then start the controller and requests
        loops (no request is routed before the registry was read)."""
        for deployment, audit in self._seeds:
            await self.publish_change(deployment, audit)
        self._seeds = []
        self._tasks = [
            asyncio.create_task(self._tick_forever(), name="router-controller"),
            asyncio.create_task(self.requests.run(), name="router-requests"),
        ]

    async def stopping(self) -> None:
        """Stop the loops."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def publish_change(self, deployment: ModelDeployment, audit: LifecycleDecision) -> None:
        """Write a new registry record (key = model) and its audit event."""
        await self.registry_out.publish(
            to_wire(deployment),
            key=deployment.model.encode(),
            headers=message_headers(deployment.correlation_id, schema_of(ModelDeployment)),
        )
        await self.publish_audit(audit)

    async def publish_audit(self, audit: LifecycleDecision) -> None:
        """Write one audit event (key = model) and log it."""
        await self.audit_out.publish(
            to_wire(audit),
            key=audit.model.encode(),
            headers=message_headers(audit.correlation_id, schema_of(LifecycleDecision)),
        )
        log.info(
            "lifecycle decision",
            model=audit.model,
            action=audit.action,
            version=audit.version,
            reason=audit.reason,
            weights=audit.weights_after,
            actor=audit.actor,
        )

    async def requests_ready(self) -> bool:
        """The requests stage consumes (for /readyz)."""
        return self.requests.ready

    async def _tick_forever(self) -> None:
        while True:
            try:
                await self.rollout.tick(utc_now())
            except Exception:  # the loop must outlive one bad tick; the error is logged
                log.exception("controller tick failed")
            await asyncio.sleep(self.settings.router_tick_s)


def create_app(
    settings: RouterSettings,
    read_to_end: StartupReader = read_topic_to_end,
    requests_clients: StageClients | None = None,
) -> AsgiFastStream:
    """Build the router app; Kafka connects (and the registry is read) when the app starts.
    ``requests_clients`` replaces the requests stage's aiokafka clients (tests: fakes)."""
    router = Router(settings, read_to_end, requests_clients)

    @get(include_in_schema=False)
    async def models(scope: Scope) -> AsgiResponse:
        view = router.rollout.status(utc_now(), router.followers.unreadable_outcomes)
        return AsgiResponse(
            json.dumps(view).encode(), 200, headers={"content-type": "application/json"}
        )

    return router.runtime.app(
        ready=router.requests_ready,
        routes=[("/models", models)],
        on_startup=[router.load],
        after_startup=[router.started],
        on_shutdown=[router.stopping],
    )
