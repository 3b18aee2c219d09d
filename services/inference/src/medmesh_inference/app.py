"""One inference worker: medmesh.model.<name>.v<version>.tasks -> Triton -> results or failures.

Micro-batching comes from the batch subscriber: it takes what Kafka has buffered, up to the
model's max batch size, waiting at most ``batch_wait_ms``. Offsets are committed only after every
result and failure of the batch is acknowledged by Kafka (the handler returns after publishing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faststream.asgi import AsgiFastStream
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import propagate, trace
from pydantic import ValidationError

from medmesh_contracts import topics
from medmesh_contracts.events import (
    InferenceCompleted,
    Producer,
    RunInference,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import ModelSpec, load_specs
from medmesh_inference.batching import RetryPolicy, WorkerIdentity, score_tasks
from medmesh_inference.settings import WorkerSettings
from medmesh_inference.triton import TritonModel
from medmesh_runtime.deadletter import DeadLetters
from medmesh_runtime.health import health_routes
from medmesh_runtime.kafka import (
    CONSUMER_ACK_POLICY,
    build_broker,
    message_headers,
    record_headers,
)
from medmesh_runtime.logging import configure_logging, get_logger
from medmesh_runtime.telemetry import configure_service_tracing

SERVICE = "inference"
log = get_logger("medmesh.inference")


class WorkerState:
    """Clients built at startup and shared by the handler (the one injection point)."""

    triton: TritonModel | None = None
    identity: WorkerIdentity | None = None


def create_app(settings: WorkerSettings) -> AsgiFastStream:
    """Build the worker app for one model version; Triton and Kafka connect at startup."""
    configure_logging(SERVICE, settings.log_level)
    tracer_provider = configure_service_tracing(
        f"{SERVICE}-{settings.worker_model}-v{settings.worker_model_version}", settings
    )
    tracer = tracer_provider.get_tracer("medmesh.inference")
    spec = load_specs(settings.model_specs_dir)[settings.worker_model]
    version = spec.version(settings.worker_model_version)
    producer = Producer(service=SERVICE, instance=settings.instance_id)
    policy = RetryPolicy(
        max_attempts=settings.triton_max_attempts,
        initial_backoff_s=settings.triton_backoff_initial_ms / 1000,
    )
    broker = build_broker(settings, SERVICE, tracer_provider)
    results_out = broker.publisher(topics.INFERENCE_RESULTS, title="inference results")
    failed_out = broker.publisher(topics.INFERENCE_FAILED, title="failed inference")
    dead_letters = DeadLetters(broker.publisher(topics.INFERENCE_DEADLETTER), producer)
    state = WorkerState()
    task_topic = topics.model_task_topic(spec.name, version.version)

    @broker.subscriber(
        task_topic,
        batch=True,
        max_records=spec.triton.max_batch_size,
        batch_timeout_ms=settings.batch_wait_ms,
        group_id=settings.group_id,
        auto_offset_reset="earliest",
        ack_policy=CONSUMER_ACK_POLICY,
        title=f"{spec.name} v{version.version} tasks",
    )
    async def on_tasks(message: KafkaMessage) -> None:
        triton, identity = state.triton, state.identity
        if triton is None or identity is None:
            raise RuntimeError("the worker consumed before Triton was connected")
        records: tuple[Any, ...] = tuple(
            message.raw_message
        )  # a batch message holds a tuple of records
        tasks: list[RunInference] = []
        sources: list[Any] = []
        for record in records:
            try:
                tasks.append(RunInference.model_validate_json(record.value))
                sources.append(record)
            except ValidationError as exc:
                await dead_letters.send(record, f"not a RunInference: {exc.error_count()} errors")
        if not tasks:
            return
        with tracer.start_as_current_span(
            "inference.batch",
            attributes={
                "medmesh.batch_size": len(tasks),
                "medmesh.model": spec.name,
                "medmesh.model_version": version.version,
            },
        ) as batch_span:
            outcomes = await score_tasks(tasks, spec, triton.infer, identity, policy, utc_now)
        batch_link = trace.Link(batch_span.get_span_context())
        sends = []
        for outcome, record in zip(outcomes, sources, strict=True):
            # Each request keeps its own trace: continue it from the task's headers and link
            # the shared batch span, so one clinical request stays one trace end to end.
            request_context = propagate.extract(record_headers(record))
            with tracer.start_as_current_span(
                "inference.result", context=request_context, links=[batch_link]
            ):
                out = results_out if isinstance(outcome, InferenceCompleted) else failed_out
                sends.append(
                    asyncio.ensure_future(
                        out.publish(
                            to_wire(outcome),
                            key=record.key,
                            headers=message_headers(
                                outcome.correlation_id, schema_of(type(outcome))
                            ),
                            correlation_id=outcome.correlation_id,
                        )
                    )
                )
        await asyncio.gather(*sends)
        failed = sum(not isinstance(o, InferenceCompleted) for o in outcomes)
        log.info(
            "batch scored",
            batch_size=len(tasks),
            failed=failed,
            model=spec.name,
            model_version=version.version,
        )

    async def connect_triton() -> None:
        state.triton, state.identity = await connect(
            settings, spec, version.triton_version, producer
        )

    async def disconnect() -> None:
        if state.triton is not None:
            await state.triton.close()
        tracer_provider.shutdown()

    async def triton_ready() -> bool:
        return state.triton is not None and await state.triton.ready()

    return AsgiFastStream(
        broker,
        asgi_routes=health_routes(broker, triton_ready),
        on_startup=[connect_triton],
        on_shutdown=[disconnect],
        logger=logging.getLogger(f"medmesh.{SERVICE}.app"),
    )


async def connect(
    settings: WorkerSettings, spec: ModelSpec, triton_version: int, producer: Producer
) -> tuple[TritonModel, WorkerIdentity]:
    """Open the Triton channel and wait until the model version is ready (bounded)."""
    triton = TritonModel(
        settings.triton_grpc_url,
        spec.triton.model,
        triton_version,
        spec.triton.input_tensor,
        (spec.triton.score_tensor, spec.triton.band_tensor, spec.triton.contributions_tensor),
        timeout_s=spec.triton.timeout_ms / 1000,
    )
    deadline = asyncio.get_running_loop().time() + settings.triton_ready_timeout_s
    while not await triton.ready():
        if asyncio.get_running_loop().time() > deadline:
            await triton.close()
            raise RuntimeError(
                f"Triton at {settings.triton_grpc_url} has no ready {spec.triton.model} "
                f"version {triton_version} after {settings.triton_ready_timeout_s}s"
            )
        await asyncio.sleep(0.5)
    identity = WorkerIdentity(
        producer, spec.triton.model, str(triton_version), await triton.device_kind()
    )
    log.info(
        "triton ready",
        model=spec.triton.model,
        model_version=triton_version,
        device_kind=identity.device_kind,
    )
    return triton, identity
