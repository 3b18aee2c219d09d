"""The aiokafka clients of report delivery (the results -> reports stage uses
``medmesh_runtime.kafka.stage_clients``). Built when the delivery loop starts, never at import.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from medmesh_reporting.settings import ReportingSettings
from medmesh_runtime.kafka import aiokafka_security, compression_type


def delivery_clients(settings: ReportingSettings) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """A consumer of committed reports and a durable producer of undeliverable events."""
    security = aiokafka_security(settings)
    client_id = f"medmesh-reporting-delivery-{settings.instance_id}"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=client_id,
        group_id=settings.delivery_group_id,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        **security,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        compression_type=compression_type(settings),
        **security,
    )
    return consumer, producer
