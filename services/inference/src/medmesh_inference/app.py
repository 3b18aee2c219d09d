"""One inference worker: medmesh.model.<name>.v<version>.tasks -> Triton -> results or failures.

This module only wires things together at startup (the one injection point): the consume loop is
``worker.TaskWorker`` over a plain aiokafka group consumer (it needs pause, resume and seek, which
a framework subscriber hides) and one transactional producer per assigned task partition
(``medmesh_runtime.transactional``), scoring a batch is ``batch_handler.BatchHandler``,
heartbeats are ``heartbeat.HealthMonitor``. Outcomes and dead letters are produced in the transactions of their
tasks' offsets; heartbeats are published through the faststream broker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from faststream.asgi import AsgiFastStream

from medmesh_contracts import topics
from medmesh_contracts.events import (
    Producer,
    WorkerHeartbeat,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_inference.batch_handler import BatchHandler
from medmesh_inference.batching import RetryPolicy, WorkerIdentity
from medmesh_inference.circuit import CircuitBackoff, CircuitBreaker
from medmesh_inference.heartbeat import HealthMonitor, HeartbeatSource
from medmesh_inference.image_inputs import ImageInputs, pacs_client, servable_probe
from medmesh_inference.settings import WorkerSettings
from medmesh_inference.triton import TritonModel
from medmesh_inference.worker import LoopTiming, TaskWorker
from medmesh_runtime.deadletter import dead_letter_record
from medmesh_runtime.kafka import (
    group_consumer,
    message_headers,
    transactional_producers,
)
from medmesh_runtime.logging import get_logger
from medmesh_runtime.service import ServiceRuntime
from medmesh_runtime.transactional import OutgoingRecord

SERVICE = "inference"
log = get_logger("medmesh.inference")


def create_app(settings: WorkerSettings) -> AsgiFastStream:
    """Build the worker app for one model version; Triton and Kafka connect at startup."""
    runtime = ServiceRuntime.build(
        SERVICE,
        settings,
        settings.group_id,
        trace_name=f"{SERVICE}-{settings.worker_model}-v{settings.worker_model_version}",
    )
    tracer = runtime.tracer_provider.get_tracer("medmesh.inference")
    spec = load_specs(settings.model_specs_dir)[settings.worker_model]
    version = spec.version(settings.worker_model_version)
    producer = Producer(service=SERVICE, instance=settings.instance_id)
    policy = RetryPolicy(
        max_attempts=settings.triton_max_attempts,
        initial_backoff_s=settings.triton_backoff_initial_ms / 1000,
    )
    status_out = runtime.broker.publisher(topics.MODELS_STATUS, title="worker heartbeats")
    task_topic = topics.model_task_topic(spec.name, version.version)
    triton = TritonModel.for_version(settings.triton_grpc_url, version)
    pacs = pacs_client(settings)
    images = ImageInputs.for_model(spec, pacs)
    tasks_running: list[asyncio.Task[None]] = []
    batches = BatchHandler(
        spec,
        version,
        triton,
        WorkerIdentity(producer, version.triton.model, str(version.triton.version), "unknown"),
        policy,
        tracer,
        images,
    )

    def dead_letter(record: Any, reason: str) -> OutgoingRecord:
        # Not logged here: the worker logs each dead letter where it decides on it.
        return dead_letter_record(topics.INFERENCE_DEADLETTER, record, reason, producer)

    client_id = f"medmesh-{SERVICE}-{settings.instance_id}"
    worker = TaskWorker(
        lambda: group_consumer(settings, client_id, settings.group_id),
        transactional_producers(settings, client_id),
        topic=task_topic,
        group_id=settings.group_id,
        max_batch=settings.worker_max_batch or version.triton.max_batch_size,
        handle=batches.handle,
        dead_letter=dead_letter,
        probe=servable_probe(triton.ready, images),
        on_ready=batches.refresh_device_kind,
        breaker=CircuitBreaker(
            CircuitBackoff(
                settings.circuit_backoff_initial_ms / 1000, settings.circuit_backoff_max_ms / 1000
            ),
            time.monotonic,
        ),
        timing=LoopTiming(
            linger_s=settings.batch_wait_ms / 1000,
            adaptive_linger=settings.batch_linger == "adaptive",
        ),
        clock=time.monotonic,
    )

    async def publish_heartbeat(heartbeat: WorkerHeartbeat) -> None:
        await status_out.publish(
            to_wire(heartbeat),
            key=heartbeat.instance.encode(),
            headers=message_headers(heartbeat.correlation_id, schema_of(WorkerHeartbeat)),
        )

    monitor = HealthMonitor(
        HeartbeatSource(producer, spec.name, version.version, settings.heartbeat_interval_s),
        worker,
        triton.ready,
        publish_heartbeat,
        lambda: batches.identity.device_kind,
        utc_now,
    )

    def crashed(task: asyncio.Task[None]) -> None:
        # A bug, not a condition the loop handles: stop the process loudly so that it is
        # restarted (and `medmesh up` notices) instead of idling with a dead loop.
        if not task.cancelled() and task.exception() is not None:
            log.error("worker loop crashed; stopping the process", error=repr(task.exception()))
            os.kill(os.getpid(), signal.SIGTERM)

    async def start_loops() -> None:
        for coroutine in (worker.run(), monitor.run()):
            task = asyncio.create_task(coroutine)
            task.add_done_callback(crashed)
            tasks_running.append(task)

    async def stop_loops() -> None:
        worker.stop()
        monitor.stop()
        await asyncio.wait(tasks_running, timeout=10)
        await monitor.beat()  # a last heartbeat saying "stopping"
        for task in tasks_running:
            task.cancel()
        await worker.close()
        await triton.close()
        await pacs.close()

    async def ready() -> bool:
        return worker.ready

    return runtime.app(ready=ready, after_startup=[start_loops], on_shutdown=[stop_loops])
