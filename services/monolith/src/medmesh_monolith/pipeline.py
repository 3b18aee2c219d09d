"""The stages after ingest, called in-process: route -> micro-batch on Triton -> report.

Each stage is the services' own code: ``medmesh_router.routing.route`` over the router's
``RouterState``, ``medmesh_inference.batching.score_tasks`` with the worker's ``TritonModel``
(for an image model after the worker's ``image_inputs.prepare_in_span`` has fetched and
prepared the batch's images from the PACS), and ``medmesh_reporting.handling.ReportHandler``.
A batch Triton or the PACS cannot serve (``ModelUnavailable``) waits, as a worker's does behind
its circuit breaker (``circuit.wait_until_ready`` with the worker's ``servable_probe``), and is
then served again whole: nothing is failed or published meanwhile. What the services do with Kafka between the
stages is done here with one bounded asyncio queue per model version: the requests ingest is
given (``publish_requests``) go to ``InProcessPipeline.accept`` one by one (routing, then the queue),
and a batcher per version takes what is queued (up to the batch size, lingering like a worker for
more) and scores it in one Triton call. Only the edges touch Kafka, through injected
publishers: reports (and reporting's dead letters), failures and shadow results go to the
topics the services write them to.

Handoffs get spans named ``in-process:<topic the services use> publish|process``, so
``medmesh trace`` and the benchmark's per-hop breakdown show the monolith's queue waits beside
the services' Kafka hops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from aiokafka.errors import KafkaError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer

from medmesh_contracts import topics
from medmesh_contracts.events import (
    InferenceCompleted,
    Producer,
    RequestInference,
    RunInference,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import ModelSpec
from medmesh_inference.batching import (
    Available,
    Infer,
    ModelUnavailable,
    Outcome,
    RetryPolicy,
    WorkerIdentity,
    destination,
    score_tasks,
)
from medmesh_inference.circuit import CircuitBackoff, CircuitBreaker, wait_until_ready
from medmesh_inference.image_inputs import ImageInputs, prepare_in_span, servable_probe
from medmesh_reporting.handling import ReportHandler
from medmesh_router.routing import route
from medmesh_router.state import RouterState
from medmesh_runtime.kafka import message_headers
from medmesh_runtime.logging import get_logger
from medmesh_runtime.transactional import OutgoingRecord

log = get_logger("medmesh.monolith")

CONVERSATION_ID = "messaging.message.conversation_id"
IN_PROCESS = "in-process:"
# Publishes one record to an edge topic (topic, key, value, headers) and returns once acked.
Publish = Callable[[str, bytes | None, bytes, Mapping[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class VersionStage:
    """One model version's scoring: the spec, the Triton model and what results are stamped with."""

    spec: ModelSpec
    version: int
    infer: Infer
    ready: Available
    identity: WorkerIdentity
    max_batch: int
    # Fetches and prepares image inputs from the PACS (None: the model reads no image).
    images: ImageInputs | None = None

    @property
    def servable(self) -> Available:
        """The worker's readiness probe: Triton serves the version (and the PACS answers)."""
        return servable_probe(self.ready, self.images)


@dataclass(frozen=True)
class Pending:
    """A routed task waiting for its version's batcher, with the trace it continues."""

    task: RunInference
    key: bytes
    trace_context: otel_context.Context
    queued_ns: int = field(default_factory=time.time_ns)


class ResultRecord:
    """A stand-in for the results-topic record reporting would consume: reporting's dead letters
    name it (offset -1: it never was on Kafka); its value is the result's wire form, made only
    when a dead letter needs it."""

    topic = topics.INFERENCE_RESULTS
    partition = -1
    offset = -1
    headers: tuple[tuple[str, bytes], ...] = ()

    def __init__(self, completed: InferenceCompleted, key: bytes | None) -> None:
        self._completed = completed
        self.key = key

    @cached_property
    def value(self) -> bytes:
        """The result as the worker would have published it."""
        return to_wire(self._completed)


class InProcessPipeline:
    """Routes accepted requests, batches them per model version and reports the results."""

    def __init__(
        self,
        *,
        state: RouterState,
        stages: Sequence[VersionStage],
        reports: ReportHandler,
        publish: Publish,
        router_producer: Producer,
        policy: RetryPolicy,
        tracer: Tracer,
        linger_s: float,
        queue_size: int = 10_000,
        unavailable_pause_s: float = 0.5,
        backoff: CircuitBackoff | None = None,
    ) -> None:
        self.state = state
        self.stages = {(s.spec.name, s.version): s for s in stages}
        self.reports = reports
        self.publish = publish
        self.router_producer = router_producer
        self.policy = policy
        self.tracer = tracer
        self.linger_s = linger_s
        self.unavailable_pause_s = unavailable_pause_s
        # The waits between readiness probes while a version cannot be served.
        self.backoff = backoff or CircuitBackoff()
        self.queues: dict[tuple[str, int], asyncio.Queue[Pending]] = {
            key: asyncio.Queue(maxsize=queue_size) for key in self.stages
        }
        self._tasks: list[asyncio.Task[None]] = []
        self.scored = 0
        self.in_flight = 0
        self.reported = 0

    # --- called with the requests ingest hands over (publish_requests), per request ----------

    async def accept(self, request: RequestInference) -> None:
        """Route one request (as the router would) and queue its tasks; waits only while a
        version's queue is full (backpressure up to ingest's HTTP answer)."""
        with self.tracer.start_as_current_span(
            "router.route",
            attributes={
                "medmesh.model": request.model,
                CONVERSATION_ID: request.correlation_id,
            },
        ) as span:
            routed = route(request, self.state.tables, self.router_producer, utc_now())
            span.set_attribute("medmesh.model_version", routed.primary.task.model_version)
            span.set_attribute("medmesh.route", routed.primary.task.route.reason)
            span.set_attribute("medmesh.shadow_copies", len(routed.shadows))
            for item in (routed.primary, *routed.shadows):
                key = (request.model, item.task.model_version)
                with self.tracer.start_as_current_span(
                    f"{IN_PROCESS}{item.topic} publish",
                    kind=SpanKind.PRODUCER,
                    attributes={CONVERSATION_ID: request.correlation_id},
                ):
                    pending = Pending(
                        item.task, request.patient_pseudonym.encode(), otel_context.get_current()
                    )
                await self.queues[key].put(pending)

    # --- batchers ----------------------------------------------------------------------------

    def start(self, on_crash: Callable[[BaseException], None] | None = None) -> None:
        """Start one batcher per model version; ``on_crash`` is told when one ends by an error
        that is not Kafka's (a bug: the app stops the process rather than idle with a dead loop)."""

        def ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None and on_crash is not None:
                on_crash(task.exception() or RuntimeError("batcher ended"))

        for key, stage in self.stages.items():
            task = asyncio.create_task(self._batcher(stage), name=f"monolith-{key[0]}-v{key[1]}")
            task.add_done_callback(ended)
            self._tasks.append(task)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until every queue is empty and no batch is in flight."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._busy():  # noqa: ASYNC110 -- once, at shutdown
            await asyncio.sleep(0.05)

    def _busy(self) -> bool:
        return bool(self.in_flight) or any(not q.empty() for q in self.queues.values())

    async def stop(self) -> None:
        """Stop the batchers (what is still queued is dropped: it was never acknowledged as
        durable; the HTTP sender got 202 for it, which is the monolith's weaker promise)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _batcher(self, stage: VersionStage) -> None:
        queue = self.queues[(stage.spec.name, stage.version)]
        while True:
            batch = await self.take_batch(queue, stage.max_batch)
            self.in_flight += 1
            try:
                await self._serve_until_published(stage, batch)
            finally:
                self.in_flight -= 1

    async def _serve_until_published(self, stage: VersionStage, batch: Sequence[Pending]) -> None:
        """Serve a batch; when Kafka refuses an outcome, serve it again (at-least-once, as a
        worker redoes an uncommitted batch: a report may then appear twice, with the same ids)."""
        while True:
            try:
                await self.serve(stage, batch)
            except KafkaError as exc:
                log.warning("publishing outcomes failed; the batch will be redone", error=str(exc))
                await asyncio.sleep(self.unavailable_pause_s)
            else:
                return

    async def take_batch(self, queue: asyncio.Queue[Pending], max_batch: int) -> list[Pending]:
        """What is queued (at least one task, at most ``max_batch``), waiting up to the linger
        for more once the first arrived, as a worker does with its Kafka fetches."""
        batch = [await queue.get()]
        deadline = time.monotonic() + self.linger_s
        while len(batch) < max_batch:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def serve(self, stage: VersionStage, batch: Sequence[Pending]) -> None:
        """Score one batch (its images prepared first; waiting out Triton or the PACS being
        away), then report or publish each outcome."""
        received_ns = time.time_ns()
        tasks = [p.task for p in batch]
        while True:
            with self.tracer.start_as_current_span(
                "inference.batch",
                attributes={
                    "medmesh.batch_size": len(tasks),
                    "medmesh.model": stage.spec.name,
                    "medmesh.model_version": stage.version,
                },
            ) as batch_span:
                try:
                    prepared = await prepare_in_span(stage.images, tasks, self.tracer)
                    outcomes = await score_tasks(
                        tasks,
                        stage.spec,
                        stage.infer,
                        stage.identity,
                        self.policy,
                        utc_now,
                        stage.ready,
                        prepared,
                    )
                except ModelUnavailable as exc:
                    log.warning("version unavailable; the batch waits", error=str(exc)[:300])
                    unavailable = True
                else:
                    unavailable = False
            if unavailable:
                await self._wait_until_servable(stage)
                continue
            break
        self.scored += len(outcomes)
        link = trace.Link(batch_span.get_span_context())
        sends: list[Awaitable[None]] = []
        for outcome, pending in zip(outcomes, batch, strict=True):
            sends.extend(
                self._after_scoring(outcome, pending, stage, received_ns, len(batch), link)
            )
        await asyncio.gather(*sends)

    async def _wait_until_servable(self, stage: VersionStage) -> None:
        """Pause, then probe with the breaker's backoff until the version can be served again."""
        await asyncio.sleep(self.unavailable_pause_s)
        await wait_until_ready(
            stage.servable,
            CircuitBreaker(self.backoff, time.monotonic),
            asyncio.sleep,
            model=stage.spec.name,
            version=stage.version,
        )

    def _after_scoring(
        self,
        outcome: Outcome,
        pending: Pending,
        stage: VersionStage,
        received_ns: int,
        batch_size: int,
        link: trace.Link,
    ) -> list[Awaitable[None]]:
        task_topic = topics.model_task_topic(stage.spec.name, stage.version)
        with self.tracer.start_as_current_span(
            f"{IN_PROCESS}{task_topic} process",
            context=pending.trace_context,
            kind=SpanKind.CONSUMER,
            links=[link],
            start_time=received_ns,
            attributes={
                CONVERSATION_ID: outcome.correlation_id,
                "medmesh.batch_size": batch_size,
            },
        ):
            where = destination(outcome)
            if where != "results" or not isinstance(outcome, InferenceCompleted):
                topic = (
                    topics.INFERENCE_FAILED
                    if where == "failed"
                    else topics.INFERENCE_SHADOW_RESULTS
                )
                headers = message_headers(outcome.correlation_id, schema_of(type(outcome)))
                encoded = tuple((name, value.encode()) for name, value in headers.items())
                return [self._send(OutgoingRecord(topic, pending.key, to_wire(outcome), encoded))]
            with self.tracer.start_as_current_span(
                f"{IN_PROCESS}{topics.INFERENCE_RESULTS} process",
                kind=SpanKind.CONSUMER,
                attributes={CONVERSATION_ID: outcome.correlation_id},
            ):
                out = self.reports.for_result(ResultRecord(outcome, pending.key), outcome)
                return [self._send(o) for o in out]

    def _send(self, out: OutgoingRecord) -> Awaitable[None]:
        headers = {name: value.decode() for name, value in out.headers}
        if out.topic == topics.REPORTS_DIAGNOSTIC:
            self.reported += 1
        # ensure_future inside the current span: the publish keeps this request's trace.
        return asyncio.ensure_future(self.publish(out.topic, out.key, out.value, headers))
