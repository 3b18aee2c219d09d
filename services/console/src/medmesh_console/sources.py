"""Where the console reads from: the router's /models and Kafka (no consumer group, no commits).

Every read happens when a page asks for it; the clients are built in the app's lifespan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import httpx
from aiokafka import AIOKafkaConsumer

from medmesh_cli.ops.connection import CliSettings, Connection
from medmesh_cli.ops.dlq import DEAD_LETTER_TOPICS
from medmesh_cli.ops.kafka_io import consumer, group_lags
from medmesh_console.settings import ConsoleSettings
from medmesh_console.views import (
    AUDIT_DECISIONS_PER_PARTITION,
    DEAD_LETTERS_PER_PARTITION,
    ReportRecord,
    dead_letter_reason,
)
from medmesh_contracts import topics
from medmesh_contracts.lifecycle import LifecycleDecision
from medmesh_runtime.kafka import read_to_end, record_headers, topic_partitions

# The Kafka settings a console shares with every service (its own security settings).
_KAFKA_FIELDS = {
    "kafka_bootstrap_servers",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
}


# Consumer groups whose lag is shown (every medmesh service's, as `medmesh status` shows them).
GROUP_PREFIX = "medmesh-"
T = TypeVar("T")


class Sources(Protocol):
    """What the pages read (tests give fakes)."""

    async def models(self) -> dict[str, Any]:
        """The router's GET /models answer."""
        ...

    async def decisions(self) -> tuple[list[LifecycleDecision], int]:
        """The newest AUDIT_DECISIONS_PER_PARTITION lifecycle decisions of each partition of
        medmesh.models.audit, and how many of those records did not validate."""
        ...

    async def dead_letters(self) -> list[tuple[str, str]]:
        """(topic, reason: ``dead_letter_reason``) of the newest DEAD_LETTERS_PER_PARTITION
        entries of each partition of every dead-letter topic."""
        ...

    async def lags(self) -> dict[str, dict[str, int]]:
        """Lag per medmesh consumer group and topic."""
        ...

    async def reports(self, limit: int) -> list[ReportRecord]:
        """The last ``limit`` records of each partition of medmesh.reports.diagnostic."""
        ...


class LiveSources:
    """The real reads: the router over HTTP, Kafka with the services' connection settings."""

    def __init__(self, settings: ConsoleSettings, http: httpx.AsyncClient) -> None:
        self._router = settings.router_url.rstrip("/")
        self._http = http
        self._connection = Connection(
            CliSettings.model_validate(settings.model_dump(include=_KAFKA_FIELDS))
        )

    async def models(self) -> dict[str, Any]:
        """The router's GET /models answer (HTTPStatusError when it does not answer 200)."""
        answer = await self._http.get(f"{self._router}/models")
        answer.raise_for_status()
        found: dict[str, Any] = answer.json()
        return found

    async def decisions(self) -> tuple[list[LifecycleDecision], int]:
        """The newest records of medmesh.models.audit that validate as decisions: the topic is
        kept for good, and a page load must not read every decision ever made."""
        decisions, unreadable = [], 0
        async with consumer(self._connection) as kafka:
            values = await _newest(
                kafka, topics.MODELS_AUDIT, AUDIT_DECISIONS_PER_PARTITION, _value
            )
        for value in values:
            if not value:
                continue
            try:
                decisions.append(LifecycleDecision.model_validate_json(value))
            except ValueError:
                unreadable += 1
        return decisions, unreadable

    async def dead_letters(self) -> list[tuple[str, str]]:
        """The reasons of the newest entries of each dead-letter topic (a topic that does not
        exist has none): a page load must not hold 14 days of dead letters in memory, nor the
        values of the newest, each up to MEDMESH_DEAD_LETTER_MAX_BYTES: each is cut to its
        reason as it is read."""
        found: list[tuple[str, str]] = []
        for topic in DEAD_LETTER_TOPICS:
            # A consumer per topic: seeking a consumer already assigned by an earlier read hung.
            async with consumer(self._connection) as kafka:
                reasons = await _newest(
                    kafka,
                    topic,
                    DEAD_LETTERS_PER_PARTITION,
                    lambda record: dead_letter_reason(record.value or b""),
                )
            found.extend((topic, reason) for reason in reasons)
        return found

    async def lags(self) -> dict[str, dict[str, int]]:
        """End offset minus committed offset, summed per medmesh group and topic (what
        ``medmesh_runtime.lag`` samples and ``medmesh status`` shows)."""
        return await group_lags(self._connection, GROUP_PREFIX)

    async def reports(self, limit: int) -> list[ReportRecord]:
        """The newest records of the reports topic, ``limit`` per partition at most."""
        async with consumer(self._connection) as kafka:
            return await _newest(kafka, topics.REPORTS_DIAGNOSTIC, limit, _report_record)


def _value(record: Any) -> bytes:
    value: bytes = record.value or b""
    return value


def _report_record(record: Any) -> ReportRecord:
    return ReportRecord(record.key, record.value or b"", record_headers(record), record.timestamp)


async def _newest(
    kafka: AIOKafkaConsumer, topic: str, limit: int, keep: Callable[[Any], T]
) -> list[T]:
    """What ``keep`` takes of each of the newest ``limit`` records of each partition of
    ``topic``, as it is read (none: no such topic)."""
    parts = await topic_partitions(kafka, topic)
    if not parts:
        return []
    begin = await kafka.beginning_offsets(parts)
    end = await kafka.end_offsets(parts)
    starts: dict[Any, int | None] = {p: max(begin[p], end[p] - limit) for p in parts}
    found: list[T] = []
    await read_to_end(kafka, parts, lambda record: found.append(keep(record)), starts=starts)
    return found
