"""One consumed inference result -> the records reporting must write for it (no Kafka I/O).

``ReportHandler`` turns a record of ``medmesh.inference.results`` into the messages to produce in
the same transaction as the record's offset: the report Bundle, or a dead letter when the result
cannot become a valid report. Results routed as shadow traffic never become reports. The W3C
trace context of the consumed record continues into the produced headers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Tracer

from medmesh_contracts import topics
from medmesh_contracts.catalog import SpecCatalog
from medmesh_contracts.events import (
    InferenceCompleted,
    MessageDeadLettered,
    Producer,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import ModelSpec
from medmesh_reporting.report import build_report, report_schema
from medmesh_runtime.deadletter import dead_letter_event
from medmesh_runtime.logging import error_reason, get_logger, log_dead_letter
from medmesh_runtime.telemetry import consumer_span, publish_headers
from medmesh_runtime.transactional import OutgoingRecord, encoded_headers

log = get_logger("medmesh.reporting")

CONVERSATION_ID = "messaging.message.conversation_id"


class ConsumedRecord(Protocol):
    """The part of an aiokafka ConsumerRecord that reporting reads."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class ReportHandler:
    """Builds the report (or the dead letter) for one consumed result, under a tracing span."""

    def __init__(
        self,
        specs: Mapping[str, ModelSpec] | SpecCatalog,
        producer: Producer,
        tracer: Tracer,
        performer_display: str | None = None,
    ) -> None:
        # A catalog is read again when a result names a version it does not know (hot deploy).
        self._catalog = specs if isinstance(specs, SpecCatalog) else None
        self._specs = specs.specs if isinstance(specs, SpecCatalog) else specs
        self._producer = producer
        self._tracer = tracer
        self._performer_display = performer_display

    def __call__(self, record: ConsumedRecord) -> list[OutgoingRecord]:
        """The records to produce for ``record``: one report, one dead letter, or none (shadow)."""
        with consumer_span(self._tracer, record):
            try:
                completed = InferenceCompleted.model_validate_json(record.value or b"")
            except ValueError as exc:
                return [self._dead_letter(record, error_reason(exc))]
            return self.for_result(record, completed)

    def for_result(
        self, record: ConsumedRecord, completed: InferenceCompleted
    ) -> list[OutgoingRecord]:
        """The records to produce for a decoded result (in the current span): its report, a dead
        letter when it cannot become one, or none (shadow). The monolith topology calls this
        in-process, with a stand-in record whose value is the result's wire form."""
        span = trace.get_current_span()
        span.set_attribute(CONVERSATION_ID, completed.correlation_id)
        span.set_attribute("medmesh.correlation_id", completed.correlation_id)
        if completed.task.route.reason == "shadow":
            log.warning(
                "shadow result on the results topic ignored",
                correlation_id=completed.correlation_id,
            )
            return []
        try:
            return [self._report(record, completed)]
        except Exception as exc:  # noqa: BLE001 -- building is pure: any error is this record's
            return [self._dead_letter(record, f"{type(exc).__name__}: {exc}")]

    def _report(self, record: ConsumedRecord, completed: InferenceCompleted) -> OutgoingRecord:
        if self._catalog is not None and not self._catalog.learn(
            completed.task.request.model, completed.task.model_version
        ):
            log.warning(
                "result of a model version the specs do not declare",
                model=completed.task.request.model,
                model_version=completed.task.model_version,
                spec_error=self._catalog.last_error,
            )
        spec = self._specs.get(completed.task.request.model)
        if spec is None:
            raise KeyError(f"no model spec named {completed.task.request.model!r}")
        with self._tracer.start_as_current_span(
            "reporting.build-report",
            attributes={
                "medmesh.model": spec.name,
                "medmesh.model_version": completed.task.model_version,
            },
        ):
            bundle = build_report(
                completed,
                spec,
                performer_display=self._performer_display,
                issued=completed.completed_at,
            )
        latency_ms = (utc_now() - completed.task.request.received_at).total_seconds() * 1000
        trace.get_current_span().set_attribute("medmesh.end_to_end_ms", latency_ms)
        headers = publish_headers(
            self._tracer,
            topics.REPORTS_DIAGNOSTIC,
            completed.correlation_id,
            report_schema(completed),
        )
        log.info(
            "report built",
            correlation_id=completed.correlation_id,
            model=spec.name,
            model_version=completed.task.model_version,
            end_to_end_ms=round(latency_ms, 1),
        )
        return OutgoingRecord(
            topics.REPORTS_DIAGNOSTIC,
            record.key,
            json.dumps(bundle, separators=(",", ":")).encode(),
            encoded_headers(headers),
        )

    def _dead_letter(self, record: ConsumedRecord, reason: str) -> OutgoingRecord:
        event = dead_letter_event(record, reason, self._producer)
        headers = publish_headers(
            self._tracer,
            topics.REPORTING_DEADLETTER,
            event.correlation_id,
            schema_of(MessageDeadLettered),
        )
        log_dead_letter(log, "result", record, reason)
        return OutgoingRecord(
            topics.REPORTING_DEADLETTER, record.key, to_wire(event), encoded_headers(headers)
        )
