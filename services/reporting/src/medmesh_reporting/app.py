"""The reporting service: medmesh.inference.results -> FHIR report Bundles, exactly once.

Thin by design: the FHIR is built in ``report.build_report``, one record's output decided in
``handling.ReportHandler``, and the Kafka transactions (one per results partition and poll,
fencing a stalled instance) and poison isolation run in ``medmesh_runtime.transactional``.
This module wires them on the shared service skeleton (``medmesh_runtime.service``): /healthz,
/readyz (Kafka up and the loop consuming).
"""

from __future__ import annotations

import asyncio

import httpx
from faststream.asgi import AsgiFastStream

from medmesh_contracts import topics
from medmesh_contracts.catalog import SpecCatalog
from medmesh_contracts.events import Producer
from medmesh_reporting.delivery import Deliverer, DeliveryBackoff, DeliveryLoop
from medmesh_reporting.handling import ReportHandler
from medmesh_reporting.kafka import delivery_clients
from medmesh_reporting.settings import ReportingSettings
from medmesh_runtime.deadletter import dead_letter_record
from medmesh_runtime.kafka import stage_clients
from medmesh_runtime.service import ServiceRuntime
from medmesh_runtime.smart import smart_auth
from medmesh_runtime.transactional import (
    LoopSettings,
    PoisonIsolation,
    StageClients,
    TransactionalLoop,
    per_record,
)

SERVICE = "reporting"


def create_app(settings: ReportingSettings, clients: StageClients | None = None) -> AsgiFastStream:
    """Build the reporting app; the Kafka clients are built when its loop starts.

    ``clients`` replaces the real aiokafka clients (tests pass in-memory fakes).
    """
    runtime = ServiceRuntime.build(SERVICE, settings, settings.reporting_group_id)
    # Declared for the AsyncAPI document: the loop, not this broker, produces these records.
    runtime.broker.publisher(topics.REPORTS_DIAGNOSTIC, title="FHIR report Bundles (transactional)")
    runtime.broker.publisher(topics.REPORTING_DEADLETTER, title="dead letters (transactional)")
    producer = Producer(service=SERVICE, instance=settings.instance_id)
    handler = ReportHandler(
        SpecCatalog(settings.model_specs_dir),
        producer,
        runtime.tracer_provider.get_tracer("medmesh.reporting"),
        performer_display=settings.performer_display,
    )
    loop = TransactionalLoop(
        _clients(settings, clients),
        PoisonIsolation(
            per_record(handler),
            lambda record, reason: dead_letter_record(
                topics.REPORTING_DEADLETTER, record, reason, producer
            ),
        ),
        LoopSettings(
            group_id=settings.reporting_group_id,
            topics=(topics.INFERENCE_RESULTS,),
            transactional_id_prefix=settings.reporting_group_id,
            max_records=settings.reporting_batch_max,
            poll_timeout_ms=settings.reporting_poll_timeout_ms,
        ),
    )
    tasks: list[asyncio.Task[None]] = []

    async def start_loops() -> None:
        tasks.append(asyncio.create_task(loop.run(), name="reporting-loop"))
        if settings.fhir_server_url:
            delivery = _deliver(settings, settings.fhir_server_url)
            tasks.append(asyncio.create_task(delivery, name="reporting-delivery"))

    async def stop_loops() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def loop_ready() -> bool:
        return loop.ready

    return runtime.app(ready=loop_ready, on_startup=[start_loops], on_shutdown=[stop_loops])


def _clients(settings: ReportingSettings, given: StageClients | None) -> StageClients:
    if given is not None:
        return given
    return stage_clients(
        settings,
        f"medmesh-reporting-{settings.instance_id}",
        settings.reporting_group_id,
        session_timeout_ms=settings.reporting_session_timeout_ms,
        heartbeat_interval_ms=settings.reporting_heartbeat_interval_ms,
        transaction_timeout_ms=settings.reporting_transaction_timeout_ms,
    )


async def _deliver(settings: ReportingSettings, fhir_server_url: str) -> None:
    """Deliver committed reports to the FHIR server until cancelled."""
    token = settings.fhir_server_token.get_secret_value() if settings.fhir_server_token else None
    auth = smart_auth(settings.fhir_server_smart)
    async with httpx.AsyncClient(timeout=settings.delivery_timeout_s, auth=auth) as client:
        deliverer = Deliverer(
            client,
            fhir_server_url,
            token=token,
            backoff=DeliveryBackoff(give_up_after_s=settings.delivery_give_up_s),
        )
        loop = DeliveryLoop(
            lambda: delivery_clients(settings),
            deliverer,
            Producer(service=SERVICE, instance=settings.instance_id),
        )
        await loop.run()
