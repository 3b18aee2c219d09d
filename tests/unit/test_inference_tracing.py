"""The worker's spans of a batch (issue 17): one batch span, one span per task in the task's own
trace, and outcome records whose headers continue that trace from the task's span."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import InferenceFailed, schema_of
from medmesh_inference.outcomes import traced_outcomes
from medmesh_runtime.kafka import record_headers
from tests.factories import make_completed, make_request, make_task
from tests.transactional_kafka import FakeRecord

TASKS = "medmesh.model.deterioration.v1.tasks"
# Two requests' traces, as the router's publish spans left them in the tasks' headers.
UPSTREAM = (
    ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
    ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
)


def _spans() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def _source(offset: int, correlation_id: str) -> FakeRecord:
    trace_id, span_id = UPSTREAM[offset]
    headers = (
        (h.CORRELATION_ID, correlation_id.encode()),
        ("traceparent", f"00-{trace_id}-{span_id}-01".encode()),
    )
    return FakeRecord(TASKS, 0, offset, b"pseudo", b"{}", headers)


def _traceparent(headers: dict[str, str]) -> tuple[str, str]:
    _, trace_id, span_id, _ = headers["traceparent"].split("-")
    return trace_id, span_id


def test_each_task_has_one_span_in_its_own_trace_linked_to_the_batch() -> None:
    """Per task exactly one "<task topic> process" span, child of the task's upstream span,
    linking the batch span and starting at the hand-over; no per-outcome publish span."""
    tracer, exporter = _spans()
    completed = make_completed(make_task(make_request(correlation_id="c-0")))
    failed = InferenceFailed(
        correlation_id="c-1",
        producer=completed.producer,
        task=make_task(make_request(correlation_id="c-1")),
        error_kind="invalid-input",
        reason="bad row",
        attempts=1,
    )
    with tracer.start_as_current_span("inference.batch") as batch:
        pass
    traced_outcomes(
        tracer,
        [completed, failed],
        [_source(0, "c-0"), _source(1, "c-1")],
        batch_span=batch,
        received_ns=1_000,
    )
    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    assert [s.name for s in spans] == ["inference.batch", f"{TASKS} process", f"{TASKS} process"]
    batch_context = batch.get_span_context()
    for span, (trace_id, parent_id), correlation_id in zip(
        spans[1:], UPSTREAM, ("c-0", "c-1"), strict=True
    ):
        assert span.context is not None
        assert span.parent is not None
        assert format(span.context.trace_id, "032x") == trace_id
        assert format(span.parent.span_id, "016x") == parent_id
        assert [link.context.span_id for link in span.links] == [batch_context.span_id]
        assert span.kind == trace.SpanKind.CONSUMER
        assert span.start_time == 1_000
        assert span.attributes is not None
        assert span.attributes["messaging.message.conversation_id"] == correlation_id
        assert span.attributes["medmesh.batch_size"] == 2


def test_outcome_records_continue_each_trace_from_the_task_span() -> None:
    """Each outcome goes to its topic, keyed like its task, with its correlation id, its schema
    and the W3C context of its task's worker span (the next hop's parent)."""
    tracer, exporter = _spans()
    completed = make_completed(make_task(make_request(correlation_id="c-0")))
    failed = InferenceFailed(
        correlation_id="c-1",
        producer=completed.producer,
        task=make_task(make_request(correlation_id="c-1")),
        error_kind="retries-exhausted",
        reason="Triton away",
        attempts=4,
    )
    with tracer.start_as_current_span("inference.batch") as batch:
        pass
    scored = traced_outcomes(
        tracer,
        [completed, failed],
        [_source(0, "c-0"), _source(1, "c-1")],
        batch_span=batch,
        received_ns=1_000,
    )
    task_spans = {
        s.context.trace_id: s.context.span_id
        for s in exporter.get_finished_spans()
        if s.context is not None and s.name.endswith(" process")
    }
    assert [s.outcome for s in scored] == [completed, failed]
    assert [s.record.topic for s in scored] == [topics.INFERENCE_RESULTS, topics.INFERENCE_FAILED]
    for item, (trace_id, _) in zip(scored, UPSTREAM, strict=True):
        headers = record_headers(item.record)
        assert item.record.key == b"pseudo"
        assert headers[h.CORRELATION_ID] == item.outcome.correlation_id
        assert headers[h.SCHEMA] == schema_of(type(item.outcome))
        got_trace, got_parent = _traceparent(headers)
        assert got_trace == trace_id
        assert got_parent == format(task_spans[int(trace_id, 16)], "016x")
