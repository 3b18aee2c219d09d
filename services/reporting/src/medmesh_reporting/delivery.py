"""Delivery of report Bundles to the hospital's FHIR server, so that a retry never duplicates.

``transaction_bundle`` turns a report (a collection Bundle) into a FHIR transaction: every
resource with an identifier is created conditionally (``ifNoneExist: identifier=system|value``),
so the report, its Observation and the model's Device exist once however often it is sent; the
Provenance, which has no identifier in R4B, is written with ``PUT`` to its deterministic id.
The transaction's content type names the report's FHIR version (``application/fhir+json;
fhirVersion=4.0`` for a report to an R4 source, 4.3 for R4B, 5.0 for R5): the version of the
record's ``medmesh-schema`` header, or of the ``DeliverReport`` command; a report of unknown
version goes without it (the server's default). An R4 report is built with the R4B models,
whose resources of a report are R4's (medmesh_reporting.report says why).

``Deliverer`` posts it with backoff: connection errors, timeouts, a token endpoint that issues
no token (SMART Backend Services, ``medmesh_runtime.smart``), 408, 429 and 5xx are retried
(doubling pauses, capped, or what the server's ``Retry-After`` asks when that is longer) until
``give_up_after_s``; any other answer is final. A report that is
refused or given up on becomes a ``ReportUndeliverable`` event carrying the server's
OperationOutcome. ``DeliveryLoop`` reads committed reports from medmesh.reports.diagnostic, and
``DeliverReport`` commands (a report to deliver again, e.g. replayed from the undeliverable topic
after a fix) from medmesh.reports.delivery-requests, and commits each offset only after the
report was delivered or recorded as undeliverable. A command's report is never published as a
report again, and the conditional creates keep the server at one copy: a redelivery cannot
duplicate a report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from aiokafka import TopicPartition
from pydantic import ValidationError

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import (
    DeliverReport,
    FhirVersion,
    Producer,
    ReportUndeliverable,
    new_id,
    schema_of,
    to_wire,
)
from medmesh_reporting.handling import ConsumedRecord
from medmesh_reporting.report import JsonDict
from medmesh_runtime.kafka import message_headers, record_headers
from medmesh_runtime.logging import error_reason, get_logger, redact_text
from medmesh_runtime.retry import retrying
from medmesh_runtime.smart import TokenUnavailableError, retry_after_s

log = get_logger("medmesh.reporting.delivery")

FHIR_JSON = "application/fhir+json"
# FHIR's fhirVersion MIME parameter of each version (http.html, "FHIR Version parameter").
MIME_VERSIONS: dict[FhirVersion, str] = {"R4": "4.0", "R4B": "4.3", "R5": "5.0"}
# The schema header of a report record and the version it names.
SCHEMA_VERSIONS: dict[str, FhirVersion] = {
    h.FHIR_R4_JSON: "R4",
    h.FHIR_R4B_JSON: "R4B",
    h.FHIR_R5_JSON: "R5",
}
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def transaction_bundle(report: JsonDict) -> JsonDict:
    """The transaction Bundle that writes a report's resources idempotently."""
    entries = []
    for entry in report["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        identifiers = resource.get("identifier") or []
        if identifiers:
            first = identifiers[0]
            token = quote(f"{first['system']}|{first['value']}", safe=":/|")
            request = {"method": "POST", "url": kind, "ifNoneExist": f"identifier={token}"}
        else:
            request = {"method": "PUT", "url": f"{kind}/{resource['id']}"}
        entries.append({"fullUrl": entry["fullUrl"], "resource": resource, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@dataclass(frozen=True)
class DeliveryBackoff:
    """Pauses between a report's delivery attempts: ``initial_s`` doubling up to ``max_s``, with
    +-20 % jitter, until ``give_up_after_s``."""

    initial_s: float = 0.5
    max_s: float = 30.0
    give_up_after_s: float = 600.0

    def pause(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_s, self.initial_s * 2.0 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)  # noqa: S311 -- jitter, not security


@dataclass(frozen=True)
class Delivered:
    """The server committed the transaction."""

    status_code: int
    attempts: int


@dataclass(frozen=True)
class Refused:
    """The server refused the report, or it could not be delivered in time."""

    reason: str
    attempts: int
    status_code: int | None = None
    operation_outcome: JsonDict | None = None


Outcome = Delivered | Refused


class Deliverer:
    """Posts report transactions to one FHIR server."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        token: str | None = None,
        backoff: DeliveryBackoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._headers = {"content-type": FHIR_JSON, "accept": FHIR_JSON}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._backoff = backoff or DeliveryBackoff()
        self._sleep = sleep

    @property
    def base_url(self) -> str:
        """The FHIR server's base URL."""
        return self._base_url

    async def deliver(self, report: JsonDict, fhir_version: FhirVersion | None = None) -> Outcome:
        """Send one report until the server answers for good, or the backoff gives up; its
        content type names ``fhir_version`` when given."""
        body = json.dumps(transaction_bundle(report), separators=(",", ":")).encode()
        headers = {**self._headers, "content-type": content_type(fhir_version)}
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._client.post(self._base_url, content=body, headers=headers)
            except (httpx.TransportError, TokenUnavailableError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                status = None
                asked = None
            else:
                if response.is_success:
                    return Delivered(response.status_code, attempt)
                status = response.status_code
                if status not in RETRIED_STATUSES:
                    return Refused(
                        f"the FHIR server answered {status}",
                        attempt,
                        status,
                        _operation_outcome(response),
                    )
                problem = f"the FHIR server answered {status}"
                asked = retry_after_s(response)
            pause = self._backoff.pause(attempt)
            if asked is not None:
                pause = max(pause, asked)
            if time.monotonic() - started + pause > self._backoff.give_up_after_s:
                return Refused(f"gave up after {attempt} attempts: {problem}", attempt, status)
            log.warning("report delivery failed: retrying", problem=problem, attempt=attempt)
            await self._sleep(pause)


def content_type(fhir_version: FhirVersion | None) -> str:
    """The content type of a report in ``fhir_version``: ``application/fhir+json;
    fhirVersion=4.0`` for R4; plain ``application/fhir+json`` when the version is unknown."""
    if fhir_version is None:
        return FHIR_JSON
    return f"{FHIR_JSON}; fhirVersion={MIME_VERSIONS[fhir_version]}"


def _operation_outcome(response: httpx.Response) -> JsonDict | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def undeliverable_event(
    report: JsonDict,
    refused: Refused,
    fhir_server: str,
    producer: Producer,
    correlation_id: str,
    fhir_version: FhirVersion | None = None,
) -> ReportUndeliverable:
    """The event recording a report the server did not take, with its answer (and its FHIR
    version, so that a replay is delivered labelled the same)."""
    return ReportUndeliverable(
        correlation_id=correlation_id,
        producer=producer,
        fhir_server=fhir_server,
        report=report,
        status_code=refused.status_code,
        operation_outcome=refused.operation_outcome,
        reason=refused.reason,
        attempts=refused.attempts,
        fhir_version=fhir_version,
    )


# Reports as reporting published them, and reports asked to be delivered again.
DELIVERED_FROM = [topics.REPORTS_DIAGNOSTIC, topics.REPORTS_DELIVERY_REQUESTS]


def report_of(record: ConsumedRecord) -> tuple[JsonDict, FhirVersion | None, Refused | None]:
    """The report a record asks to deliver (a report, or a DeliverReport command's) and its FHIR
    version (a report record's ``medmesh-schema`` header names it, a DeliverReport command
    carries it; None when neither does), or the record's text and why it holds none."""
    raw = {"raw": (record.value or b"").decode(errors="replace")}
    if record.topic == topics.REPORTS_DELIVERY_REQUESTS:
        try:
            command = DeliverReport.model_validate_json(record.value or b"")
        except ValidationError as exc:
            return raw, None, Refused(f"not a DeliverReport command: {error_reason(exc)}", 0)
        return command.report, command.fhir_version, None
    version = SCHEMA_VERSIONS.get(record_headers(record).get(h.SCHEMA) or "")
    try:
        report = json.loads(record.value or b"")
    except ValueError as exc:
        return raw, version, Refused(f"not a JSON report: {exc}", 0)
    return report, version, None


class DeliveryConsumer(Protocol):
    """The part of an AIOKafkaConsumer (read_committed, no auto commit) used here."""

    def subscribe(self, topics: Sequence[str]) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]: ...
    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...


class EventProducer(Protocol):
    """The part of an (idempotent, acks=all) AIOKafkaProducer used here."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any: ...


class DeliveryLoop:
    """Delivers every committed report once; refused ones go to medmesh.reports.undeliverable."""

    def __init__(
        self,
        clients: Callable[[], tuple[DeliveryConsumer, EventProducer]],
        deliverer: Deliverer,
        producer: Producer,
        restart_pause_s: float = 1.0,
    ) -> None:
        self._clients = clients
        self._deliverer = deliverer
        self._producer = producer
        self._restart_pause_s = restart_pause_s
        self.max_attempts = 3
        self.retry_backoff_s = 0.2
        self.delivered = 0
        self.undeliverable = 0

    async def run(self) -> None:
        """Deliver until cancelled; on a Kafka error start over from the committed offsets."""
        while True:
            consumer, kafka = self._clients()
            try:
                await kafka.start()
                consumer.subscribe(DELIVERED_FROM)
                await consumer.start()
                while True:
                    await self.process_batch(consumer, kafka)
            except Exception as exc:  # noqa: BLE001 -- logged, then the loop starts over
                log.warning(
                    "delivery loop failed: starting over", error=f"{type(exc).__name__}: {exc}"
                )
            finally:
                for client in (consumer, kafka):
                    with contextlib.suppress(Exception):
                        await client.stop()
            await asyncio.sleep(self._restart_pause_s)

    async def process_batch(self, consumer: DeliveryConsumer, kafka: EventProducer) -> int:
        """Deliver one batch of reports, committing each offset once its report is settled."""
        batch = await consumer.getmany(timeout_ms=500, max_records=50)
        count = 0
        for tp, records in batch.items():
            for record in records:
                await self.settle(record, kafka)
                await consumer.commit({tp: record.offset + 1})
                count += 1
        return count

    async def _delivered(self, report: Any, fhir_version: FhirVersion | None) -> Outcome:
        """The deliverer's outcome; an error it raises (a report it cannot handle: the
        deliverer itself retries what the server or the network may fix) is retried, then the
        report is refused with the error's kind, so that it cannot stall the partition."""
        try:
            async for attempt in retrying(self.max_attempts, self.retry_backoff_s):
                with attempt:
                    return await self._deliverer.deliver(report, fhir_version)
        except Exception as exc:  # noqa: BLE001 -- every attempt failed: the report is refused
            return Refused(
                f"delivering raised {self.max_attempts} times; last error: "
                + redact_text(f"{type(exc).__name__}: {exc}")[:500],
                self.max_attempts,
            )
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    async def settle(self, record: ConsumedRecord, kafka: EventProducer) -> Outcome:
        """Deliver one report record; record it as undeliverable when the server does not take it."""
        correlation_id = record_headers(record).get(h.CORRELATION_ID) or new_id()
        report, fhir_version, unreadable = report_of(record)
        outcome = unreadable or await self._delivered(report, fhir_version)
        if isinstance(outcome, Delivered):
            self.delivered += 1
            log.info(
                "report delivered",
                correlation_id=correlation_id,
                attempts=outcome.attempts,
                redelivery=record.topic == topics.REPORTS_DELIVERY_REQUESTS,
            )
            return outcome
        event = undeliverable_event(
            report, outcome, self._deliverer.base_url, self._producer, correlation_id, fhir_version
        )
        headers = message_headers(correlation_id, schema_of(ReportUndeliverable))
        await kafka.send_and_wait(
            topics.REPORTS_UNDELIVERABLE,
            to_wire(event),
            key=record.key,
            headers=[(k, v.encode()) for k, v in headers.items()],
        )
        self.undeliverable += 1
        log.warning("report undeliverable", correlation_id=correlation_id, reason=outcome.reason)
        return outcome
