"""Reading a topic to its current end at start: the registry and heartbeats from their
beginning, a rollout step's results and failures from when it began. The router's only start-up
I/O; ``startup`` decides what the records mean, and tests pass their own reader.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer

from medmesh_router.settings import RouterSettings
from medmesh_runtime.kafka import aiokafka_security, read_to_end, topic_partitions


@dataclass(frozen=True)
class Consumed:
    """One record read at start, with where it was in its topic."""

    partition: int
    offset: int
    value: bytes | None


class StartupReader(Protocol):
    """Reads a topic to its current end at start: from its beginning (the registry, heartbeats)
    or from the first record at or after ``since`` (results and failures of a rollout step).
    With ``apply``, each record is handed to it as it arrives and none is kept (the list is
    empty): results embed whole requests, an hour of them must not sit in memory."""

    def __call__(
        self,
        settings: RouterSettings,
        topic: str,
        /,
        since: datetime | None = None,
        apply: Callable[[Consumed], None] | None = None,
    ) -> Awaitable[list[Consumed]]: ...


async def read_topic_to_end(
    settings: RouterSettings,
    topic: str,
    since: datetime | None = None,
    apply: Callable[[Consumed], None] | None = None,
) -> list[Consumed]:
    """Every record of ``topic`` (from ``since`` when given) up to its end at the time of the
    call, in order per partition."""
    # read_committed: results and failures are produced in transactions (an aborted one is
    # not evidence), and so is nothing else read here.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        isolation_level="read_committed",
        client_id=f"medmesh-router-start-{settings.instance_id}",
        **aiokafka_security(settings),
    )
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        if not partitions:
            raise RuntimeError(f"topic {topic} does not exist")
        found: list[Consumed] = []

        def keep(record: Any) -> None:
            consumed = Consumed(record.partition, record.offset, record.value)
            if apply is None:
                found.append(consumed)
            else:
                apply(consumed)

        await read_to_end(
            consumer,
            partitions,
            keep,
            since_ms=None if since is None else int(since.timestamp() * 1000),
            timeout_s=settings.router_registry_timeout_s,
        )
        return found
    finally:
        await consumer.stop()
