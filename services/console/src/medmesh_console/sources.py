"""Where the console reads from: the router's /models and Kafka (no consumer group, no commits).

Every read happens when a page asks for it; the clients are built in the app's lifespan.
"""

from __future__ import annotations

from typing import Any, Protocol

import httpx

from medmesh_cli.models import read_topic
from medmesh_cli.ops.connection import CliSettings, Connection
from medmesh_cli.ops.dlq import DEAD_LETTER_TOPICS
from medmesh_cli.ops.kafka_io import consumer, group_lags, read_range
from medmesh_console.settings import ConsoleSettings
from medmesh_console.views import ReportRecord
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


class Sources(Protocol):
    """What the pages read (tests give fakes)."""

    async def models(self) -> dict[str, Any]:
        """The router's GET /models answer."""
        ...

    async def decisions(self) -> tuple[list[LifecycleDecision], int]:
        """Every lifecycle decision, and how many audit records did not validate."""
        ...

    async def dead_letters(self) -> list[tuple[str, bytes]]:
        """(topic, value) of every entry of every dead-letter topic."""
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
        """Every record of medmesh.models.audit that validates as a decision."""
        decisions, unreadable = [], 0
        for value in await read_topic(self._connection, topics.MODELS_AUDIT):
            try:
                decisions.append(LifecycleDecision.model_validate_json(value))
            except ValueError:
                unreadable += 1
        return decisions, unreadable

    async def dead_letters(self) -> list[tuple[str, bytes]]:
        """Every dead-letter topic read to its end (a topic that does not exist has none)."""
        found: list[tuple[str, bytes]] = []
        async with consumer(self._connection) as kafka:
            for topic in DEAD_LETTER_TOPICS:
                found.extend((topic, entry.value) for entry in await read_range(kafka, topic))
        return found

    async def lags(self) -> dict[str, dict[str, int]]:
        """``medmesh status``'s lag: end offset minus committed offset per group and topic."""
        return await group_lags(self._connection)

    async def reports(self, limit: int) -> list[ReportRecord]:
        """The newest records of the reports topic, ``limit`` per partition at most."""
        found: list[ReportRecord] = []
        async with consumer(self._connection) as kafka:
            parts = await topic_partitions(kafka, topics.REPORTS_DIAGNOSTIC)
            if not parts:
                return found
            begin = await kafka.beginning_offsets(parts)
            end = await kafka.end_offsets(parts)
            starts: dict[Any, int | None] = {p: max(begin[p], end[p] - limit) for p in parts}

            def keep(record: Any) -> None:
                found.append(
                    ReportRecord(
                        record.key, record.value or b"", record_headers(record), record.timestamp
                    )
                )

            await read_to_end(kafka, parts, keep, starts=starts)
        return found
