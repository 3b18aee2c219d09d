"""Dead-lettering: a message a consumer cannot process is kept whole, with the reason."""

from __future__ import annotations

from typing import Any, Protocol

from medmesh_contracts import headers as h
from medmesh_contracts.events import MessageDeadLettered, Producer, new_id, schema_of, to_wire
from medmesh_runtime.kafka import encode_raw, message_headers
from medmesh_runtime.logging import get_logger

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


class DeadLetters:
    """Publishes MessageDeadLettered events for one service's dead-letter topic."""

    def __init__(self, publisher: Publisher, producer: Producer) -> None:
        self._publisher = publisher
        self._producer = producer

    async def send(self, record: Any, reason: str) -> None:
        """Dead-letter one consumed record (an aiokafka ConsumerRecord) with a reason."""
        value, encoding = encode_raw(record.value or b"")
        event = MessageDeadLettered(
            correlation_id=correlation_of(record),
            producer=self._producer,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            raw_value=value,
            raw_encoding=encoding,
            reason=reason,
        )
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
