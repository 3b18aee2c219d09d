"""Dead letters always fit in one Kafka record: a value too large keeps its start, with the
size and SHA-256 of the whole (medmesh_runtime.deadletter)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from medmesh_contracts.events import FhirEventRejected, MessageDeadLettered, Producer, to_wire
from medmesh_runtime.deadletter import (
    REASON_MAX_CHARS,
    DeadLetters,
    configured_max_bytes,
    dead_letter_event,
    rejected_event,
)
from medmesh_runtime.logging import (
    DEAD_LETTER_LOG_REASON_CHARS,
    error_reason,
    get_logger,
    log_dead_letter,
)

PRODUCER = Producer(service="router", instance="router-1")
MIB = 1024 * 1024


@dataclass
class Record:
    """The fields of an aiokafka ConsumerRecord a dead letter reads."""

    value: bytes | None
    key: bytes | None = b"p-pseudonym"
    topic: str = "medmesh.inference.requests"
    partition: int = 3
    offset: int = 41
    headers: tuple[tuple[str, bytes | None], ...] = ()


def _raw(event: MessageDeadLettered | FhirEventRejected) -> bytes:
    if event.raw_encoding == "base64":
        return base64.b64decode(event.raw_value)
    return event.raw_value.encode()


def _escape_heavy_text(size: int) -> bytes:
    """UTF-8 text where many characters cost more than one byte in JSON."""
    rng = random.Random(7)  # noqa: S311 -- reproducible test data, not a secret
    alphabet = ['"', "\\", "\n", "\t", "\x00", "\x1f", "é", "€", "𝄞", "a", "{", " "]
    text = "".join(rng.choice(alphabet) for _ in range(size // 2))
    return text.encode()[:size].decode("utf-8", errors="ignore").encode()


def test_a_small_record_is_kept_whole_with_its_size_and_hash() -> None:
    """A dead letter under the bound keeps the value whole, untruncated, with its size and
    SHA-256."""
    value = b'{"resourceType": "Bundle", "note": "caf\xc3\xa9"}'
    event = dead_letter_event(Record(value), "ValidationError: no", PRODUCER, max_bytes=8192)
    assert not event.raw_truncated
    assert _raw(event) == value
    assert event.raw_size == len(value)
    assert event.raw_sha256 == hashlib.sha256(value).hexdigest()


@pytest.mark.parametrize("max_bytes", [4096, 65_536, None])
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_a_record_over_the_bound_keeps_its_start_within_it(
    kind: str, max_bytes: int | None
) -> None:
    """A 1.1 MiB value (escape-heavy text or random bytes) gives a dead letter whose wire form
    and key fit the bound (default MEDMESH_DEAD_LETTER_MAX_BYTES) nearly exactly, holding the
    value's start, and the size and SHA-256 of the whole."""
    value = _escape_heavy_text(1_100 * 1024) if kind == "text" else os.urandom(1_100 * 1024)
    record = Record(value)
    event = dead_letter_event(record, "ValueError: bad", PRODUCER, max_bytes=max_bytes)
    bound = max_bytes or configured_max_bytes()
    used = len(to_wire(event)) + len(record.key or b"")
    assert bound - 16 <= used <= bound
    assert event.raw_truncated
    assert event.raw_encoding == ("utf-8" if kind == "text" else "base64")
    kept = _raw(event)
    assert value.startswith(kept)
    assert len(kept) > 0
    assert event.raw_size == len(value)
    assert event.raw_sha256 == hashlib.sha256(value).hexdigest()
    assert MessageDeadLettered.model_validate_json(to_wire(event)) == event


def test_the_default_bound_fits_the_producers_one_mebibyte_request() -> None:
    """MEDMESH_DEAD_LETTER_MAX_BYTES defaults to a bound that leaves room under the producer's
    1 MiB max_request_size for headers."""
    assert 0 < configured_max_bytes() <= MIB - 16 * 1024


class Captured:
    """A publisher that keeps what it was asked to publish."""

    def __init__(self) -> None:
        self.published: list[tuple[bytes, dict[str, Any]]] = []

    async def publish(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.published.append((message, kwargs))


async def test_dead_letters_send_publishes_a_bounded_event_with_a_cut_reason() -> None:
    """DeadLetters.send (the router's and workers' path) publishes a 1.1 MiB record's dead
    letter within the bound, its reason cut to REASON_MAX_CHARS."""
    publisher = Captured()
    record = Record(b"x" * (1_100 * 1024), headers=(("medmesh-correlation-id", None),))
    await DeadLetters(publisher, PRODUCER).send(record, "E: " + "y" * 100_000)
    ((wire, kwargs),) = publisher.published
    assert len(wire) + len(kwargs["key"]) <= configured_max_bytes()
    event = MessageDeadLettered.model_validate_json(wire)
    assert event.raw_truncated
    assert event.raw_size == 1_100 * 1024
    assert len(event.reason) < REASON_MAX_CHARS + 100


def test_a_rejected_inbound_record_with_a_huge_outcome_fits_with_its_first_issues() -> None:
    """ingest's FhirEventRejected of a 1.1 MiB record whose OperationOutcome has 20,000 issues
    fits the bound, keeps the first issues and says how many were left out."""
    value = json.dumps({"resourceType": "Bundle", "entry": ["x" * 64] * 17_000}).encode()
    assert len(value) > 1_100 * 1024
    issues = [
        {"severity": "error", "code": "invalid", "diagnostics": f"entry {i} is not a resource"}
        for i in range(20_000)
    ]
    outcome = {"resourceType": "OperationOutcome", "issue": issues}
    record = Record(value, key=b"mrn-1234", topic="medmesh.fhir.inbound")
    event = rejected_event(record, outcome, PRODUCER, max_bytes=200_000)
    assert len(to_wire(event)) + len(b"mrn-1234") <= 200_000
    assert event.raw_truncated
    assert event.raw_size == len(value)
    kept = event.operation_outcome["issue"]
    assert kept[0] == issues[0]
    assert kept[-1]["diagnostics"].startswith(f"{20_000 - (len(kept) - 1)} further issues")


def test_a_dead_letter_is_logged_with_where_it_was_and_the_start_of_its_reason() -> None:
    """log_dead_letter (every stage's dead-letter log line) names the stage's kind of record,
    its topic, partition and offset, and cuts the reason to DEAD_LETTER_LOG_REASON_CHARS."""
    record = Record(b"{}")
    with capture_logs() as logs:
        log_dead_letter(
            get_logger("test"), "request", record, "E: " + "y" * 10_000, truncated=False
        )
    (line,) = logs
    assert line["event"] == "request dead-lettered"
    assert line["log_level"] == "warning"
    assert (line["source_topic"], line["partition"], line["offset"]) == (record.topic, 3, 41)
    assert line["reason"] == ("E: " + "y" * 10_000)[:DEAD_LETTER_LOG_REASON_CHARS]
    assert line["truncated"] is False


def test_a_validation_error_is_described_without_its_input() -> None:
    """error_reason names a ValidationError's paths and kinds, never the input pydantic's own
    message quotes; another error keeps its kind and redacted text."""
    try:
        Producer.model_validate_json(b'{"service": "Jane Doe 1970-01-01", "instance": 7}')
    except ValidationError as exc:
        reason = error_reason(exc)
    assert reason == "ValidationError: 1 errors at instance: string_type"
    assert "Jane" not in reason
    assert error_reason(KeyError("medmesh.model")).startswith("KeyError: ")
