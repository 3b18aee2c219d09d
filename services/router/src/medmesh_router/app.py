"""The router service: medmesh.inference.requests -> medmesh.model.<name>.v<version>.tasks.

Thin by design: decoding and publishing here, the decisions in ``routing`` (where a request
goes), ``controller`` (what a rollout does next) and ``medmesh_contracts.lifecycle`` (how the
registry record changes). On start the router reads the compacted registry topic to its end
(seeding a model from its spec's weights when the registry has none), then follows the registry,
worker heartbeats, results and failures, and runs the rollout controller every tick. Requests
are routed by ``medmesh_runtime.transactional``: a poll's tasks and dead letters are committed
with its offsets, one transaction per requests partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.types import Scope
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from medmesh_contracts import topics
from medmesh_contracts.catalog import SpecCatalog
from medmesh_contracts.events import (
    InferenceCompleted,
    InferenceFailed,
    Producer,
    RunInference,
    WorkerHeartbeat,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.lifecycle import (
    LifecycleDecision,
    ModelDeployment,
    decision,
    rollout_active,
)
from medmesh_router.analysis import Analysis, headlines
from medmesh_router.readiness import Readiness
from medmesh_router.rollout import Rollout
from medmesh_router.routing import (
    NotARequestError,
    RoutedWire,
    UnknownModelError,
    route_key,
    route_wire,
)
from medmesh_router.settings import RouterSettings
from medmesh_router.startup import apply_registry, parse_record, seed_unknown
from medmesh_router.state import RouterState
from medmesh_runtime.deadletter import DeadLetters, dead_letter_record
from medmesh_runtime.kafka import (
    aiokafka_security,
    message_headers,
    read_to_end,
    record_headers,
    stage_clients,
    topic_partitions,
)
from medmesh_runtime.logging import get_logger
from medmesh_runtime.service import ServiceRuntime
from medmesh_runtime.telemetry import consumer_span, publish_headers
from medmesh_runtime.transactional import (
    LoopSettings,
    OutgoingRecord,
    PoisonIsolation,
    StageClients,
    TransactionalLoop,
    encoded_headers,
)

SERVICE = "router"
Outcome = TypeVar("Outcome", InferenceCompleted, InferenceFailed)
log = get_logger("medmesh.router")


@dataclass(frozen=True)
class Consumed:
    """One record read at start, with where it was in its topic."""

    partition: int
    offset: int
    value: bytes | None


class StartupReader(Protocol):
    """Reads a topic to its current end at start: from its beginning (the registry, heartbeats)
    or from the first record at or after ``since`` (results and failures of a rollout step).
    With ``apply``, each record is handed to it as it arrives and none is kept (the list is
    empty): results embed whole requests, an hour of them must not sit in memory."""

    def __call__(
        self,
        settings: RouterSettings,
        topic: str,
        /,
        since: datetime | None = None,
        apply: Callable[[Consumed], None] | None = None,
    ) -> Awaitable[list[Consumed]]: ...


# How far back a restarted router reads results and failures to rebuild a rollout step's
# figures: bounds its start time on a busy pipeline (a step longer than this restarts counting).
FIGURES_REBUILD_MAX = timedelta(hours=1)


async def read_topic_to_end(
    settings: RouterSettings,
    topic: str,
    since: datetime | None = None,
    apply: Callable[[Consumed], None] | None = None,
) -> list[Consumed]:
    """Every record of ``topic`` (from ``since`` when given) up to its end at the time of the
    call, in order per partition."""
    # read_committed: results and failures are produced in transactions (an aborted one is
    # not evidence), and so is nothing else read here.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        isolation_level="read_committed",
        client_id=f"medmesh-router-start-{settings.instance_id}",
        **aiokafka_security(settings),
    )
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        if not partitions:
            raise RuntimeError(f"topic {topic} does not exist")
        found: list[Consumed] = []

        def keep(record: Any) -> None:
            consumed = Consumed(record.partition, record.offset, record.value)
            if apply is None:
                found.append(consumed)
            else:
                apply(consumed)

        await read_to_end(
            consumer,
            partitions,
            keep,
            since_ms=None if since is None else int(since.timestamp() * 1000),
            timeout_s=settings.router_registry_timeout_s,
        )
        return found
    finally:
        await consumer.stop()


class Router:
    """The router's parts, built once at the bootstrap point and shared by its handlers."""

    def __init__(
        self,
        settings: RouterSettings,
        read_to_end: StartupReader = read_topic_to_end,
        requests_clients: StageClients | None = None,
    ) -> None:
        self.settings = settings
        self._read_to_end = read_to_end
        self.catalog = SpecCatalog(settings.model_specs_dir)
        self.specs = self.catalog.specs
        self.producer = Producer(service=SERVICE, instance=settings.instance_id)
        self.runtime = ServiceRuntime.build(SERVICE, settings, settings.router_group_id)
        self.tracer_provider = self.runtime.tracer_provider
        self.broker = self.runtime.broker
        self.state = RouterState(
            self.specs, Readiness(require_heartbeats=settings.router_require_heartbeats)
        )
        self.analysis = Analysis(headlines(self.specs), mirrored=self._mirrored)
        self.rollout = Rollout(
            self.state,
            self.analysis,
            self.producer,
            f"controller:{settings.instance_id}",
            self.publish_change,
            self.publish_audit,
            controller=settings.router_controller,
        )
        # Last offset read by load(), per (topic, partition): the followers skip up to there.
        self.loaded: dict[tuple[str, int], int] = {}
        self._unpublished: list[tuple[ModelDeployment, LifecycleDecision]] = []
        self._loop_task: asyncio.Task[None] | None = None
        # Results and failures that did not parse (skipped as evidence; reporting dead-letters).
        self.unreadable_outcomes = 0
        self.tracer = self.tracer_provider.get_tracer("medmesh.router")
        self.registry_out = self.broker.publisher(topics.MODELS_REGISTRY, title="model registry")
        self.audit_out = self.broker.publisher(topics.MODELS_AUDIT, title="lifecycle audit")
        self.dead_letters = DeadLetters(
            self.broker.publisher(topics.ROUTER_DEADLETTER), self.producer
        )
        self.requests = TransactionalLoop(
            requests_clients or _requests_clients(settings),
            PoisonIsolation(self.route_records, self._dead_letter),
            LoopSettings(
                group_id=settings.router_group_id,
                topics=(topics.INFERENCE_REQUESTS,),
                transactional_id_prefix=settings.router_group_id,
                max_records=settings.router_max_batch,
            ),
        )
        self._requests_task: asyncio.Task[None] | None = None
        self._subscribe()

    def _learn_versions(self, deployment: ModelDeployment) -> None:
        """A registry record naming a version the specs lack: read the specs again (a hot
        deploy added it), so the version can be routed without a restart."""
        for v in deployment.versions:
            if not self.catalog.learn(deployment.model, v.version):
                log.warning(
                    "registry names a model version the specs do not declare; not routed",
                    model=deployment.model,
                    model_version=v.version,
                    spec_error=self.catalog.last_error,
                )

    async def requests_ready(self) -> bool:
        """The requests stage consumes (for /readyz)."""
        return self.requests.ready

    def _mirrored(self, model: str) -> bool:
        table = self.state.tables.get(model)
        return table is not None and bool(table.shadows)

    # --- start, stop, registry --------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild the state from the registry; seed models the registry does not know yet."""
        now = utc_now()
        registry = await self._read_to_end(self.settings, topics.MODELS_REGISTRY)
        last = apply_registry(self.state, registry, now, learn=self._learn_versions)
        for partition, offset in last.items():
            self.loaded[(topics.MODELS_REGISTRY, partition)] = offset
        for record in await self._read_to_end(self.settings, topics.MODELS_STATUS):
            self.loaded[(topics.MODELS_STATUS, record.partition)] = record.offset
            beat = parse_record(WorkerHeartbeat, record)
            if beat is not None:
                self.state.readiness.observe(beat)
        self.state.refresh(now)  # readiness as of now: a restart audits no change
        await self._rebuild_figures(now)
        changed_by = f"router:{self.settings.instance_id}"
        for seeded in seed_unknown(self.state, self.producer, now, changed_by):
            audit = decision(
                None,
                seeded,
                "seed",
                seeded.changed_by,
                "registry empty: spec weights",
                self.producer,
                now,
            )
            self._unpublished.append((seeded, audit))
        log.info(
            "registry loaded",
            models={m: d.weights for m, d in self.state.deployments.items()},
            servable={
                f"{m}-v{v.version}": self.state.servable(m, v.version, now)
                for m, d in self.state.deployments.items()
                for v in d.versions
            },
        )

    async def _rebuild_figures(self, now: datetime) -> None:
        """Results and failures since the earliest step of a progressing rollout began, so a
        restart neither forgets a step's evidence nor makes it start counting again. Best
        effort: a read that runs out of time leaves the figures partial (logged), it does not
        stop the router from starting."""
        starts = [
            d.rollout.step_started_at
            for d in self.state.deployments.values()
            if rollout_active(d) and d.rollout.step_started_at is not None
        ]
        if not starts:
            return
        since = max(min(starts), now - FIGURES_REBUILD_MAX)
        read = [0]

        def completed(record: Consumed) -> None:
            event = parse_record(InferenceCompleted, record, owned=False)
            if event is not None:
                self.analysis.completed(event)
                read[0] += 1

        def failed(record: Consumed) -> None:
            event = parse_record(InferenceFailed, record, owned=False)
            if event is not None:
                self.analysis.failed(event)
                read[0] += 1

        sources = (
            (topics.INFERENCE_RESULTS, completed),
            (topics.INFERENCE_SHADOW_RESULTS, completed),
            (topics.INFERENCE_FAILED, failed),
        )
        try:
            for topic, apply in sources:
                await self._read_to_end(self.settings, topic, since=since, apply=apply)
        except TimeoutError:
            log.warning(
                "rollout figures only partly rebuilt: reading them took too long",
                since=since.isoformat(),
                records=read[0],
            )
            return
        log.info("rollout figures rebuilt", since=since.isoformat(), records=read[0])

    async def started(self) -> None:
        """After Kafka connected: publish seeds, then start the readiness and controller loop."""
        for deployment, audit in self._unpublished:
            await self.publish_change(deployment, audit)
        self._unpublished.clear()
        self._loop_task = asyncio.create_task(self._loop(), name="router-controller")
        self._requests_task = asyncio.create_task(self.requests.run(), name="router-requests")

    async def stopping(self) -> None:
        """Stop the loops."""
        for task in (self._requests_task, self._loop_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def publish_change(self, deployment: ModelDeployment, audit: LifecycleDecision) -> None:
        """Write a new registry record (key = model) and its audit event."""
        key = deployment.model.encode()
        await self.registry_out.publish(
            to_wire(deployment),
            key=key,
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

    # --- the loop: readiness and the rollout controller -------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self.rollout.tick(utc_now())
            except Exception:  # the loop must outlive one bad tick; the error is logged
                log.exception("controller tick failed")
            await asyncio.sleep(self.settings.router_tick_s)

    # --- handlers ---------------------------------------------------------------------------

    def _subscribe(self) -> None:
        broker = self.broker

        @broker.subscriber(
            topics.MODELS_REGISTRY, auto_offset_reset="earliest", title="model registry (follow)"
        )
        async def on_registry(message: KafkaMessage) -> None:
            record: Any = message.raw_message
            if self._seen_at_start(record) or not record.value:
                return  # read at start already (or a tombstone)
            try:
                deployment = ModelDeployment.model_validate_json(record.value)
            except ValidationError as exc:
                await self.dead_letters.send(record, f"{type(exc).__name__}: {exc}")
                return
            self._learn_versions(deployment)
            if self.state.apply(deployment, utc_now()):
                log.info(
                    "registry changed",
                    model=deployment.model,
                    revision=deployment.revision,
                    weights=deployment.weights,
                    by=deployment.changed_by,
                )

        @broker.subscriber(
            topics.MODELS_STATUS, auto_offset_reset="earliest", title="worker heartbeats"
        )
        async def on_heartbeat(message: KafkaMessage) -> None:
            record: Any = message.raw_message
            if self._seen_at_start(record) or not record.value:
                return
            try:
                beat = WorkerHeartbeat.model_validate_json(record.value)
            except ValidationError as exc:
                await self.dead_letters.send(record, f"{type(exc).__name__}: {exc}")
                return
            self.state.readiness.observe(beat)
            now = utc_now()
            if (now - beat.sent_at).total_seconds() <= beat.interval_s:
                # A fresh beat takes effect now; old ones replayed at start wait for the tick,
                # so the replay does not audit every intermediate state.
                await self.rollout.audit_readiness(now)

        # Results and failures are only observed here (reporting owns them): a record that does
        # not parse is reporting's dead letter, so the router logs and counts it (it is evidence
        # the rollout controller did not get) without a second dead letter.
        # read_committed: outcomes are produced in transactions; an aborted one is not evidence.
        @broker.subscriber(
            topics.INFERENCE_RESULTS, isolation_level="read_committed", title="results (observed)"
        )
        async def on_result(message: KafkaMessage) -> None:
            self._observe(message.raw_message, InferenceCompleted, self.analysis.completed)

        @broker.subscriber(
            topics.INFERENCE_SHADOW_RESULTS,
            isolation_level="read_committed",
            title="shadow results (observed)",
        )
        async def on_shadow_result(message: KafkaMessage) -> None:
            self._observe(message.raw_message, InferenceCompleted, self.analysis.completed)

        @broker.subscriber(
            topics.INFERENCE_FAILED, isolation_level="read_committed", title="failures (observed)"
        )
        async def on_failed(message: KafkaMessage) -> None:
            self._observe(message.raw_message, InferenceFailed, self.analysis.failed)

    def _observe(self, record: Any, model: type[Outcome], apply: Callable[[Outcome], None]) -> None:
        """Feed one observed outcome to the analysis; one that does not parse is logged and
        counted (``GET /models``: ``unreadable_outcomes``)."""
        try:
            event = model.model_validate_json(record.value or b"")
        except ValidationError as exc:
            self.unreadable_outcomes += 1
            log.warning(
                "an outcome the rollout controller cannot read was skipped",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                errors=exc.error_count(),
            )
            return
        apply(event)

    async def route_records(self, records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        """Each request's tasks (or its dead letter), to commit with the poll's offsets."""
        routed = [self._route_record(record) for record in records]
        log.info(
            "requests routed",
            records=len(records),
            tasks=sum(len(out) for out in routed),
        )
        return routed

    def _route_record(self, record: Any) -> list[OutgoingRecord]:
        """Route one request on its key and headers, in its own trace (each request continues
        the trace in its headers: the poll has none of its own)."""
        with consumer_span(self.tracer, record, self.settings.router_group_id):
            try:
                key = route_key(record.key, record_headers(record), record.value)
                with self.tracer.start_as_current_span(
                    "router.route", attributes={"medmesh.model": key.model}
                ) as span:
                    tasks = route_wire(
                        key, record.value, self.state.tables, self.producer, utc_now()
                    )
                    span.set_attribute("medmesh.model_version", tasks[0].version)
                    span.set_attribute("medmesh.route", tasks[0].decision.reason)
                    span.set_attribute("medmesh.route_detail", tasks[0].decision.detail)
                    span.set_attribute("medmesh.shadow_copies", len(tasks) - 1)
            except (ValidationError, UnknownModelError, NotARequestError) as exc:
                return [self._dead_letter(record, f"{type(exc).__name__}: {exc}")]
            # DEBUG: per request at the router's rate, the poll's summary is logged at INFO.
            log.debug(
                "request routed",
                correlation_id=key.correlation_id,
                model=key.model,
                model_version=tasks[0].version,
                route=tasks[0].decision.detail,
                shadows=[t.version for t in tasks[1:]],
            )
            return [self._task_record(task, record.key, key.correlation_id) for task in tasks]

    def _task_record(
        self, task: RoutedWire, key: bytes | None, correlation_id: str
    ) -> OutgoingRecord:
        headers = publish_headers(self.tracer, task.topic, correlation_id, schema_of(RunInference))
        return OutgoingRecord(task.topic, key, task.value, encoded_headers(headers))

    def _dead_letter(self, record: Any, reason: str) -> OutgoingRecord:
        log.warning(
            "request dead-lettered",
            partition=record.partition,
            offset=record.offset,
            reason=reason[:500],
        )
        return dead_letter_record(topics.ROUTER_DEADLETTER, record, reason, self.producer)

    def _seen_at_start(self, record: Any) -> bool:
        loaded = self.loaded.get((record.topic, record.partition), -1)
        return bool(record.offset <= loaded)


def _requests_clients(settings: RouterSettings) -> StageClients:
    return stage_clients(
        settings, f"medmesh-router-{settings.instance_id}", settings.router_group_id
    )


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
        body = json.dumps(router.rollout.status(utc_now(), router.unreadable_outcomes)).encode()
        return AsgiResponse(body, 200, headers={"content-type": "application/json"})

    return router.runtime.app(
        ready=router.requests_ready,
        routes=[("/models", models)],
        on_startup=[router.load],
        after_startup=[router.started],
        on_shutdown=[router.stopping],
    )
