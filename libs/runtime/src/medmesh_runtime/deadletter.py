"""Dead-lettering: a message a consumer cannot process is kept whole, with the reason."""

from __future__ import annotations

import functools
from typing import Any, Protocol

from opentelemetry.metrics import Counter

from medmesh_contracts import headers as h
from medmesh_contracts.events import MessageDeadLettered, Producer, new_id, schema_of, to_wire
from medmesh_runtime.kafka import encode_raw, message_headers
from medmesh_runtime.logging import get_logger
from medmesh_runtime.metrics import meter

log = get_logger("medmesh.deadletter")


class Publisher(Protocol):
    """The part of a faststream publisher used here."""

    async def publish(self, message: Any, *args: Any, **kwargs: Any) -> Any: ...


def correlation_of(record: Any) -> str:
    """The medmesh correlation id in a record's headers, or a new one."""
    for key, value in record.headers or ():
        if key == h.CORRELATION_ID and value:
            return bytes(value).decode(errors="replace")
    return new_id()


@functools.cache
def _dead_letters() -> Counter:
    # Built once: OpenTelemetry's proxy meter binds it to the provider once metrics are set up.
    return meter("medmesh.deadletter").create_counter(
        "medmesh.dead_letters", unit="{message}", description="Messages sent to a dead-letter topic"
    )


def dead_letter_event(record: Any, reason: str, producer: Producer) -> MessageDeadLettered:
    """The MessageDeadLettered event keeping one consumed record (aiokafka ConsumerRecord) whole.

    Every dead letter built is counted (medmesh_dead_letters_total by source topic and service).
    """
    _dead_letters().add(1, {"source_topic": record.topic, "service": producer.service})
    value, encoding = encode_raw(record.value or b"")
    return MessageDeadLettered(
        correlation_id=correlation_of(record),
        producer=producer,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        raw_value=value,
        raw_encoding=encoding,
        reason=reason,
    )


class DeadLetters:
    """Publishes MessageDeadLettered events for one service's dead-letter topic."""

    def __init__(self, publisher: Publisher, producer: Producer) -> None:
        self._publisher = publisher
        self._producer = producer

    async def send(self, record: Any, reason: str) -> None:
        """Dead-letter one consumed record (an aiokafka ConsumerRecord) with a reason."""
        event = dead_letter_event(record, reason, self._producer)
        await self._publisher.publish(
            to_wire(event),
            key=record.key,
            headers=message_headers(event.correlation_id, schema_of(MessageDeadLettered)),
        )
        log.warning(
            "message dead-lettered",
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason[:500],
        )
