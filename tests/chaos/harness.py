"""The fault suite's parts: an HTTP load generator that retries what was not accepted, a
read_committed reader of the reports topic that times arrivals, the per-fault result row, and for
the poison fault the poison records and a reader of the dead-letter topics.

An event is one vital-signs Bundle of a fresh patient, or for the PACS fault one ImagingStudy of
a fresh patient (ingest dedupes identical content), so a report is matched to its event by the
DiagnosticReport's subject; an imaging report's subject is the ImagingStudy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_reporting.report import MODEL_VERSION_TAG_SYSTEM
from medmesh_runtime.kafka import record_headers
from medmesh_runtime.settings import PRODUCER_MAX_REQUEST_SIZE

# A 503's Retry-After is honoured up to this many seconds (ingest says 5; the suite stays short).
MAX_RETRY_AFTER_S = 2.0
# After no answer at all (connection refused or reset, timeout), try again after this long.
NO_ANSWER_RETRY_S = 0.5


@dataclass
class Event:
    """One event of the load and everything that happened to it."""

    patient: str
    payload: bytes
    planned_at: float = 0.0
    accepted_at: float | None = None
    accepted_status: int | None = None
    correlation_ids: tuple[str, ...] = ()
    attempts: int = 0
    refused: int = 0  # 503 answers (not accepted, retried)
    no_answer: int = 0  # connection refused or reset, timeouts (retried)
    rejected: list[int] = field(default_factory=list)  # any other non-2xx (a bug here)


@dataclass(frozen=True)
class Arrival:
    """One report read from the reports topic."""

    patient: str
    correlation_id: str
    model_version: str | None
    at: float


def patient_of(bundle: dict[str, Any]) -> str | None:
    """The patient id of a report Bundle's DiagnosticReport subject ("Patient/<id>")."""
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "DiagnosticReport":
            reference = str(resource.get("subject", {}).get("reference", ""))
            return reference.removeprefix("Patient/") or None
    return None


def model_version_of(node: Any) -> str | None:
    """The model version tag ("deterioration/v1") anywhere in a report Bundle."""
    if isinstance(node, dict):
        if node.get("system") == MODEL_VERSION_TAG_SYSTEM:
            return str(node.get("code"))
        children: Any = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = model_version_of(child)
        if found is not None:
            return found
    return None


async def consumer_at_end(bootstrap: str, names: list[str]) -> AIOKafkaConsumer:
    """A started read_committed consumer assigned every partition of ``names`` at its current
    end (resolved before returning, so nothing produced afterwards is missed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        # A dead letter of an oversized poison carries up to MEDMESH_DEAD_LETTER_MAX_BYTES.
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    partitions: list[TopicPartition] = []
    for name in names:
        found = consumer.partitions_for_topic(name)
        for _ in range(50):
            if found:
                break
            await consumer._client.force_metadata_update()  # aiokafka has no public refresh
            found = consumer.partitions_for_topic(name)
            await asyncio.sleep(0.1)
        if not found:
            await consumer.stop()
            raise RuntimeError(f"topic {name} has no partitions")
        partitions += [TopicPartition(name, p) for p in sorted(found)]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for partition in partitions:  # resolve the end offsets now, before any load is sent
        await consumer.position(partition)
    return consumer


class ReportReader:
    """Reads medmesh.reports.diagnostic with read_committed from the current end, timing each
    arrival; rides out broker restarts (aiokafka reconnects and keeps its positions)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.arrivals: list[Arrival] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Assign every partition at its end offset, then collect in the background."""
        consumer = await consumer_at_end(self.bootstrap, [topics.REPORTS_DIAGNOSTIC])
        self._consumer = consumer
        self._task = asyncio.create_task(self._collect(consumer))

    async def _collect(self, consumer: AIOKafkaConsumer) -> None:
        async for message in consumer:
            bundle = json.loads(message.value or b"{}")
            patient = patient_of(bundle)
            if patient is None:
                continue
            cid = record_headers(message).get(h.CORRELATION_ID, "")
            self.arrivals.append(Arrival(patient, cid, model_version_of(bundle), time.monotonic()))

    def of(self, patients: set[str]) -> list[Arrival]:
        """The reports seen so far whose subject is one of ``patients``."""
        return [a for a in self.arrivals if a.patient in patients]

    async def wait_for_all(self, patients: set[str], timeout_s: float, grace_s: float) -> None:
        """Until every patient has a report (then ``grace_s`` more, for duplicates) or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if patients <= {a.patient for a in self.of(patients)}:
                await asyncio.sleep(grace_s)
                return
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Stop collecting (the task first: it iterates the consumer)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter read from a dead-letter topic: where its record came from and why."""

    topic: str
    source: tuple[str, int, int]  # (topic, partition, offset) of the dead-lettered record
    reason: str  # MessageDeadLettered's reason, or ingest's OperationOutcome as JSON
    raw_truncated: bool
    raw_size: int | None


class DeadLetterReader:
    """Reads the dead-letter topics with read_committed from their current end."""

    def __init__(self, bootstrap: str, names: list[str]) -> None:
        self.bootstrap = bootstrap
        self.names = names
        self.letters: list[DeadLetter] = []
        self.unreadable = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Assign every partition at its end offset, then collect in the background."""
        self._consumer = await consumer_at_end(self.bootstrap, self.names)
        self._task = asyncio.create_task(self._collect(self._consumer))

    async def _collect(self, consumer: AIOKafkaConsumer) -> None:
        async for message in consumer:
            try:
                event = json.loads(message.value or b"{}")
                source = (
                    str(event["source_topic"]),
                    int(event["source_partition"]),
                    int(event["source_offset"]),
                )
            except (ValueError, KeyError, TypeError):
                self.unreadable += 1
                continue
            reason = event.get("reason") or _outcome_text(event.get("operation_outcome"))
            self.letters.append(
                DeadLetter(
                    message.topic,
                    source,
                    str(reason),
                    bool(event.get("raw_truncated")),
                    event.get("raw_size"),
                )
            )

    def of(self, source: tuple[str, int, int]) -> list[DeadLetter]:
        """The dead letters of the record at ``source`` (topic, partition, offset)."""
        return [letter for letter in self.letters if letter.source == source]

    async def wait_for(self, sources: set[tuple[str, int, int]], timeout_s: float) -> None:
        """Until every record in ``sources`` has a dead letter, or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sources <= {letter.source for letter in self.letters}:
                return
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Stop collecting (the task first: it iterates the consumer)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def _outcome_text(outcome: Any) -> str:
    """An OperationOutcome's issues as one line: each issue's expressions and diagnostics."""
    issues = outcome.get("issue", []) if isinstance(outcome, dict) else []
    return "; ".join(
        " ".join([*map(str, issue.get("expression", [])), str(issue.get("diagnostics", ""))])
        for issue in issues
        if isinstance(issue, dict)
    ).strip()


# A poison over 1 MiB: twice the request size a service's producer may send (so a service can
# only dead-letter it truncated). Produced gzip-compressed: the broker checks its
# message.max.bytes (the local broker keeps Kafka's default, 1 MiB + 12 bytes) against the
# compressed batch, so the only limit on the value is this producer's max_request_size.
OVERSIZED_VALUE_BYTES = 2 * PRODUCER_MAX_REQUEST_SIZE


@dataclass
class Poison:
    """One poison record produced straight to a topic, and where it landed."""

    kind: str
    topic: str
    value: bytes
    dead_letter_topic: str
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    # Text the dead letter's reason must contain (empty: any reason but an empty one).
    reason_has: str = ""
    partition: int | None = None
    offset: int | None = None

    @property
    def source(self) -> tuple[str, int, int]:
        """(topic, partition, offset) once produced."""
        if self.partition is None or self.offset is None:
            raise RuntimeError(f"{self.kind} on {self.topic} was not produced")
        return (self.topic, self.partition, self.offset)


def common_poisons(topic: str, dead_letter_topic: str) -> list[Poison]:
    """The poison every consumed topic gets: bytes that are not JSON, JSON of no schema of
    medmesh's, a record whose headers have null values (Kafka allows them; they once stalled
    faststream's parser), and a value over 1 MiB."""
    oversized = b'{"poison": "' + b"x" * (OVERSIZED_VALUE_BYTES - 14) + b'"}'
    null_headers: list[tuple[str, bytes | None]] = [
        (h.CORRELATION_ID, None),
        (h.SCHEMA, None),
        ("content-type", None),
    ]
    return [
        Poison("not JSON", topic, b"\x00\xff\xfe poison \x80\x81 {", dead_letter_topic),
        Poison(
            "wrong schema", topic, b'{"poison": "wrong schema", "n": [1, 2]}', dead_letter_topic
        ),
        Poison(
            "null header values",
            topic,
            b'{"poison": "null headers"}',
            dead_letter_topic,
            headers=null_headers,
        ),
        Poison("value over 1 MiB", topic, oversized, dead_letter_topic),
    ]


async def produce_poisons(bootstrap: str, poisons: list[Poison]) -> None:
    """Produce each poison (acks=all) and note its partition and offset."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        compression_type="gzip",
        max_request_size=OVERSIZED_VALUE_BYTES + 64 * 1024,
    )
    await producer.start()
    try:
        for poison in poisons:
            metadata = await producer.send_and_wait(
                poison.topic, poison.value, headers=list(poison.headers)
            )
            poison.partition, poison.offset = metadata.partition, metadata.offset
    finally:
        await producer.stop()


async def send_until_accepted(client: httpx.AsyncClient, event: Event, give_up_at: float) -> None:
    """POST the event at its planned time; on 503 or no answer, the same event again later,
    until a 2xx (accepted) or ``give_up_at``; any other status is recorded and not retried."""
    await asyncio.sleep(max(0.0, event.planned_at - time.monotonic()))
    while time.monotonic() < give_up_at:
        event.attempts += 1
        try:
            response = await client.post(
                "/fhir", content=event.payload, headers={"content-type": "application/fhir+json"}
            )
        except httpx.HTTPError:
            event.no_answer += 1
            await asyncio.sleep(NO_ANSWER_RETRY_S)
            continue
        if response.status_code // 100 == 2:
            event.accepted_at = time.monotonic()
            event.accepted_status = response.status_code
            ids = response.headers.get(h.CORRELATION_ID, "")
            event.correlation_ids = tuple(i for i in ids.split(",") if i)
            return
        if response.status_code == 503:
            event.refused += 1
            retry_after = response.headers.get("retry-after", "1")
            delay = float(retry_after) if retry_after.isdigit() else 1.0
            await asyncio.sleep(min(delay, MAX_RETRY_AFTER_S))
            continue
        event.rejected.append(response.status_code)
        return


@dataclass(frozen=True)
class FaultResult:
    """One row of the fault suite's table."""

    fault: str
    events: int
    rate_per_s: float
    accepted: int
    answered_503: int
    no_answer: int
    other_non_2xx: int
    retried_events: int
    reports: int
    missing: int
    duplicates: int
    correlation_mismatches: int
    restart_s: float
    stall_s: float | None
    recovery_s: float | None
    drain_s: float | None
    p50_latency_s: float | None
    max_latency_s: float | None
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values."""
        return asdict(self)


def summarize(
    fault: str,
    events: list[Event],
    arrivals: list[Arrival],
    rate_per_s: float,
    fault_at: float,
    restart_s: float,
    started: float,
) -> FaultResult:
    """Counts and timings of one fault run.

    stall_s: the longest time without any report from the fault on (reports flow every
    1/rate seconds under the steady load, so this is the outage the fault caused).
    recovery_s: from the fault to the end of that stall (reports flow again).
    drain_s: from the fault to the last report (the backlog drained).
    latency: from an event's acceptance (2xx) to its first report.
    """
    accepted = {e.patient: e for e in events if e.accepted_at is not None}
    per_patient = Counter(a.patient for a in arrivals)
    first: dict[str, Arrival] = {}
    for arrival in arrivals:
        first.setdefault(arrival.patient, arrival)
    mismatches = sum(
        1
        for patient, event in accepted.items()
        if patient in first
        and event.correlation_ids
        and first[patient].correlation_id not in event.correlation_ids
    )
    stall_s, recovery_s = _stall(sorted(a.at for a in arrivals), fault_at)
    latencies = [
        first[p].at - e.accepted_at
        for p, e in accepted.items()
        if p in first and e.accepted_at is not None
    ]
    return FaultResult(
        fault=fault,
        events=len(events),
        rate_per_s=rate_per_s,
        accepted=len(accepted),
        answered_503=sum(e.refused for e in events),
        no_answer=sum(e.no_answer for e in events),
        other_non_2xx=sum(len(e.rejected) for e in events),
        retried_events=sum(1 for e in events if e.attempts > 1),
        reports=len(arrivals),
        missing=sum(1 for p in accepted if p not in per_patient),
        duplicates=sum(n - 1 for n in per_patient.values() if n > 1),
        correlation_mismatches=mismatches,
        restart_s=round(restart_s, 2),
        stall_s=stall_s,
        recovery_s=recovery_s,
        drain_s=round(max(a.at for a in arrivals) - fault_at, 2) if arrivals else None,
        p50_latency_s=round(statistics.median(latencies), 2) if latencies else None,
        max_latency_s=round(max(latencies), 2) if latencies else None,
        wall_s=round(time.monotonic() - started, 1),
    )


def _stall(times: list[float], fault_at: float) -> tuple[float | None, float | None]:
    """(longest gap between reports from ``fault_at`` on, fault to the end of that gap)."""
    later = [t for t in times if t >= fault_at]
    if not later:
        return None, None
    gaps = [(b - a, b) for a, b in zip([fault_at, *later], later, strict=False)]
    gap, end = max(gaps)
    return round(gap, 2), round(end - fault_at, 2)


COLUMNS = (
    ("fault", "fault"),
    ("events", "events"),
    ("rate_per_s", "rate/s"),
    ("accepted", "accepted (2xx)"),
    ("answered_503", "503 answers"),
    ("no_answer", "no answer"),
    ("other_non_2xx", "other non-2xx"),
    ("retried_events", "events retried"),
    ("reports", "reports"),
    ("missing", "lost"),
    ("duplicates", "duplicates"),
    ("restart_s", "restart s"),
    ("stall_s", "longest stall s"),
    ("recovery_s", "recovery s"),
    ("drain_s", "drained s"),
    ("p50_latency_s", "p50 2xx->report s"),
    ("max_latency_s", "max 2xx->report s"),
    ("verdict", "verdict"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The result rows as a Markdown table."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |\n"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|\n"
    body = "".join(
        "| "
        + " | ".join("-" if row.get(key) is None else str(row[key]) for key, _ in COLUMNS)
        + " |\n"
        for row in rows
    )
    return head + rule + body
