"""Poison records on ingest's inbound topic (in-memory transactional Kafka): none stalls the
partition, none sinks the valid events beside it, and each is rejected with its reason."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from medmesh_contracts import headers as h
from medmesh_contracts.events import FhirEventRejected, RequestInference
from medmesh_ingest.service import Prepared
from tests.service.conftest import FIXTURES
from tests.service.test_ingest_app import Harness, running, settings

MAX_BYTES = 1_000_000  # MEDMESH_DEAD_LETTER_MAX_BYTES's default
MEDIUM = (FIXTURES / "vitals-bundle-medium.json").read_bytes()
HIGH = (FIXTURES / "vitals-bundle-high.json").read_bytes()


@pytest.fixture
async def inbound() -> AsyncIterator[Harness]:
    """The real ingest app, started, on an in-memory transactional Kafka."""
    async with running(settings(dead_letter_max_bytes=MAX_BYTES)) as harness:
        yield harness


def _subjects(harness: Harness) -> list[str]:
    return sorted(
        RequestInference.model_validate_json(r).subject_reference for r in harness.captured.requests
    )


def _ecg_with_lead(**sampled_data: Any) -> bytes:
    """The R4B sinus ECG fixture with its lead's SampledData changed."""
    bundle: dict[str, Any] = json.loads((FIXTURES / "ecg-sinus.json").read_text())
    bundle["entry"][1]["resource"]["component"][0]["valueSampledData"].update(sampled_data)
    return json.dumps(bundle).encode()


async def test_a_null_header_value_is_read_as_absent_and_the_next_record_is_processed_too(
    inbound: Harness,
) -> None:
    """A poll whose first record has null header values (correlation id, traceparent, content
    type) is processed whole: both vitals Bundles become requests, none is rejected."""
    nulls: list[tuple[str, bytes | None]] = [
        (h.CORRELATION_ID, None),
        ("traceparent", None),
        ("content-type", None),
        ("x-sender", b"ward-7"),
    ]
    inbound.kafka.append("medmesh.fhir.inbound", MEDIUM, nulls)
    await inbound.inbound(HIGH)
    assert _subjects(inbound) == ["Patient/example-high", "Patient/example-medium"]
    assert inbound.captured.invalid == []


async def test_a_rejected_record_over_a_mebibyte_is_dead_lettered_within_the_bound(
    inbound: Harness,
) -> None:
    """1.1 MiB of garbage on the inbound topic becomes a FhirEventRejected that fits the
    producer's request (value and key <= MEDMESH_DEAD_LETTER_MAX_BYTES) with the start of the
    payload, its whole size and SHA-256; the valid Bundle after it still becomes a request."""
    garbage = os.urandom(1_100 * 1024)
    inbound.kafka.append("medmesh.fhir.inbound", garbage, key=b"mrn-garbage")
    await inbound.inbound(MEDIUM)
    (dead,) = inbound.kafka.records("medmesh.fhir.invalid")
    wire = dead.value or b""
    assert len(wire) + len(dead.key or b"") <= MAX_BYTES
    event = FhirEventRejected.model_validate_json(wire)
    assert event.raw_truncated
    assert event.raw_size == len(garbage)
    assert event.raw_sha256 == hashlib.sha256(garbage).hexdigest()
    assert event.raw_encoding == "base64"
    assert len(event.raw_value) > MAX_BYTES // 2  # as much as fits, not nothing
    assert json.loads(wire)["operation_outcome"]["resourceType"] == "OperationOutcome"
    assert len(inbound.captured.requests) == 1


async def test_the_issues_poison_sequence_loses_neither_valid_bundle(inbound: Harness) -> None:
    """The sequence that lost two valid Bundles (issue 16): an overflowing waveform, a valid
    Bundle with a null header, 1.1 MiB of garbage and another valid Bundle, in one partition:
    both Bundles become requests, both poisons are rejected, the offset moves past all four."""
    overflow = _ecg_with_lead(origin={"value": 1e308, "unit": "V", "code": "V"})
    inbound.kafka.append("medmesh.fhir.inbound", overflow)
    inbound.kafka.append("medmesh.fhir.inbound", MEDIUM, [(h.CORRELATION_ID, None)])
    inbound.kafka.append("medmesh.fhir.inbound", os.urandom(1_100 * 1024))
    await inbound.inbound(HIGH)
    assert _subjects(inbound) == ["Patient/example-high", "Patient/example-medium"]
    assert len(inbound.captured.invalid) == 2
    assert len(inbound.captured.states) == 2


async def test_an_event_whose_handling_keeps_raising_is_rejected_and_its_neighbours_pass(
    inbound: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unforeseen error on one event (here: preparing it raises) is retried, then the event
    is rejected naming the error kind; the events before and after it become requests."""
    prepare = inbound.ingest.prepare_inbound
    calls: list[bytes] = []

    async def failing_on_marker(record: Any) -> Any:
        calls.append(record.value)
        if record.value == b'{"marker": true}':
            raise ZeroDivisionError("a bug")
        return await prepare(record)

    monkeypatch.setattr(inbound.ingest, "prepare_inbound", failing_on_marker)
    inbound.kafka.append("medmesh.fhir.inbound", MEDIUM)
    inbound.kafka.append("medmesh.fhir.inbound", b'{"marker": true}')
    await inbound.inbound(HIGH)
    assert _subjects(inbound) == ["Patient/example-high", "Patient/example-medium"]
    (dead,) = inbound.captured.invalid
    issue = json.loads(dead)["operation_outcome"]["issue"][0]
    assert "failed 3 times" in issue["diagnostics"]
    assert "ZeroDivisionError" in issue["diagnostics"]
    assert calls.count(b'{"marker": true}') == 3


async def test_a_merge_that_raises_for_one_event_is_found_by_applying_alone(
    inbound: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error while merging a poll (a bug in the state merge) fails only the event that
    causes it: the poll is applied one event at a time, the others become requests."""
    service = inbound.ingest.service
    apply = service.apply

    async def failing_with_high(prepared: Any, publish: Any = None) -> Any:
        if any(
            isinstance(p, Prepared) and "example-high" in str(p.groups[0].found) for p in prepared
        ):
            raise RuntimeError("merge bug")
        return await apply(prepared, publish)

    monkeypatch.setattr(service, "apply", failing_with_high)
    inbound.kafka.append("medmesh.fhir.inbound", MEDIUM)
    await inbound.inbound(HIGH)
    assert _subjects(inbound) == ["Patient/example-medium"]
    (dead,) = inbound.captured.invalid
    assert "RuntimeError" in json.dumps(json.loads(dead)["operation_outcome"])
