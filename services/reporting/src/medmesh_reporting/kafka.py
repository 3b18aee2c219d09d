"""The reporting service's own aiokafka clients: a transactional producer, a read_committed consumer.

faststream's KafkaBroker publishes outside transactions, so the results -> reports path uses
aiokafka directly. Clients are built by ``kafka_clients`` when the loop starts, never at import.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from medmesh_reporting.settings import ReportingSettings
from medmesh_runtime.settings import ServiceSettings


def security_options(settings: ServiceSettings) -> dict[str, Any]:
    """aiokafka keyword arguments for the configured security protocol."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context()
    if protocol.startswith("SASL"):
        user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
        if user is None or password is None:
            raise ValueError(f"{protocol} needs MEDMESH_KAFKA_SASL_USERNAME and _PASSWORD")
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": user,
            "sasl_plain_password": password,
        }
    return options


def kafka_clients(settings: ReportingSettings) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """A fresh (unstarted) consumer and transactional producer for one run of the loop."""
    security = security_options(settings)
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
        **security,
    )
    return consumer, producer


def delivery_clients(settings: ReportingSettings) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """A consumer of committed reports and a durable producer of undeliverable events."""
    security = security_options(settings)
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
        **security,
    )
    return consumer, producer
