"""What ingest commits, as Kafka records: requests keyed by pseudonym in their payload's trace,
patient states on their pseudonym's partition of the compacted state topic, and rejected
inbound events for medmesh.fhir.invalid. No I/O: the transactional loop or the group commit
produces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import Tracer

from medmesh_contracts import topics
from medmesh_contracts.events import (
    FhirEventRejected,
    PatientReadingsUpdated,
    Producer,
    routing_headers,
    schema_of,
    to_wire,
)
from medmesh_ingest.readings import state_key
from medmesh_ingest.service import Answer, Outgoing
from medmesh_ingest.state_topic import partition_of
from medmesh_runtime.deadletter import rejected_event
from medmesh_runtime.kafka import message_headers
from medmesh_runtime.logging import get_logger
from medmesh_runtime.telemetry import publish_headers, within
from medmesh_runtime.transactional import OutgoingRecord, encoded_headers

log = get_logger("medmesh.ingest")


class Records:
    """Builds ingest's outgoing records."""

    def __init__(self, tracer: Tracer, producer: Producer, dead_letter_max_bytes: int) -> None:
        self.tracer = tracer
        self.producer = producer
        self.dead_letter_max_bytes = dead_letter_max_bytes
        # Partitions of the state topic, known once it was read on start (None: key hashing).
        self.state_partitions: int | None = None

    def requests(self, requests: Sequence[Outgoing]) -> list[OutgoingRecord]:
        """Each request as a record keyed by its pseudonym, in the trace of its payload."""
        records = []
        for item in requests:
            request = item.request
            with within(item.trace):
                headers = publish_headers(
                    self.tracer,
                    topics.INFERENCE_REQUESTS,
                    request.correlation_id,
                    schema_of(type(request)),
                )
            records.append(
                OutgoingRecord(
                    topics.INFERENCE_REQUESTS,
                    request.patient_pseudonym.encode(),
                    to_wire(request),
                    encoded_headers(headers | routing_headers(request)),
                )
            )
        return records

    def states(self, states: Sequence[PatientReadingsUpdated]) -> list[OutgoingRecord]:
        """Each patient state as a record of the compacted topic, on its pseudonym's partition.

        Untraced: a state is ingest's own bookkeeping, not a hop of the request's trace.
        """
        return [
            OutgoingRecord(
                topics.INGEST_READINGS,
                state_key(state.patient_pseudonym, state.model).encode(),
                to_wire(state),
                encoded_headers(
                    message_headers(state.correlation_id, schema_of(PatientReadingsUpdated))
                ),
                partition=(
                    partition_of(state.patient_pseudonym, self.state_partitions)
                    if self.state_partitions
                    else None
                ),
            )
            for state in states
        ]

    def rejection(self, record: Any, answer: Answer) -> OutgoingRecord:
        """The rejected event kept whole (up to the dead-letter bound), with its offset and
        OperationOutcome, for medmesh.fhir.invalid; in the event's trace."""
        rejected = rejected_event(
            record, answer.operation_outcome, self.producer, max_bytes=self.dead_letter_max_bytes
        )
        headers = publish_headers(
            self.tracer, topics.FHIR_INVALID, rejected.correlation_id, schema_of(FhirEventRejected)
        )
        log.warning(
            "inbound event rejected",
            status=answer.status,
            partition=record.partition,
            offset=record.offset,
            dead_letter_topic=topics.FHIR_INVALID,
        )
        return OutgoingRecord(
            topics.FHIR_INVALID, record.key, to_wire(rejected), encoded_headers(headers)
        )
