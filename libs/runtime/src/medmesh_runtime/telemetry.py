"""OpenTelemetry tracing for one service process.

A real SDK TracerProvider is always installed: without one, spans are non-recording and no
trace context would travel in Kafka headers. Spans are exported as JSON lines to a file when
``trace_file`` is set (used by ``medmesh up``), and nowhere otherwise.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from medmesh_contracts import headers as h
from medmesh_runtime.settings import ServiceSettings


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON object per line to a file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(span), separators=(",", ":")) for span in spans]
        with self._lock, self._path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per export."""


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as a flat JSON-able dict (W3C hex ids, nanosecond times)."""
    context = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": format(context.trace_id, "032x") if context else None,
        "span_id": format(context.span_id, "016x") if context else None,
        "parent_span_id": format(parent.span_id, "016x") if parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
        "links": [
            {
                "trace_id": format(link.context.trace_id, "032x"),
                "span_id": format(link.context.span_id, "016x"),
            }
            for link in span.links
        ],
    }


def configure_tracing(
    service: str,
    instance: str,
    trace_file: Path | None,
    *,
    otlp_endpoint: str | None = None,
    sample_ratio: float = 1.0,
) -> TracerProvider:
    """Install and return the process's TracerProvider (parent-based ratio sampling)."""
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": f"medmesh-{service}", "service.instance.id": instance}
        ),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if trace_file is not None:
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(trace_file)))
    if otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def configure_service_tracing(service: str, settings: ServiceSettings) -> TracerProvider:
    """configure_tracing with a service's settings (span file, OTLP endpoint, sample ratio)."""
    return configure_tracing(
        service,
        settings.instance_id,
        settings.trace_file,
        otlp_endpoint=settings.otlp_traces_endpoint,
        sample_ratio=settings.trace_sample_ratio,
    )


def consumer_span(
    tracer: trace.Tracer, record: Any, group_id: str | None = None
) -> AbstractContextManager[trace.Span]:
    """The span of one consumed record, continuing the trace in its headers.

    Named and attributed as faststream's telemetry middleware does ("<topic> process"), for the
    consumers that read records themselves (batches, transactions), so every hop of a request
    looks the same in its trace and `medmesh trace` shows it.
    """
    carrier = {key: bytes(value).decode(errors="replace") for key, value in (record.headers or ())}
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation": "process",
        "messaging.destination_publish.name": record.topic,
        "messaging.kafka.destination.partition": record.partition,
        "messaging.kafka.message.offset": record.offset,
        "messaging.message.conversation_id": carrier.get(h.CORRELATION_ID, ""),
    }
    if group_id is not None:
        attributes["messaging.consumer.group.name"] = group_id
    return tracer.start_as_current_span(
        f"{record.topic} process",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    )


def trace_id_hex(span: trace.Span) -> str:
    """The W3C hex trace id of a span."""
    return format(span.get_span_context().trace_id, "032x")


# A valid parent that is not sampled: under it, the ParentBased sampler every medmesh process
# uses (configure_tracing) records no span, so instrumented code costs next to nothing.
_NOT_SAMPLED = trace.NonRecordingSpan(
    trace.SpanContext(
        trace_id=1,
        span_id=1,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
    )
)


@contextlib.contextmanager
def within(context: object | None) -> Iterator[None]:
    """Run a block in a tracing context kept from earlier (``otel_context.get_current()``),
    so its spans and published headers join that trace; anything else leaves the current one.

    Typed ``object`` so that code without OpenTelemetry (ingest's service) can carry it.
    """
    if not isinstance(context, otel_context.Context):
        yield
        return
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def untraced() -> AbstractContextManager[None]:
    """Run a block whose spans are not recorded: for internal writes that belong to no
    request's trace (faststream's telemetry middleware otherwise records two spans for every
    publish)."""
    return within(trace.set_span_in_context(_NOT_SAMPLED))
