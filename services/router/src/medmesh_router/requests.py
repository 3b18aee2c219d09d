"""The requests stage's work: each request of a poll routed to its tasks (or its dead letter),
as records the transactional loop commits with the poll's offsets. The decision is
``routing``'s; this module decodes, traces and encodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import Tracer
from pydantic import ValidationError

from medmesh_contracts import topics
from medmesh_contracts.events import Producer, RunInference, schema_of, utc_now
from medmesh_router.metrics import RouterMetrics
from medmesh_router.routing import (
    NotARequestError,
    RoutedWire,
    UnknownModelError,
    route_key,
    route_wire,
)
from medmesh_router.state import RouterState
from medmesh_runtime.deadletter import dead_letter_record
from medmesh_runtime.kafka import record_headers
from medmesh_runtime.logging import error_reason, get_logger, log_dead_letter
from medmesh_runtime.telemetry import consumer_span, publish_headers
from medmesh_runtime.transactional import OutgoingRecord, encoded_headers

log = get_logger("medmesh.router")


class RequestRouting:
    """Routes the records of a requests poll by the current routing tables."""

    def __init__(
        self,
        state: RouterState,
        producer: Producer,
        tracer: Tracer,
        group_id: str,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.state = state
        self.producer = producer
        self.tracer = tracer
        self.group_id = group_id
        self.metrics = metrics

    async def route_records(self, records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        """Each request's tasks (or its dead letter), to commit with the poll's offsets."""
        decided: list[tuple[str, list[RoutedWire]]] = []
        routed = [self._route_record(record, decided) for record in records]
        if self.metrics is not None:
            self.metrics.routed(decided)
        log.info("requests routed", records=len(records), tasks=sum(len(out) for out in routed))
        return routed

    def _route_record(
        self, record: Any, decided: list[tuple[str, list[RoutedWire]]]
    ) -> list[OutgoingRecord]:
        """Route one request on its key and headers, in its own trace (each request continues
        the trace in its headers: the poll has none of its own)."""
        with consumer_span(self.tracer, record, self.group_id):
            try:
                key = route_key(record.key, record_headers(record), record.value)
                with self.tracer.start_as_current_span(
                    "router.route", attributes={"medmesh.model": key.model}
                ) as span:
                    tasks = route_wire(
                        key, record.value, self.state.tables, self.producer, utc_now()
                    )
                    span.set_attribute("medmesh.model_version", tasks[0].version)
                    span.set_attribute("medmesh.route", tasks[0].decision.reason)
                    span.set_attribute("medmesh.route_detail", tasks[0].decision.detail)
                    span.set_attribute("medmesh.shadow_copies", len(tasks) - 1)
            except (ValidationError, UnknownModelError, NotARequestError) as exc:
                return [self.dead_letter(record, error_reason(exc))]
            decided.append((key.model, tasks))
            # DEBUG: per request at the router's rate, the poll's summary is logged at INFO.
            log.debug(
                "request routed",
                correlation_id=key.correlation_id,
                model=key.model,
                model_version=tasks[0].version,
                route=tasks[0].decision.detail,
                shadows=[t.version for t in tasks[1:]],
            )
            return [self._task_record(task, record.key, key.correlation_id) for task in tasks]

    def _task_record(
        self, task: RoutedWire, key: bytes | None, correlation_id: str
    ) -> OutgoingRecord:
        headers = publish_headers(self.tracer, task.topic, correlation_id, schema_of(RunInference))
        return OutgoingRecord(task.topic, key, task.value, encoded_headers(headers))

    def dead_letter(self, record: Any, reason: str) -> OutgoingRecord:
        """The dead letter of a request that cannot be routed, with its reason."""
        log_dead_letter(log, "request", record, reason)
        return dead_letter_record(topics.ROUTER_DEADLETTER, record, reason, self.producer)
