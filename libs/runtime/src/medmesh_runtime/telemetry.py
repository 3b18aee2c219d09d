"""OpenTelemetry tracing for one service process.

A real SDK TracerProvider is always installed: without one, spans are non-recording and no
trace context would travel in Kafka headers. Spans are exported as JSON lines to a file when
``trace_file`` is set (used by ``medmesh up``), over OTLP when an endpoint is set, and nowhere
otherwise; every exporter sees them through ``RedactingSpanProcessor``, so no exported span
carries a message key or patient data (see ``redact_span``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Status
from opentelemetry.util.types import Attributes, AttributeValue

from medmesh_contracts import headers as h
from medmesh_runtime.kafka import record_headers
from medmesh_runtime.logging import REDACTED, is_patient_data_key, redact_text
from medmesh_runtime.otel import otlp_traces_from_environment, service_resource, traces_sampler
from medmesh_runtime.settings import ServiceSettings

# --- patient data out of spans ---------------------------------------------------------------

# A record's key (faststream's telemetry middleware records it on every consume and publish
# span): an inbound key is the sender's and may be an MRN or a patient reference, and medmesh's
# own keys are patient pseudonyms. No exported span keeps one.
MESSAGE_KEY_ATTRIBUTES = frozenset({"messaging.kafka.message.key"})
# Correlation ids read from a record's headers: medmesh's own are UUIDs and are kept as they
# are; anything else (an inbound sender's header) is redacted like log text.
_CONVERSATION_ATTRIBUTES = frozenset(
    {"messaging.message.conversation_id", "medmesh.correlation_id"}
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
# The free-text attributes of an exception event (the type, a class name, is kept).
_EXCEPTION_TEXT = frozenset({"exception.message", "exception.stacktrace"})


@functools.lru_cache(maxsize=4096)
def _dropped(key: str) -> bool:
    # Cached: spans carry the same few attribute names over and over.
    return key in MESSAGE_KEY_ATTRIBUTES or is_patient_data_key(key)


def _redacted_attributes(attributes: Attributes, text: frozenset[str]) -> dict[str, Any] | None:
    """The attributes without patient data, or None when they hold none (nothing to copy)."""
    if not attributes:
        return None
    if not text and not any(_dropped(key) or key in _CONVERSATION_ATTRIBUTES for key in attributes):
        return None  # the common case, decided on the names alone
    changed = False
    kept: dict[str, AttributeValue] = {}
    for key, value in attributes.items():
        if _dropped(key):
            changed = True
            continue
        if isinstance(value, str) and (
            key in text or (key in _CONVERSATION_ATTRIBUTES and not _UUID.match(value))
        ):
            scrubbed = redact_text(value)
            changed = changed or scrubbed != value
            kept[key] = scrubbed
        else:
            kept[key] = value
    return kept if changed else None


def _redacted_event(event: Event) -> Event:
    text = _EXCEPTION_TEXT if event.name == "exception" else frozenset()
    attributes = _redacted_attributes(event.attributes, text)
    if attributes is None:
        return event
    return Event(event.name, attributes, event.timestamp)


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """A finished span without patient data: the span itself when it holds none.

    Dropped: message keys (``MESSAGE_KEY_ATTRIBUTES``) and every attribute, of the span or of
    its events, that log redaction treats as patient data by name (``is_patient_data_key``).
    Scrubbed with log redaction's text rule (``redact_text``): exception events' message and
    stack trace, the status description (an exception's text when a span ends by one), and
    correlation ids that are not medmesh's own UUIDs. Other attribute values are set by
    medmesh's code and faststream from topic names, offsets, model names and ids, never from a
    payload.
    """
    attributes = _redacted_attributes(span.attributes, frozenset())
    original_events = span.events
    events = [_redacted_event(event) for event in original_events]
    events_changed = any(new is not old for new, old in zip(events, original_events, strict=True))
    status = original_status = span.status
    if status.description:
        scrubbed = redact_text(status.description)
        if scrubbed != status.description:
            status = Status(status.status_code, scrubbed)
    if attributes is None and not events_changed and status is original_status:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes if attributes is None else attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class RedactingSpanProcessor(SpanProcessor):
    """Hands its processor (an exporter's) every span without patient data.

    On start, message-key and patient-data attributes the span starts with are overwritten
    with ``[redacted]`` on the live span (attributes cannot be removed from it); on end, the
    exporter gets ``redact_span`` of the finished span, which drops them and scrubs the
    exception events and status set since.
    """

    def __init__(self, delegate: SpanProcessor) -> None:
        self._delegate = delegate

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        for key in [k for k in span.attributes or () if _dropped(k)]:
            span.set_attribute(key, REDACTED)
        self._delegate.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self._delegate.on_end(redact_span(span))

    def shutdown(self) -> None:
        self._delegate.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._delegate.force_flush(timeout_millis)


def exporting(exporter: SpanExporter) -> SpanProcessor:
    """The processor through which a medmesh process exports spans: batched, redacted."""
    return RedactingSpanProcessor(BatchSpanProcessor(exporter))


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
    """Install and return the process's TracerProvider (parent-based ratio sampling), the
    standard OTEL_* variables honoured (medmesh_runtime.otel)."""
    provider = TracerProvider(
        resource=service_resource(service, instance), sampler=traces_sampler(sample_ratio)
    )
    if trace_file is not None:
        provider.add_span_processor(exporting(JsonLinesSpanExporter(trace_file)))
    if otlp_endpoint:
        provider.add_span_processor(exporting(OTLPSpanExporter(endpoint=otlp_endpoint)))
    elif otlp_traces_from_environment():
        # Endpoint, headers, certificate and timeout from the OTEL_EXPORTER_OTLP_* variables.
        provider.add_span_processor(exporting(OTLPSpanExporter()))
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
    tracer: trace.Tracer,
    record: Any,
    group_id: str | None = None,
    *,
    links: Sequence[trace.Link] = (),
    start_time: int | None = None,
    attributes: Mapping[str, str | int] | None = None,
) -> AbstractContextManager[trace.Span]:
    """The span of one consumed record, continuing the trace in its headers.

    Named and attributed as faststream's telemetry middleware does ("<topic> process"), for the
    consumers that read records themselves (batches, transactions), so every hop of a request
    looks the same in its trace and `medmesh trace` shows it. A record handled in a batch
    links the batch's span and starts when the batch was handed over (``start_time``, ns);
    ``attributes`` add the hop's own.
    """
    carrier = record_headers(record)
    span_attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation": "process",
        "messaging.destination_publish.name": record.topic,
        "messaging.kafka.destination.partition": record.partition,
        "messaging.kafka.message.offset": record.offset,
        "messaging.message.conversation_id": carrier.get(h.CORRELATION_ID, ""),
    }
    if group_id is not None:
        span_attributes["messaging.consumer.group.name"] = group_id
    span_attributes.update(attributes or {})
    return tracer.start_as_current_span(
        f"{record.topic} process",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.CONSUMER,
        attributes=span_attributes,
        links=links,
        start_time=start_time,
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


def publish_headers(
    tracer: trace.Tracer, topic: str, correlation_id: str, schema: str
) -> dict[str, str]:
    """The medmesh headers of one record produced in a transaction, with the W3C context of
    its "<topic> publish" span (named and attributed as faststream's telemetry middleware does
    for the broker's publishes), so the next hop continues this request's trace.

    The record becomes visible when its transaction commits, a little after this span ends.
    """
    with tracer.start_as_current_span(
        f"{topic} publish",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation": "publish",
            "messaging.destination.name": topic,
            "messaging.message.conversation_id": correlation_id,
        },
    ):
        headers = {h.CORRELATION_ID: correlation_id, h.SCHEMA: schema}
        propagate.inject(headers)
    return headers
