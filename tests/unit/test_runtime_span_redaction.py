"""Spans leave a medmesh process without patient data: no message key, no patient-data
attribute, exception text redacted as logs are (medmesh_runtime.telemetry)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from faststream.kafka import TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from medmesh_contracts import headers as h
from medmesh_runtime.kafka import build_broker
from medmesh_runtime.logging import REDACTED
from medmesh_runtime.settings import ServiceSettings
from medmesh_runtime.telemetry import RedactingSpanProcessor, configure_tracing

TOPIC = "medmesh.fhir.inbound"
MRN = "MRN-12345678"
KEY_ATTRIBUTE = "messaging.kafka.message.key"


def _providers() -> tuple[TracerProvider, InMemorySpanExporter, InMemorySpanExporter]:
    """A provider exporting through RedactingSpanProcessor, and unredacted beside it."""
    redacted, raw = InMemorySpanExporter(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(RedactingSpanProcessor(SimpleSpanProcessor(redacted)))
    provider.add_span_processor(SimpleSpanProcessor(raw))
    return provider, redacted, raw


def _text(spans: Sequence[ReadableSpan]) -> str:
    """Every attribute, event and status of the spans as one string."""
    parts: list[Any] = []
    for span in spans:
        parts += [dict(span.attributes or {}), span.status.description]
        parts += [(e.name, dict(e.attributes or {})) for e in span.events]
    return repr(parts)


async def test_a_keyed_records_spans_carry_no_key() -> None:
    """faststream's telemetry middleware puts an inbound record's key (an MRN) on its publish
    and process spans; exported through RedactingSpanProcessor, no span has it."""
    provider, redacted, raw = _providers()
    broker = build_broker(ServiceSettings(instance_id="test"), "test", provider)
    handled: list[bytes] = []

    @broker.subscriber(TOPIC, group_id="test")
    async def handle(message: KafkaMessage) -> None:
        handled.append(message.body)

    async with TestKafkaBroker(broker):
        await broker.publish(b"{}", topic=TOPIC, key=MRN.encode())
    assert handled == [b"{}"]
    assert any(KEY_ATTRIBUTE in (s.attributes or {}) for s in raw.get_finished_spans())
    spans = redacted.get_finished_spans()
    assert {s.name for s in spans} >= {f"{TOPIC} publish", f"{TOPIC} process"}
    assert all(KEY_ATTRIBUTE not in (s.attributes or {}) for s in spans)
    assert "12345678" not in _text(spans)


def test_an_exception_events_message_stacktrace_and_status_are_redacted() -> None:
    """A span ended by an exception quoting an MRN, a birth date and a patient reference
    exports its exception event and status with those redacted (log redaction's rule), and
    keeps the exception type."""
    provider, redacted, _raw = _providers()
    tracer = provider.get_tracer("test")
    message = f"no bed for {MRN}, born 1950-02-03, Patient/example-high"
    with pytest.raises(ValueError, match="no bed"), tracer.start_as_current_span("handle"):
        raise ValueError(message)
    (span,) = redacted.get_finished_spans()
    (event,) = span.events
    attributes = dict(event.attributes or {})
    assert event.name == "exception"
    assert attributes["exception.type"] == "ValueError"
    for text in (attributes["exception.message"], attributes["exception.stacktrace"]):
        assert isinstance(text, str)
        assert REDACTED in text
    for secret in ("12345678", "1950-02-03", "Patient/example-high"):
        assert secret not in _text([span])


def test_patient_data_attributes_are_dropped_and_foreign_correlation_ids_scrubbed() -> None:
    """Attributes named like patient data (as logs name them) are dropped, a correlation id
    that is not a medmesh UUID is redacted, and medmesh's own ids and other attributes stay."""
    provider, redacted, _raw = _providers()
    tracer = provider.get_tracer("test")
    own = str(uuid.uuid4())
    with tracer.start_as_current_span(
        "hop",
        attributes={
            "patient": "Patient/42",
            "birthdate": "1950-02-03",
            "medmesh.correlation_id": own,
            "messaging.message.conversation_id": MRN,
            "messaging.destination.name": TOPIC,
            "medmesh.model": "deterioration",
        },
    ):
        pass
    (span,) = redacted.get_finished_spans()
    assert dict(span.attributes or {}) == {
        "medmesh.correlation_id": own,
        "messaging.message.conversation_id": REDACTED,
        "messaging.destination.name": TOPIC,
        "medmesh.model": "deterioration",
    }


def test_the_span_file_of_configure_tracing_has_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configure_tracing's exporters (the span file medmesh up writes) go through the
    redaction: a span with a message key is written without it."""
    # The process-wide provider stays as it is (it can be set once per process).
    monkeypatch.setattr(trace, "set_tracer_provider", lambda _provider: None)
    spans_file = tmp_path / "spans.jsonl"
    provider = configure_tracing("test", "test-1", spans_file)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(
        f"{TOPIC} process", attributes={KEY_ATTRIBUTE: MRN, h.SCHEMA: "s"}
    ):
        pass
    provider.force_flush()
    provider.shutdown()
    (record,) = [json.loads(line) for line in spans_file.read_text().splitlines()]
    assert record["attributes"] == {h.SCHEMA: "s"}
