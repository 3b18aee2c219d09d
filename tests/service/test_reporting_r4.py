"""Reports to an R4 source: published as fhir.R4+json and delivered with fhirVersion=4.0."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest
from aiokafka import TopicPartition

from medmesh_cli.ops.dlq import replay_of
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import (
    DeliverReport,
    FhirVersion,
    InferenceCompleted,
    Producer,
    ReportUndeliverable,
    SourceContext,
    to_wire,
)
from medmesh_contracts.modelspec import ModelSpec, load_spec
from medmesh_reporting.delivery import Deliverer, DeliveryLoop
from medmesh_reporting.report import build_report, validate_report
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_completed, make_request, make_task
from tests.fhir_receiver import FhirTestServer
from tests.service.conftest import SPECS_DIR
from tests.service.test_reporting_app import _header, _loop, _reports
from tests.service.test_reporting_delivery import ISSUED
from tests.transactional_kafka import FakeKafka, run_until

BASE = "https://fhir.hospital.test/r4"
PRODUCER = Producer(service="reporting", instance="t")


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The deterioration model's spec."""
    return load_spec(SPECS_DIR / "deterioration.yaml")


def _completed(fhir_version: FhirVersion, correlation_id: str = "req-r4") -> InferenceCompleted:
    source = SourceContext(channel="http", fhir_version=fhir_version, site="ward")
    request = make_request(correlation_id=correlation_id).model_copy(update={"source": source})
    return make_completed(make_task(request))


class _Record:
    def __init__(self, offset: int, value: bytes, topic: str, schema: str | None) -> None:
        self.topic = topic
        self.partition = 0
        self.offset = offset
        self.key = b"pseudo"
        self.value = value
        headers = [(h.CORRELATION_ID, b"req-r4")]
        if schema is not None:
            headers.append((h.SCHEMA, schema.encode()))
        self.headers = tuple(headers)


class _Consumer:
    def __init__(self, records: list[_Record]) -> None:
        self.records = records

    def subscribe(self, topics: Sequence[str]) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Any]]:
        records, self.records = self.records, []
        return {TopicPartition(topics.REPORTS_DIAGNOSTIC, 0): records} if records else {}

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        return None


class _Kafka:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any:
        self.sent.append((topic, value or b""))


async def _deliver(records: list[_Record], server: FhirTestServer) -> tuple[list[str], _Kafka]:
    """Run the delivery loop over ``records``; the content types the server was sent."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return server(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(record))
    consumer, kafka = _Consumer(records), _Kafka()
    loop = DeliveryLoop(lambda: (consumer, kafka), Deliverer(client, BASE), PRODUCER)
    await loop.process_batch(consumer, kafka)
    return [r.headers["content-type"] for r in seen], kafka


async def test_the_report_of_an_r4_source_is_labelled_r4() -> None:
    """A result of an R4 source becomes a conformant R4 report with the fhir.R4+json header."""
    kafka = FakeKafka()
    kafka.append(topics.INFERENCE_RESULTS, to_wire(_completed("R4")))

    await run_until(_loop(kafka), lambda: _reports(kafka))

    (report,) = _reports(kafka)
    bundle = json.loads(report.value or b"")
    assert _header(report, h.SCHEMA) == h.FHIR_R4_JSON
    assert check_report_bundle(bundle, fhir_version="R4") == []
    validate_report(bundle, "R4")


@pytest.mark.parametrize(
    ("schema", "content_type"),
    [
        (h.FHIR_R4_JSON, "application/fhir+json; fhirVersion=4.0"),
        (h.FHIR_R4B_JSON, "application/fhir+json; fhirVersion=4.3"),
        (h.FHIR_R5_JSON, "application/fhir+json; fhirVersion=5.0"),
        (None, "application/fhir+json"),
    ],
)
async def test_a_report_is_delivered_in_the_version_its_header_names(
    spec: ModelSpec, schema: str | None, content_type: str
) -> None:
    """The transaction's content type names the FHIR version of the report record's schema
    header (fhirVersion=4.0 for R4); a record without one is sent without it."""
    report = build_report(_completed("R4"), spec, issued=ISSUED)
    record = _Record(0, json.dumps(report).encode(), topics.REPORTS_DIAGNOSTIC, schema)

    content_types, kafka = await _deliver([record], FhirTestServer())

    assert content_types == [content_type]
    assert kafka.sent == []


async def test_a_refused_r4_report_is_replayed_as_r4(spec: ModelSpec) -> None:
    """A refused R4 report's undeliverable event says R4, its replay command carries R4, and
    the command is delivered with fhirVersion=4.0."""
    report = build_report(_completed("R4"), spec, issued=ISSUED)
    record = _Record(0, json.dumps(report).encode(), topics.REPORTS_DIAGNOSTIC, h.FHIR_R4_JSON)
    _, kafka = await _deliver([record], FhirTestServer(reject_when=lambda _b: "refused"))
    ((topic, value),) = kafka.sent
    event = ReportUndeliverable.model_validate_json(value)
    assert topic == topics.REPORTS_UNDELIVERABLE
    assert event.fhir_version == "R4"

    replay = replay_of(json.loads(value), b"pseudo", f"{topics.REPORTS_UNDELIVERABLE}/0/0")
    command = DeliverReport.model_validate_json(replay.value)
    assert command.fhir_version == "R4"
    requests = topics.REPORTS_DELIVERY_REQUESTS
    content_types, _ = await _deliver([_Record(0, replay.value, requests, None)], FhirTestServer())
    assert content_types == ["application/fhir+json; fhirVersion=4.0"]
