"""The records of a scored batch's outcomes, each in its own request's trace.

A batch has one ``inference.batch`` span (the Triton call); each task has one span, its
"<task topic> process" span (``medmesh_runtime.telemetry.consumer_span``): it continues the
trace in the task's headers, links the batch span and starts when the batch was handed over.
The outcome's headers carry that span's context, so the next hop (reporting) continues the
request's trace from the worker's span of it: one clinical request stays one trace end to end,
and shows its inference. There is no per-outcome "<topic> publish" span any more (issue 17):
it ended as soon as it started and only carried the same context one level down.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import propagate, trace

from medmesh_contracts import topics
from medmesh_contracts.events import schema_of, to_wire
from medmesh_inference.batching import Outcome, destination
from medmesh_inference.worker import Scored
from medmesh_runtime.kafka import message_headers
from medmesh_runtime.telemetry import consumer_span
from medmesh_runtime.transactional import OutgoingRecord, encoded_headers

# Where each outcome is produced (``batching.destination``).
OUTCOME_TOPICS = {
    "results": topics.INFERENCE_RESULTS,
    "shadow-results": topics.INFERENCE_SHADOW_RESULTS,
    "failed": topics.INFERENCE_FAILED,
}


def outcome_record(outcome: Outcome, key: bytes | None) -> OutgoingRecord:
    """The record of one outcome, keyed like its task, with the current trace context."""
    headers = message_headers(outcome.correlation_id, schema_of(type(outcome)))
    propagate.inject(headers)
    return OutgoingRecord(
        OUTCOME_TOPICS[destination(outcome)], key, to_wire(outcome), encoded_headers(headers)
    )


def traced_outcomes(
    tracer: trace.Tracer,
    outcomes: Sequence[Outcome],
    sources: Sequence[Any],
    *,
    batch_span: trace.Span,
    received_ns: int,
) -> list[Scored]:
    """Each outcome with its record (in the order of ``sources``, the tasks' consumed
    records), made inside the task's "<task topic> process" span, which links ``batch_span``
    and starts at ``received_ns`` (when the batch was handed over)."""
    batch_link = trace.Link(batch_span.get_span_context())
    size = len(outcomes)
    scored = []
    for outcome, record in zip(outcomes, sources, strict=True):
        with consumer_span(
            tracer,
            record,
            links=[batch_link],
            start_time=received_ns,
            attributes={
                "messaging.message.conversation_id": outcome.correlation_id,
                "medmesh.batch_size": size,
            },
        ):
            scored.append(Scored(outcome, outcome_record(outcome, record.key)))
    return scored
