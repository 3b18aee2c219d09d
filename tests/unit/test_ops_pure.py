"""The ops commands' pure parts: trace waterfalls and dead-letter replays."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from medmesh_cli.ops.dlq import REPLAY_HEADER, replay_of, summary
from medmesh_cli.ops.waterfall import hops, read_spans, render, spans_of, trace_ids_for
from medmesh_contracts.events import to_wire
from tests.factories import make_task


def _span(name: str, service: str, start: int, end: int, **attrs: str) -> dict[str, object]:
    return {
        "trace_id": "t1",
        "span_id": name,
        "parent_span_id": None,
        "name": name,
        "kind": "INTERNAL",
        "service": f"medmesh-{service}",
        "start_ns": start * 1_000_000,
        "end_ns": end * 1_000_000,
        "attributes": attrs,
    }


@pytest.fixture
def span_file(tmp_path: Path) -> Path:
    """A span file with one request's spans over two Kafka hops, and an unrelated trace."""
    spans = [
        _span("POST /fhir", "ingest", 0, 10),
        _span(
            "medmesh.inference.requests publish",
            "ingest",
            5,
            8,
            **{"messaging.message.conversation_id": "c-1"},
        ),
        _span("medmesh.inference.requests process", "router", 11, 14),
        _span("medmesh.model.m.v1.tasks publish", "router", 12, 13),
        _span("medmesh.model.m.v1.tasks process", "inference-m-v1", 33, 40),
    ]
    other = {**_span("x", "router", 0, 1), "trace_id": "t2"}
    path = tmp_path / "spans.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in [*spans, other]))
    return path


def test_trace_is_found_by_correlation_id(span_file: Path) -> None:
    """The conversation id faststream records finds the request's trace and no other."""
    assert trace_ids_for(read_spans(span_file), "c-1") == ["t1"]
    assert trace_ids_for(read_spans(span_file), "nope") == []


def test_hops_split_kafka_wait_from_work(span_file: Path) -> None:
    """Each hop's time in Kafka runs from the publish's start to the process span's start."""
    trace = spans_of(read_spans(span_file), "t1")
    found = {h.topic: h for h in hops(trace)}
    assert found["medmesh.inference.requests"].wait_ms == pytest.approx(6.0)
    assert found["medmesh.inference.requests"].work_ms == pytest.approx(3.0)
    assert found["medmesh.model.m.v1.tasks"].wait_ms == pytest.approx(21.0)
    assert found["medmesh.model.m.v1.tasks"].consumer == "inference-m-v1"


def test_waterfall_has_a_line_per_span_in_start_order(span_file: Path) -> None:
    """The rendering lists every span of the trace once, earliest first."""
    lines = render(spans_of(read_spans(span_file), "t1"))
    assert len(lines) == 5
    assert lines[0].endswith("POST /fhir")
    assert "█" in lines[-1]


def test_replay_of_a_rejected_inbound_event_restores_its_bytes() -> None:
    """A base64 raw value goes back to its source topic byte for byte, tagged as a replay."""
    original = b"\xff\x00not utf-8"
    event = {
        "source_topic": "medmesh.fhir.inbound",
        "raw_encoding": "base64",
        "raw_value": base64.b64encode(original).decode(),
    }
    replay = replay_of(event, b"k", "medmesh.fhir.invalid/0/7")
    assert (replay.topic, replay.key, replay.value) == ("medmesh.fhir.inbound", b"k", original)
    assert replay.headers == [(REPLAY_HEADER, b"medmesh.fhir.invalid/0/7")]


def test_replay_of_a_failed_inference_sends_the_task_to_its_version_topic() -> None:
    """An InferenceFailed entry replays its RunInference on the version's task topic."""
    task = make_task(model_version=2)
    event = {
        "schema": "medmesh.InferenceFailed/1",
        "reason": "boom",
        "task": json.loads(to_wire(task)),
    }
    replay = replay_of(event, None, "medmesh.inference.failed/1/3")
    assert replay.topic == "medmesh.model.deterioration.v2.tasks"
    assert json.loads(replay.value)["correlation_id"] == task.correlation_id


def test_entries_without_a_source_cannot_be_replayed() -> None:
    """An entry that names no source is refused with a clear error."""
    with pytest.raises(ValueError, match="nothing that can be replayed"):
        replay_of({"reason": "?"}, None, "x/0/0")


def test_summary_names_the_reason_and_fhirpath_not_the_payload() -> None:
    """Summaries quote diagnostics and expressions, never the raw value."""
    event = {
        "raw_value": "Patient secret",
        "operation_outcome": {
            "issue": [
                {
                    "severity": "error",
                    "diagnostics": "bad status",
                    "expression": ["Observation.status"],
                }
            ]
        },
    }
    text = summary(event)
    assert text == "error: bad status at Observation.status"
    assert "secret" not in text


def test_a_truncated_dead_letter_is_not_replayed_as_if_whole() -> None:
    """A dead letter keeping only the start of its record is refused, naming where the whole is."""
    event = {
        "source_topic": "medmesh.fhir.inbound",
        "source_offset": 41,
        "raw_value": '{"resourceType": "Bun',
        "raw_encoding": "utf-8",
        "raw_truncated": True,
        "raw_size": 1153434,
        "raw_sha256": "ab" * 32,
    }
    with pytest.raises(ValueError, match=r"1153434-byte record .* offset 41"):
        replay_of(event, None, "test")
