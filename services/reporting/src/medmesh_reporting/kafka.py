"""The reporting service's own aiokafka clients: a transactional producer, a read_committed consumer.

faststream's KafkaBroker publishes outside transactions, so the results -> reports path uses
aiokafka directly. Clients are built by ``kafka_clients`` when the loop starts, never at import.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from medmesh_reporting.settings import ReportingSettings
from medmesh_runtime.kafka import aiokafka_security, compression_type


def kafka_clients(settings: ReportingSettings) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """A fresh (unstarted) consumer and transactional producer for one run of the loop."""
    security = aiokafka_security(settings)
    client_id = f"medmesh-reporting-{settings.instance_id}"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=client_id,
        group_id=settings.reporting_group_id,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        session_timeout_ms=settings.reporting_session_timeout_ms,
        heartbeat_interval_ms=settings.reporting_heartbeat_interval_ms,
        **security,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=client_id,
        transactional_id=settings.transactional_id,
        transaction_timeout_ms=settings.reporting_transaction_timeout_ms,
        enable_idempotence=True,
        acks="all",
        compression_type=compression_type(settings),
        **security,
    )
    return consumer, producer


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
