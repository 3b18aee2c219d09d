"""Dead-lettering: a message a consumer cannot process is kept, with the reason.

Every dead letter built from a consumed record goes through ``dead_letter_event`` (any
consumer's MessageDeadLettered) or ``rejected_event`` (ingest's FhirEventRejected). A dead letter
is one Kafka record, so it must fit under the producer's request size: the record's value is
kept whole when it fits under ``MEDMESH_DEAD_LETTER_MAX_BYTES`` (key and event together), and
otherwise only its start is kept (``raw_truncated``). Either way the event carries the size and
the SHA-256 of the whole value, so a dead letter can always be published and the partition it
came from moves on.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, TypedDict, TypeVar

from opentelemetry import propagate
from opentelemetry.metrics import Counter

from medmesh_contracts import headers as h
from medmesh_contracts.events import (
    FhirEventRejected,
    MessageDeadLettered,
    Producer,
    new_id,
    schema_of,
    to_wire,
)
from medmesh_runtime.kafka import encode_raw, message_headers
from medmesh_runtime.logging import get_logger, log_dead_letter
from medmesh_runtime.metrics import meter
from medmesh_runtime.settings import DeadLetterSettings
from medmesh_runtime.transactional import OutgoingRecord, encoded_headers

log = get_logger("medmesh.deadletter")

# A reason is an exception's text; beyond this many characters it is cut (a validation error
# can quote a large input).
REASON_MAX_CHARS = 4000
# An OperationOutcome takes at most this share of a dead letter; issues beyond it are left out
# and counted in a last issue (a large Bundle can fail on thousands of elements).
_OUTCOME_SHARE = 4

Encoding = Literal["utf-8", "base64"]
E = TypeVar("E", MessageDeadLettered, FhirEventRejected)

# JSON escapes these bytes with two characters (\" \\ \b \f \n \r \t) and the other control
# characters with six (\u00XX); every other byte of UTF-8 text is written as it is.
_SHORT_ESCAPES = b'"\\\b\f\n\r\t'
_LONG_ESCAPES = bytes(b for b in range(0x20) if b not in _SHORT_ESCAPES)


class Publisher(Protocol):
    """The part of a faststream publisher used here."""

    async def publish(self, message: Any, *args: Any, **kwargs: Any) -> Any: ...


def correlation_of(record: Any) -> str:
    """The medmesh correlation id in a record's headers, or a new one (also for a header
    without a value, which Kafka allows)."""
    for key, value in record.headers or ():
        if key == h.CORRELATION_ID and value:
            return bytes(value).decode(errors="replace")
    return new_id()


@functools.cache
def configured_max_bytes() -> int:
    """This process's ``MEDMESH_DEAD_LETTER_MAX_BYTES`` (read once)."""
    return DeadLetterSettings().dead_letter_max_bytes


@functools.cache
def _dead_letters() -> Counter:
    # Built once: OpenTelemetry's proxy meter binds it to the provider once metrics are set up.
    return meter("medmesh.deadletter").create_counter(
        "medmesh.dead_letters", unit="{message}", description="Messages sent to a dead-letter topic"
    )


def _json_text_cost(data: bytes) -> int:
    """Bytes that UTF-8 text takes as a JSON string's content (quotes not counted)."""
    short = len(data) - len(data.translate(None, _SHORT_ESCAPES))
    long = len(data) - len(data.translate(None, _LONG_ESCAPES))
    return len(data) + short + 5 * long


def _text_prefix(raw: bytes, budget: int) -> str:
    """The longest start of UTF-8 text whose JSON string content takes at most budget bytes."""
    # Bisect on the byte length; the cost of raw[:lo] is kept, so each step scans only the
    # bytes between the bounds (about twice the value in all).
    lo, lo_cost, hi = 0, 0, min(len(raw), max(budget, 0)) + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cost = lo_cost + _json_text_cost(raw[lo:mid])
        if cost <= budget:
            lo, lo_cost = mid, cost
        else:
            hi = mid
    # The cut may split a character: its incomplete last bytes are dropped.
    return raw[:lo].decode("utf-8", errors="ignore")


def _base64_prefix(raw: bytes, budget: int) -> str:
    """The base64 of the longest start of raw whose base64 takes at most budget bytes."""
    return base64.b64encode(raw[: max(budget, 0) // 4 * 3]).decode("ascii")


class KeptRecord(TypedDict):
    """What every dead letter (MessageDeadLettered, FhirEventRejected) keeps of its source
    record: where it was, and its value (whole or its start) with the whole value's size and
    SHA-256."""

    source_topic: str
    source_partition: int
    source_offset: int
    raw_value: str
    raw_encoding: Encoding
    raw_truncated: bool
    raw_size: int
    raw_sha256: str


def bounded_event(build: Callable[[KeptRecord], E], record: Any, max_bytes: int) -> E:
    """The event ``build(kept)`` makes of a consumed record (aiokafka ConsumerRecord), its wire
    form and the record's key together at most ``max_bytes``: ``kept`` holds the whole value
    when that fits, else the longest start of it that does (text stays text, anything else
    base64).

    ``build`` sets the fields the event has beyond ``KeptRecord`` (its correlation id, its
    producer, its reason or OperationOutcome).
    """
    raw: bytes = record.value or b""
    sha256 = hashlib.sha256(raw).hexdigest()

    def build_with(value: str, encoding: Encoding, truncated: bool) -> E:
        return build(
            KeptRecord(
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
                raw_value=value,
                raw_encoding=encoding,
                raw_truncated=truncated,
                raw_size=len(raw),
                raw_sha256=sha256,
            )
        )

    value, encoding = encode_raw(raw)
    limit = max_bytes - len(record.key or b"")
    if len(value) <= limit:  # else it cannot fit: each character takes a byte or more
        event = build_with(value, encoding, False)
        if len(to_wire(event)) <= limit:
            return event
    # The envelope with an empty value: the budget for the value's JSON string content.
    budget = limit - len(to_wire(build_with("", encoding, True)))
    for _ in range(3):
        prefix = _text_prefix(raw, budget) if encoding == "utf-8" else _base64_prefix(raw, budget)
        event = build_with(prefix, encoding, True)
        over = len(to_wire(event)) - limit
        if over <= 0:
            break
        budget -= over  # not expected: the serializer escaped more than counted
    return event


def _reason(reason: str) -> str:
    if len(reason) <= REASON_MAX_CHARS:
        return reason
    return reason[:REASON_MAX_CHARS] + f"... [{len(reason) - REASON_MAX_CHARS} characters cut]"


def dead_letter_event(
    record: Any, reason: str, producer: Producer, *, max_bytes: int | None = None
) -> MessageDeadLettered:
    """The MessageDeadLettered event keeping one consumed record (aiokafka ConsumerRecord):
    its value whole, or its start when the dead letter would exceed ``max_bytes`` (default:
    ``MEDMESH_DEAD_LETTER_MAX_BYTES``), with the size and SHA-256 of the whole value.

    Every dead letter built is counted (medmesh_dead_letters_total by source topic and service).
    """
    _dead_letters().add(1, {"source_topic": record.topic, "service": producer.service})
    correlation_id = correlation_of(record)
    cut_reason = _reason(reason)

    def build(kept: KeptRecord) -> MessageDeadLettered:
        return MessageDeadLettered(
            correlation_id=correlation_id, producer=producer, reason=cut_reason, **kept
        )

    return bounded_event(build, record, max_bytes or configured_max_bytes())


def _bounded_outcome(outcome: Mapping[str, Any], max_bytes: int) -> dict[str, Any]:
    """An OperationOutcome of at most ``max_bytes`` (JSON): its first issues, then one that
    says how many were left out."""
    whole = dict(outcome)
    if len(json.dumps(whole, separators=(",", ":"))) <= max_bytes:
        return whole
    issues = list(whole.get("issue") or [])
    kept: list[Any] = []
    size = 200  # the outcome without issues, and the last issue
    for issue in issues:
        size += len(json.dumps(issue, separators=(",", ":"))) + 1
        if size > max_bytes:
            break
        kept.append(issue)
    left_out = len(issues) - len(kept)
    note = f"{left_out} further issues left out of this dead letter (MEDMESH_DEAD_LETTER_MAX_BYTES)"
    kept.append({"severity": "information", "code": "too-costly", "diagnostics": note})
    return {"resourceType": "OperationOutcome", "issue": kept}


def rejected_event(
    record: Any,
    operation_outcome: Mapping[str, Any],
    producer: Producer,
    *,
    max_bytes: int | None = None,
) -> FhirEventRejected:
    """The FhirEventRejected event keeping one rejected inbound record, bounded as
    ``dead_letter_event`` bounds a dead letter (the OperationOutcome takes at most a quarter).

    It starts a correlation of its own: an inbound record's headers are its sender's.
    """
    limit = max_bytes or configured_max_bytes()
    correlation_id = new_id()
    outcome = _bounded_outcome(operation_outcome, limit // _OUTCOME_SHARE)

    def build(kept: KeptRecord) -> FhirEventRejected:
        return FhirEventRejected(
            correlation_id=correlation_id, producer=producer, operation_outcome=outcome, **kept
        )

    return bounded_event(build, record, limit)


def dead_letter_record(topic: str, record: Any, reason: str, producer: Producer) -> OutgoingRecord:
    """The dead letter of one consumed record, to produce in the transaction of its offset
    (``dead_letter_event`` bounds it), with the current trace context in its headers."""
    event = dead_letter_event(record, reason, producer)
    headers = message_headers(event.correlation_id, schema_of(MessageDeadLettered))
    propagate.inject(headers)
    return OutgoingRecord(topic, record.key, to_wire(event), encoded_headers(headers))


class DeadLetters:
    """Publishes MessageDeadLettered events for one service's dead-letter topic."""

    def __init__(self, publisher: Publisher, producer: Producer) -> None:
        self._publisher = publisher
        self._producer = producer

    async def send(self, record: Any, reason: str) -> None:
        """Dead-letter one consumed record (an aiokafka ConsumerRecord) with a reason."""
        event = dead_letter_event(record, reason, self._producer)
        await self._publisher.publish(
            to_wire(event),
            key=record.key,
            headers=message_headers(event.correlation_id, schema_of(MessageDeadLettered)),
        )
        log_dead_letter(log, "message", record, reason, truncated=event.raw_truncated)
