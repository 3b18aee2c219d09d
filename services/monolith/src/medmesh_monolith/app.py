"""The monolith topology: ingest, router, one worker per model version and reporting, in one
process, calling each other in-process. HTTP and Kafka only at the edges.

The app *is* ingest's app (``medmesh_ingest.app.create_app``: the same POST /fhir, the same
medmesh.fhir.inbound consumer and dead letters, the same readings state topic), composed with
one difference passed in: ``publish_requests`` hands the requests to the ``InProcessPipeline``
instead of their being produced to medmesh.inference.requests. So the differences from the
services topology are exactly the three Kafka hops in the middle. The pipeline starts in
ingest's ``on_start`` and drains in its ``on_stop``, while ingest's Kafka clients (which publish
the edge topics) still run.

Routing state (``startup.load_routing``): read once at start from the compacted registry topic
with the router's own start-up (``medmesh_router.startup``: seeded from the spec's weights for a
model the registry does not know; not written back). Registry changes made later, worker
heartbeats and the rollout controller are the router service's: the monolith does not follow
them. Tasks of every version in the specs are scored, each once Triton serves it (a worker's
wait, ``medmesh_inference.circuit.wait_until_ready``, in ``startup.ready_stages``); an image
model's with its images fetched from the PACS (MEDMESH_PACS_URLS) as a worker fetches them.

What the monolith promises less than the services: a 202 means the request is queued in this
process, not stored in Kafka, so a crash loses what was queued; reports are produced with an
idempotent acks=all producer, not in consume-produce transactions (there is no consumed
results offset to commit with them).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping, Sequence

from fastapi import FastAPI
from opentelemetry import trace

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import Producer
from medmesh_contracts.modelspec import load_specs
from medmesh_inference.batching import RetryPolicy
from medmesh_inference.image_inputs import pacs_client
from medmesh_ingest.app import create_app as create_ingest_app
from medmesh_ingest.service import Outgoing
from medmesh_monolith.pipeline import InProcessPipeline
from medmesh_monolith.settings import SERVICE, MonolithSettings
from medmesh_monolith.startup import circuit_backoff, load_routing, ready_stages, triton_models
from medmesh_reporting.handling import ReportHandler
from medmesh_router.readiness import Readiness
from medmesh_router.state import RouterState
from medmesh_router.topic_reader import StartupReader, read_topic_to_end
from medmesh_runtime.logging import get_logger
from medmesh_runtime.telemetry import within

EDGE_TOPICS = (
    topics.REPORTS_DIAGNOSTIC,
    topics.REPORTING_DEADLETTER,
    topics.INFERENCE_FAILED,
    topics.INFERENCE_SHADOW_RESULTS,
)
log = get_logger("medmesh.monolith")


def _stop_process(error: BaseException) -> None:
    """A batcher died of a bug: stop loudly (so `medmesh up` notices) instead of idling."""
    log.error("batcher crashed; stopping the process", error=repr(error))
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(
    settings: MonolithSettings, read_to_end: StartupReader = read_topic_to_end
) -> FastAPI:
    """Ingest's app with the later stages in-process; Kafka and Triton connect at startup."""
    specs = load_specs(settings.model_specs_dir)
    producer = Producer(service=SERVICE, instance=settings.instance_id)
    tracer = trace.get_tracer_provider().get_tracer("medmesh.monolith")
    state = RouterState(specs, Readiness(require_heartbeats=False))
    reports = ReportHandler(specs, producer, tracer, performer_display=settings.performer_display)
    tritons = triton_models(settings, specs)
    # One PACS client for the process (MEDMESH_PACS_URLS ...), built as a worker builds its own.
    pacs = pacs_client(settings)
    # Built at start, once routing is loaded and Triton serves every version.
    running: list[InProcessPipeline] = []
    started = time.monotonic()

    async def accept(outgoing: Sequence[Outgoing]) -> None:
        for item in outgoing:
            # In the trace of the payload that caused it (a poll's requests come together).
            with within(item.trace):
                await running[0].accept(item.request)

    async def start() -> None:
        await load_routing(state, settings, producer, read_to_end)
        pipeline = InProcessPipeline(
            state=state,
            stages=await ready_stages(settings, specs, tritons, producer, pacs),
            reports=reports,
            publish=publish,
            router_producer=producer,
            policy=RetryPolicy(
                max_attempts=settings.triton_max_attempts,
                initial_backoff_s=settings.triton_backoff_initial_ms / 1000,
            ),
            tracer=tracer,
            linger_s=settings.batch_wait_ms / 1000,
            backoff=circuit_backoff(settings),
        )
        running.append(pipeline)
        pipeline.start(on_crash=_stop_process)
        log.info("monolith stages started", seconds=round(time.monotonic() - started, 1))

    async def stop() -> None:
        if not running:
            return
        try:
            await running[0].drain(timeout_s=10.0)
        finally:
            await running[0].stop()
            for triton in tritons:
                await triton.close()
            await pacs.close()

    app = create_ingest_app(
        settings, service=SERVICE, publish_requests=accept, on_start=start, on_stop=stop
    )
    broker = app.state.broker
    edge = {
        topic: broker.publisher(topic, title=f"{topic} (monolith edge)") for topic in EDGE_TOPICS
    }

    async def publish(
        topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]
    ) -> None:
        await edge[topic].publish(
            value, key=key, headers=dict(headers), correlation_id=headers.get(h.CORRELATION_ID)
        )

    app.state.monolith = running
    return app
